import numpy as np
import pytest

from aiop.tasks.digits import DataError, _load_source, load_digits_split, split_indices


@pytest.mark.parametrize(
    "source,shape,total", [("sklearn", (8, 8), 1797), ("mnist", (28, 28), 5000)]
)
def test_splits_partition_the_source_and_are_deterministic(source, shape, total):
    parts = [load_digits_split(source, s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == total
    for p in parts:
        assert p.images.shape[1:] == shape
        assert p.images.dtype == np.float32 and p.images.min() >= 0.0 and p.images.max() <= 1.0
        assert set(np.unique(p.labels)) == set(range(10))
    # The splits partition the source's indices.
    labels = load_digits_split(source, "train").labels
    idx = [
        set(split_indices(_load_source(source)[1], s).tolist()) for s in ("train", "val", "test")
    ]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == total and len(labels) == len(idx[0])
    again = load_digits_split(source, "val")
    np.testing.assert_array_equal(again.labels, parts[1].labels)
    other_seed = load_digits_split(source, "val", seed=1)
    assert not np.array_equal(other_seed.images, parts[1].images)


def test_bad_names_fail_clearly():
    with pytest.raises(DataError, match="unknown digit source"):
        load_digits_split("cifar", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_digits_split("mnist", "dev")
