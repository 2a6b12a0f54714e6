"""The training loop in-process: resume exactness, signals, bf16, accumulation, exports, config."""

import json
import signal

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import vocseg.engine as engine
from vocseg.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from vocseg.config import ConfigError, TrainConfig, load_recipe, parse_config
from vocseg.constants import VOC_CLASSES
from vocseg.models import build_model, load_model
from tests.helpers.scalars import logged_scalars


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

    def save_then_crash(accelerator, output_dir, step, limit, run_config=None):
        path = original_save(accelerator, output_dir, step, limit, run_config)
        if step == 2:
            raise SimulatedCrash
        return path

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        engine.train(tiny_config(tree, tmp_path / "crashed", cache))
    monkeypatch.setattr(engine, "save_checkpoint", original_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step_0000002"]

    # 2) Resume; SIGTERM arrives during step 4's logging: honoured at the next step (5: epoch 1, sample 8 of 12,
    #    mid-epoch), which saves and leaves cleanly.
    original_log = engine.log_train

    def log_then_signal(run):
        original_log(run)
        if run.state.step == 4:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(engine, "log_train", log_then_signal)
    stopped = engine.train(tiny_config(tree, tmp_path / "crashed", cache, resume_from_checkpoint="latest"))
    monkeypatch.setattr(engine, "log_train", original_log)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert stopped["interrupted"]
    assert list_checkpoints(tmp_path / "crashed")[-1].name == "step_0000005"
    assert not (tmp_path / "crashed" / "all_results.json").exists()

    # 3) Resume again to the end.
    resumed = engine.train(tiny_config(tree, tmp_path / "crashed", cache, resume_from_checkpoint="latest"))
    assert resumed["step"] == 6 and not resumed["interrupted"]
    assert_same_weights(final_weights(tmp_path / "reference", 6), final_weights(tmp_path / "crashed", 6))
    assert resumed["eval_mean_iou"] == reference["eval_mean_iou"]
    # Only complete checkpoints, at most checkpoints_total_limit (2), and no temp folders in checkpoints/.
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step_0000005", "step_0000006"]
    assert {p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()} == {"step_0000005", "step_0000006"}


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
    # Train figures beside the scores: the mean loss of the run's logged steps, its runtime and throughput.
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    assert written["train_loss"] == pytest.approx(sum(e["train_loss"] for e in logged) / 4, rel=1e-6)
    assert written["train_runtime"] > 0
    assert written["train_samples_per_second"] == pytest.approx(4 * 2 / written["train_runtime"], rel=1e-6)
    assert written["best_model_selected_on"] == "val"
    assert list(written["eval_per_category_iou"]) == list(VOC_CLASSES)
    assert written["step"] == 4 and written["best_step"] in (2, 4)
    assert written["best_eval_mean_iou"] >= written["eval_mean_iou"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "deeplabv3_mobilenet_v3_large"

    # The exported best model scores exactly what the training run recorded for it.
    history = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    best = next(h for h in history if h["step"] == written["best_step"])
    exported = load_model(out / "best_model")
    assert json.loads((out / "best_model" / "vocseg_model.json").read_text())["step"] == written["best_step"]
    card = (out / "best_model" / "README.md").read_text()  # the export explains itself
    assert card.startswith("---\n") and "deeplabv3_mobilenet_v3_large" in card
    assert f"{100 * written['best_eval_mean_iou']:.2f}" in card and "selected on val" in card
    from accelerate import Accelerator

    from vocseg.data import load_split
    from vocseg.data.transforms import build_eval_augment, with_augmentation
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    view = with_augmentation(load_split("val", tree, cache_dir=tmp_path / "cache"), build_eval_augment())
    matrix = engine.evaluate(exported, view, accelerator)
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
    lrs = logged_scalars(out)["lr_backbone_decay"]
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
        runs[precision] = {"dtypes": seen, "loss": logged_scalars(out)["train_loss"][0][1],
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
    with pytest.raises(ConfigError, match="--no_such_flag"):
        parse_config(["--config", "demo", "--no_such_flag", "1"])
    with pytest.raises(ConfigError, match="--crop_size"):
        parse_config(["--config", "demo", "--crop_size", "big"])


SHIPPED_RECIPES = ["demo", "deeplabv3_r101_voc_aug", "deeplabv3_r101_voc_aug_mmseg", "segformer_b2_voc_aug",
                   "segformer_b2_voc_aug_mmseg", "deeplabv3_r101_voc_sbd_ignite"]


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_shipped_recipes_parse(name):
    cfg = parse_config(["--config", name])
    assert cfg.recipe == name


def test_every_shipped_recipe_is_tested():
    from vocseg.config import CONFIGS_DIR

    assert sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) == sorted(SHIPPED_RECIPES)


def test_mmseg_control_recipes_are_mmseg_protocols():
    # configs/_base_/datasets/pascal_voc12.py, models/deeplabv3_r50-d8.py, schedules/schedule_20k.py (mmseg 0.x)
    cfg = parse_config(["--config", "deeplabv3_r101_voc_aug_mmseg"])
    assert (cfg.model, cfg.decode_head, cfg.resnet_stem, cfg.aux_weight, cfg.sync_bn) == (
        "deeplabv3_resnet101", "mmseg", "deep", 0.4, True)
    assert (cfg.scale_convention, cfg.resize_base, cfg.align, cfg.scale_min, cfg.scale_max, cfg.crop_size) == (
        "fit", [2048, 512], 1, 0.5, 2.0, 512)
    assert (cfg.cat_max_ratio, cfg.photometric, cfg.pad_fill, cfg.loss_average) == (0.75, "mmseg", "mean", "all")
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay, cfg.weight_decay_policy) == (
        "sgd", 0.01, 0.9, 0.0005, "all")
    assert (cfg.poly_power, cfg.min_learning_rate, cfg.max_train_steps, cfg.lr_warmup_steps) == (0.9, 1e-4, 20000, 0)
    assert cfg.global_batch_size == 16 == cfg.per_device_train_batch_size * 4
    segformer = parse_config(["--config", "segformer_b2_voc_aug_mmseg"])
    assert (segformer.scale_convention, segformer.align, segformer.weight_decay_policy, segformer.head_lr_mult,
            segformer.photometric, segformer.cat_max_ratio, segformer.loss_average) == (
        "fit", 32, "no_norm_pos", 10.0, "mmseg", 0.75, "all")
    # The project's best recipes change only what they document (each change is explained in the file).
    best = parse_config(["--config", "deeplabv3_r101_voc_aug"])
    differing = {k for k, v in best.to_dict().items() if v != cfg.to_dict()[k]} - {"recipe"}
    assert differing == {"loss_average"}
    best = parse_config(["--config", "segformer_b2_voc_aug"])
    differing = {k for k, v in best.to_dict().items() if v != segformer.to_dict()[k]} - {"recipe"}
    assert differing == {"loss_average"}


def test_fit_protocol_run_records_its_protocol_and_evaluate_reuses_it(synthetic_tree, tmp_path, capsys):
    tree, _ = synthetic_tree
    out = tmp_path / "fit"
    engine.train(tiny_config(tree, out, tmp_path / "cache", scale_convention="fit", resize_base=[96, 48], align=32,
                             cat_max_ratio=0.75, photometric="mmseg", pad_fill="mean", loss_average="all",
                             weight_decay_policy="no_norm_pos", max_train_steps=2, eval_steps=2,
                             checkpointing_steps=2, max_eval_samples=2, crop_size=32, global_batch_size=16))
    assert "differs from the recipe's global_batch_size 16" in capsys.readouterr().out
    written = json.loads((out / "all_results.json").read_text())
    assert written["best_model_selected_on"] == "val" and written["step"] == 2
    meta = json.loads((out / "best_model" / "vocseg_model.json").read_text())
    assert meta["eval_protocol"] == {"scale_convention": "fit", "resize_base": [96, 48], "align": 32}

    from vocseg.cli.evaluate import main

    def evaluate_cli(*flags):
        result = tmp_path / f"scores{len(flags)}.json"
        assert main(["--model", str(out / "best_model"), "--data_root", str(tree), "--cache_dir",
                     str(tmp_path / "cache"), "--num_workers", "0", "--max_samples", "2", "--output", str(result),
                     *flags]) == 0
        return json.loads(result.read_text())

    own = evaluate_cli()
    assert own["protocol"] == meta["eval_protocol"]
    assert own["mean_iou"] == written["best_eval_mean_iou"]  # the training run's evaluation, reproduced
    native = evaluate_cli("--scale_convention", "native", "--align", "1")
    assert native["protocol"]["scale_convention"] == "native"
    # Scored at the labels' native size either way: the same labelled pixels are counted.
    import numpy as np

    assert np.sum(native["confusion_matrix"], axis=1).tolist() == np.sum(own["confusion_matrix"], axis=1).tolist()


def test_default_recipe_follows_dataset_path(monkeypatch):
    monkeypatch.delenv("DATASET_PATH", raising=False)
    assert parse_config([]).recipe == "demo"
    monkeypatch.setenv("DATASET_PATH", "/data/VOCdevkit")
    assert parse_config([]).recipe == "deeplabv3_r101_voc_aug"


def test_tensorboard_holds_curves_per_class_iou_confusion_matrix_and_samples(synthetic_tree, tmp_path):
    """Without a ClearML server, TensorBoard must show a run completely: grouped scalars, per-class IoU, images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vocseg.summary import summary_lines

    tree, _ = synthetic_tree
    out = tmp_path / "tb"
    cfg = tiny_config(tree, out, tmp_path / "cache", tracker="tensorboard", max_train_steps=2, eval_steps=2,
                      checkpointing_steps=2, max_eval_samples=2, crop_size=32, num_debug_samples=2)
    results = engine.train(cfg)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert {"learning_rate/backbone_decay", "learning_rate/head_decay", "mIoU/val", "grad_norm/train"} <= set(scalars)
    logged = json.loads((out / "eval_results.jsonl").read_text().splitlines()[-1])
    per_class = {t.split("/", 1)[1] for t in scalars if t.startswith("IoU_per_class/")}
    assert per_class == {name for name, iou in logged["eval_per_category_iou"].items() if iou is not None}
    assert events.Scalars("mIoU/val")[-1].value == pytest.approx(logged["eval_mean_iou"], rel=1e-6)
    assert "confusion_matrix/val" in images
    val_ids = (tree / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[:2]
    assert {f"val_samples/{i}" for i in val_ids} <= set(images)
    assert results["tensorboard_dir"] == str(out / "tensorboard")
    assert f"tensorboard --logdir {out / 'tensorboard'}" in "\n".join(summary_lines(cfg, results))


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu_bf16", "multi_gpu_fp16", "multi_node"])
def test_accelerate_configs_load(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parent.parent / "accelerate_configs" / f"{name}.yaml"))
    expected = {"cpu": "no", "single_gpu": "bf16", "multi_gpu_bf16": "bf16", "multi_gpu_fp16": "fp16",
                "multi_node": "bf16"}[name]
    assert str(config.mixed_precision) == expected
    assert (config.num_machines == 2) == (name == "multi_node")


def test_resuming_from_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, capsys):
    from accelerate import Accelerator

    from vocseg.log import setup_logging
    from vocseg.run_folder import claim_folder

    setup_logging()
    accelerator = Accelerator(cpu=True)
    for step in (100, 200, 300):
        save_checkpoint(accelerator, tmp_path, step, total_limit=3)
    (tmp_path / "checkpoints" / "step_0000300" / "note").write_text("the abandoned future")
    earlier = tmp_path / "checkpoints" / "step_0000100"
    lock, resume = claim_folder(tmp_path, str(earlier), overwrite=False)
    lock.release()
    assert resume == earlier
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000100"]
    [aside] = (tmp_path / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000200", "step_0000300"]
    assert (aside / "step_0000300" / "note").read_text() == "the abandoned future"  # moved, not deleted
    said = capsys.readouterr().out
    assert "superseded" in said and "step_0000200, step_0000300" in said
    # The resumed run saves step 200 again: a new, complete checkpoint; `latest` is the resumed run's.
    save_checkpoint(accelerator, tmp_path, 200, total_limit=3)
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
                 "--output_dir", str(out), "--max_train_steps", "1", "--lr_warmup_steps", "0", "--eval_steps", "1",
                 "--crop_size", "32",
                 "--per_device_train_batch_size", "2", "--num_workers", "0", "--max_eval_samples", "1",
                 "--tracker", "none"]) == 0
    assert json.loads((out / "all_results.json").read_text())["step"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["recipe"] == "demo"
    assert "Finished 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("env, expected", [
    ({}, "all"),                                                          # python train.py
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, "all"),  # accelerate launch's fallback
    ({"OMP_NUM_THREADS": "1"}, 1),                                        # chosen outside the launcher
    ({"OMP_NUM_THREADS": "3", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 3),      # --num_cpu_threads_per_process 3
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO", "VOCSEG_CPU_THREADS": "1"}, 1),
])
def test_one_cpu_process_uses_every_core_unless_a_count_was_chosen(monkeypatch, env, expected):
    for name in ("OMP_NUM_THREADS", "ACCELERATE_DYNAMO_BACKEND", "VOCSEG_CPU_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 5)  # a count no default produces
    before = torch.get_num_threads()
    try:
        engine.configure_cpu_threads(True)
        assert torch.get_num_threads() == (5 if expected == "all" else expected)
        monkeypatch.setenv("WORLD_SIZE", "2")  # N processes: accelerate's per-process count stands
        torch.set_num_threads(1)
        engine.configure_cpu_threads(True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resume_with_another_accumulation_starts_each_window_on_a_step_boundary(synthetic_tree, tmp_path,
                                                                                 monkeypatch):
    """accelerate's load_state restores its micro-batch counter, which belongs to the old accumulation: resumed
    from step 1 (one micro-batch counted) with accumulation 2, the first window would close after one micro-batch."""
    tree, _ = synthetic_tree
    out, cache = tmp_path / "run", tmp_path / "cache"
    original_save = engine.save_checkpoint

    def save_then_crash(accelerator, output_dir, step, limit, run_config=None):
        original_save(accelerator, output_dir, step, limit, run_config)
        raise SimulatedCrash

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        engine.train(tiny_config(tree, out, cache, max_train_steps=4, checkpointing_steps=1, eval_steps=0))
    monkeypatch.setattr(engine, "save_checkpoint", original_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    micro_batches = []
    original_step = engine.train_micro_step

    def counted(run, batch):
        micro_batches.append((run.state.step + 1, len(batch["ids"])))
        return original_step(run, batch)

    monkeypatch.setattr(engine, "train_micro_step", counted)
    results = engine.train(tiny_config(tree, out, cache, max_train_steps=4, checkpointing_steps=4, eval_steps=0,
                                       resume_from_checkpoint="latest", per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert results["step"] == 4
    assert micro_batches == [(2, 2), (2, 2), (3, 2), (3, 2), (4, 2), (4, 2)]
