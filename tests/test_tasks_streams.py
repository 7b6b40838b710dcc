"""Named domain streams over the digits."""

from __future__ import annotations

import numpy as np
import pytest

from aiop.tasks.streams import STREAMS, Domain, Stream, StreamError, get_stream


def test_named_streams_and_unknown_name() -> None:
    assert "digits-c" in STREAMS
    spec = get_stream("digits-c")
    assert spec.domains[0] == Domain() and len({d.name for d in spec.domains}) == len(spec.domains)
    assert len(get_stream("digits-c-all").domains) == 16
    with pytest.raises(StreamError, match="valid streams: digits-c"):
        get_stream("cifar-c")


def test_domain_parse() -> None:
    assert Domain.parse("fog-3") == Domain("fog", 3)
    assert Domain.parse("clean").name == "clean"
    for bad in ("fog", "fog-9", "rain-2", "fog-x"):
        with pytest.raises(StreamError):
            Domain.parse(bad)


def test_stream_batches_and_sets() -> None:
    s = Stream(
        "digits-c-short",
        resolution=24,
        batch_size=8,
        steps_per_domain=3,
        eval_size=40,
        probe_size=20,
    )
    assert len(s) == 9
    assert [s.domain_index(t) for t in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = s.batch(4)
    assert x.shape == (8, 3, 24, 24) and x.dtype == np.float32 and y.shape == (8,)
    assert x.min() >= 0 and x.max() <= 1
    assert np.array_equal(x[:, 0], x[:, 1])  # grey digits repeated to three channels
    x2, y2 = Stream("digits-c-short", resolution=24, batch_size=8, steps_per_domain=3).batch(4)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)  # deterministic
    assert not np.array_equal(s.batch(3)[0], s.batch(4)[0])
    clean, _ = s.eval_set(0)
    noisy, labels = s.eval_set(1)
    assert clean.shape == noisy.shape == (40, 3, 24, 24) and labels.shape == (40,)
    assert np.abs(clean - noisy).mean() > 0.01
    assert s.probe_set(2)[0].shape == (20, 3, 24, 24)
    with pytest.raises(StreamError):
        s.batch(9)
    with pytest.raises(StreamError, match="batch_size"):
        Stream("digits-c", batch_size=0)
