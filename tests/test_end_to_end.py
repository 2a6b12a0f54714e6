"""Real `accelerate launch` runs: the quick-start demo learns, DDP training runs, and evaluation is
exact whether one process or two share the split. One trained demo run is shared by the module."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(command, cwd, env_extra=None, timeout=600):
    # No ClearML server configured: runs track to an offline session under CLEARML_CACHE_DIR.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CLEARML_CACHE_DIR": str(Path(cwd) / "clearml"), "CLEARML_CONFIG_FILE": str(Path(cwd) / "none.conf"),
           **(env_extra or {})}
    for name in ("DATASET_PATH", "SBD_DATASET_PATH", "CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "CLEARML_TASK_ID"):
        env.pop(name, None)
    env = {k: v for k, v in env.items() if v is not None}  # env_extra NAME=None: unset it
    start = time.monotonic()
    # Its own process group: on a timeout the processes `accelerate launch` started go too, not only the launcher
    # (an orphaned trainer would keep a busy machine busy for the tests that follow).
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        # A busy machine, not a crash: say so, with what ran and how far it got.
        pytest.fail(f"too slow on this machine: {' '.join(map(str, command))} was still running after "
                    f"{time.monotonic() - start:.0f} s (limit {timeout} s; load average {os.getloadavg()[0]:.1f} "
                    f"on {os.cpu_count()} cores). Last output:\n{stdout[-2000:]}", pytrace=False)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, \
        f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def launch(*args, processes=1):
    """`accelerate launch` with one thread per process, so 1- and 2-process runs compute identically."""
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes == 1:
        return base + ["--cpu", "--num_processes", "1", *args]
    return base + ["--multi_gpu", "--num_processes", str(processes), *args]


def demo_env(workdir: Path) -> dict:
    """A user's fresh account: HOME is the work folder, so ~/.cache/vocseg and ~/.clearml are its own."""
    return {"HOME": str(workdir), "CLEARML_CACHE_DIR": str(workdir / ".clearml" / "cache"), "VOCSEG_CACHE": None}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The quick start exactly as a user runs it (no arguments but fewer steps), in an empty folder."""
    workdir = tmp_path_factory.mktemp("quickstart")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu.yaml"), str(REPO / "train.py"), "--max_train_steps", "100",
               "--eval_steps", "50", "--checkpointing_steps", "50", "--run_name", "demo-test"]
    result = run(command, cwd=workdir, env_extra=demo_env(workdir))
    return workdir, workdir / "outputs" / "demo-test", result


def test_quickstart_demo_learns_and_says_it_is_synthetic(demo_run):
    workdir, out, result = demo_run
    results = json.loads((out / "all_results.json").read_text())
    assert results["step"] == 100
    assert results["eval_mean_iou"] >= 0.3, results["eval_mean_iou"]
    assert "SYNTHETIC" in result.stdout and "DATASET_PATH" in result.stdout
    assert str(out / "best_model") in result.stdout or "outputs/demo-test/best_model" in result.stdout
    assert (workdir / ".cache" / "vocseg" / "synthetic-demo-v1-seed0" / "VOCdevkit" / "VOC2012").is_dir()
    assert "recipe demo: default recipe: the synthetic demo" in result.stdout.splitlines()[0]


def test_quickstart_log_reads_well_in_a_file(demo_run):
    """Not a terminal: no progress-bar redraws, a plain line every logging_steps with step/total and ETA."""
    _, _, result = demo_run
    assert "\r" not in result.stdout and "\r" not in result.stderr
    step_lines = [line for line in result.stdout.splitlines() if " | loss " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in step_lines] == ["25/100", "50/100", "75/100", "100/100"]
    assert all(" | ETA " in line and " img/s" in line for line in step_lines)


def test_readme_after_the_demo_commands_run_as_written(demo_run):
    workdir, _, _ = demo_run
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- after-demo:begin -->")[1].split("<!-- after-demo:end -->")[0]
    script = block.split("```bash")[1].split("```")[0]
    # This interpreter's bin first: `python` / `tensorboard` as the user's, whatever shims HOME would change.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in {**os.environ, **demo_env(workdir), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                             "PATH": path}.items() if v is not None}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"README block failed:\n{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "confusion_matrix/val" in result.stdout and "IoU_per_class/" in result.stdout  # tensorboard --inspect
    assert "mIoU" in result.stdout  # evaluate's table
    assert sorted(p.name for p in (workdir / "preds").iterdir()) == [
        f"2007_00000{i}{suffix}" for i in range(4) for suffix in (".png", "_overlay.jpg")]


def test_two_process_and_one_process_evaluation_are_identical(demo_run, tmp_path):
    workdir, out, _ = demo_run
    data_root = workdir / ".cache" / "vocseg" / "synthetic-demo-v1-seed0"
    common = ["-m", "vocseg", "evaluate", "--model", str(out / "best_model"), "--data_root", str(data_root),
              "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]
    # 7 images over 2 processes: the last batch is padded with a duplicate that must not be counted.
    run(launch(*common, "--max_samples", "7", "--output", str(tmp_path / "one.json")), cwd=REPO)
    run(launch(*common, "--max_samples", "7", "--output", str(tmp_path / "two.json"), processes=2), cwd=REPO,
        env_extra={"ACCELERATE_USE_CPU": "1"})
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["num_samples"] == two["num_samples"] == 7
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert one["mean_iou"] == two["mean_iou"]

    # The full val split scored by `evaluate` equals what the training run recorded for its best model.
    run(launch(*common, "--output", str(tmp_path / "full.json"), processes=2), cwd=REPO,
        env_extra={"ACCELERATE_USE_CPU": "1"})
    full = json.loads((tmp_path / "full.json").read_text())
    trained = json.loads((out / "all_results.json").read_text())
    history = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    best = next(h for h in history if h["step"] == trained["best_step"])
    assert full["mean_iou"] == pytest.approx(best["eval_mean_iou"], abs=1e-12)


def test_two_process_ddp_training_one_clearml_session_server_overrides_on_all_ranks(tmp_path, synthetic_tree):
    """2 real processes; the main one gets edited values from "the server" (a replayed edited clone, real
    Task.connect): both ranks must train with them, in the replay's own folder (the one the main process chose),
    and exactly one ClearML session is written."""
    tree, _ = synthetic_tree
    overrides = {"Optim": {"learning_rate": "0.0042", "lr_warmup_steps": "1"}, "General": {"max_train_steps": "4"}}
    result = run(launch(str(REPO / "tests" / "helpers" / "train_with_server_overrides.py"),
                        str(REPO / "train.py"), "--config", "demo", "--data_root",
                        str(tree), "--cache_dir", str(tmp_path / "cache"), "--crop_size", "48",
                        "--per_device_train_batch_size", "2", "--max_train_steps", "40", "--eval_steps", "4",
                        "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "recorded"),
                        "--num_debug_samples", "1", processes=2),
                 cwd=tmp_path,
                 env_extra={"ACCELERATE_USE_CPU": "1", "VOCSEG_TEST_SERVER_OVERRIDES": json.dumps(overrides),
                            "VOCSEG_OUTPUT_ROOT": str(tmp_path / "replays")})
    [out] = (tmp_path / "replays").iterdir()
    assert not (tmp_path / "recorded").exists()
    results = json.loads((out / "all_results.json").read_text())
    assert results["step"] == 4  # 40 on the command line, 4 from "the server": both ranks stopped at 4
    assert "identical on 2 process(es)" in result.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 0.0042
    sessions = [p for p in (tmp_path / "clearml" / "offline").glob("offline-*") if p.is_dir()]
    assert len(sessions) == 1
    assert "2 process(es)" in result.stdout
    assert "not using the synthetic demo data" in result.stdout and "SYNTHETIC" not in result.stdout
    assert result.stdout.count("checkpoint saved") == 2  # main process only: one line per event
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    # Each rank saved its own RNG state into the same, complete checkpoint.
    assert {p.name for p in (out / "checkpoints" / "step_0000004").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
