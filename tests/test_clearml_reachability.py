"""A configured ClearML server that does not answer never hangs a run or a command.

Local listeners on 127.0.0.1 play the server (tests/clearml_listeners.py): one accepts and never answers,
one answers HTTP 502, one answers the probe and then stalls (so Task.init itself must be bounded).
Before vocseg checked for an answer, a run against the first two hung in Task.init for minutes.
"""

import socket
import time

import pytest
from clearml import Task

import vocseg.engine as engine
from tests.clearml_listeners import (BadGateway, StallingApi, forget_clearml_offline_state, http_server,
                                     point_clearml_at, silent_server)
from tests.test_tracking import run_config, sessions
from vocseg import tracking
from vocseg.cli import clearml_import, compare
from vocseg.clearml_connection import REACHABILITY_TIMEOUT_S, unreachable_reason
from vocseg.config import TrainConfig
from vocseg.log import setup_logging

# What a run spends before training besides the probe: an offline Task.init, git and package reads, the
# Accelerator. Measured 0.9 s (502) and 3.5 s (silent, 3 s probe included) on 2 busy cores; before the fix
# these runs had not started training after 150 s.
SETUP_ALLOWANCE_S = 8.0
TASK_IDS = ["0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"]
LISTENERS = {"silent": silent_server, "bad_gateway": lambda: http_server(BadGateway)}


@pytest.fixture(params=sorted(LISTENERS))
def dead_server(request, monkeypatch, clearml_env):
    """A configured server that accepts and never answers, or answers 502."""
    with LISTENERS[request.param]() as url:
        point_clearml_at(monkeypatch, url)
        yield url


@pytest.fixture
def stalling_server(monkeypatch, clearml_env):
    """A server that answers debug.ping and auth.login, then nothing; Task.init gets 2 s."""
    with http_server(StallingApi) as url:
        point_clearml_at(monkeypatch, url)
        monkeypatch.setenv("VOCSEG_CLEARML_TIMEOUT", "2")
        forget_clearml_offline_state()
        yield url
    forget_clearml_offline_state()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_the_probe_tells_each_kind_of_dead_server_apart_within_its_timeout():
    def probe(url):
        start = time.monotonic()
        reason = unreachable_reason(url, timeout=1.0)
        return reason, time.monotonic() - start

    with silent_server() as url:
        reason, seconds = probe(url)
        assert reason == f"ClearML server {url} is unreachable (no answer to debug.ping within 1 s)"
        assert 0.9 <= seconds < 3.0
    with http_server(BadGateway) as url:
        reason, seconds = probe(url)
        assert reason == f"ClearML server {url} is unreachable (debug.ping answered HTTP 502)" and seconds < 2.0
    url = closed_port_url()
    reason, seconds = probe(url)
    assert reason.startswith(f"ClearML server {url} is unreachable (ConnectionError") and seconds < 2.0
    with http_server(StallingApi) as url:
        assert probe(url)[0] is None  # answers the ping: reachable


def test_a_run_against_a_server_that_does_not_answer_goes_offline_and_finishes(
        dead_server, synthetic_tree, tmp_path, clearml_env, monkeypatch, capsys):
    tree, _ = synthetic_tree
    started = {}
    build_model = engine.build_model

    def timed_build_model(cfg):  # the first thing train() builds once the run is set up
        started.setdefault("training", time.monotonic())
        return build_model(cfg)

    monkeypatch.setattr(engine, "build_model", timed_build_model)
    start = time.monotonic()
    results = engine.train(run_config(tree, tmp_path / "run", tmp_path / "cache", max_train_steps=1, eval_steps=1,
                                      checkpointing_steps=1, num_debug_samples=0))
    setup_seconds = started["training"] - start
    assert results["step"] == 1 and results["clearml_offline_session"]
    assert len(sessions(clearml_env)) == 1
    out = capsys.readouterr().out
    assert out.count(f"ClearML runs offline: ClearML server {dead_server} is unreachable") == 1
    assert setup_seconds < REACHABILITY_TIMEOUT_S + SETUP_ALLOWANCE_S, setup_seconds


def test_task_init_is_bounded_when_the_server_stalls_after_the_probe(stalling_server, tmp_path, capsys):
    setup_logging()  # as train() does: vocseg's lines on stdout
    cfg = TrainConfig(run_name="stalled", output_dir=str(tmp_path / "run"), mixed_precision="no")
    start = time.monotonic()
    task, offline = tracking.start_task(cfg, world_size=1)
    seconds = time.monotonic() - start
    try:
        assert offline and task.id.startswith("offline-") and Task.current_task() is task
        assert task.get_offline_mode_folder().is_dir()
        assert "ClearML runs offline: ClearML Task.init did not finish within 2 s" in capsys.readouterr().out
        assert seconds < 2 + SETUP_ALLOWANCE_S, seconds
    finally:
        task.close()


def test_an_interrupted_init_that_already_registered_its_task_does_not_leak_into_the_offline_run(
        stalling_server, tmp_path, monkeypatch):
    """Task.init sets the process's main task before its last server calls; interrupted there, the offline
    Task.init that follows must not hand that half-made online task back."""
    real_init = Task.init
    half_made = object()

    def init_that_stalls_after_registering(**kwargs):
        if Task.is_offline():
            return real_init(**kwargs)
        Task._Task__main_task = half_made
        time.sleep(60)

    monkeypatch.setattr(Task, "init", init_that_stalls_after_registering)
    task, offline = tracking.start_task(TrainConfig(run_name="half", output_dir=str(tmp_path / "run")), world_size=1)
    try:
        assert offline and task is not half_made and task.id.startswith("offline-")
        assert Task.current_task() is task
    finally:
        task.close()


def test_compare_and_clearml_import_do_not_hang_on_a_server_that_does_not_answer(dead_server, tmp_path, capsys):
    start = time.monotonic()
    assert compare.main(TASK_IDS) == 2
    assert time.monotonic() - start < REACHABILITY_TIMEOUT_S + 3
    assert f"error: ClearML server {dead_server} is unreachable" in capsys.readouterr().err

    session = tmp_path / "offline-0123.zip"
    session.write_bytes(b"")
    start = time.monotonic()
    assert clearml_import.main([str(session)]) == 2
    assert time.monotonic() - start < REACHABILITY_TIMEOUT_S + 3
    assert f"error: ClearML server {dead_server} is unreachable" in capsys.readouterr().err


def test_compare_is_bounded_when_the_server_stalls_after_the_probe(stalling_server, capsys):
    start = time.monotonic()
    assert compare.main(TASK_IDS[:1]) == 2
    assert time.monotonic() - start < 2 + REACHABILITY_TIMEOUT_S + 3
    assert f"error: reading {TASK_IDS[0]} from the ClearML server did not finish within 2 s" in capsys.readouterr().err


def test_compare_names_a_missing_session_file(tmp_path, capsys, clearml_env):
    assert compare.main([str(tmp_path / "offline-gone.zip")]) == 2
    assert "no such offline session" in capsys.readouterr().err


def test_the_deadline_interrupts_a_blocking_call_and_keeps_an_outer_alarm():
    import signal

    from vocseg.clearml_connection import ClearMLTimeout, deadline

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *args: fired.append("outer"))
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        start = time.monotonic()
        with pytest.raises(ClearMLTimeout, match="a blocking read did not finish within 0.5 s"):
            quiet, other_end = socket.socketpair()
            with deadline(0.5, "a blocking read"), quiet, other_end:
                quiet.recv(1)  # nothing ever arrives
        assert 0.4 < time.monotonic() - start < 2.0
        assert 1.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 2.6  # the outer alarm still counts down
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []
