"""The training maths, pinned by values: learning rate of every param group at every step, which tensors get
weight decay, the loss over labelled pixels, gradient accumulation == a larger batch, fp16 loss scaling.

Whole-loop properties go through the public entry `vocseg.engine.train(cfg)`; only `vocseg.engine.build_model`
is replaced, by the float64 toy of tests/toys.py, so that results can be recomputed exactly here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import vocseg.engine as engine
from vocseg.config import TrainConfig
from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from vocseg.models import build_model
from vocseg.optim import build_optimizer, build_scheduler
from tests.helpers.scalars import logged_scalars
from tests.toys import toy_model, write_flat_tree

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

GROUPS = ("backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay")


@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory):
    """16 train images of 24 x 32 without void pixels: every 24 x 24 crop has 576 labelled pixels."""
    return write_flat_tree(tmp_path_factory.mktemp("flat"), num_train=16, num_val=2, size=(24, 32), void=False)


@pytest.fixture(scope="module")
def void_tree(tmp_path_factory):
    """4 train images of 24 x 24 with ~20% void (255) pixels."""
    return write_flat_tree(tmp_path_factory.mktemp("void"), num_train=4, num_val=1, size=(24, 24), void=True, seed=1)


def toy_config(tree, out, **overrides) -> TrainConfig:
    """Scale 1 and a crop no larger than the images: no padding, no resizing, only crop offsets and flips."""
    values = dict(data_root=str(tree), train_split="train", val_split="val", model="deeplabv3_mobilenet_v3_large",
                  crop_size=24, scale_min=1.0, scale_max=1.0, per_device_train_batch_size=2, num_workers=0,
                  optimizer="sgd", momentum=0.9, learning_rate=0.1, head_lr_mult=10.0, weight_decay=0.0,
                  lr_warmup_steps=0, poly_power=0.9, min_learning_rate=0.0, max_train_steps=2, eval_steps=0,
                  checkpointing_steps=0, logging_steps=1, max_eval_samples=1, output_dir=str(out),
                  cache_dir=str(tree / "cache"), seed=0, recipe="maths", tracker="none")
    values.update(overrides)
    return TrainConfig(**values)


def train_toy(cfg: TrainConfig, monkeypatch, dtype=torch.float64):
    """Run the real engine on a fresh toy; return (initial model copy, trained model, results)."""
    model = toy_model(dtype)
    initial = copy.deepcopy(model)
    monkeypatch.setattr(engine, "build_model", lambda _cfg: model)
    results = engine.train(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    return initial, model, results


def expected_lr(step: int, base: float, warmup: int, total: int, power: float, min_lr: float) -> float:
    """The spec, written out again: linear warmup from 0, then poly from the group's peak to min_lr."""
    if step < warmup:
        return base * step / warmup
    return (base - min_lr) * (1 - (step - warmup) / (total - warmup)) ** power + min_lr


def group_of_each_parameter(model, optimizer) -> dict[str, dict]:
    by_id = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_group_warms_up_linearly_then_decays_to_min_learning_rate(optimizer):
    cfg = TrainConfig(optimizer=optimizer, learning_rate=0.01, head_lr_mult=10.0, lr_warmup_steps=3,
                      poly_power=0.9, min_learning_rate=1e-4)
    total = 10
    opt = build_optimizer(cfg, toy_model())
    scheduler = build_scheduler(cfg, opt, total)
    bases = {g["name"]: cfg.learning_rate * (10.0 if g["name"].startswith("head") else 1.0) for g in opt.param_groups}
    assert sorted(bases) == sorted(GROUPS)
    for step in range(total + 1):
        for group in opt.param_groups:
            want = expected_lr(step, bases[group["name"]], 3, total, 0.9, 1e-4)
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (step, group["name"])
        opt.step()
        scheduler.step()
    # The peak is each group's own lr; the end is min_learning_rate for every group, the x10 head too.
    assert expected_lr(3, 0.1, 3, total, 0.9, 1e-4) == pytest.approx(0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4] * 4, rel=1e-12)


