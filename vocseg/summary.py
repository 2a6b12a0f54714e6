"""The closing summary a person reads after `accelerate launch train.py`."""

from __future__ import annotations

import sys

from accelerate import PartialState

from vocseg.engine import demo_data_path


def summary_lines(cfg, results: dict) -> list[str]:
    out = results.get("output_dir")
    lines = ["", "=" * 72]
    if results.get("interrupted"):
        lines.append(f"Run stopped; checkpoint in {out}/checkpoints. Resume with:")
        lines.append(f"  accelerate launch train.py --output_dir {out} --resume_from_checkpoint latest")
    else:
        miou, best = results.get("eval_mean_iou"), results.get("best_eval_mean_iou")
        lines.append(f"Finished {results.get('step')} steps of {cfg.model} on {cfg.train_split}.")
        # The headline is the last step's score, as mmseg reports its final checkpoint: the best of several
        # evaluations on the very split being reported is an optimistic pick.
        lines.append(f"  final mIoU ({cfg.val_split}, step {results.get('step')}): {miou:.4f}"
                     if miou is not None else "  final mIoU: n/a")
        if best is not None and best >= 0:
            lines.append(f"  best model:  {out}/best_model  (mIoU {best:.4f} at step {results.get('best_step')}, "
                         f"selected on {cfg.val_split}: not an unbiased score of it)")
        lines.append(f"  results:     {out}/all_results.json   config: {out}/config.yaml")
        data = demo_data_path() if cfg.synthetic_data else (cfg.data_root or "$DATASET_PATH")
        lines.append(f"  evaluate it: python -m vocseg evaluate --model {out}/best_model --data_root {data}")
    if results.get("tensorboard_dir"):
        lines.append(f"  curves:      tensorboard --logdir {results['tensorboard_dir']}")
    if results.get("clearml_offline_session"):
        lines.append(f"  ClearML (offline) session: {results['clearml_offline_session']}")
        lines.append("  upload it to a server with: python -m vocseg clearml-import "
                     f"{results['clearml_offline_session']}")
    if cfg.synthetic_data:
        lines.append("")
        lines.append("NOTE: this was the SYNTHETIC demo data set (coloured shapes in VOC format), not Pascal VOC.")
        lines.append("To train on VOC 2012 + SBD:  DATASET_PATH=/data/VOCdevkit "
                     "SBD_DATASET_PATH=/data/benchmark_RELEASE accelerate launch train.py")
        lines.append("(or --config configs/deeplabv3_r101_voc_aug.yaml --data_root ... --sbd_root ...)")
    lines.append("=" * 72)
    return lines


def print_summary(cfg, results: dict) -> None:
    if not PartialState().is_main_process:
        return
    print("\n".join(summary_lines(cfg, results)), flush=True)
    sys.stdout.flush()
