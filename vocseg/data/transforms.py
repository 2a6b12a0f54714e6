"""Augmentation presets (albumentations + OpenCV) applied lazily with `Dataset.with_transform`.

Images are decoded with cv2 straight from the stored JPEG bytes (no PIL, no EXIF rotation) and
stay uint8 until the device: `normalize_on_device` turns them into normalised floats there,
which moves 4x fewer bytes through the DataLoader than float tensors would.
"""

from __future__ import annotations

import io
import zlib

import albumentations as A
import cv2
import datasets
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


def build_train_augment(crop_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                        photometric: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        normalize: bool = False) -> A.Compose:
    """Random scale, pad to the crop (mask padded with 255, never "background"), random crop, flip.

    normalize=False returns uint8 CHW tensors (normalise on the device); True returns float32 normalised.
    """
    steps = [
        # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR does; cv2's plain INTER_NEAREST
        # (albumentations' default) is off by up to ~1.4 px at 0.5x, misaligning mask and image.
        A.RandomScale(scale_limit=(scale_range[0] - 1.0, scale_range[1] - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0),
        # fill_mask=255: albumentations 2.x ignores the old mask_value= and would pad masks with class 0.
        A.PadIfNeeded(crop_size, crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=IGNORE_INDEX),
        A.RandomCrop(crop_size, crop_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric:
        steps.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05, p=0.8))
    if normalize:
        steps.append(A.Normalize(mean=mean, std=std))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def build_eval_augment(mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize: bool = False) -> A.Compose:
    """No geometric change: predictions are scored at the label's native resolution."""
    steps = [A.Normalize(mean=mean, std=std)] if normalize else []
    return A.Compose(steps + [ToTensorV2()])


def decode_image(value) -> np.ndarray:
    """RGB uint8 HxWx3 from a stored image cell ({'bytes', 'path'}), raw bytes or a PIL image."""
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("RGB"))
    data = value["bytes"] if isinstance(value, dict) else value
    if data is None:
        with open(value["path"], "rb") as f:
            data = f.read()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot decode image {value.get('path') if isinstance(value, dict) else ''}")
    return image


def decode_mask(value) -> np.ndarray:
    """Class ids HxW uint8. PIL, not cv2: cv2 expands a palette PNG into colours."""
    if isinstance(value, Image.Image):
        return np.array(value)
    data = value["bytes"] if isinstance(value, dict) else value
    if data is None:
        with open(value["path"], "rb") as f:
            data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays


class SegmentationTransform:
    """The `with_transform` callable: decode, augment, return `pixel_values` (CHW) and int64 `labels` (HW).

    With a `seed`, each sample's augmentation is a pure function of (seed, epoch, sample id): the
    same crops and flips come back after a restart, so a resumed run replays the data exactly
    (albumentations keeps its own RNG, which torch.manual_seed does not touch). Set `epoch`
    before creating each epoch's DataLoader iterator; workers receive a copy of this object then.
    """

    def __init__(self, augment: A.Compose, seed: int | None = None):
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def _seed_for(self, sample_id: str) -> int:
        sequence = np.random.SeedSequence([self.seed, self.epoch, zlib.crc32(sample_id.encode())])
        return int(sequence.generate_state(1)[0])

    def __call__(self, batch: dict) -> dict:
        pixel_values, labels = [], []
        for sample_id, image, label in zip(batch["id"], batch["image"], batch["label"]):
            if self.seed is not None:
                self.augment.set_random_seed(self._seed_for(sample_id))
            out = self.augment(image=decode_image(image), mask=decode_mask(label))
            pixel_values.append(out["image"])
            mask = out["mask"]
            # numpy, not mask.long(): a torch op here wakes torch's OpenMP pool once per sample, which
            # with num_workers=0 fights cv2's threads and costs milliseconds (benchmarks/data_pipeline.py).
            mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            labels.append(torch.from_numpy(mask.astype(np.int64)))
        return {"id": list(batch["id"]), "pixel_values": pixel_values, "labels": labels}


def undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """The same rows with image columns left as encoded bytes.

    Otherwise `datasets` decodes them with PIL (slower, and it applies EXIF rotation) before our
    transform ever sees them.
    """
    return dataset.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))


def with_augmentation(dataset: datasets.Dataset, augment: A.Compose | SegmentationTransform,
                      seed: int | None = None) -> datasets.Dataset:
    """A lazily augmented view of a `load_split` dataset (`with_transform` keeps the very transform object)."""
    transform = augment if isinstance(augment, SegmentationTransform) else SegmentationTransform(augment, seed)
    return undecoded(dataset).with_transform(transform)


def collate(examples: list[dict]) -> dict:
    """Stack a batch; samples of different sizes (eval at native size) are padded with 0 / 255.

    Built with numpy (single-threaded copies) and wrapped with torch.from_numpy at the end: torch's
    own fill/copy ops go through its OpenMP pool, which in the main process (num_workers=0) costs
    far more than the copies themselves.
    """
    height = max(e["pixel_values"].shape[-2] for e in examples)
    width = max(e["pixel_values"].shape[-1] for e in examples)
    first = np.asarray(examples[0]["pixel_values"])
    pixel_values = np.zeros((len(examples), 3, height, width), dtype=first.dtype)
    labels = np.full((len(examples), height, width), IGNORE_INDEX, dtype=np.int64)
    for i, example in enumerate(examples):
        h, w = example["labels"].shape
        pixel_values[i, :, :h, :w] = np.asarray(example["pixel_values"])
        labels[i, :h, :w] = np.asarray(example["labels"])
    return {"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels),
            "ids": [e["id"] for e in examples]}


def normalize_on_device(pixel_values: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalised, on whatever device the batch already is."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values  # already normalised by the transform (normalize=True)
    mean = torch.tensor(mean, device=pixel_values.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(std, device=pixel_values.device).view(1, 3, 1, 1) * 255.0
    return (pixel_values.float() - mean) / std
