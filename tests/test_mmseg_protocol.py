"""mmseg's training / test protocol: fitted scales, cat_max_ratio crops, PhotoMetricDistortion, mean padding,
evaluation at native label size, the loss averaging, and the config keys that switch them on."""

import math
import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vocseg.config import (ConfigError, TrainConfig, config_from_dict, global_batch_warning, parse_config,
                           validate_config)
from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from vocseg.data.transforms import (PhotoMetricDistortion, RandomScaleCrop, build_eval_augment, build_train_augment,
                                    collate, normalize_on_device, resize_to_protocol)
from vocseg.losses import cross_entropy, segmentation_loss
from vocseg.protocol import ScaleProtocol


def fitted_by_hand(height, width, long=2048, short=512):
    """mmcv.rescale_size written out: the largest factor that keeps both sides inside (long, short)."""
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


# ------------------------------------------------------------------------------------------------ scales


def draw_scaled_sizes(transform, shape, count, seed=0):
    transform.set_random_seed(seed)
    return np.array([transform.get_params_dependent_on_data({"shape": shape}, {})["scaled"] for _ in range(count)])


@pytest.mark.parametrize("shape", [(375, 500), (120, 1000)])  # short side limits VOC; the long side a panorama
def test_fit_scales_are_uniform_ratios_of_the_fitted_size(shape):
    count = 4000
    fitted_h, fitted_w = fitted_by_hand(*shape)
    transform = RandomScaleCrop(64, (0.5, 2.0), resize_base=(2048, 512))
    sizes = draw_scaled_sizes(transform, shape, count)
    ratios = np.sort(sizes[:, 0] / fitted_h)
    # Each drawn size is r x the fitted size (r ~ U(0.5, 2)) up to mmseg's integer truncations: the box
    # int(2048 r) x int(512 r) loses < 1 px of the limiting side, the final rounding < 0.5 px.
    slack = 2.0 / fitted_h
    assert ratios[0] >= 0.5 - slack and ratios[-1] <= 2.0 + slack
    # Kolmogorov-Smirnov distance to U(0.5, 2): P(D > 1.95 / sqrt(n)) ~ 0.001 for a correct sampler.
    uniform_cdf = np.clip((ratios - 0.5) / 1.5, 0, 1)
    empirical = np.arange(1, count + 1) / count
    distance = max(np.abs(empirical - uniform_cdf).max(), np.abs(empirical - 1 / count - uniform_cdf).max())
    assert distance < 1.95 / math.sqrt(count) + slack / 1.5
    # Mean ratio 1.25, standard error 1.5 / sqrt(12 n): 4.5 standard errors, plus the truncation bias.
    assert abs(ratios.mean() - 1.25) < 4.5 * 1.5 / math.sqrt(12 * count) + slack
    # Both sides scale together: the aspect ratio is the image's, to rounding.
    assert np.all(np.abs(sizes[:, 1] - sizes[:, 0] * shape[1] / shape[0]) <= 1 + shape[1] / shape[0])


def test_fit_scale_formula_per_draw_and_native_unchanged():
    transform = RandomScaleCrop(64, (0.5, 2.0), resize_base=(2048, 512))
    for ratio in (0.5, 0.731, 1.0, 1.37, 2.0):
        box = (int(2048 * ratio), int(512 * ratio))
        assert transform.scaled_size(375, 500, ratio) == fitted_by_hand(375, 500, *box)
    assert fitted_by_hand(375, 500) == (512, 683)  # VOC: short side 512, 1.37x native
    # Without resize_base the draw is albumentations' RandomScale of the stored size, as before.
    native = draw_scaled_sizes(RandomScaleCrop(64, (0.5, 2.0)), (375, 500), 2000)
    assert 0.5 - 1 / 375 <= (native[:, 0] / 375).min() and (native[:, 0] / 375).max() <= 2.0  # int() truncates
    assert abs((native[:, 0] / 375).mean() - 1.25) < 0.03


# ------------------------------------------------------------------------------------------ cat_max_ratio


def count_draws(transform, mask, seed=0):
    draws = []
    original = transform._draw_crop

    def counted(*args):
        draws.append(args)
        return original(*args)

    transform._draw_crop = counted
    transform.set_random_seed(seed)
    params = transform.get_params_dependent_on_data({"shape": mask.shape + (3,)}, {"mask": mask})
    crop = transform.apply_to_mask(mask, **params)
    return len(draws), crop


