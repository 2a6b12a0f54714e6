import shutil

import pytest
from accelerate.state import AcceleratorState

from vocseg.data.synthetic import make_synthetic_tree


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    """A small VOC + SBD tree with planted SBD/VOC overlaps. Read-only: copy it before editing."""
    root = tmp_path_factory.mktemp("synthetic")
    manifest = make_synthetic_tree(root, num_train=12, num_val=5, sbd=True, num_sbd_only=6, seed=1, scale=0.3)
    return root, manifest


@pytest.fixture
def tree_copy(synthetic_tree, tmp_path):
    """A private copy of the synthetic tree that a test may break."""
    root, manifest = synthetic_tree
    copy = tmp_path / "tree"
    shutil.copytree(root, copy)
    return copy


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def fresh_accelerator_state(monkeypatch):
    """Each in-process run builds its own Accelerator (mixed precision may differ between tests)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
