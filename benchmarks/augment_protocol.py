"""Training-augmentation throughput of mmseg's protocol next to vocseg's native one, in the same run.

    python benchmarks/augment_protocol.py                  # VOC-sized images, crop 512, best of 5
    python benchmarks/augment_protocol.py --smoke          # seconds: tiny images, one repeat

Per sample, in one process, exactly what a DataLoader worker runs (vocseg.data.transforms.SegmentationTransform):
decode the stored JPEG + palette PNG, augment with the seeded pipeline, hand back a uint8 CHW image and
int64 labels. The images are VOC-sized (500 x 375 and 375 x 500 JPEGs) with VOC-like masks: a few objects
on background, a 255 border band. Pipelines (each a `build_train_augment` call, crop `--crop-size`):

  native            the default: scale 0.5-2.0 of the stored size, flip, black padding
  (the "255 px" column: share of crop pixels labelled 255, VOC borders + padding)
  native + jitter   the old `photometric: true` (ColorJitter)
  fit               scales of the size fitted into 2048x512 (1.37x a VOC image): bigger crops, less padding
  fit + cat_max     + cat_max_ratio 0.75 (the mask crop is re-made for each redraw)
  mmseg             fit + cat_max_ratio + PhotoMetricDistortion + mean padding: the mmseg recipes' pipeline

The pipelines take turns within each repeat, so a burst of load on the machine slows all of them; the
table shows the best repeat (other processes can only slow a run down), the median beside it, and the
ratio of each pipeline's best to native's best.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vocseg.constants import IGNORE_INDEX  # noqa: E402
from vocseg.data.synthetic import add_void_border  # noqa: E402
from vocseg.data.transforms import SegmentationTransform, build_train_augment  # noqa: E402
from vocseg.protocol import ScaleProtocol  # noqa: E402


def voc_like_samples(count: int, sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """A `with_transform`-style batch of encoded samples: JPEG images, palette-free PNG masks (class ids)."""
    rng = np.random.default_rng(seed)
    batch = {"id": [], "image": [], "label": []}
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        mask = np.zeros((height, width), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            axes = (int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3)))
            cv2.ellipse(mask, (int(cx), int(cy)), axes, 0, 0, 360, int(rng.integers(1, 21)), -1)
        mask = add_void_border(mask)
        image = (rng.normal(110, 40, (height, width, 3)) + (mask[..., None] % 21) * 6).clip(0, 255).astype(np.uint8)
        batch["id"].append(f"sample_{index}")
        batch["image"].append({"bytes": cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                               .tobytes(), "path": None})
        batch["label"].append({"bytes": cv2.imencode(".png", mask)[1].tobytes(), "path": None})
    return batch


def pipelines(crop: int, resize_base: tuple[int, int]) -> dict:
    fit = ScaleProtocol("fit", resize_base)
    return {
        "native": build_train_augment(crop),
        "native + jitter": build_train_augment(crop, photometric="jitter"),
        "fit": build_train_augment(crop, protocol=fit),
        "fit + cat_max": build_train_augment(crop, protocol=fit, cat_max_ratio=0.75),
        "mmseg": build_train_augment(crop, protocol=fit, cat_max_ratio=0.75, photometric="mmseg", pad_fill="mean"),
    }


def ignored_share(transform: SegmentationTransform, batch: dict) -> float:
    labels = transform(batch)["labels"]
    return float(np.mean([(label.numpy() == IGNORE_INDEX).mean() for label in labels]))


def measure(batch: dict, augments: dict, repeats: int) -> dict:
    """Samples/s of each pipeline per repeat (taking turns), after one untimed warm-up pass each."""
    transforms = {name: SegmentationTransform(augment, seed=0) for name, augment in augments.items()}
    for transform in transforms.values():
        transform(batch)
    rates = {name: [] for name in transforms}
    for repeat in range(repeats):
        for name, transform in transforms.items():
            transform.epoch = repeat + 1  # new crops each repeat, the same ones for every pipeline's turn
            start = time.perf_counter()
            transform(batch)
            rates[name].append(len(batch["id"]) / (time.perf_counter() - start))
    shares = {name: ignored_share(transform, batch) for name, transform in transforms.items()}
    return {name: {"best": max(r), "median": statistics.median(r), "ignored": shares[name]}
            for name, r in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="cv2 threads (a DataLoader worker uses 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny images and crops, one repeat: seconds")
    args = parser.parse_args(argv)
    sizes, resize_base = [(375, 500), (500, 375)], (2048, 512)
    if args.smoke:
        args.num_images, args.crop_size, args.repeats = 4, 64, 1
        sizes, resize_base = [(75, 100), (100, 75)], (410, 103)  # VOC / 5, the same fit ratio
    cv2.setNumThreads(args.threads)
    batch = voc_like_samples(args.num_images, sizes)
    results = measure(batch, pipelines(args.crop_size, resize_base), args.repeats)
    native = results["native"]["best"]
    print(f"{args.num_images} images of {sizes[0][1]}x{sizes[0][0]} / {sizes[1][1]}x{sizes[1][0]}, crop "
          f"{args.crop_size}, cv2 threads {args.threads}, best of {args.repeats} (decode + augment, one process)")
    print(f"{'pipeline':<18} {'samples/s':>10} {'median':>9} {'vs native':>10} {'255 px':>8}")
    for name, figures in results.items():
        print(f"{name:<18} {figures['best']:>10.1f} {figures['median']:>9.1f} {figures['best'] / native:>9.2f}x "
              f"{100 * figures['ignored']:>7.1f}%")
    return results


if __name__ == "__main__":
    main()