def striped_mask(size=200, every=10):
    """Class 1 with one column in `every` of class 2: any 40x40 crop is 90% class 1, 10% class 2."""
    mask = np.ones((size, size), np.uint8)
    mask[:, ::every] = 2
    return mask


def test_a_crop_where_one_class_covers_90_percent_is_redrawn_at_most_10_times():
    mask = striped_mask()
    strict = RandomScaleCrop(40, (1.0, 1.0), cat_max_ratio=0.75)
    draws, crop = count_draws(strict, mask)
    share = np.bincount(crop.ravel(), minlength=3)[1] / crop.size
    assert 0.85 <= share <= 0.95
    assert draws == 11  # the first draw and mmseg's 10 redraws; the last one is kept unchecked
    lenient = RandomScaleCrop(40, (1.0, 1.0), cat_max_ratio=0.95)
    assert count_draws(lenient, mask)[0] == 1  # 90% < 95%: accepted at once
    off = RandomScaleCrop(40, (1.0, 1.0))
    assert count_draws(off, mask)[0] == 1
    # 255 does not count: half ignore + half class 1 is 100% of the labelled pixels, a single class.
    ignored = np.full((200, 200), IGNORE_INDEX, np.uint8)
    ignored[:, ::2] = 1
    assert count_draws(RandomScaleCrop(40, (1.0, 1.0), cat_max_ratio=0.75), ignored)[0] == 11


def test_redraws_find_the_varied_crops_mmseg_would_keep():
    # Class 1 everywhere but a 100x100 block of class 2 in a corner: most 64x64 crops are single-class.
    mask = np.ones((256, 256), np.uint8)
    mask[:100, :100] = 2

    def varied(crop):
        counts = np.bincount(crop.ravel(), minlength=3)[1:3]
        return counts.min() > 0 and counts.max() / counts.sum() < 0.75

    accepted = 0
    for seed in range(200):
        draws, crop = count_draws(RandomScaleCrop(64, (1.0, 1.0), cat_max_ratio=0.75), mask, seed)
        if draws < 11:  # stopped early: the crop passed mmseg's test
            assert varied(crop)
            accepted += 1
    by_chance = sum(varied(count_draws(RandomScaleCrop(64, (1.0, 1.0)), mask, seed)[1]) for seed in range(200))
    # One draw passes with probability p (by_chance / 200); ten checked draws with 1 - (1 - p)^10.
    p = by_chance / 200
    assert 5 <= by_chance <= 60
    expected = 200 * (1 - (1 - p) ** 10)
    assert accepted > 2.5 * by_chance and abs(accepted - expected) < 0.25 * expected + 15


def test_image_and_mask_share_the_accepted_crop():
    rng = np.random.default_rng(0)
    mask = np.ones((150, 200), np.uint8)
    mask[40:90, 60:140] = 7
    image = np.stack([mask * 30, mask * 20, rng.integers(0, 5, mask.shape)], -1).astype(np.uint8)
    augment = build_train_augment(64, (0.5, 2.0), protocol=ScaleProtocol("fit", (400, 100)), cat_max_ratio=0.75,
                                  hflip=True)
    for seed in range(20):
        augment.set_random_seed(seed)
        out = augment(image=image, mask=mask)
        labels, pixels = out["mask"].numpy(), out["image"].numpy()
        inside = labels != IGNORE_INDEX
        # Interior pixels: the red channel is 30 x label exactly where a 3x3 neighbourhood agrees.
        same = np.ones_like(labels, bool)
        padded = np.pad(labels.astype(int), 1, constant_values=-1)
        for dy in range(3):
            for dx in range(3):
                same &= padded[dy:dy + 64, dx:dx + 64] == labels
        interior = same & inside
        assert np.abs(pixels[0][interior].astype(int) - 30 * labels[interior]).max(initial=0) <= 1


# -------------------------------------------------------------------------------- PhotoMetricDistortion


