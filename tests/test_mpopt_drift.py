"""Unsupervised drift detection: the detector on real corrupted digits, and the loop re-planning
on detected drift without the stream's domain boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mpopt_helpers import tiny_retrain_settings

from aiop.cli import load_predictor, main
from aiop.mpopt.drift import FEATURES, DriftDetector, DriftError, image_features
from aiop.mpopt.loop import RetrainError, RetrainLoop, RetrainSettings
from aiop.tasks.streams import Stream


def test_image_features_shape_and_bad_input() -> None:
    rng = np.random.default_rng(0)
    f = image_features(rng.random((5, 3, 16, 16), dtype=np.float32))
    assert f.shape == (5, 3 * len(FEATURES)) and np.isfinite(f).all()
    with pytest.raises(DriftError, match="batch, channels, height, width"):
        image_features(np.zeros((5, 16, 16)))


def test_stationary_input_raises_no_alarm_and_a_jump_does() -> None:
    rng = np.random.default_rng(1)
    det = DriftDetector()
    for step in range(200):
        assert det.update(rng.random((32, 1, 12, 12), dtype=np.float32), step) is None
    assert det.ready and det.events == []
    brighter = [rng.random((32, 1, 12, 12), dtype=np.float32) + 0.3 for _ in range(2)]
    assert det.update(brighter[0], 200) is None  # patience 2: one batch is not yet drift
    event = det.update(brighter[1], 201)
    assert event is not None and event.step == 201 and event.score > 1.0
    assert event.feature.startswith("mean")
    assert not det.ready  # a new reference starts after a detection


@pytest.mark.parametrize(
    "kw", [{"threshold": 0}, {"threshold": float("nan")}, {"patience": 0}, {"reference_batches": 0}]
)
def test_bad_settings(kw: dict[str, Any]) -> None:
    with pytest.raises(DriftError):
        DriftDetector(**kw)


def test_detects_every_corruption_change_of_digits_c() -> None:
    """On the real digits-c stream (8 domains), one event right after each of the 7 boundaries
    and none inside a domain, without being told where the boundaries are."""
    stream = Stream("digits-c", resolution=16, batch_size=32, steps_per_domain=6, seed=0)
    det = DriftDetector()
    events = [e for t in range(len(stream)) if (e := det.update(stream.batch(t)[0], t))]
    boundaries = [i * 6 for i in range(1, len(stream.domains))]
    assert [e.step for e in events] == [b + 1 for b in boundaries]  # patience 2: one step late


# -- the loop, blind to the stream's boundaries (slow: real training) -----------------------


def settings(**kw: Any) -> RetrainSettings:
    """Five steps per domain at batch 16 under a flat 40 MB: enough for the detector's
    reference batches before each boundary."""
    kw = {"budget_mb": 40, "steps_per_domain": 5, "batch_size": 16, **kw}
    return tiny_retrain_settings(**kw)


@pytest.mark.slow
def test_loop_replans_on_detected_drift_without_metadata(tmp_path: Path, aiop_cache: Path) -> None:
    report = RetrainLoop(
        settings(drift="detect"), load_predictor(None), tmp_path, progress=False
    ).run()
    reasons = [p["reason"] for p in report["plans"]]
    assert not any(r.startswith("domain") for r in reasons)  # boundaries were not used
    drifts = [p for p in report["plans"] if p["reason"].startswith("drift detected")]
    assert [p["domain"] for p in drifts] == ["gaussian_noise-4", "fog-4"]
    summary = report["drift_detection"]
    assert summary["boundaries"] == 2 and summary["boundaries_detected"] == 2
    assert summary["false_alarms"] == 0 and summary["mean_delay_steps"] == 1
    assert report["budget_violations"] == 0
    steps = sorted(r["step"] for r in report["steps"] if r["event"] != "oom-fallback")
    assert steps == list(range(15))


def test_bad_drift_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RetrainError, match="unknown drift mode"):
        settings(drift="sometimes")
    with pytest.raises(RetrainError, match="threshold must be positive"):
        settings(drift_threshold=-1.0)
    with pytest.raises(SystemExit) as info:  # argparse's own usage error: exit code 2
        main(["retrain", "--budget-mb", "100", "--drift-threshold", "-2"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--drift-threshold" in err.splitlines()[-1]
