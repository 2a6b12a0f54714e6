"""Runs that go wrong say so and keep their last good state: divergence, a huge val image, a full disk,
evaluation batches, and the exit code of a run stopped by a signal."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import vocseg.checkpoint as checkpoint
import vocseg.engine as engine
from vocseg.checkpoint import list_checkpoints
from vocseg.constants import VOC_PALETTE_FLAT
from vocseg.errors import DiskFull, EvaluationFailed, TrainingDiverged

from .test_engine import tiny_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerator_state(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def all_weight_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_divergence_stops_with_the_step_named_and_saves_no_nonfinite_weights(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    out = tmp_path / "diverged"
    # Logging every 3 steps: the check rides on the syncs the loop makes anyway, and checkpoints (every step)
    # must still never be written from non-finite weights.
    cfg = tiny_config(tree, out, tmp_path / "cache", optimizer="sgd", learning_rate=1e8, weight_decay=0.0,
                      max_train_steps=8, eval_steps=4, checkpointing_steps=1, logging_steps=3, crop_size=32)
    with pytest.raises(TrainingDiverged) as error:
        engine.train(cfg)
    message = str(error.value)
    assert "non-finite at step" in message and "\n" not in message
    first_bad = int(message.split("non-finite at step ")[1].split()[0])
    assert 1 <= first_bad <= 8
    saved = list_checkpoints(out)
    assert all(int(p.name.split("_")[1]) < first_bad for p in saved)
    assert (str(saved[-1]) in message) if saved else ("no checkpoint" in message)
    for file in all_weight_files(out):
        for name, tensor in load_file(str(file)).items():
            assert torch.isfinite(tensor).all(), f"{file}: {name} is not finite"
    assert not (out / "all_results.json").exists()


def test_skip_mode_skips_nonfinite_steps_then_gives_up(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    cfg = tiny_config(tree, tmp_path / "skip", tmp_path / "cache", optimizer="sgd", learning_rate=1e8,
                      weight_decay=0.0, max_train_steps=30, eval_steps=0, checkpointing_steps=0, logging_steps=30,
                      crop_size=32, on_nonfinite="skip", max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged, match="3 steps with a non-finite loss"):
        engine.train(cfg)


def write_huge_val_image(tree: Path, height: int = 3000, width: int = 4500) -> str:
    """Replace the first val image (and its mask) by a huge one, as a user's broken download might hold."""
    voc = tree / "VOCdevkit" / "VOC2012"
    first = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    image = np.full((height, width, 3), 90, np.uint8)
    image[: height // 2] = (200, 30, 30)
    Image.fromarray(image).save(voc / "JPEGImages" / f"{first}.jpg", quality=70)
    mask = Image.fromarray(np.where(np.arange(height)[:, None] < height // 2, 1, 0).astype(np.uint8).repeat(width, 1))
    mask.putpalette(VOC_PALETTE_FLAT)
    mask.save(voc / "SegmentationClass" / f"{first}.png")
    return first


def test_huge_val_image_fails_evaluation_after_the_checkpoint_and_max_eval_size_fixes_it(tree_copy, tmp_path,
                                                                                         monkeypatch):
    """The image is real (4500x3000 in the val split); its out-of-memory failure is injected at the model's
    forward for inputs over 4000 px, because a real one needs more memory than the test machine has (and
    SegFormer's memory-efficient attention would first compute for minutes)."""
    from vocseg.models import SegmentationModel

    real_forward = SegmentationModel.forward

    def forward_that_runs_out_of_memory(self, pixel_values, output_size=None):
        if max(pixel_values.shape[-2:]) > 4000:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2831155200000 bytes")
        return real_forward(self, pixel_values, output_size)

    monkeypatch.setattr(SegmentationModel, "forward", forward_that_runs_out_of_memory)
    huge = write_huge_val_image(tree_copy)
    out = tmp_path / "huge"
    cfg = tiny_config(tree_copy, out, tmp_path / "cache", max_train_steps=3, eval_steps=2, checkpointing_steps=2,
                      crop_size=32)
    with pytest.raises(EvaluationFailed) as error:
        engine.train(cfg)
    message = str(error.value)
    assert huge in message and "4500x3000" in message and "--max_eval_size" in message and "\n" not in message
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002"]  # saved before the evaluation failed

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = engine.train(tiny_config(tree_copy, out, tmp_path / "cache", max_train_steps=3, eval_steps=2,
                                       checkpointing_steps=2, crop_size=32, resume_from_checkpoint="latest",
                                       max_eval_size=256))
    assert resumed["step"] == 3 and resumed["eval_mean_iou"] is not None


def test_full_disk_is_one_line_naming_the_folder_and_leaves_no_partial_checkpoint(synthetic_tree, tmp_path,
                                                                                  monkeypatch):
    tree, _ = synthetic_tree
    out = tmp_path / "full"
    real_save_state = Accelerator.save_state

    def save_then_run_out_of_space(self, output_dir=None, **kwargs):
        if "step_0000004" in str(output_dir):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 4096)  # a partial write...
            raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_then_run_out_of_space)
    with pytest.raises(DiskFull) as error:
        engine.train(tiny_config(tree, out, tmp_path / "cache", max_train_steps=6, eval_steps=0,
                                 checkpointing_steps=2, crop_size=32))
    message = str(error.value)
    assert str(out) in message and "bytes needed" in message and "\n" not in message
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002"]
    assert not list(out.glob(".tmp-*"))


def test_checkpoint_refused_up_front_when_free_space_is_below_the_last_checkpoint(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(torch.nn.Linear(100, 100))
    checkpoint.save_checkpoint(accelerator, tmp_path, 1, total_limit=None)
    size = checkpoint.folder_size(tmp_path / "checkpoints" / "step_0000001")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, size // 2))
    with pytest.raises(DiskFull, match=f"{size} bytes needed .* {size // 2} free"):
        checkpoint.save_checkpoint(accelerator, tmp_path, 2, total_limit=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"] and not list(tmp_path.glob(".tmp-*"))


def test_evaluation_batch_3_gives_the_same_confusion_matrix_as_batch_1(synthetic_tree, tmp_path):
    from vocseg.data import load_split
    from vocseg.data.transforms import build_eval_augment, collate, with_augmentation
    from vocseg.models import build_model
    from vocseg.sampling import eval_batches, sample_sizes

    tree, _ = synthetic_tree
    dataset = load_split("train", tree, cache_dir=tmp_path / "cache")
    sizes = sample_sizes(dataset)
    assert max(len(b) for b in eval_batches(sizes, 3, 0, 1)) > 1, "no two images share a size: test would be vacuous"
    torch.manual_seed(0)
    model = build_model(tiny_config(tree, tmp_path, tmp_path)).eval()
    view = with_augmentation(dataset, build_eval_augment())
    accelerator = Accelerator(cpu=True)
    one = engine.evaluate(model, view, accelerator, engine.EvalOptions(batch_size=1))
    three = engine.evaluate(model, view, accelerator, engine.EvalOptions(batch_size=3))
    assert torch.equal(one, three) and one.sum() > 0
    # What grouping avoids: padding a smaller image into a batch changes what the model predicts for it.
    small, large = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])[:: len(sizes) - 1]
    padded = collate([view[small], view[large]])
    alone = collate([view[small]])
    with torch.no_grad():
        norm = engine.prepare_inputs
        h, w = sizes[small]
        in_batch = model(norm(padded, model.image_mean, model.image_std, False))["logits"][0, :, :h, :w]
        by_itself = model(norm(alone, model.image_mean, model.image_std, False))["logits"][0]
    assert not torch.allclose(in_batch, by_itself)


@pytest.mark.slow
def test_sigterm_exits_with_code_3_and_the_run_resumes(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    out = tmp_path / "stopped"
    env = {**os.environ, "TQDM_DISABLE": "1", "CLEARML_CONFIG_FILE": str(tmp_path / "none.conf")}
    command = [sys.executable, str(REPO / "train.py"), "--config", "demo", "--data_root", str(tree),
               "--cache_dir", str(tmp_path / "cache"), "--crop_size", "32", "--per_device_train_batch_size", "2",
               "--max_train_steps", "400", "--eval_steps", "0", "--checkpointing_steps", "0", "--logging_steps", "1",
               "--lr_warmup_steps", "0", "--output_dir", str(out), "--tracker", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 240
    for line in process.stdout:
        lines.append(line)
        if "step 3/400" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    signalled = time.monotonic()
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 3, output[-3000:]
    assert time.monotonic() - signalled < 30  # well inside a scheduler's grace period
    assert "stopped by SIGTERM" in output
    stopped_at = list_checkpoints(out)[-1]
    assert int(stopped_at.name.split("_")[1]) in (4, 5)  # the step after the signal arrived

    resume = [sys.executable, str(REPO / "train.py"), "--output_dir", str(out), "--resume_from_checkpoint", "latest",
              "--max_train_steps", "8", "--allow_config_change"]
    result = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"resumed from {stopped_at}" in result.stdout and "Finished 8 steps" in result.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    out = tmp_path / "aborted"
    env = {**os.environ, "TQDM_DISABLE": "1", "CLEARML_CONFIG_FILE": str(tmp_path / "none.conf")}
    command = [sys.executable, str(REPO / "train.py"), "--config", "demo", "--data_root", str(tree),
               "--cache_dir", str(tmp_path / "cache"), "--crop_size", "96", "--max_train_steps", "400",
               "--eval_steps", "0", "--checkpointing_steps", "0", "--logging_steps", "1", "--output_dir", str(out),
               "--tracker", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if "step 2/400" in line:
            break
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("aborted (second Ctrl-C)")
    assert "Traceback" not in stderr
    assert not list_checkpoints(out)  # nothing saved: the user asked to leave at once