class NumpyRandomShim:
    """`numpy.random` as mmseg's module uses it (randint with exclusive upper end, uniform), on a Generator."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def randint(self, low, high=None):
        return self.rng.integers(low) if high is None else self.rng.integers(low, high)

    def uniform(self, low, high):
        return self.rng.uniform(low, high)


def mmseg_photometric_distortion(bgr, random):
    """mmseg 0.x PhotoMetricDistortion.__call__ (mmseg/datasets/pipelines/transforms.py), step by step, on BGR."""
    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(img):
        if random.randint(2):
            return convert(img, beta=random.uniform(-32, 32))
        return img

    def contrast(img):
        if random.randint(2):
            return convert(img, alpha=random.uniform(0.5, 1.5))
        return img

    def saturation(img):
        if random.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv
            img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(0.5, 1.5))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)  # mmcv.hsv2bgr
        return img

    def hue(img):
        if random.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    img = brightness(bgr)
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    img = saturation(img)
    img = hue(img)
    if mode == 0:
        img = contrast(img)
    return img


def test_photometric_distortion_equals_mmseg_on_fixed_seeds():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    rgb[:5] = 255  # saturated and black pixels exercise the clipping
    rgb[5:10] = 0
    transform = PhotoMetricDistortion()
    applied = {"brightness": set(), "contrast": set(), "saturation": set(), "hue": set(), "contrast_first": set()}
    for seed in range(120):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        ours = transform(image=rgb.copy())["image"]
        reference = mmseg_photometric_distortion(rgb[..., ::-1].copy(), NumpyRandomShim(seed))[..., ::-1]
        assert ours.dtype == np.uint8 and np.array_equal(ours, reference), f"seed {seed} differs"
        for key, value in transform.params.items():
            if key in applied:
                applied[key].add(value is not None if key != "contrast_first" else value)
    assert all(seen == {True, False} for seen in applied.values()), applied  # every branch both ways


def test_photometric_distortion_changes_colours_within_mmseg_ranges():
    grey = np.full((8, 8, 3), 128, np.uint8)
    transform = PhotoMetricDistortion()
    means = []
    for seed in range(200):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = transform(image=grey)["image"]
        means.append(out.mean())
    means = np.array(means)
    # Grey has no saturation or hue to change: brightness +-32 then contrast x0.5..1.5 in either order.
    assert means.min() >= 0.5 * (128 - 32) - 1 and means.max() <= 1.5 * (128 + 32) + 1
    assert (means == 128).mean() > 0.15  # ~1/4 of draws leave it alone (no brightness, no contrast)


# ------------------------------------------------------------------------------------------------ padding


def test_mean_padding_normalises_to_zero_and_zero_padding_stays_black():
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.ones((30, 40), np.uint8)
    # uint8 rounding of the mean colour: at most 0.5 / (255 * std) per channel, std >= 0.224 -> < 0.0088.
    tolerance = 0.5 / (255 * min(IMAGENET_STD))
    for photometric in ("none", "mmseg", "jitter"):
        augment = build_train_augment(96, (1.0, 1.0), photometric=photometric, pad_fill="mean")
        augment.set_random_seed(0)
        out = augment(image=image, mask=mask)
        padding = out["mask"] == IGNORE_INDEX
        assert padding.float().mean() > 0.8  # 30x40 of 96x96 is image, the rest padding
        normalised = normalize_on_device(out["image"][None], IMAGENET_MEAN, IMAGENET_STD)[0]
        assert normalised[:, padding].abs().max() < tolerance  # colour changes happen before padding
    black = build_train_augment(96, (1.0, 1.0), pad_fill="zero")(image=image, mask=mask)
    normalised = normalize_on_device(black["image"][None])[0]
    assert torch.allclose(normalised[:, black["mask"] == IGNORE_INDEX].mean(1),
                          -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD), atol=1e-5)


# ---------------------------------------------------------------------------------------- evaluation size


class ColourOracle(nn.Module):
    """A pointwise 'model': the class is the red channel / 10 (logits peak there), so it is right wherever the
    image shows the label's colour, and padding or misplaced pixels score wrong."""

    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, pixel_values, output_size=None):
        red = pixel_values[:, :1] * (IMAGENET_STD[0] * 255) + IMAGENET_MEAN[0] * 255
        classes = torch.arange(21, dtype=torch.float32).view(1, 21, 1, 1) * 10
        logits = -((red - classes) ** 2) / 25.0
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return {"logits": logits}


