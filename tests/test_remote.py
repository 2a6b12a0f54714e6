"""The decisions a run replayed by clearml-agent makes (vocseg.remote), tested directly: its folder, what it
resumes, its precision and the command that relaunches it."""

import dataclasses

import pytest
from accelerate.commands.launch import launch_command_parser

from vocseg.config import ConfigError, TrainConfig
from vocseg.remote import (ReplaySettings, relaunch_command, remote_output_dir, remote_resume, remote_run_config,
                           replay_settings, resolve_mixed_precision, safe_folder_name)

TASK_ID = "0f3a9c2e4b5d4e6f8a7b9c0d1e2f3a4b"


def make_checkpoint(run_dir, step):
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("name,expected", [
    ("demo-20240101-120000", "demo-20240101-120000"), ("Clone Of demo", "Clone_Of_demo"),
    ("a/b\\c:d", "a_b_c_d"), ("  ../../etc  ", "etc"), ("", "task"), ("ü" * 5, "task"), ("x" * 200, "x" * 80)])
def test_task_names_become_one_safe_folder_name(name, expected):
    assert safe_folder_name(name) == expected


def test_a_replay_gets_a_folder_of_its_own_named_after_the_task(tmp_path):
    root = tmp_path / "outputs"
    assert remote_output_dir("Clone Of demo", TASK_ID, root) == root / f"Clone_Of_demo-{TASK_ID}"
    other = "1" * 32
    assert remote_output_dir("Clone Of demo", other, root) != remote_output_dir("Clone Of demo", TASK_ID, root)


def test_a_renamed_task_finds_its_folder_by_id(tmp_path):
    root = tmp_path / "outputs"
    (root / f"old_name-{TASK_ID}").mkdir(parents=True)
    assert remote_output_dir("new name", TASK_ID, root) == root / f"old_name-{TASK_ID}"


def test_the_output_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCSEG_OUTPUT_ROOT", str(tmp_path / "runs"))
    assert remote_output_dir("t", TASK_ID) == tmp_path / "runs" / f"t-{TASK_ID}"
    monkeypatch.delenv("VOCSEG_OUTPUT_ROOT")
    assert str(remote_output_dir("t", TASK_ID)) == f"outputs/t-{TASK_ID}"


def test_a_malformed_task_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task id"):
        remote_output_dir("t", "../escape", tmp_path)


def test_a_task_restarted_under_its_own_id_resumes_its_own_folder(tmp_path):
    from vocseg.run_folder import claim_folder

    run = tmp_path / "run"
    assert remote_resume(run) is None  # no folder yet: a new task (a clone) starts from step 0
    (run / ".tmp-step_0000004").mkdir(parents=True)  # stopped during its first save: nothing complete yet
    (run / "config.yaml").write_text("model: segformer-b0\n")
    assert remote_resume(run) == "latest"
    lock, resume = claim_folder(run, remote_resume(run), overwrite=False)  # accepted: starts afresh...
    lock.release()
    assert resume is None and sorted(p.name for p in run.iterdir()) == []
    assert [(p / "config.yaml").is_file() for p in tmp_path.glob("run.replaced-*")] == [True]  # ...files kept aside
    make_checkpoint(run, 2)
    assert remote_resume(run) == "latest"
    lock, resume = claim_folder(run, remote_resume(run), overwrite=False)
    lock.release()
    assert resume.name == "step_0000002"


def test_a_clone_never_inherits_its_originals_folder_or_resume(tmp_path):
    original = tmp_path / "original"
    make_checkpoint(original, 500)
    recorded = TrainConfig(output_dir=str(original), run_name="original", resume_from_checkpoint="latest",
                           learning_rate=0.02, mixed_precision="bf16", num_processes=4)
    clone = remote_run_config(recorded, "Clone Of original", TASK_ID, tmp_path / "outputs")
    assert clone.output_dir == str(tmp_path / "outputs" / f"Clone_Of_original-{TASK_ID}")
    assert clone.run_name == f"Clone_Of_original-{TASK_ID}"
    assert clone.resume_from_checkpoint is None
    # Everything else is the recorded (possibly edited) config.
    unchanged = {f.name for f in dataclasses.fields(TrainConfig)} - {"output_dir", "run_name", "resume_from_checkpoint"}
    assert all(getattr(clone, k) == getattr(recorded, k) for k in unchanged)


def test_a_task_restarted_under_its_own_id_resumes_its_own_checkpoints(tmp_path):
    root = tmp_path / "outputs"
    first = remote_run_config(TrainConfig(resume_from_checkpoint=None), "demo", TASK_ID, root)
    assert first.resume_from_checkpoint is None
    make_checkpoint(root / f"demo-{TASK_ID}", 250)  # the preempted first attempt saved a checkpoint
    again = remote_run_config(TrainConfig(resume_from_checkpoint=None), "demo", TASK_ID, root)
    assert again.output_dir == first.output_dir and again.resume_from_checkpoint == "latest"


def test_precision_the_config_wins_then_the_launcher_then_fp32(monkeypatch):
    assert resolve_mixed_precision("bf16", "fp16") == "bf16"
    assert resolve_mixed_precision("no", "bf16") == "no"  # an explicit fp32 run stays fp32 under a bf16 launcher
    assert resolve_mixed_precision(None, "FP16") == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision(None) == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_mixed_precision(None) == "no"
    with pytest.raises(ConfigError, match="fp8"):
        resolve_mixed_precision(None, "fp8")


@pytest.mark.parametrize("recorded,expected", [
    ({"General/num_processes": "2", "General/mixed_precision": "bf16"}, ReplaySettings(2, "bf16")),
    ({"General/num_processes": "4.0", "General/mixed_precision": "fp16"}, ReplaySettings(4, "fp16")),
    ({"General/num_processes": "1", "General/mixed_precision": "no"}, ReplaySettings(1, "no")),
    ({"General/num_processes": "", "General/mixed_precision": ""}, ReplaySettings(1, "no")),
    ({}, ReplaySettings(1, "no")),  # a task recorded before these fields existed
])
def test_replay_settings_from_the_recorded_strings(recorded, expected):
    assert replay_settings({"Optim/learning_rate": "0.01", **recorded}) == expected


def test_bad_recorded_replay_settings_name_the_key():
    with pytest.raises(ConfigError, match="num_processes"):
        replay_settings({"General/num_processes": "two"})
    with pytest.raises(ConfigError, match="num_processes"):
        replay_settings({"General/num_processes": "0"})
    with pytest.raises(ConfigError, match="fp8"):
        replay_settings({"General/mixed_precision": "fp8"})


def test_one_process_replays_in_place():
    assert relaunch_command("/repo/train.py", ["--x", "1"], ReplaySettings(1, "bf16")) is None


def test_a_multi_process_replay_relaunches_under_accelerate_with_the_recorded_precision():
    command = relaunch_command("/repo/train.py", ["--config", "demo"], ReplaySettings(2, "bf16"), python="/py")
    assert command[:3] == ["/py", "-m", "accelerate.commands.launch"]
    # What accelerate's own parser makes of it (the command the agent's process is replaced with).
    args = launch_command_parser().parse_args(command[3:])
    assert args.multi_gpu and args.num_processes == 2 and args.num_machines == 1
    assert args.mixed_precision == "bf16"
    assert args.training_script == "/repo/train.py" and args.training_script_args == ["--config", "demo"]
