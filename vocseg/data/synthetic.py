"""Write a small synthetic Pascal VOC 2012 (+ SBD) tree in the exact on-disk layouts.

Each foreground class has its own saturated colour and objects are ellipses or rectangles on a
grey noisy background, so a small model trained from scratch reaches a high mIoU in minutes on
a CPU. Everything else mimics the real data: JPEG images of varied VOC-like sizes, 8-bit palette
PNG masks with a 255 "void" band along every object border, SBD class masks as `.mat` files
(`GTcls.Segmentation`, no border band), and SBD split files that overlap VOC train and VOC val
the way the real ones do.

    python -m vocseg.data.synthetic OUT [--num-train N] [--num-val M] [--sbd] [--seed S]
"""

from __future__ import annotations

import colorsys
import io
import json
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from vocseg.constants import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, VOC_PALETTE_FLAT
from vocseg.errors import OneLineArgumentParser

# One saturated colour per foreground class: hues spread around the wheel, two brightness levels
# so neighbouring hues stay distinguishable after JPEG compression.
CLASS_COLOURS = np.array(
    [(0, 0, 0)]
    + [
        tuple(round(255 * v) for v in colorsys.hsv_to_rgb(i / 10 % 1.0, 1.0, 1.0 if i < 10 else 0.55))
        for i in range(NUM_CLASSES - 1)
    ],
    dtype=np.uint8,
)

# VOC images are at most 500 px on the long side; the demo uses half of that to train fast.
VOC_LONG_SIDE = 500
VOC_SHORT_SIDES = (281, 333, 344, 353, 375, 400, 442, 500)


def _image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """(height, width) of a VOC-like image: 500 x {281..500}, landscape or portrait."""
    long_side = round(VOC_LONG_SIDE * scale)
    short_side = round(rng.choice(VOC_SHORT_SIDES) * scale)
    return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)


def _draw_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 image, class-id mask without border band)."""
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(1, 4)):
        class_id = int(rng.integers(1, NUM_CLASSES))
        object_mask = np.zeros_like(mask)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        ry = int(rng.integers(height // 8, height // 3 + 1))
        rx = int(rng.integers(width // 8, width // 3 + 1))
        if rng.random() < 0.5:
            cv2.ellipse(object_mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            cv2.rectangle(object_mask, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
        mask[object_mask > 0] = class_id  # later objects occlude earlier ones

    grey = rng.normal(128, 30, size=(height, width, 1)).clip(0, 255)
    image = np.repeat(grey, 3, axis=2)
    colours = CLASS_COLOURS[mask].astype(np.float64)
    jitter = rng.normal(0, 12, size=(height, width, 3))
    foreground = mask > 0
    image[foreground] = (colours + jitter)[foreground]
    return image.clip(0, 255).astype(np.uint8), mask


def add_void_border(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Mark pixels near a boundary between two labels as 255, like VOC's annotation borders."""
    kernel = np.ones((width, width), np.uint8)
    boundary = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
    out = mask.copy()
    out[boundary] = IGNORE_INDEX
    return out


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    """Save class ids as an 8-bit palette PNG with the VOC colour map, as VOC ships its masks."""
    png = Image.fromarray(mask, mode="P")
    png.putpalette(VOC_PALETTE_FLAT)
    png.save(path, format="PNG")


