"""Augmentation presets (albumentations + OpenCV) applied lazily with `Dataset.with_transform`.

Images are decoded with cv2 straight from the stored JPEG bytes (no PIL, no EXIF rotation) and
stay uint8 until the device: `normalize_on_device` turns them into normalised floats there,
which moves 4x fewer bytes through the DataLoader than float tensors would.
"""

from __future__ import annotations

import io
import math
import zlib

import albumentations as A
import cv2
import datasets
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


class RandomScaleCrop(A.DualTransform):
    """RandomScale -> PadIfNeeded(top_left) -> RandomCrop in one step that resizes only what lands in the crop.

    Draws the scale (uniform in `scale_range`), the scaled size (albumentations' int(size * scale)),
    the top-left padding to `crop_size` and the crop offset exactly as that three-step chain does,
    then resizes only the source region under the crop window (plus a 2-3 px margin, so the
    interpolation sees the same neighbours), at the chain's per-axis ratio: a 2x scale no longer
    resizes the whole image to 1000x750 to keep 512x512 of it. Because the region starts at a
    whole source pixel, its sampling grid can sit off the full-resize grid by a fraction of an
    output pixel (~0.1 px on average, under 1 px at worst; ratio within 0.1% on VOC sizes); image
    and mask share that grid, so they stay aligned. Padding: `fill` for the image, `fill_mask`
    (255) for the mask, in exactly the rows/columns the chain would pad.
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 interpolation: int = cv2.INTER_LINEAR, mask_interpolation: int = cv2.INTER_NEAREST_EXACT,
                 fill: float = 0, fill_mask: float = IGNORE_INDEX, p: float = 1.0):
        super().__init__(p=p)
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.interpolation = interpolation
        self.mask_interpolation = mask_interpolation
        self.fill = fill
        self.fill_mask = fill_mask

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "scale_range", "interpolation", "mask_interpolation", "fill", "fill_mask")

    @staticmethod
    def _axis(size: int, scaled: int, crop: int, start: float) -> tuple[int, int, int, int, int]:
        """One axis: source region [lo, hi), its resized length, the crop's offset in it, valid length."""
        ratio = scaled / size  # what cv2.resize(img, (scaled_w, scaled_h)) uses
        offset = int((max(scaled, crop) - crop + 1) * start)  # RandomCrop on the padded size
        valid = min(crop, scaled - offset)  # the rest of the crop is top-left padding
        lo = max(0, math.floor((offset + 0.5) / ratio - 0.5) - 2)
        hi = min(size, math.ceil((offset + valid - 0.5) / ratio - 0.5) + 3)
        # An explicit output size, not fx/fy: INTER_LINEAR would use fx but INTER_NEAREST_EXACT the size
        # ratio, and the two must agree for mask and image to stay aligned. Widen the region by up to
        # 3 px a side to the length whose resized size comes closest to a whole number of pixels, so
        # the region's ratio matches the full image's as well as it can.
        lo, hi = min(((a, b) for a in range(lo, max(0, lo - 3) - 1, -1) for b in range(hi, min(size, hi + 3) + 1)),
                     key=lambda r: abs((r[1] - r[0]) * ratio - round((r[1] - r[0]) * ratio)))
        resized = max(1, round((hi - lo) * ratio))
        region_ratio = resized / (hi - lo)
        first = round(region_ratio * ((offset + 0.5) / ratio - lo) - 0.5)  # output pixel `offset` lands here
        return lo, hi, resized, min(max(first, 0), resized - 1), valid

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        scale = self.py_random.uniform(*self.scale_range)
        h_start, w_start = self.py_random.random(), self.py_random.random()
        return {"rows": self._axis(height, int(height * scale), self.crop_size, h_start),
                "cols": self._axis(width, int(width * scale), self.crop_size, w_start)}

    def _scale_crop(self, array: np.ndarray, rows, cols, interpolation: int, fill) -> np.ndarray:
        (y0, y1, out_h, oy, nh), (x0, x1, out_w, ox, nw) = rows, cols
        region = cv2.resize(np.ascontiguousarray(array[y0:y1, x0:x1]), (out_w, out_h), interpolation=interpolation)
        if region.ndim < array.ndim:  # cv2 drops a trailing channel axis of 1
            region = region[..., None]
        region = region[oy:oy + nh, ox:ox + nw]
        if region.shape[0] < nh or region.shape[1] < nw:  # rounding at the far image edge: clamp like resize
            pad = ((0, nh - region.shape[0]), (0, nw - region.shape[1])) + ((0, 0),) * (region.ndim - 2)
            region = np.pad(region, pad, mode="edge")
        if nh == self.crop_size and nw == self.crop_size:
            return np.ascontiguousarray(region)
        out = np.full((self.crop_size, self.crop_size) + array.shape[2:], fill, dtype=array.dtype)
        out[:nh, :nw] = region
        return out

    def apply(self, img: np.ndarray, rows=None, cols=None, **params) -> np.ndarray:
        return self._scale_crop(img, rows, cols, self.interpolation, self.fill)

    def apply_to_mask(self, mask: np.ndarray, rows=None, cols=None, **params) -> np.ndarray:
        return self._scale_crop(mask, rows, cols, self.mask_interpolation, self.fill_mask)


def build_train_augment(crop_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                        photometric: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        normalize: bool = False) -> A.Compose:
    """Random scale, pad to the crop (mask padded with 255, never "background"), random crop, flip.

    normalize=False returns uint8 CHW tensors (normalise on the device); True returns float32 normalised.
    """
    steps = [
        # = A.RandomScale(scale_limit=(lo - 1, hi - 1)) + A.PadIfNeeded(position="top_left", fill=0,
        # fill_mask=255) + A.RandomCrop, ~2x cheaper (see RandomScaleCrop). INTER_NEAREST_EXACT samples
        # pixel centres like INTER_LINEAR does; cv2's plain INTER_NEAREST (albumentations' default) is
        # off by up to ~1.4 px at 0.5x, misaligning mask and image. The mask is padded with 255, never 0.
        RandomScaleCrop(crop_size, scale_range, interpolation=cv2.INTER_LINEAR,
                        mask_interpolation=cv2.INTER_NEAREST_EXACT, fill=0, fill_mask=IGNORE_INDEX),
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
        if self.seed is None:
            # Unseeded: fresh OS entropy per sample. Forked DataLoader workers each inherit a copy of
            # albumentations' RNG state and would otherwise all draw the same crops, every epoch.
            return int(np.random.SeedSequence().generate_state(1)[0])
        sequence = np.random.SeedSequence([self.seed, self.epoch, zlib.crc32(sample_id.encode())])
        return int(sequence.generate_state(1)[0])

    def __call__(self, batch: dict) -> dict:
        pixel_values, labels = [], []
        for sample_id, image, label in zip(batch["id"], batch["image"], batch["label"]):
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
