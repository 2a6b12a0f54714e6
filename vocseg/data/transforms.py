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
from vocseg.protocol import ScaleProtocol, rescaled_size, scaled_box

CAT_MAX_RATIO_ATTEMPTS = 10  # mmseg RandomCrop: "Repeat 10 times"


class RandomScaleCrop(A.DualTransform):
    """RandomScale -> PadIfNeeded(top_left) -> RandomCrop in one step that resizes only what lands in the crop.

    Draws the scale (uniform in `scale_range`), the scaled size, the top-left padding to `crop_size`
    and the crop offset exactly as that three-step chain does. The scaled size is albumentations'
    int(size * scale) of the stored image, or, with `resize_base` = (long, short), mmseg 0.x's
    `Resize(img_scale=resize_base, ratio_range=scale_range)`: the image fitted into
    (int(long * r), int(short * r)) keeping its ratio (vocseg.protocol.rescaled_size), i.e. r times
    the size fitted into `resize_base` -- a per-sample base factor on top of the drawn scale.
    With `cat_max_ratio` < 1 the crop is redrawn like mmseg's `RandomCrop(cat_max_ratio=...)`
    (mmseg/datasets/pipelines/transforms.py, RandomCrop.__call__): while one class covers
    >= cat_max_ratio of the crop's labelled pixels (255 excluded), or the crop holds a single class,
    draw another offset (the scale stays), at most 10 times; the 11th draw is kept unchecked.
    The transform
    resizes only the source region under the crop window (plus a 2-3 px margin, so the
    interpolation sees the same neighbours), at the chain's per-axis ratio: a 2x scale no longer
    resizes the whole image to 1000x750 to keep 512x512 of it. Because the region starts at a
    whole source pixel, its sampling grid can sit off the full-resize grid by a fraction of an
    output pixel (~0.1 px on average, under 1 px at worst; ratio within 0.1% on VOC sizes); image
    and mask share that grid, so they stay aligned. Padding: `fill` for the image, `fill_mask`
    (255) for the mask, in exactly the rows/columns the chain would pad.

    `pad=False` returns only the part of the crop window that the scaled image covers (at most
    `crop_size` a side), for a pipeline that pads later (mmseg pads after flip and photometric
    distortion: `build_train_augment`).
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 interpolation: int = cv2.INTER_LINEAR, mask_interpolation: int = cv2.INTER_NEAREST_EXACT,
                 fill: float = 0, fill_mask: float = IGNORE_INDEX, resize_base: tuple[int, int] | None = None,
                 cat_max_ratio: float = 1.0, pad: bool = True, p: float = 1.0):
        super().__init__(p=p)
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.interpolation = interpolation
        self.mask_interpolation = mask_interpolation
        self.fill = fill
        self.fill_mask = fill_mask
        self.resize_base = tuple(int(v) for v in resize_base) if resize_base is not None else None
        self.cat_max_ratio = float(cat_max_ratio)
        self.pad = pad

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "scale_range", "interpolation", "mask_interpolation", "fill", "fill_mask", "resize_base",
                "cat_max_ratio", "pad")

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

    def scaled_size(self, height: int, width: int, ratio: float) -> tuple[int, int]:
        """The size the whole image would be resized to for a drawn ratio."""
        if self.resize_base is None:
            return int(height * ratio), int(width * ratio)  # albumentations RandomScale
        return rescaled_size(height, width, scaled_box(self.resize_base, ratio))  # mmseg Resize(ratio_range)

    def _draw_crop(self, height: int, width: int, scaled: tuple[int, int]) -> tuple[tuple, tuple]:
        h_start, w_start = self.py_random.random(), self.py_random.random()
        return (self._axis(height, scaled[0], self.crop_size, h_start),
                self._axis(width, scaled[1], self.crop_size, w_start))

    def crop_is_varied(self, mask_crop: np.ndarray) -> bool:
        """mmseg's acceptance test: more than one labelled class and none covering >= cat_max_ratio of them."""
        if mask_crop.dtype == np.uint8:  # cv2's histogram: ~2x faster than np.bincount on a 512x512 crop
            counts = cv2.calcHist([np.ascontiguousarray(mask_crop)], [0], None, [256], [0, 256]).ravel()
        else:
            counts = np.bincount(mask_crop.ravel()).astype(np.float64)
        if len(counts) > self.fill_mask:
            counts[int(self.fill_mask)] = 0  # the ignore label (also the mask padding) is not counted
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        scaled = self.scaled_size(height, width, self.py_random.uniform(*self.scale_range))
        rows, cols = self._draw_crop(height, width, scaled)
        mask = data.get("mask")
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(CAT_MAX_RATIO_ATTEMPTS):
                if self.crop_is_varied(self._scale_crop(mask, rows, cols, self.mask_interpolation, self.fill_mask)):
                    break
                rows, cols = self._draw_crop(height, width, scaled)
        return {"rows": rows, "cols": cols, "scaled": scaled}  # scaled: for inspection, not used by apply

    def _scale_crop(self, array: np.ndarray, rows, cols, interpolation: int, fill) -> np.ndarray:
        (y0, y1, out_h, oy, nh), (x0, x1, out_w, ox, nw) = rows, cols
        region = cv2.resize(np.ascontiguousarray(array[y0:y1, x0:x1]), (out_w, out_h), interpolation=interpolation)
        if region.ndim < array.ndim:  # cv2 drops a trailing channel axis of 1
            region = region[..., None]
        region = region[oy:oy + nh, ox:ox + nw]
        if region.shape[0] < nh or region.shape[1] < nw:  # rounding at the far image edge: clamp like resize
            pad = ((0, nh - region.shape[0]), (0, nw - region.shape[1])) + ((0, 0),) * (region.ndim - 2)
            region = np.pad(region, pad, mode="edge")
        if not self.pad or (nh == self.crop_size and nw == self.crop_size):
            return np.ascontiguousarray(region)
        out = np.full((self.crop_size, self.crop_size) + array.shape[2:], fill, dtype=array.dtype)
        out[:nh, :nw] = region
        return out

    def apply(self, img: np.ndarray, rows=None, cols=None, **params) -> np.ndarray:
        return self._scale_crop(img, rows, cols, self.interpolation, self.fill)

    def apply_to_mask(self, mask: np.ndarray, rows=None, cols=None, **params) -> np.ndarray:
        return self._scale_crop(mask, rows, cols, self.mask_interpolation, self.fill_mask)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg 0.x's PhotoMetricDistortion (mmseg/datasets/pipelines/transforms.py), on RGB uint8 images.

    In order, each step with probability 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5) either here
    or last (50/50); saturation x U(0.5, 1.5) in OpenCV's HSV; hue + randint(-18, 18) (upper end excluded,
    numpy's randint) modulo 180, OpenCV's hue units. Every step clips to 0..255 and truncates to uint8
    (mmseg's `convert`), and saturation and hue each convert to HSV and back, as mmseg does, so the result
    is bit-identical to mmseg's on the same draws. RGB -> HSV here equals mmseg's BGR -> HSV of the same
    pixels. The draws come from albumentations' seeded numpy generator in mmseg's order.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18, p: float = 1.0):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")

    def _maybe(self, draw):
        return draw() if self.random_generator.integers(2) else None

    def get_params(self) -> dict:
        rng = self.random_generator
        brightness = self._maybe(lambda: rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))  # mmseg: mode == 1 -> contrast right after brightness
        contrast = self._maybe(lambda: rng.uniform(*self.contrast_range)) if contrast_first else None
        saturation = self._maybe(lambda: rng.uniform(*self.saturation_range))
        hue = self._maybe(lambda: int(rng.integers(-self.hue_delta, self.hue_delta)))
        if not contrast_first:
            contrast = self._maybe(lambda: rng.uniform(*self.contrast_range))
        return {"brightness": brightness, "contrast": contrast, "contrast_first": contrast_first,
                "saturation": saturation, "hue": hue}

    @staticmethod
    def _lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        # mmseg's convert (float32 x alpha + beta, clip, astype uint8) as a 256-entry table: same per-value arithmetic.
        return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def apply(self, img: np.ndarray, brightness=None, contrast=None, contrast_first=True, saturation=None, hue=None,
              **params) -> np.ndarray:
        lut = np.arange(256, dtype=np.uint8)
        if brightness is not None:
            lut = self._lut(beta=brightness)[lut]
        if contrast is not None and contrast_first:
            lut = self._lut(alpha=contrast)[lut]
        img = cv2.LUT(img, lut) if brightness is not None or (contrast is not None and contrast_first) else img
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = cv2.LUT(hsv[..., 1], self._lut(alpha=saturation))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = cv2.LUT(img, self._lut(alpha=contrast))
        return img


