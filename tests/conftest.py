import logging
import os
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState

# One thread per process: tiny test models gain nothing from more, and on a busy 2-core machine every extra
# OpenMP thread makes each small op wait for a descheduled peer (5x slower runs, measured). Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = os.environ["VOCSEG_CPU_THREADS"] = "1"
torch.set_num_threads(1)

from vocseg.data.synthetic import make_synthetic_tree  # noqa: E402 (after the thread setting)


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
def clearml_env(monkeypatch, tmp_path):
    """No server configured: vocseg must choose offline mode by itself. Yields the offline sessions folder.

    ClearML writes to os.environ itself (CLEARML_PROC_MASTER_ID, CLEARML_OFFLINE_MODE): restored afterwards, or a
    later test's subprocess inherits them and its Task.init returns a stub (it believes it is a child process).
    """
    saved_environment = dict(os.environ)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "no-clearml.conf"))
    for name in ("CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "CLEARML_TASK_ID", "ACCELERATE_MIXED_PRECISION",
                 "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "VOCSEG_CLEARML_TIMEOUT", "VOCSEG_OUTPUT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield tmp_path / "clearml" / "offline"
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(saved_environment)


@pytest.fixture(autouse=True)
def vocseg_logger_as_it_was():
    """train() gives the "vocseg" logger its own handler and stops propagation; a later test reading the log
    with caplog (a root handler) would see nothing. Each test leaves the logger as it found it."""
    logger = logging.getLogger("vocseg")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def fresh_accelerator_state(monkeypatch):
    """Each in-process run builds its own Accelerator (mixed precision may differ between tests)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
