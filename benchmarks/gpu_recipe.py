"""Train and evaluate the DeepLabV3-R101 recipe on synthetic VOC-sized data on one GPU: img/s, peak memory, eval fps.

    python benchmarks/gpu_recipe.py                 # one GPU, bf16 + channels_last, crop 512, batch 4: a few minutes
    python benchmarks/gpu_recipe.py --smoke         # CPU, tiny sizes, fp32: seconds (CI / no GPU)

What runs is the project's own code for `configs/deeplabv3_r101_voc_aug.yaml` (mmseg ASPPHead + FCNHead,
ResNetV1c deep stem, SGD + poly schedule, the recipe's loss averaging): the config is parsed from the recipe,
the model, optimiser, scheduler and loss come from vocseg.models / vocseg.optim / vocseg.losses, and
accelerate runs them (`Accelerator(mixed_precision=...)`, prepared model and optimiser, accelerator.backward,
clip_grad_norm_ as the trainer logs it). Only the data is synthetic and made on the device in advance:
random 512x512 crops with blob-shaped labels and a 255 border band, so the figure is the model's, not the
CPU pipeline's (benchmarks/augment_protocol.py and data_pipeline.py measure that). Backbone weights are
random: the cost does not depend on them.

Measured:
- training: img/s over --steps optimiser steps after --warmup steps (CUDA synchronised at both ends);
  peak GPU memory (torch.cuda.max_memory_allocated / _reserved) over the whole training phase.
  mmseg reports 9.6 GB per GPU for this model at batch 4 in fp32 (its model zoo table).
- evaluation: whole-image val at the recipe's protocol: each VOC-sized image (500x375 / 375x500 / 500x333)
  fitted into 2048x512 (512x683 / 683x512 / 512x769), one forward, logits resized back to the native size
  and argmaxed, batch 1 as `vocseg evaluate`; images/s after a warm-up.
The last line printed is one JSON object with every figure. --max-seconds stops the timed training early
(reported) so a run always ends within the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vocseg.config import parse_config  # noqa: E402
from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES  # noqa: E402
from vocseg.inference import predict_logits  # noqa: E402
from vocseg.losses import segmentation_loss  # noqa: E402
from vocseg.models import build_model, parameter_counts  # noqa: E402
from vocseg.optim import build_optimizer, build_scheduler  # noqa: E402
from vocseg.protocol import ScaleProtocol  # noqa: E402

RECIPE = "deeplabv3_r101_voc_aug"
VOC_SIZES = ((375, 500), (500, 375), (333, 500))
MMSEG_MEMORY_GB_FP32 = 9.6


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> ImageNet-normalised float (vocseg.data.transforms.normalize_on_device, without
    importing the data layer and its albumentations dependency)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


def synthetic_labels(batch: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """Blob-shaped class maps (low-resolution noise upsampled, nearest) with 255 where classes meet."""
    coarse = torch.randint(0, NUM_CLASSES, (batch, 1, max(2, height // 64), max(2, width // 64)), generator=generator)
    labels = F.interpolate(coarse.float(), size=(height, width), mode="nearest")[:, 0].long()
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    labels[edge] = IGNORE_INDEX
    return labels.to(device)


def synthetic_batches(count: int, batch: int, crop: int, device,
                      seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=generator).to(device),
             synthetic_labels(batch, crop, crop, generator, device)) for _ in range(count)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase(args, cfg, accelerator, model, device) -> dict:
    """Warm-up then timed optimiser steps; img/s, seconds per step, first/last loss, peak memory."""
    optimizer = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(cfg, optimizer, args.warmup + args.steps)
    batches = synthetic_batches(args.pool, args.batch_size, args.crop_size, device)
    model.train()
    losses, timed_steps, start = [], 0, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        pixels, labels = batches[step % len(batches)]
        inputs = normalise(pixels)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        outputs = model(inputs, output_size=labels.shape[-2:])
        loss, _ = segmentation_loss(outputs, labels, cfg.aux_weight, cfg.loss_average)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), float("inf"))  # the trainer measures the norm every step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (0, args.warmup + args.steps - 1) or step == args.warmup:
            losses.append(float(loss.detach()))
        if step >= args.warmup:
            timed_steps += 1
            if time.perf_counter() - began > args.max_seconds:
                break
    sync(device)
    seconds = time.perf_counter() - start
    out = {"train_steps_timed": timed_steps, "train_seconds": round(seconds, 3),
           "train_img_per_s": round(timed_steps * args.batch_size / seconds, 2),
           "train_s_per_step": round(seconds / timed_steps, 4), "loss_first": round(losses[0], 4),
           "loss_last": round(losses[-1], 4), "stopped_early": timed_steps < args.steps}
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return out


@torch.no_grad()
def eval_phase(args, accelerator, model, protocol: ScaleProtocol, device) -> dict:
    """Whole-image inference at the recipe's protocol, one image at a time; images/s after a warm-up."""
    model = accelerator.unwrap_model(model).eval()
    generator = torch.Generator().manual_seed(1)
    sizes = [VOC_SIZES[i % len(VOC_SIZES)] for i in range(args.eval_images)]
    images = [torch.randint(0, 256, (1, 3, *protocol.eval_size(h, w)), dtype=torch.uint8, generator=generator)
              .to(device) for h, w in sizes]
    warmup = min(len(VOC_SIZES) * 2, len(images) - 1)  # each size once or twice (allocator, kernels)
    count, start = 0, None
    for index, (image, size) in enumerate(zip(images, sizes)):
        if index == warmup:
            sync(device)
            start = time.perf_counter()
        inputs = normalise(image)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            prediction = predict_logits(model, inputs, output_size=size, align=protocol.align).argmax(1)
        assert prediction.shape[-2:] == size
        count += index >= warmup
    sync(device)
    seconds = time.perf_counter() - start
    return {"eval_images_timed": count, "eval_fps": round(count / seconds, 2),
            "eval_input_sizes": sorted({tuple(protocol.eval_size(h, w)) for h, w in VOC_SIZES})}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="per GPU (the recipe's)")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--pool", type=int, default=8, help="distinct synthetic batches cycled through")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--max-seconds", type=float, default=360.0, help="stop timed training after this long")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN pick kernels by timing them (the trainer does not; off matches a real run)")
    parser.add_argument("--smoke", action="store_true", help="CPU, crop 64, batch 2, a few steps, fp32: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.crop_size, args.warmup, args.steps, args.eval_images, args.pool = 2, 32, 1, 1, 4, 1
        args.mixed_precision = "no"  # bf16 autocast on a CPU without bf16 units is ~12x slower
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import torchvision  # noqa: F401  (DeepLabV3's ResNet comes from torchvision)
    except ImportError:
        raise SystemExit("gpu_recipe.py needs torchvision (the DeepLab backbone): pip install torchvision matching "
                         f"torch {torch.__version__}") from None
    from accelerate import Accelerator

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    wall = time.perf_counter()
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.smoke)
    device = accelerator.device
    if not args.smoke and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    overrides = ["--per_device_train_batch_size", str(args.batch_size), "--crop_size", str(args.crop_size)]
    if args.smoke:  # the same protocol at a tenth of the size, to keep the CPU run short
        overrides += ["--resize_base", "205", "51"]
    cfg = parse_config(["--config", RECIPE, *overrides])
    protocol = ScaleProtocol.from_values(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    counts = parameter_counts(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    results = {"benchmark": "gpu_recipe", "recipe": RECIPE, "smoke": args.smoke,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "mixed_precision": args.mixed_precision,
               "channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark,
               "crop_size": args.crop_size, "batch_per_gpu": args.batch_size,
               "decode_head": cfg.decode_head, "resnet_stem": cfg.resnet_stem, "loss_average": cfg.loss_average,
               "parameters_m": round(counts["total"] / 1e6, 2), "eval_protocol": protocol.to_dict(),
               "mmseg_reported_memory_gb_fp32": MMSEG_MEMORY_GB_FP32}
    results.update(train_phase(args, cfg, accelerator, model, device))
    results.update(eval_phase(args, accelerator, model, protocol, device))
    results["wall_s"] = round(time.perf_counter() - wall, 1)
    if not all(math.isfinite(results[k]) for k in ("loss_first", "loss_last")):
        results["error"] = "non-finite loss"
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