def colour_sample(height, width, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        mask[y:y + 20, x:x + 25] = rng.integers(1, 21)
    mask[:2] = IGNORE_INDEX
    red = (mask.astype(np.int64) * 10) % 256
    image = np.stack([red, np.full_like(red, 90), np.full_like(red, 40)], -1).astype(np.uint8)
    image[mask == IGNORE_INDEX] = 0
    return image, mask


def test_fit_evaluation_resizes_the_image_and_scores_at_the_native_label_size():
    from accelerate import Accelerator

    from vocseg.data.transforms import normalize_on_device
    from vocseg.engine import EvalOptions, evaluate, forward_for_eval
    from vocseg.metrics import batch_confusion_matrices

    protocol = ScaleProtocol("fit", (400, 100), align=32)
    augment = build_eval_augment(protocol=protocol)
    samples = []
    for index, (height, width) in enumerate([(75, 100), (60, 110)]):
        image, mask = colour_sample(height, width, index)
        out = augment(image=image, mask=mask)
        fitted = fitted_by_hand(height, width, 400, 100)
        aligned = tuple(-(-side // 32) * 32 for side in fitted)
        assert tuple(out["image"].shape[-2:]) == aligned == protocol.eval_size(height, width)
        assert tuple(out["mask"].shape) == (height, width)  # the label is never resized
        samples.append({"id": f"s{index}", "pixel_values": out["image"], "labels": out["mask"].long()})
    batch = collate(samples)
    assert batch["image_sizes"] == [protocol.eval_size(75, 100), protocol.eval_size(60, 110)]
    assert batch["label_sizes"] == [(75, 100), (60, 110)]
    # Each padded to its own largest size: images (96x128 and 128x192, aligned to 32) and labels.
    assert tuple(batch["pixel_values"].shape[-2:]) == (128, 192) and tuple(batch["labels"].shape[-2:]) == (75, 110)

    labelled = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in samples)
    accelerator = Accelerator(cpu=True)
    one_by_one = evaluate(ColourOracle(), samples, accelerator)  # the training loop's evaluation, batch 1
    # evaluate never pads (same-size batches), but a padded batch (predict, user code) must still map each
    # sample's logits back to its own label.
    normalised = normalize_on_device(batch["pixel_values"], IMAGENET_MEAN, IMAGENET_STD)
    logits = forward_for_eval(ColourOracle(), normalised, batch, EvalOptions())
    together = batch_confusion_matrices(logits.argmax(1), batch["labels"], 21, IGNORE_INDEX).sum(0)
    assert int(one_by_one.sum()) == labelled  # every labelled pixel scored once, at the native size
    assert torch.equal(one_by_one, together)
    accuracy = one_by_one.diag().sum() / one_by_one.sum()
    assert accuracy > 0.93  # aligned: only pixels at object edges, blurred by the two resizes, go wrong


def test_resize_to_protocol_is_mmseg_rescale_then_aligned_resize():
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    assert resize_to_protocol(image, ScaleProtocol()) is image
    fitted = resize_to_protocol(image, ScaleProtocol("fit"))
    assert fitted.shape[:2] == (512, 683)
    assert np.array_equal(fitted, cv2.resize(image, (683, 512), interpolation=cv2.INTER_LINEAR))
    aligned = resize_to_protocol(image, ScaleProtocol("fit", align=32))
    assert aligned.shape[:2] == (512, 704)  # SegFormer's AlignedResize: rescale, then resize to the multiple
    assert np.array_equal(aligned, cv2.resize(fitted, (704, 512), interpolation=cv2.INTER_LINEAR))


# --------------------------------------------------------------------------------------------------- loss


def test_loss_averages_over_labelled_or_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 6, 7)
    labels = torch.randint(0, 21, (2, 6, 7))
    labels[0, :3] = IGNORE_INDEX
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = (labels != IGNORE_INDEX).sum()
    assert torch.allclose(cross_entropy(logits, labels, "labelled"), per_pixel.sum() / labelled)
    assert torch.allclose(cross_entropy(logits, labels, "labelled"),
                          F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))
    # mmseg 0.x, avg_non_ignore=False: F.cross_entropy(reduction='none', ignore_index) then .mean().
    assert torch.allclose(cross_entropy(logits, labels, "all"), per_pixel.mean())
    loss, parts = segmentation_loss({"logits": logits, "aux_logits": logits * 2}, labels, 0.4, "all")
    assert torch.allclose(loss, per_pixel.mean() + 0.4 * F.cross_entropy(
        logits * 2, labels, ignore_index=IGNORE_INDEX, reduction="none").mean())
    assert set(parts) == {"loss_main", "loss_aux"}
    empty = torch.full((1, 4, 4), IGNORE_INDEX)
    assert cross_entropy(torch.randn(1, 21, 4, 4), empty, "labelled") == 0
    with pytest.raises(ValueError, match="loss average"):
        cross_entropy(logits, labels, "mean")