def save_sbd_mat(mask: np.ndarray, path: Path) -> None:
    """Save an SBD class annotation: `GTcls` struct with Segmentation, Boundaries, CategoriesPresent."""
    present = np.array([c for c in np.unique(mask) if 0 < c < NUM_CLASSES], np.uint8).reshape(-1, 1)
    gtcls = {"Segmentation": mask.astype(np.uint8), "Boundaries": np.empty((0, 1), object),
             "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gtcls}, do_compression=True)


def _write_lines(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_synthetic_tree(out: str | Path, num_train: int = 300, num_val: int = 100, sbd: bool = False,
                        num_sbd_only: int | None = None, seed: int = 0, scale: float = 0.5) -> dict:
    """Write OUT/VOCdevkit/VOC2012 (and OUT/benchmark_RELEASE with `sbd`). Returns a manifest of ids.

    SBD split files are planted like the real ones: SBD train and SBD val each take some VOC train
    ids, some VOC val ids (which `train_aug` must drop) and some ids only SBD has.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    voc = out / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)

    train_ids = [f"2007_{i:06d}" for i in range(num_train)]
    val_ids = [f"2007_{num_train + i:06d}" for i in range(num_val)]
    num_sbd_only = num_train if num_sbd_only is None else num_sbd_only
    sbd_only_ids = [f"2008_{i:06d}" for i in range(num_sbd_only)]

    samples = {}  # id -> (image, mask without border), shared by both trees for overlapping ids
    for sample_id in train_ids + val_ids + (sbd_only_ids if sbd else []):
        samples[sample_id] = _draw_sample(rng, *_image_size(rng, scale))

    for sample_id in train_ids + val_ids:
        image, mask = samples[sample_id]
        (voc / "JPEGImages" / f"{sample_id}.jpg").write_bytes(_jpeg_bytes(image, quality=90))
        save_palette_png(add_void_border(mask), voc / "SegmentationClass" / f"{sample_id}.png")
    splits = voc / "ImageSets" / "Segmentation"
    _write_lines(splits / "train.txt", train_ids)
    _write_lines(splits / "val.txt", val_ids)
    _write_lines(splits / "trainval.txt", train_ids + val_ids)
    manifest = {"voc_root": str(out / "VOCdevkit"), "train": train_ids, "val": val_ids}

    if sbd:
        dataset = out / "benchmark_RELEASE" / "dataset"
        (dataset / "img").mkdir(parents=True, exist_ok=True)
        (dataset / "cls").mkdir(parents=True, exist_ok=True)
        third, half, two_thirds = len(train_ids) // 3, len(val_ids) // 2, 2 * len(sbd_only_ids) // 3
        sbd_train = train_ids[:third] + val_ids[:half] + sbd_only_ids[:two_thirds]
        sbd_val = train_ids[third:2 * third] + val_ids[half:] + sbd_only_ids[two_thirds:]
        for sample_id in sbd_train + sbd_val:
            image, mask = samples[sample_id]
            # SBD re-encoded its images; a different JPEG quality makes the two copies tell apart.
            (dataset / "img" / f"{sample_id}.jpg").write_bytes(_jpeg_bytes(image, quality=85))
            save_sbd_mat(mask, dataset / "cls" / f"{sample_id}.mat")
        _write_lines(dataset / "train.txt", sorted(sbd_train))
        _write_lines(dataset / "val.txt", sorted(sbd_val))
        manifest.update(sbd_root=str(out / "benchmark_RELEASE"), sbd_train=sorted(sbd_train),
                        sbd_val=sorted(sbd_val))
    (out / "synthetic_manifest.json").write_text(json.dumps(manifest))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(prog="python -m vocseg.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write VOCdevkit/ (and benchmark_RELEASE/) into")
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-sbd-only", type=int, default=None, help="SBD-only ids (default: num-train)")
    parser.add_argument("--sbd", action="store_true", help="also write an SBD benchmark_RELEASE tree")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.5, help="image size relative to VOC's (500 px long side)")
    args = parser.parse_args(argv)
    manifest = make_synthetic_tree(args.out, args.num_train, args.num_val, args.sbd, args.num_sbd_only,
                                   args.seed, args.scale)
    print(f"wrote VOC tree to {manifest['voc_root']}: train {len(manifest['train'])}, val {len(manifest['val'])}")
    if args.sbd:
        print(f"wrote SBD tree to {manifest['sbd_root']}: sbd_train {len(manifest['sbd_train'])}, "
              f"sbd_val {len(manifest['sbd_val'])}")
    print(f"classes: {', '.join(VOC_CLASSES)}")


if __name__ == "__main__":
    main()
