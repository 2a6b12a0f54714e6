"""What each test-time mode of vocseg.inference.predict_logits costs, as a ratio to whole-image inference.

    python benchmarks/inference.py                       # CPU-sized defaults: 250x188 images, 256/171 windows
    python benchmarks/inference.py --height 375 --width 500 --crop 512 --stride 341   # VOC's real sizes
    python benchmarks/inference.py --smoke               # seconds: does it still run (CI)

Images are random VOC-shaped tensors (the cost does not depend on the content) scored one at a time, as
`vocseg evaluate` does; randomly initialised models (the weights do not change the cost either). Modes:
whole, slide, ms+flip (scales 0.5-1.75 and flips, 12 views) over whole images and over sliding windows.
Each figure is the best of --repeats passes over --num-images images, after one warm-up round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vocseg.inference import predict_logits, sliding_windows  # noqa: E402
from vocseg.models import build_model  # noqa: E402

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def forward_passes(height, width, mode, crop, stride, scales) -> int:
    """Model calls per image (x2 with flip): one per view, or one per window of each view."""
    if mode == "whole":
        return len(scales)
    return sum(len(sliding_windows(int(height * s + 0.5), int(width * s + 0.5), crop, stride)) for s in scales)


def images_per_second(model, images, modes: dict, repeats: int) -> dict:
    """Best-of-`repeats` images/s per mode. The modes take turns within each repeat, so a burst of load from
    another process slows all of them rather than skewing one ratio."""
    best = dict.fromkeys(modes, float("inf"))
    for attempt in range(repeats + 1):
        for label, options in modes.items():
            start = time.perf_counter()
            for image in images:
                predict_logits(model, image, **options).argmax(1)
            if attempt:  # the first round warms up the allocator and oneDNN's kernels
                best[label] = min(best[label], time.perf_counter() - start)
    return {label: len(images) / seconds for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["segformer-b0", "deeplabv3_mobilenet_v3_large"])
    parser.add_argument("--height", type=int, default=188)
    parser.add_argument("--width", type=int, default=250)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--stride", type=int, default=171)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds: CI runs it to catch a crash; "
                        "its figures mean nothing and never fail it")
    args = parser.parse_args()
    if args.smoke:
        # SegFormer needs >= 32 px a side (its first stage reduces attention keys with an 8x8 kernel at 1/4 size)
        args.height, args.width, args.crop, args.stride, args.num_images, args.repeats = 64, 64, 64, 48, 1, 1
        args.threads = 1  # a smoke run shares CI machines: no OpenMP threads spinning against other jobs
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = [torch.randn(1, 3, args.height, args.width) for _ in range(args.num_images)]
    modes = {
        "whole": {"mode": "whole"},
        "slide": {"mode": "slide", "crop_size": args.crop, "stride": args.stride},
        "ms+flip (whole)": {"mode": "whole", "scales": MS_SCALES, "flip": True},
        "ms+flip (slide)": {"mode": "slide", "crop_size": args.crop, "stride": args.stride, "scales": MS_SCALES,
                            "flip": True},
    }
    print(f"{args.height}x{args.width} images, windows {args.crop}/{args.stride}, {args.threads} thread(s), "
          f"{args.num_images} images x best of {args.repeats}; load average {os.getloadavg()[0]:.2f} "
          f"(another busy process skews every figure)")
    print("| model | mode | forward passes / image | images/s | cost vs whole |\n|---|---|---|---|---|")
    for name in args.models:
        model = build_model(SimpleNamespace(model=name, aux_loss=False)).eval()
        speeds = images_per_second(model, images, modes, args.repeats)
        for label, options in modes.items():
            passes = forward_passes(args.height, args.width, options["mode"], args.crop, args.stride,
                                    options.get("scales", (1.0,))) * (2 if options.get("flip") else 1)
            print(f"| {name} | {label} | {passes} | {speeds[label]:.2f} | {speeds['whole'] / speeds[label]:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