# ------------------------------------------------------------------------------------------------- config


def test_protocol_config_keys_parse_coerce_and_validate(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("photometric: true\nresize_base: [1024, 256]\nscale_convention: fit\n")
    cfg = parse_config(["--config", str(recipe), "--align", "32"])
    assert (cfg.photometric, cfg.resize_base, cfg.scale_convention, cfg.align) == ("jitter", [1024, 256], "fit", 32)
    assert parse_config(["--config", str(recipe), "--photometric", "false"]).photometric == "none"
    assert parse_config(["--config", str(recipe), "--photometric", "--align", "1"]).photometric == "jitter"  # old flag
    assert parse_config(["--config", str(recipe), "--photometric", "mmseg"]).photometric == "mmseg"
    assert parse_config(["--config", str(recipe), "--resize_base", "2048", "512"]).resize_base == [2048, 512]
    # ClearML hands edited values back as strings.
    cfg = config_from_dict({"resize_base": "[2048, 512]", "photometric": "True", "cat_max_ratio": "0.75",
                            "weight_decay_policy": "all", "global_batch_size": "16"}, coerce=True)
    assert (cfg.resize_base, cfg.photometric, cfg.cat_max_ratio, cfg.global_batch_size) == ([2048, 512], "jitter",
                                                                                            0.75, 16)
    bad = {"align": 0, "cat_max_ratio": 0.0, "scale_min": 3.0, "resize_base": [512], "pad_fill": "grey",
           "photometric": "strong", "loss_average": "mean", "weight_decay_policy": "none"}
    def validated(**values):  # impossible choices fail when the config is built, impossible values here
        validate_config(TrainConfig(max_train_steps=10, **values))

    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key):
            validated(**{key: value})
    with pytest.raises(ConfigError, match="decode_head"):
        validated(model="segformer-b2", decode_head="mmseg")
    with pytest.raises(ConfigError, match="resnet_stem"):
        validated(model="deeplabv3_mobilenet_v3_large", resnet_stem="deep")


def test_global_batch_warning_names_the_product():
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, global_batch_size=16)
    assert global_batch_warning(cfg, 2) is None
    message = global_batch_warning(cfg, 1)
    assert "global batch 8" in message and "global_batch_size 16" in message and "\n" not in message
    assert global_batch_warning(TrainConfig(), 3) is None  # no recipe figure: nothing to compare


# ------------------------------------------------------------------------------------- benchmark scripts


def load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_augmentation_benchmark_smoke(capsys):
    results = load_benchmark("augment_protocol").main(["--smoke"])
    assert set(results) == {"native", "native + jitter", "fit", "fit + cat_max", "mmseg"}
    assert all(figures["best"] > 0 for figures in results.values())
    assert all(0 <= figures["ignored"] < 1 for figures in results.values())
    assert "vs native" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_recipe_benchmark_smoke_on_cpu(capsys):
    """The GPU script's --smoke mode: the real recipe code path on CPU at tiny sizes, one JSON line at the end."""
    import json

    returned = load_benchmark("gpu_recipe").main(["--smoke"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last_line)
    assert printed == json.loads(json.dumps(returned))
    assert (printed["decode_head"], printed["resnet_stem"], printed["recipe"]) == ("mmseg", "deep",
                                                                                 "deeplabv3_r101_voc_aug")
    assert printed["train_steps_timed"] >= 1 and printed["train_img_per_s"] > 0 and printed["eval_fps"] > 0
    assert math.isfinite(printed["loss_first"]) and "error" not in printed
    protocol = ScaleProtocol.from_values(printed["eval_protocol"])
    assert printed["eval_input_sizes"] == sorted(list(protocol.eval_size(h, w)) for h, w in
                                                 ((375, 500), (500, 375), (333, 500)))
