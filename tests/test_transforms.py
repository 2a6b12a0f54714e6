"""Augmentation keeps image and mask aligned, keeps 255, is reproducible from (seed, epoch, id)."""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from vocseg.data.dataset import FEATURES
from vocseg.data.synthetic import add_void_border, save_palette_png
from vocseg.data.transforms import (
    build_eval_augment,
    build_train_augment,
    collate,
    normalize_on_device,
    with_augmentation,
)

# A colour per label value that survives bilinear interpolation between equal neighbours.
COLOUR = np.random.default_rng(0).integers(30, 256, size=(256, 3)).astype(np.uint8)


def _png_bytes(array, palette=False):
    buffer = io.BytesIO()
    if palette:
        save_palette_png(array, buffer)
    else:
        Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def colour_coded():
    """Images whose colour is a function of the mask, in sizes smaller and larger than the crop."""
    rng = np.random.default_rng(0)
    rows = {"id": [], "image": [], "label": []}
    for index, (h, w) in enumerate([(40, 60), (97, 75), (150, 200)]):
        mask = np.zeros((h, w), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
            mask[y:y + rng.integers(8, h // 2), x:x + rng.integers(8, w // 2)] = rng.integers(1, 21)
        mask = add_void_border(mask)
        rows["id"].append(f"sample_{index}")
        rows["image"].append({"bytes": _png_bytes(COLOUR[mask]), "path": None})
        rows["label"].append({"bytes": _png_bytes(mask, palette=True), "path": None})
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def test_train_augment_keeps_alignment_and_labels(colour_coded):
    view = with_augmentation(colour_coded, build_train_augment(crop_size=64), seed=None)
    checked_interior = checked_padding = 0
    for _ in range(60):
        for example in view:
            image, labels = example["pixel_values"], example["labels"]
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
            assert labels.dtype == torch.int64 and labels.shape == (64, 64)
            values = set(labels.unique().tolist())
            assert values <= set(range(21)) | {IGNORE_INDEX}
            labels_np, image_np = labels.numpy(), image.permute(1, 2, 0).numpy().astype(int)
            # Interior pixels (3x3 neighbourhood of one label) must carry exactly that label's colour.
            # Crop-edge pixels have unseen neighbours: pad with -1 so they never count as interior.
            padded = np.pad(labels_np.astype(int), 1, constant_values=-1)
            same = np.ones_like(labels_np, bool)
            for dy in range(3):
                for dx in range(3):
                    same &= padded[dy:dy + 64, dx:dx + 64] == labels_np
            interior = same & (labels_np != IGNORE_INDEX)
            diff = np.abs(image_np[interior] - COLOUR[labels_np[interior]].astype(int))
            assert diff.max(initial=0) <= 1, f"image and mask misaligned ({diff.max()} colour levels)"
            checked_interior += int(interior.sum())
            # Padding (black image) must be labelled 255, never background.
            black = (image_np == 0).all(axis=2)
            assert (labels_np[black] == IGNORE_INDEX).all()
            checked_padding += int(black.sum())
    assert checked_interior > 10_000 and checked_padding > 1_000


def test_photometric_jitter_changes_pixels_with_the_configured_statistics():
    """ColorJitter(brightness=0.25, ..., p=0.8) on a flat grey image: contrast, saturation and hue leave grey
    unchanged, so each output is 128 x a brightness factor drawn uniformly from [0.75, 1.25] in 80% of the
    draws and 128 otherwise. The mask and the geometry are those of the preset without jitter (same seed)."""
    image = np.full((40, 56, 3), 128, np.uint8)
    mask = np.zeros((40, 56), np.uint8)
    mask[10:30, 5:25] = 7
    jitter = build_train_augment(crop_size=32, scale_range=(0.8, 1.2), photometric=True)
    plain = build_train_augment(crop_size=32, scale_range=(0.8, 1.2), photometric=False)
    ratios = []
    for seed in range(400):
        jitter.set_random_seed(seed)
        plain.set_random_seed(seed)
        out, reference = jitter(image=image, mask=mask), plain(image=image, mask=mask)
        assert torch.equal(out["mask"], reference["mask"]), "jitter moved or changed the labels"
        valid = reference["image"].sum(0) > 0  # not padding
        pixels = out["image"].permute(1, 2, 0)[valid].float()
        assert (pixels.max(0).values - pixels.min(0).values).max() <= 1, "jitter is not one change per image"
        ratios.append(pixels.mean().item() / 128)
    ratios = np.array(ratios)
    changed = ratios[np.abs(ratios - 1) > 1.5 / 128]
    # Unchanged: the 20% not jittered, plus the ~4.7% of the 80% whose factor rounds back to 128 (|b - 1| < 1.5/128).
    assert 0.15 <= 1 - len(changed) / len(ratios) <= 0.33
    assert changed.min() >= 0.74 and changed.max() <= 1.26, "brightness outside [0.75, 1.25]"
    assert changed.min() < 0.78 and changed.max() > 1.22, "the brightness range is not used"
    assert abs(changed.mean() - 1) < 0.03 and abs(changed.std() - 0.5 / 12 ** 0.5) < 0.02  # uniform on [0.75, 1.25]


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_id(colour_coded):
    view = with_augmentation(colour_coded, build_train_augment(crop_size=48), seed=7)
    transform = view._format_kwargs["transform"]
    first = [view[i] for i in range(3)]
    reversed_order = [view[i] for i in (2, 1, 0)][::-1]  # order of access must not matter
    for a, b in zip(first, reversed_order):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    transform.epoch = 1
    next_epoch = [view[i] for i in range(3)]
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, next_epoch))


def test_eval_preset_is_identity_at_native_size(colour_coded):
    view = with_augmentation(colour_coded, build_eval_augment())
    for row, example in zip(colour_coded, view):
        assert np.array_equal(example["pixel_values"].permute(1, 2, 0).numpy(), np.array(row["image"]))
        assert np.array_equal(example["labels"].numpy(), np.array(row["label"]))


def test_device_normalisation_equals_albumentations_normalise(colour_coded):
    as_uint8 = with_augmentation(colour_coded, build_eval_augment())
    as_float = with_augmentation(colour_coded, build_eval_augment(normalize=True))
    for a, b in zip(as_uint8, as_float):
        ours = normalize_on_device(a["pixel_values"][None], IMAGENET_MEAN, IMAGENET_STD)[0]
        assert torch.allclose(ours, b["pixel_values"], atol=1e-5)


def test_collate_pads_labels_with_ignore_index(colour_coded):
    view = with_augmentation(colour_coded, build_eval_augment())
    batch = collate([view[0], view[2]])
    assert batch["pixel_values"].shape == (2, 3, 150, 200)
    assert (batch["labels"][0, 40:, :] == IGNORE_INDEX).all() and (batch["labels"][0, :, 60:] == IGNORE_INDEX).all()
    assert batch["ids"] == ["sample_0", "sample_2"]


def test_unseeded_augmentation_differs_between_dataloader_workers(colour_coded):
    """Forked workers inherit albumentations' RNG state; unseeded views must still draw independently."""
    from torch.utils.data import DataLoader

    copies = 8
    same_image = datasets.Dataset.from_dict(
        {"id": [str(i) for i in range(copies)], "image": [colour_coded[2]["image"]] * copies,
         "label": [colour_coded[2]["label"]] * copies}, features=FEATURES)
    view = with_augmentation(same_image, build_train_augment(crop_size=64))
    loader = DataLoader(view, batch_size=1, num_workers=2, collate_fn=collate)
    crops = [batch["pixel_values"] for batch in loader]
    # Worker 0 draws for items 0, 2, 4, 6 and worker 1 for 1, 3, 5, 7: with a copied RNG state every pair would be
    # equal. One pair can be equal by chance (two crops inside one flat colour block), not all four.
    assert not all(torch.equal(crops[i], crops[i + 1]) for i in range(0, copies, 2))
