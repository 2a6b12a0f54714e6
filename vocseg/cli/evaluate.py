"""`python -m vocseg evaluate --model PATH --split val`: score an exported model at native resolution.

Runs in one process, or split over N with `accelerate launch [--multi_gpu --num_processes N] -m vocseg
evaluate ...`; the metric is the training loop's exact one either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader

from vocseg.constants import VOC_CLASSES
from vocseg.data import load_split
from vocseg.data.transforms import build_eval_augment, collate, with_augmentation
from vocseg.engine import eval_results, evaluate
from vocseg.log import setup_logging
from vocseg.models import load_model


def format_table(results: dict) -> str:
    lines = [f"{'class':<12} {'IoU':>7}"]
    for name in VOC_CLASSES:
        iou = results["per_category_iou"][name]
        lines.append(f"{name:<12} {'-' if iou is None else f'{100 * iou:6.2f}':>7}")
    for key, label in (("mean_iou", "mIoU"), ("mean_accuracy", "mAcc"), ("overall_accuracy", "aAcc")):
        value = results[key]
        lines.append(f"{label:<12} {'-' if value is None else f'{100 * value:6.2f}':>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vocseg evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported model folder (e.g. outputs/RUN/best_model)")
    parser.add_argument("--data_root", default=None, help="VOC root or parquet folder (default: $DATASET_PATH)")
    parser.add_argument("--sbd_root", default=None)
    parser.add_argument("--split", default="val")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="per process; 1 scores native sizes unpadded")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the scores (and confusion matrix) as JSON here")
    args = parser.parse_args(argv)

    logger = setup_logging()
    accelerator = Accelerator()
    model = load_model(args.model)
    with accelerator.main_process_first():
        dataset = load_split(args.split, args.data_root, args.sbd_root, args.cache_dir)
    if args.max_samples:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    loader = DataLoader(with_augmentation(dataset, build_eval_augment(model.image_mean, model.image_std)),
                        batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    mean, std = model.image_mean, model.image_std
    model, loader = accelerator.prepare(model, loader)
    matrix = evaluate(model, loader, accelerator, mean, std, desc=f"evaluate {args.split}")
    scores = {k.removeprefix("eval_"): v for k, v in eval_results(matrix).items()}
    if accelerator.is_main_process:
        logger.info(f"{args.model} on {args.split} ({len(dataset)} images, {accelerator.num_processes} process(es))")
        print(format_table(scores))
        if args.output:
            payload = {**scores, "split": args.split, "num_samples": len(dataset), "model": str(args.model),
                       "confusion_matrix": matrix.tolist()}
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(payload, indent=2))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
