"""train.py started as clearml-agent starts it (`python train.py`, CLEARML_TASK_ID set, no arguments), with
the server calls replaced (tests/helpers/train_as_clearml_agent.py): no ClearML server or agent exists on
these machines. What is real: train.py, the engine, the relaunch decision and command, the training run
in bf16 and its folder; what is simulated: the task the server would hand back and the server writes."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

from vocseg.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "tests" / "helpers" / "train_as_clearml_agent.py"
TASK_ID = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
CLONE_FOLDER = f"outputs/Clone_Of_original-{TASK_ID}"


def recorded_parameters(cfg: TrainConfig) -> dict:
    """The task's hyperparameters as the server returns them: "Section/key" -> string."""
    return {f"{section}/{key}": "" if value is None else str(value)
            for section, values in cfg.sections().items() for key, value in values.items()}


def replay(workdir: Path, recorded: TrainConfig, task_name: str = "Clone Of original"):
    env = {**os.environ, "CLEARML_TASK_ID": TASK_ID, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CLEARML_CACHE_DIR": str(workdir / "clearml"), "CLEARML_CONFIG_FILE": str(workdir / "none.conf"),
           "VOCSEG_TEST_RECORDED_TASK": json.dumps({"id": TASK_ID, "name": task_name,
                                                    "parameters": recorded_parameters(recorded)})}
    for name in ("DATASET_PATH", "SBD_DATASET_PATH", "CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "LOCAL_RANK",
                 "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "VOCSEG_OUTPUT_ROOT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, str(HELPER), str(REPO / "train.py")], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def original_run(tmp_path: Path) -> Path:
    """The folder of the run the task was cloned from: it must come out of the replay untouched."""
    original = tmp_path / "original"
    (original / "checkpoints" / "step_0000500").mkdir(parents=True)
    (original / "checkpoints" / "step_0000500" / "model.safetensors").write_bytes(b"original weights")
    (original / "best_model").mkdir()
    (original / "best_model" / "vocseg_model.json").write_text('{"step": 500}')
    (original / "eval_results.jsonl").write_text('{"step": 500}\n')
    return original


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_multi_process_replay_relaunches_with_the_recorded_processes_and_precision(tmp_path):
    recorded = TrainConfig(output_dir=str(original_run(tmp_path)), run_name="original", num_processes=2,
                           mixed_precision="bf16", resume_from_checkpoint="latest")
    out = replay(tmp_path, recorded)
    assert (f"clearml-agent replay of task {TASK_ID} (Clone Of original): 2 process(es), mixed precision bf16, "
            f"run folder {CLONE_FOLDER}") in out
    command = shlex.split(next(line for line in out.splitlines() if line.startswith("EXECV "))[len("EXECV "):])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    launch = launch_command_parser().parse_args(command[3:])
    assert launch.multi_gpu and launch.num_processes == 2 and launch.mixed_precision == "bf16"
    assert launch.training_script == str(REPO / "train.py") and launch.training_script_args == []
    assert not (tmp_path / "outputs").exists()  # relaunched before anything was built


@pytest.mark.slow
def test_a_single_process_clone_trains_in_its_own_folder_in_the_recorded_precision(tmp_path, synthetic_tree):
    tree, _ = synthetic_tree
    original = original_run(tmp_path)
    before = snapshot(original)
    recorded = TrainConfig(
        data_root=str(tree), train_split="train", val_split="val", model="segformer-b0", crop_size=32,
        per_device_train_batch_size=2, num_workers=0, optimizer="adamw", learning_rate=1e-3, max_train_steps=2,
        eval_steps=2, checkpointing_steps=2, logging_steps=1, cache_dir=str(tmp_path / "cache"), seed=0,
        recipe="original", num_debug_samples=1, max_eval_samples=2, num_processes=1, mixed_precision="bf16",
        output_dir=str(original), run_name="original", resume_from_checkpoint="latest")
    out = replay(tmp_path, recorded)

    assert "EXECV" not in out  # one process: trains in place
    assert "Finished 2 steps of segformer-b0" in out and "SYNTHETIC" not in out  # the summary of the task's config
    assert f"run folder {CLONE_FOLDER} (recorded: {original}), starting from step 0" in out
    assert "mixed precision bf16" in out  # the Accelerator was built with the recorded precision
    run = tmp_path / CLONE_FOLDER
    assert json.loads((run / "all_results.json").read_text())["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["mixed_precision"] == "bf16" and saved["output_dir"] == CLONE_FOLDER
    assert saved["resume_from_checkpoint"] is None and saved["learning_rate"] == 1e-3
    assert snapshot(original) == before  # the original's checkpoints, best model and history are untouched

    # What the replay wrote to "the server": its own folder, and no demo recipe as its configuration.
    assert f'FAKE-CLEARML set_parameter General/output_dir "{CLONE_FOLDER}"' in out
    assert 'FAKE-CLEARML set_parameter General/resume_from_checkpoint ""' in out
    assert f'"run_folder": "{run.resolve()}"' in out
    assert "set_configuration_object" not in out
    # The best model registered as the whole export folder, in place (no upload destination configured).
    prefix = "FAKE-CLEARML update_weights "
    registered = json.loads(next(line for line in out.splitlines() if line.startswith(prefix))[len(prefix):])
    assert registered == {"register_uri": str((run / "best_model").resolve()), "iteration": 2}
    assert 'FAKE-CLEARML set_all_metadata {"mIoU"' in out
