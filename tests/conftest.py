"""Shared test settings."""

from pathlib import Path

import pytest
import torch

# On a 2-core machine shared with other work, intra-op threads contend and made
# small-tensor tests about 10× slower (PyG's scatter_add_ about 1000×); one thread
# is the fast and stable choice.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, whatever an earlier test set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def aiop_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``AIOP_CACHE_DIR`` in the session's temporary base: pretrained models and streams
    are built once per test session and shared by the retraining tests."""
    path = tmp_path_factory.getbasetemp() / "aiop-cache"
    monkeypatch.setenv("AIOP_CACHE_DIR", str(path))
    return path
