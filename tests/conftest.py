import os
import shutil

import pytest
import torch

# One thread per process: tiny test models gain nothing from more, and on a busy 2-core machine every extra
# OpenMP thread makes each small op wait for a descheduled peer (5x slower runs, measured). Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

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