def pad_colour(mean=IMAGENET_MEAN) -> tuple[int, int, int]:
    """The uint8 colour that normalises to ~0: mmseg pads *after* normalising, i.e. with the mean colour.

    Rounding to uint8 leaves at most 0.5 / (255 * std) per channel: < 0.0088 with ImageNet's std.
    """
    return tuple(int(round(m * 255)) for m in mean)


def build_train_augment(crop_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                        photometric: str | bool = "none", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        normalize: bool = False, protocol: ScaleProtocol | None = None, cat_max_ratio: float = 1.0,
                        pad_fill: str = "zero") -> A.Compose:
    """Random scale + crop (cat_max_ratio redraws), flip, photometric, then pad to the crop (mask with 255).

    The order is mmseg's (Resize, RandomCrop, RandomFlip, PhotoMetricDistortion, Normalize, Pad): padding
    comes last, so colour changes never touch it and it stays `pad_fill` (zero: black; mean: the mean
    colour, ~0 once normalised). `photometric`: none, jitter (ColorJitter) or mmseg (PhotoMetricDistortion);
    True/False mean jitter/none. `protocol` (vocseg.protocol.ScaleProtocol) with scale_convention "fit"
    draws the scale as a ratio of the size fitted into its resize_base. normalize=False returns uint8 CHW
    tensors (normalise on the device); True returns float32 normalised.
    """
    if isinstance(photometric, bool):  # the pre-mode API
        photometric = "jitter" if photometric else "none"
    protocol = protocol or ScaleProtocol()
    steps = [
        # ~ A.RandomScale(scale_limit=(lo - 1, hi - 1)) + A.RandomCrop, ~2x cheaper (see RandomScaleCrop).
        # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR does; cv2's plain INTER_NEAREST
        # (albumentations' and mmcv's default) is off by up to ~1.4 px at 0.5x, misaligning mask and image.
        RandomScaleCrop(crop_size, scale_range, interpolation=cv2.INTER_LINEAR,
                        mask_interpolation=cv2.INTER_NEAREST_EXACT, fill_mask=IGNORE_INDEX,
                        resize_base=protocol.resize_base if protocol.scale_convention == "fit" else None,
                        cat_max_ratio=cat_max_ratio, pad=False),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric == "jitter":
        steps.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.05, p=0.8))
    elif photometric == "mmseg":
        steps.append(PhotoMetricDistortion())
    elif photometric != "none":
        raise ValueError(f"photometric must be none, jitter or mmseg, got {photometric!r}")
    # The mask is padded with 255 (fill_mask), never 0: albumentations 2.x ignores the old mask_value=.
    steps.append(A.PadIfNeeded(crop_size, crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                               fill=pad_colour(mean) if pad_fill == "mean" else 0, fill_mask=IGNORE_INDEX))
    if normalize:
        steps.append(A.Normalize(mean=mean, std=std))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def resize_to_protocol(image: np.ndarray, protocol: ScaleProtocol) -> np.ndarray:
    """An image (HxWxC uint8) at the size `protocol` predicts it at; cv2 bilinear, like mmcv.imresize.

    fit: mmseg's test `Resize(img_scale=resize_base, keep_ratio=True)` (mmcv.imrescale). align > 1: then a
    second resize to the aligned size, as SegFormer's AlignedResize does (`_resize_img` then `_align`).
    """
    height, width = image.shape[:2]
    if protocol.scale_convention == "fit":
        fitted = rescaled_size(height, width, protocol.resize_base)
        if fitted != (height, width):
            image = cv2.resize(image, fitted[::-1], interpolation=cv2.INTER_LINEAR)
    target = protocol.eval_size(height, width)
    if target != image.shape[:2]:
        image = cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR)
    return image


