"""Run train.py (every rank runs this file) with test instruments switched on by environment variables:

VOCSEG_TEST_ID_LOG=PREFIX          append {"step", "ids"} of every micro-batch a rank trains on to PREFIX.rank<R>
VOCSEG_TEST_SIGNAL_AT_STEP=K       rank 0 sends SIGTERM to its parent (the launcher) once step K is done
VOCSEG_TEST_SIGNAL_IN_EVAL=1       rank 0 sends SIGTERM to the launcher when the first evaluation starts,
                                   and every evaluation batch takes 0.5 s longer (a long evaluation)
VOCSEG_TEST_RANK_CWD=DIR           each rank works in DIR/rank<R>: node-local disks, i.e. an output_dir
                                   that is not shared between the ranks
VOCSEG_TEST_BN_LOG=PREFIX          append a digest of the BatchNorm running statistics of each rank, before
                                   and after they are shared for an evaluation, to PREFIX.rank<R>

Usage: python -m accelerate.commands.launch ... tests/helpers/train_instrumented.py train.py ARGS...
"""

import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import vocseg.engine as engine

RANK = int(os.environ.get("RANK", "0"))

if os.environ.get("VOCSEG_TEST_RANK_CWD"):
    folder = Path(os.environ["VOCSEG_TEST_RANK_CWD"]) / f"rank{RANK}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)

if os.environ.get("VOCSEG_TEST_ID_LOG"):
    _micro_step = engine.train_micro_step

    def logged_micro_step(run, batch):
        with open(f"{os.environ['VOCSEG_TEST_ID_LOG']}.rank{RANK}", "a") as f:
            f.write(json.dumps({"step": run.state.step + 1, "ids": list(batch["ids"])}) + "\n")
        return _micro_step(run, batch)

    engine.train_micro_step = logged_micro_step

if os.environ.get("VOCSEG_TEST_BN_LOG"):
    import hashlib

    _share = engine.share_batchnorm_statistics

    def digest(model):
        buffers = [b for name, b in sorted(model.named_buffers()) if "running_" in name]
        return hashlib.sha1(b"".join(b.detach().cpu().numpy().tobytes() for b in buffers)).hexdigest()

    def logged_share(model, accelerator):
        before = digest(model)
        _share(model, accelerator)
        with open(f"{os.environ['VOCSEG_TEST_BN_LOG']}.rank{RANK}", "a") as f:
            f.write(json.dumps({"before": before, "after": digest(model)}) + "\n")

    engine.share_batchnorm_statistics = logged_share

if os.environ.get("VOCSEG_TEST_SIGNAL_AT_STEP"):
    _advance = engine.advance

    def advance_then_signal(run):
        _advance(run)
        if RANK == 0 and run.state.step == int(os.environ["VOCSEG_TEST_SIGNAL_AT_STEP"]):
            os.kill(os.getppid(), signal.SIGTERM)

    engine.advance = advance_then_signal

if os.environ.get("VOCSEG_TEST_SIGNAL_IN_EVAL"):
    _evaluate, _forward = engine.evaluate, engine.forward_for_eval
    signalled = []

    def evaluate_then_signal(*args, **kwargs):
        if RANK == 0 and not signalled:
            signalled.append(True)
            print("TEST: SIGTERM to the launcher during evaluation", flush=True)
            os.kill(os.getppid(), signal.SIGTERM)
        return _evaluate(*args, **kwargs)

    def slow_forward(*args, **kwargs):
        time.sleep(0.5)
        return _forward(*args, **kwargs)

    engine.evaluate, engine.forward_for_eval = evaluate_then_signal, slow_forward

sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
