"""The training loop in-process: resume exactness, signals, bf16, accumulation, exports, config."""

import json
import signal

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import vocseg.engine as engine
from vocseg.checkpoint import list_checkpoints
from vocseg.config import ConfigError, TrainConfig, load_recipe, parse_config
from vocseg.constants import VOC_CLASSES
from vocseg.models import build_model, load_model
from tests.helpers.scalars import tensorboard_scalars


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def tiny_config(tree, out, cache, **overrides) -> TrainConfig:
    values = dict(data_root=str(tree), train_split="train", val_split="val", model="segformer-b0", crop_size=48,
                  per_device_train_batch_size=4, num_workers=0, optimizer="adamw", learning_rate=1e-3,
                  weight_decay=0.01, max_train_steps=6, eval_steps=3, checkpointing_steps=2, logging_steps=1,
                  output_dir=str(out), cache_dir=str(cache), seed=0, recipe="test", tracker="none")
    values.update(overrides)
    return TrainConfig(**values)


def final_weights(output_dir, step):
    return load_file(str(output_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


class SimulatedCrash(Exception):
    pass


def test_resume_after_crash_and_after_sigterm_equals_uninterrupted_run(synthetic_tree, tmp_path, monkeypatch):
    tree, _ = synthetic_tree
    cache = tmp_path / "cache"
    # 12 train images, batch 4, drop_last: 3 batches per epoch; 6 steps = 2 epochs. Step 2 and 4 are mid-epoch.
    reference = engine.train(tiny_config(tree, tmp_path / "reference", cache))
    assert reference["step"] == 6 and not reference["interrupted"]

    # 1) A hard crash right after the step-2 checkpoint (mid-epoch: 2 of 3 batches consumed).
    original_save = engine.save_checkpoint

    def save_then_crash(accelerator, output_dir, step, limit):
        path = original_save(accelerator, output_dir, step, limit)
        if step == 2:
            raise SimulatedCrash
        return path

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        engine.train(tiny_config(tree, tmp_path / "crashed", cache))
    monkeypatch.setattr(engine, "save_checkpoint", original_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step_0000002"]

    # 2) Resume; SIGTERM arrives at step 4 (epoch 1, batch 1 of 3): save and leave cleanly.
    original_log = engine.log_train

    def log_then_signal(accelerator, reporter, state, *args):
        original_log(accelerator, reporter, state, *args)
        if state.step == 4:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(engine, "log_train", log_then_signal)
    stopped = engine.train(tiny_config(tree, tmp_path / "crashed", cache, resume_from_checkpoint="latest"))
    monkeypatch.setattr(engine, "log_train", original_log)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert stopped["interrupted"]
    assert list_checkpoints(tmp_path / "crashed")[-1].name == "step_0000004"
    assert not (tmp_path / "crashed" / "all_results.json").exists()

    # 3) Resume again to the end.
    resumed = engine.train(tiny_config(tree, tmp_path / "crashed", cache, resume_from_checkpoint="latest"))
    assert resumed["step"] == 6 and not resumed["interrupted"]
    assert_same_weights(final_weights(tmp_path / "reference", 6), final_weights(tmp_path / "crashed", 6))
    assert resumed["eval_mean_iou"] == reference["eval_mean_iou"]
    # Only complete checkpoints, at most checkpoints_total_limit (2), and no temp folders in checkpoints/.
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step_0000004", "step_0000006"]
    assert {p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()} == {"step_0000004", "step_0000006"}


def test_results_file_and_exported_deeplab_reload(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    out = tmp_path / "run"
    results = engine.train(tiny_config(tree, out, tmp_path / "cache", model="deeplabv3_mobilenet_v3_large",
                                       optimizer="sgd", learning_rate=0.01, max_train_steps=4, eval_steps=2,
                                       checkpointing_steps=4, per_device_train_batch_size=2, max_grad_norm=1.0))
    written = json.loads((out / "all_results.json").read_text())
    assert results["step"] == written["step"] == 4
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou", "step",
                "epoch", "best_eval_mean_iou", "best_step"):
        assert key in written, key
    assert list(written["eval_per_category_iou"]) == list(VOC_CLASSES)
    assert written["step"] == 4 and written["best_step"] in (2, 4)
    assert written["best_eval_mean_iou"] >= written["eval_mean_iou"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "deeplabv3_mobilenet_v3_large"

    # The exported best model scores exactly what the training run recorded for it.
    history = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    best = next(h for h in history if h["step"] == written["best_step"])
    exported = load_model(out / "best_model")
    assert json.loads((out / "best_model" / "vocseg_model.json").read_text())["step"] == written["best_step"]
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from vocseg.data import load_split
    from vocseg.data.transforms import build_eval_augment, collate, with_augmentation
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    loader = DataLoader(with_augmentation(load_split("val", tree, cache_dir=tmp_path / "cache"), build_eval_augment()),
                        batch_size=1, collate_fn=collate)
    matrix = engine.evaluate(exported, loader, accelerator, exported.image_mean, exported.image_std)
    assert engine.eval_results(matrix)["eval_mean_iou"] == best["eval_mean_iou"]


def watch_built_model(monkeypatch, on_model):
    """Let a test hook into the model the engine builds (forward hooks, a reference to its weights)."""
    def build_and_watch(cfg):
        model = build_model(cfg)  # vocseg.models' own: a second call replaces the first watcher, not wraps it
        on_model(model)
        return model

    monkeypatch.setattr(engine, "build_model", build_and_watch)


def test_gradient_accumulation_run(synthetic_tree, tmp_path, monkeypatch):
    """2 micro-batches per optimiser step: 6 training forwards for 3 steps, one epoch, and the schedule
    advanced once per optimiser step (the lr logged after step s is the poly value at s of 3, not at 2s)."""
    tree, _ = synthetic_tree
    out = tmp_path / "accum"
    forwards = []
    watch_built_model(monkeypatch, lambda model: model.register_forward_hook(
        lambda module, inputs, output: forwards.append(module.training)))
    results = engine.train(tiny_config(tree, out, tmp_path / "cache", per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2, max_train_steps=3, eval_steps=3,
                                       checkpointing_steps=3, max_eval_samples=2, tracker="tensorboard"))
    assert results["step"] == 3
    assert json.loads((out / "all_results.json").read_text())["step"] == 3
    # 12 images / batch 2 = 6 batches per epoch = 3 optimiser steps: exactly one epoch was consumed.
    assert results["epoch"] == 1
    assert forwards.count(True) == 6
    lrs = tensorboard_scalars(out)["lr_backbone_decay"]
    assert lrs == [(s, pytest.approx(1e-3 * (1 - s / 3) ** 0.9, abs=1e-9)) for s in (1, 2, 3)]


def test_bf16_run(synthetic_tree, tmp_path, monkeypatch):
    """bf16 autocast really computes in bf16 (conv outputs are bf16, the loss differs from fp32) and stays close
    to fp32: the first loss within 1%, the weights after 2 AdamW steps within AdamW's step bound (|update| <=
    ~lr per step, so two runs from the same start differ by at most ~4 lr)."""
    tree, _ = synthetic_tree
    runs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what `accelerate launch --mixed_precision` sets
        seen, built = set(), []

        def watch(model, seen=seen, built=built):
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
            built.append(model)

        watch_built_model(monkeypatch, watch)
        out = tmp_path / precision
        results = engine.train(tiny_config(tree, out, tmp_path / "cache", max_train_steps=2, eval_steps=2,
                                           checkpointing_steps=2, max_eval_samples=1, crop_size=32,
                                           tracker="tensorboard"))
        assert (out / "all_results.json").exists() and results["step"] == 2
        runs[precision] = {"dtypes": seen, "loss": tensorboard_scalars(out)["train_loss"][0][1],
                           "weights": {k: v.detach().clone() for k, v in built[0].state_dict().items()}}
    assert runs["bf16"]["dtypes"] == {torch.bfloat16}, "the forward did not run under bf16 autocast"
    assert runs["no"]["dtypes"] == {torch.float32}
    fp32, bf16 = runs["no"]["loss"], runs["bf16"]["loss"]
    assert bf16 != fp32 and abs(bf16 - fp32) <= 0.01 * fp32, (bf16, fp32)
    differences = [(runs["bf16"]["weights"][k].float() - w.float()).abs().max().item()
                   for k, w in runs["no"]["weights"].items() if w.is_floating_point()]
    assert max(differences) > 0 and max(differences) <= 4.1 * 1e-3, max(differences)


def test_resume_latest_without_checkpoint_warns_and_starts_at_zero(synthetic_tree, tmp_path, capsys):
    tree, _ = synthetic_tree
    results = engine.train(tiny_config(tree, tmp_path / "fresh", tmp_path / "cache", max_train_steps=1,
                                       eval_steps=1, checkpointing_steps=1, max_eval_samples=1,
                                       resume_from_checkpoint="latest"))
    assert results["step"] == 1
    assert "no complete checkpoint" in capsys.readouterr().out


def test_config_cli_overrides_recipe_and_rejects_unknown_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: segformer-b2\nlearning_rate: 0.5\ncrop_size: 256\n")
    cfg = parse_config(["--config", str(recipe), "--learning_rate", "0.1", "--aux_loss", "false"])
    assert (cfg.model, cfg.learning_rate, cfg.crop_size, cfg.aux_loss, cfg.recipe) == ("segformer-b2", 0.1, 256,
                                                                                        False, "r")
    assert set(cfg.sections()) == {"General", "Data", "Model", "Optim"}
    recipe.write_text("model: segformer-b2\nlearnig_rate: 0.5\n")
    with pytest.raises(ConfigError, match="learnig_rate"):
        load_recipe(recipe)
    with pytest.raises(SystemExit):
        parse_config(["--config", "demo", "--no_such_flag", "1"])


@pytest.mark.parametrize("name", ["demo", "deeplabv3_r101_voc_aug", "segformer_b2_voc_aug",
                                  "deeplabv3_r101_voc_sbd_ignite"])
def test_shipped_recipes_parse(name):
    cfg = parse_config(["--config", name])
    assert cfg.recipe == name


def test_default_recipe_follows_dataset_path(monkeypatch):
    monkeypatch.delenv("DATASET_PATH", raising=False)
    assert parse_config([]).recipe == "demo"
    monkeypatch.setenv("DATASET_PATH", "/data/VOCdevkit")
    assert parse_config([]).recipe == "deeplabv3_r101_voc_aug"


def test_tensorboard_tracker_writes_scalars(synthetic_tree, tmp_path):
    tree, _ = synthetic_tree
    out = tmp_path / "tb"
    engine.train(tiny_config(tree, out, tmp_path / "cache", tracker="tensorboard", max_train_steps=2, eval_steps=2,
                             checkpointing_steps=2, max_eval_samples=1, crop_size=32))
    scalars = tensorboard_scalars(out)
    assert scalars, "no TensorBoard event file under output_dir"
    assert "train_loss" in scalars and "eval_mean_iou" in scalars
    assert [step for step, _ in scalars["train_loss"]] == [1, 2]


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu_bf16", "multi_gpu_fp16", "multi_node"])
def test_accelerate_configs_load(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parent.parent / "accelerate_configs" / f"{name}.yaml"))
    expected = {"cpu": "no", "single_gpu": "bf16", "multi_gpu_bf16": "bf16", "multi_gpu_fp16": "fp16",
                "multi_node": "bf16"}[name]
    assert str(config.mixed_precision) == expected
    assert (config.num_machines == 2) == (name == "multi_node")


def test_checkpoint_after_resuming_from_an_earlier_step_replaces_the_abandoned_future(tmp_path):
    from accelerate import Accelerator

    from vocseg.checkpoint import resolve_resume, save_checkpoint

    accelerator = Accelerator(cpu=True)
    for step in (100, 200, 300):
        save_checkpoint(accelerator, tmp_path, step, total_limit=3)
    (tmp_path / "checkpoints" / "step_0000200" / "abandoned").write_text("old run")
    # The run resumed from step 100 (e.g. with a lower lr) and now saves step 200 again.
    save_checkpoint(accelerator, tmp_path, 200, total_limit=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000100", "step_0000200"]
    assert not (tmp_path / "checkpoints" / "step_0000200" / "abandoned").exists()
    assert resolve_resume("latest", tmp_path).name == "step_0000200"
    assert not list(tmp_path.glob(".t*")), "temporary folders left behind"


def test_zero_interval_turns_periodic_actions_off():
    assert engine.every(10, 5) and not engine.every(10, 3) and not engine.every(10, 0)


def test_none_on_the_command_line_clears_a_recipe_value():
    cfg = parse_config(["--config", "segformer_b2_voc_aug", "--max_train_steps", "none", "--num_train_epochs", "3"])
    assert cfg.max_train_steps is None and cfg.num_train_epochs == 3


def test_vocseg_train_command_trains_from_a_recipe_name(synthetic_tree, tmp_path, capsys):
    """`vocseg train` (the console script of an installed package) = train.py: recipe by name, flags on top."""
    from vocseg.cli.train import main

    tree, _ = synthetic_tree
    out = tmp_path / "cli"
    assert main(["--config", "demo", "--data_root", str(tree), "--cache_dir", str(tmp_path / "cache"),
                 "--output_dir", str(out), "--max_train_steps", "1", "--eval_steps", "1", "--crop_size", "32",
                 "--per_device_train_batch_size", "2", "--num_workers", "0", "--max_eval_samples", "1",
                 "--tracker", "none"]) == 0
    assert json.loads((out / "all_results.json").read_text())["step"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["recipe"] == "demo"
    assert "Finished 1 steps" in capsys.readouterr().out