class ProtocolResize(A.ImageOnlyTransform):
    """Evaluation: the image goes to the protocol's size, the label stays native (scored there)."""

    def __init__(self, protocol: ScaleProtocol, p: float = 1.0):
        super().__init__(p=p)
        self.protocol = protocol

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("protocol",)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return resize_to_protocol(img, self.protocol)


def build_eval_augment(mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize: bool = False,
                       protocol: ScaleProtocol | None = None) -> A.Compose:
    """Native protocol: no geometric change. fit / align: the image is resized, the label is not; the
    logits are resized back to the label, so scores are always at the label's native resolution."""
    steps = [ProtocolResize(protocol)] if protocol is not None and protocol.resizes else []
    steps += [A.Normalize(mean=mean, std=std)] if normalize else []
    return A.Compose(steps + [ToTensorV2()])


def augments_for(cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[A.Compose, A.Compose]:
    """(train, eval) augmentations of a TrainConfig (or any object with its fields)."""
    protocol = ScaleProtocol.from_values(cfg)
    train = build_train_augment(cfg.crop_size, (cfg.scale_min, cfg.scale_max), photometric=cfg.photometric, mean=mean,
                                std=std, protocol=protocol, cat_max_ratio=cfg.cat_max_ratio, pad_fill=cfg.pad_fill)
    return train, build_eval_augment(mean, std, protocol=protocol)


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

    Images and labels are padded each to their own largest size: under the fit protocol an eval image is
    resized and its label is not. `image_sizes` / `label_sizes` record every sample's own sizes, so its
    logits can be mapped back to its label (vocseg.inference.logits_at_label_size).

    Built with numpy (single-threaded copies) and wrapped with torch.from_numpy at the end: torch's
    own fill/copy ops go through its OpenMP pool, which in the main process (num_workers=0) costs
    far more than the copies themselves.
    """
    image_sizes = [tuple(e["pixel_values"].shape[-2:]) for e in examples]
    label_sizes = [tuple(e["labels"].shape[-2:]) for e in examples]
    first = np.asarray(examples[0]["pixel_values"])
    pixel_values = np.zeros((len(examples), 3, max(h for h, _ in image_sizes), max(w for _, w in image_sizes)),
                            dtype=first.dtype)
    labels = np.full((len(examples), max(h for h, _ in label_sizes), max(w for _, w in label_sizes)), IGNORE_INDEX,
                     dtype=np.int64)
    for i, example in enumerate(examples):
        (h, w), (lh, lw) = image_sizes[i], label_sizes[i]
        pixel_values[i, :, :h, :w] = np.asarray(example["pixel_values"])
        labels[i, :lh, :lw] = np.asarray(example["labels"])
    return {"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels),
            "ids": [e["id"] for e in examples], "image_sizes": image_sizes, "label_sizes": label_sizes}


def normalize_on_device(pixel_values: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalised, on whatever device the batch already is."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values  # already normalised by the transform (normalize=True)
    mean = torch.tensor(mean, device=pixel_values.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(std, device=pixel_values.device).view(1, 3, 1, 1) * 255.0
    return (pixel_values.float() - mean) / std