def test_engine_steps_the_schedule_once_per_optimiser_step_in_every_group(flat_tree, tmp_path, monkeypatch):
    """Accumulating 2 micro-batches: the lr logged after step s is the schedule's value at s (not at 2s)."""
    out = tmp_path / "lr"
    cfg = toy_config(flat_tree, out, gradient_accumulation_steps=2, max_train_steps=6, lr_warmup_steps=2,
                     min_learning_rate=1e-4, tracker="tensorboard")
    train_toy(cfg, monkeypatch)
    logged = logged_scalars(out)
    for name in GROUPS:
        base = 0.1 * (10.0 if name.startswith("head") else 1.0)
        steps, values = zip(*logged[f"lr_{name}"])
        assert steps == (1, 2, 3, 4, 5, 6)
        want = [expected_lr(s, base, 2, 6, 0.9, 1e-4) for s in steps]
        assert values == pytest.approx(want, rel=1e-6), name
        assert values[1] == pytest.approx(base, rel=1e-6)  # the peak, at the end of the warmup
        assert values[-1] == pytest.approx(1e-4, rel=1e-6)  # min_learning_rate, head included


# --------------------------------------------------------------------------------------------- weight decay

def expected_decay(model, name: str) -> bool:
    """Decay the weights of convolutions / linear layers / embeddings; never biases or normalisation parameters."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    norm = isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm))
    return not (norm or name.endswith(".bias"))


@pytest.mark.parametrize("name", ["toy", "segformer-b0", "deeplabv3_mobilenet_v3_large"])
def test_weight_decay_goes_to_weights_not_to_norms_or_biases(name):
    model = toy_model() if name == "toy" else build_model(TrainConfig(model=name))
    cfg = TrainConfig(weight_decay=0.01, learning_rate=0.1, head_lr_mult=10.0)
    groups = group_of_each_parameter(model, build_optimizer(cfg, model))
    head_modules = {"decode_head", "classifier", "aux_classifier"}
    checked = {True: 0, False: 0}
    for param_name, group in groups.items():
        decay = expected_decay(model, param_name)
        head = bool(head_modules & set(param_name.split(".")))
        assert group["weight_decay"] == (0.01 if decay else 0.0), param_name
        assert group["lr"] == pytest.approx(1.0 if head else 0.1), param_name
        checked[decay] += 1
    assert checked[True] and checked[False]


def test_engine_applies_weight_decay_and_head_lr_to_the_right_tensors(flat_tree, tmp_path, monkeypatch):
    """One SGD step with and without weight decay, same data and weights: the difference is -lr_g * wd * w0
    for decayed tensors (lr_g = 10 x lr for the head) and exactly 0 for biases and norm parameters."""
    runs = {}
    for wd in (0.0, 0.01):
        cfg = toy_config(flat_tree, tmp_path / f"wd{wd}", weight_decay=wd, max_train_steps=1)
        initial, trained, _ = train_toy(cfg, monkeypatch)  # the same initial toy both times (seeded)
        runs[wd] = dict(trained.named_parameters())
    for name, w0 in initial.named_parameters():
        difference = (runs[0.01][name] - runs[0.0][name]).detach()
        lr = 1.0 if ".classifier." in name else 0.1
        if expected_decay(initial, name):
            torch.testing.assert_close(difference, -lr * 0.01 * w0.detach(), rtol=0, atol=1e-12, msg=name)
        else:
            assert torch.equal(difference, torch.zeros_like(difference)), f"{name} was decayed"
        assert not torch.equal(runs[0.0][name], w0), f"{name} did not train"


# --------------------------------------------------------------------------------------------- loss

def test_logged_loss_is_the_cross_entropy_over_labelled_pixels(void_tree, tmp_path, monkeypatch):
    """Batch = the whole train set, crop = the whole image: the first step's loss is the mean cross-entropy of
    the initial toy over every labelled pixel of the 4 images, 255 excluded. The toy is per pixel up to a
    per-image GroupNorm, so the random flips do not change it; recomputed here from the files."""
    out = tmp_path / "loss"
    cfg = toy_config(void_tree, out, per_device_train_batch_size=4, max_train_steps=1, tracker="tensorboard")
    initial, _, _ = train_toy(cfg, monkeypatch)
    voc = void_tree / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    images = np.stack([np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    labels = torch.from_numpy(np.stack([np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")) for i in ids]))
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        log_p = torch.log_softmax(initial(pixels)["logits"], dim=1)
    labelled = labels != IGNORE_INDEX
    picked = log_p.permute(0, 2, 3, 1)[labelled].gather(1, labels[labelled].long()[:, None])
    want = -picked.mean().item()
    [(step, got)] = logged_scalars(out)["train_loss"]
    assert step == 1 and got == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------------------------- accumulation

def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(flat_tree, tmp_path, monkeypatch):
    """Two optimiser steps of SGD (momentum, weight decay, x10 head, poly) in float64: the same weights to 1e-10.

    Exact only because every micro-batch has the same number of labelled pixels (no void pixels, fixed crop,
    scale 1): the engine averages the loss per micro-batch over its labelled pixels and accelerate divides by
    the accumulation steps, i.e. the mean of 4 micro-batch means, which equals the batch-of-8 mean only when the
    counts are equal. And the toy has no BatchNorm: batch statistics would differ between 2 and 8 samples.
    """
    big = toy_config(flat_tree, tmp_path / "batch8", per_device_train_batch_size=8, weight_decay=0.01)
    accumulated = toy_config(flat_tree, tmp_path / "accum4x2", per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, weight_decay=0.01)
    initial, model_big, results_big = train_toy(big, monkeypatch)
    _, model_accumulated, results_accumulated = train_toy(accumulated, monkeypatch)
    assert results_big["step"] == results_accumulated["step"] == 2
    for (name, w0), w_big, w_acc in zip(initial.named_parameters(), model_big.parameters(),
                                        model_accumulated.parameters()):
        assert w_big.dtype == torch.float64
        assert (w_big - w0).abs().max() > 1e-3, f"{name} barely moved: the comparison would prove nothing"
        torch.testing.assert_close(w_acc, w_big, rtol=0, atol=1e-10, msg=name)


# --------------------------------------------------------------------------------------------- fp16

@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="accelerate gives CPU runs no GradScaler and no fp16 autocast (fp16 on CPU trains in fp32)")
def test_fp16_scales_the_loss_and_skips_the_schedule_on_overflow(flat_tree, tmp_path, monkeypatch):
    """fp16 on CUDA: the forward runs in half precision, and a step whose gradients overflow is skipped by the
    GradScaler together with its scheduler step (written for CUDA; not run on this project's CPU machine)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    out = tmp_path / "fp16"
    model = toy_model(torch.float32)
    seen = set()
    model.inner.backbone.conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    calls = {"backward": 0}

    def poison_second_step(grad):  # an inf gradient in optimiser step 2 only: the scaler must skip that step
        calls["backward"] += 1
        return grad * float("inf") if calls["backward"] == 2 else grad

    model.inner.classifier.weight.register_hook(poison_second_step)
    monkeypatch.setattr(engine, "build_model", lambda _cfg: model)
    engine.train(toy_config(flat_tree, out, max_train_steps=4, lr_warmup_steps=0, tracker="tensorboard"))
    assert torch.float16 in seen
    lrs = [v for _, v in logged_scalars(out)["lr_backbone_decay"]]
    # Step 2 was skipped: its lr is still the one after step 1; the schedule then resumes one step late.
    assert lrs == pytest.approx([expected_lr(s, 0.1, 0, 4, 0.9, 0.0) for s in (1, 1, 2, 3)], rel=1e-6)
