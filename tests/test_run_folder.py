"""A run folder belongs to one run: second runs are refused, overwrites move aside, resumes keep their config,
locks refuse a live owner and take over a dead one, and every bad flag is a one-line error."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

import vocseg.engine as engine
from vocseg.config import ConfigError, parse_args, parse_config, validate_config
from vocseg.errors import UsageError
from vocseg.run_folder import LOCK_FILE, acquire_lock, claim_folder

from .test_engine import tiny_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerator_state(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("DATASET_PATH", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_tree):
    """One finished 4-step run (checkpoints at 2 and 4, crop 48), shared by the tests that only read it."""
    tree, _ = synthetic_tree
    root = tmp_path_factory.mktemp("finished")
    AcceleratorState._reset_state(reset_partial_state=True)
    engine.train(tiny_config(tree, root / "run", root / "cache", max_train_steps=4, eval_steps=4,
                             checkpointing_steps=2, max_eval_samples=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    return tree, root / "run", root / "cache"


def test_a_second_run_on_a_finished_folder_is_refused_and_changes_nothing(finished_run, tmp_path):
    tree, out, cache = finished_run
    before = digest(out)
    with pytest.raises(UsageError, match="already holds a run") as error:
        engine.train(tiny_config(tree, out, cache, max_train_steps=2, learning_rate=0.5))
    assert "--resume_from_checkpoint latest" in str(error.value) and "--overwrite_output_dir" in str(error.value)
    assert digest(out) == before


def test_overwrite_moves_the_old_run_aside_intact(finished_run, tmp_path):
    tree, out, cache = finished_run
    copy = tmp_path / "run"
    import shutil
    shutil.copytree(out, copy)
    before = digest(copy)
    results = engine.train(tiny_config(tree, copy, cache, max_train_steps=1, eval_steps=1, checkpointing_steps=1,
                                       max_eval_samples=1, overwrite_output_dir=True))
    [aside] = tmp_path.glob("run.replaced-*")
    assert digest(aside) == before  # every checkpoint, the best model and the results moved, unchanged
    assert results["step"] == 1 and json.loads((copy / "all_results.json").read_text())["step"] == 1


def test_resume_takes_the_runs_config_and_refuses_a_changed_one(finished_run, tmp_path):
    tree, out, cache = finished_run
    hint = ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    parsed = parse_args(hint)
    saved = yaml.safe_load((out / "checkpoints" / "step_0000004" / "run_config.yaml").read_text())
    # The printed resume command alone restores every override of the run (crop 48, 4 steps, ...).
    assert {**parsed.cfg.to_dict(), "resume_from_checkpoint": None} == saved
    assert "resuming" in parsed.origin
    with pytest.raises(UsageError, match=r"crop_size: 48 -> 64"):
        engine.train(parse_config([*hint, "--crop_size", "64"]))
    assert yaml.safe_load((out / "config.yaml").read_text())["crop_size"] == 48  # not overwritten


def test_an_allowed_config_change_is_recorded_not_overwritten(finished_run, tmp_path):
    import shutil

    tree, out, cache = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    cfg = parse_config(["--output_dir", str(copy), "--resume_from_checkpoint", "latest", "--max_train_steps", "5",
                        "--allow_config_change"])
    results = engine.train(cfg)
    assert results["step"] == 5
    [change] = [json.loads(line) for line in (copy / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"max_train_steps": [4, 5]} and change["resumed_from"].endswith("step_0000004")
    assert yaml.safe_load((copy / "config.yaml").read_text())["max_train_steps"] == 4
    assert yaml.safe_load((copy / "checkpoints" / "step_0000005" / "run_config.yaml").read_text())[
        "max_train_steps"] == 5


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "token": "x"}
    (folder / LOCK_FILE).write_text(json.dumps(live))
    with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}"):
        claim_folder(folder, None, overwrite=False)
    with pytest.raises(UsageError, match="in use"):  # the early check, before a ClearML task is created
        engine.check_output_dir_free(folder, None, False)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_FILE).write_text(json.dumps({**live, "pid": int(dead.stdout)}))
    lock = acquire_lock(folder)
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()

    other_host = {**live, "host": "elsewhere"}  # cannot be checked from here: refused, with the way out
    (folder / LOCK_FILE).write_text(json.dumps(other_host))
    with pytest.raises(UsageError, match="delete .*vocseg.lock"):
        acquire_lock(folder)


def test_stale_temporary_folders_are_removed_when_the_next_run_takes_the_folder(tmp_path):
    folder = tmp_path / "run"
    for name in (".tmp-step_0000004", ".best_model.tmp-abc", ".best_model.old-def"):
        (folder / name).mkdir(parents=True)
        (folder / name / "partial.safetensors").write_bytes(b"0" * 100)
    (folder / "checkpoints" / "step_0000002").mkdir(parents=True)
    (folder / "checkpoints" / "step_0000002" / "model.safetensors").write_bytes(b"x")
    lock, resume = claim_folder(folder, "latest", overwrite=False)
    lock.release()
    assert resume.name == "step_0000002"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("flag,value,key", [
    ("crop_size", 0, "crop_size"), ("crop_size", -1, "crop_size"), ("per_device_train_batch_size", 0, None),
    ("gradient_accumulation_steps", 0, None), ("per_device_eval_batch_size", 0, None), ("num_workers", -1, None),
    ("learning_rate", float("nan"), None), ("learning_rate", 0.0, None), ("max_train_steps", 0, None),
    ("model", "resnet", None), ("scale_min", 0.0, None), ("weight_decay", -1.0, None), ("momentum", 1.5, None),
    ("min_learning_rate", 1.0, None), ("max_grad_norm", 0.0, None), ("lr_warmup_steps", 550, None)])
def test_impossible_values_are_one_line_errors_naming_the_key(flag, value, key):
    cfg = parse_config(["--config", "demo"])
    setattr(cfg, flag, value)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert message.startswith(key or flag) and "\n" not in message


def test_default_recipe_follows_real_data_given_by_flag_or_env(monkeypatch):
    assert parse_args([]).cfg.recipe == "demo"
    parsed = parse_args(["--data_root", "/data/VOCdevkit"])
    assert parsed.cfg.recipe == "deeplabv3_r101_voc_aug" and "--data_root" in parsed.origin
    monkeypatch.setenv("DATASET_PATH", "/data/VOCdevkit")
    parsed = parse_args([])
    assert parsed.cfg.recipe == "deeplabv3_r101_voc_aug" and "$DATASET_PATH" in parsed.origin
    assert parse_args(["--config", "demo"]).cfg.recipe == "demo"


def test_report_to_is_an_alias_of_tracker():
    assert parse_config(["--report_to", "tensorboard"]).tracker == "tensorboard"
    assert parse_config(["--report_to", "tensorboard,clearml"]).tracker == "all"
    assert parse_config(["--report_to", "none"]).tracker == "none"
    with pytest.raises(ConfigError, match="wandb"):
        parse_config(["--report_to", "wandb"])


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--max_train_steps", "30", "--lr_warmup_steps", "30"], "lr_warmup_steps = 30"),
    (["--crop_size", "big"], "argument --crop_size"),
    (["--config", "no_such_recipe"], "recipe no_such_recipe not found"),
    (["--data_root", "/no/such/voc"], "VOC root /no/such/voc does not exist")])
def test_train_py_user_errors_are_one_line_and_exit_2(tmp_path, args, expected):
    env = {**os.environ, "VOCSEG_CACHE": str(tmp_path), "CLEARML_CACHE_DIR": str(tmp_path / "clearml"),
           "CLEARML_CONFIG_FILE": str(tmp_path / "none.conf")}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--tracker", "none",
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [next(line for line in result.stderr.splitlines()
                                                       if line.startswith("error:"))]
    assert expected in result.stderr and "Traceback" not in result.stderr
