"""`python -m vocseg evaluate --model PATH --split val`: score a model at the labels' native resolution.

The image is predicted at the size of the model's scale protocol (stored with its export / checkpoint:
native, or mmseg's fit into resize_base, optionally aligned); `--scale_convention`, `--resize_base` and
`--align` override it. The logits are resized back to each label, which is never resized.

Runs in one process, or split over N with `accelerate launch [--multi_gpu --num_processes N] -m vocseg
evaluate ...`; the metric is the training loop's exact one either way. `--mode slide`, `--scales` and
`--flip` give the sliding-window / multi-scale / flip numbers papers report (see vocseg.inference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from vocseg.constants import VOC_CLASSES
from vocseg.data import load_split
from vocseg.data.transforms import build_eval_augment, with_augmentation
from vocseg.engine import EvalOptions, eval_results, evaluate
from vocseg.errors import OneLineArgumentParser, cli_errors, pop_flag
from vocseg.protocol import SCALE_CONVENTIONS
from vocseg.inference import MODES, load_model_or_checkpoint, predict_logits
from vocseg.log import setup_logging


def format_table(results: dict) -> str:
    lines = [f"{'class':<12} {'IoU':>7}"]
    for name in VOC_CLASSES:
        iou = results["per_category_iou"][name]
        lines.append(f"{name:<12} {'-' if iou is None else f'{100 * iou:6.2f}':>7}")
    for key, label in (("mean_iou", "mIoU"), ("mean_accuracy", "mAcc"), ("overall_accuracy", "aAcc")):
        value = results[key]
        lines.append(f"{label:<12} {'-' if value is None else f'{100 * value:6.2f}':>7}")
    return "\n".join(lines)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--mode / --crop / --stride / --scales / --flip, shared with `vocseg predict`."""
    parser.add_argument("--mode", choices=MODES, default="whole", help="whole image, or mmseg's sliding window")
    parser.add_argument("--crop", type=int, default=512, help="sliding-window size (--mode slide)")
    parser.add_argument("--stride", type=int, default=341, help="sliding-window stride (--mode slide)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="test scales, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (softmax averaged over the views)")
    parser.add_argument("--flip", action="store_true", help="also predict each mirrored view (softmax averaged)")
    parser.add_argument("--scale_convention", choices=SCALE_CONVENTIONS, default=None,
                        help="native, or fit (mmseg: fit into --resize_base first); default: the model's own")
    parser.add_argument("--resize_base", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                        help="fit box for --scale_convention fit (mmseg: 2048 512); default: the model's own")
    parser.add_argument("--align", type=int, default=None,
                        help="round the predicted size up to a multiple of this (SegFormer: 32); default: the model's")


def inference_options(args, parser: argparse.ArgumentParser) -> dict:
    """predict_logits keyword arguments; bad values stop here with a usage error, before the model loads."""
    if args.mode == "slide" and not 0 < args.stride <= args.crop:
        parser.error(f"--stride must be in 1..--crop ({args.crop}), got {args.stride}")
    if min(args.scales) <= 0:
        parser.error(f"--scales must be positive, got {args.scales}")
    return {"mode": args.mode, "crop_size": args.crop, "stride": args.stride, "scales": tuple(args.scales),
            "flip": args.flip}


def protocol_overrides(args, parser: argparse.ArgumentParser) -> dict:
    """The scale-protocol flags that were given (None: keep the model's); bad values are a usage error."""
    if args.align is not None and args.align < 1:
        parser.error(f"--align must be >= 1, got {args.align}")
    if args.resize_base is not None and min(args.resize_base) < 1:
        parser.error(f"--resize_base must be two positive sizes, got {args.resize_base}")
    return {"scale_convention": args.scale_convention, "resize_base": args.resize_base, "align": args.align}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = pop_flag(argv, "--debug")
    parser = OneLineArgumentParser(prog="python -m vocseg evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported model folder (e.g. outputs/RUN/best_model) or a "
                        "training checkpoint folder (outputs/RUN/checkpoints/step_N)")
    parser.add_argument("--data_root", default=None, help="VOC root or parquet folder (default: $DATASET_PATH)")
    parser.add_argument("--sbd_root", default=None)
    parser.add_argument("--split", default="val")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="per process; images of the same size share a "
                        "batch, so the scores equal batch 1's")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_eval_size", type=int, default=None, help="run images whose long side exceeds N px "
                        "at N px (scored at native size)")
    parser.add_argument("--output", default=None, help="write the scores (and confusion matrix) as JSON here")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    options = inference_options(args, parser)
    overrides = protocol_overrides(args, parser)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch_size must be >= 1 and --num_workers >= 0")
    with cli_errors(debug):
        return evaluate_model(args, options, overrides)


def evaluate_model(args, options: dict, overrides: dict) -> int:
    logger = setup_logging()
    accelerator = Accelerator()
    model = load_model_or_checkpoint(args.model).to(accelerator.device)
    protocol = model.protocol.replace(**overrides)  # the model's own scale protocol unless flags say otherwise
    with accelerator.local_main_process_first():
        dataset = load_split(args.split, args.data_root, args.sbd_root, args.cache_dir)
    if args.max_samples:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    view = with_augmentation(dataset, build_eval_augment(model.image_mean, model.image_std, protocol=protocol))
    eval_options = EvalOptions(batch_size=args.batch_size, num_workers=args.num_workers,
                               max_eval_size=args.max_eval_size, desc=f"evaluate {args.split}",
                               predict=lambda pixel_values, size: predict_logits(model, pixel_values, output_size=size,
                                                                                 align=protocol.align, **options))
    matrix = evaluate(model, view, accelerator, eval_options)
    scores = {k.removeprefix("eval_"): v for k, v in eval_results(matrix).items()}
    if accelerator.is_main_process:
        logger.info(f"{args.model} on {args.split} ({len(dataset)} images, {accelerator.num_processes} process(es)); "
                    f"{describe(options)}; images {protocol.describe()}, scored at the labels' size")
        print(format_table(scores))
        if args.output:
            payload = {**scores, "split": args.split, "num_samples": len(dataset), "model": str(args.model),
                       "inference": {**options, "scales": list(options["scales"])}, "protocol": protocol.to_dict(),
                       "confusion_matrix": matrix.tolist()}
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(payload, indent=2))
    accelerator.wait_for_everyone()
    return 0


def describe(options: dict) -> str:
    text = "whole image" if options["mode"] == "whole" else f"sliding window {options['crop_size']}/{options['stride']}"
    if options["scales"] != (1.0,):
        text += ", scales " + " ".join(f"{s:g}" for s in options["scales"])
    return text + (", flip" if options["flip"] else "")


if __name__ == "__main__":
    sys.exit(main())
