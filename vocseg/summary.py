"""The closing summary a person reads after `accelerate launch train.py`."""

from __future__ import annotations

import os

from accelerate import PartialState


def print_summary(cfg, results: dict) -> None:
    if not PartialState().is_main_process:
        return
    out = results.get("output_dir")
    lines = ["", "=" * 72]
    if results.get("interrupted"):
        lines.append(f"Run interrupted; checkpoint in {out}/checkpoints. Resume with:")
        lines.append(f"  accelerate launch train.py --config {cfg.recipe or '...'} --output_dir {out} "
                     "--resume_from_checkpoint latest")
    else:
        miou, best = results.get("eval_mean_iou"), results.get("best_eval_mean_iou")
        lines.append(f"Finished {results.get('step')} steps of {cfg.model} on {cfg.train_split}.")
        lines.append(f"  val mIoU ({cfg.val_split}): {miou:.4f}   best {best:.4f} at step {results.get('best_step')}"
                     if miou is not None else "  val mIoU: n/a")
        lines.append(f"  best model: {out}/best_model")
        lines.append(f"  results:    {out}/all_results.json   config: {out}/config.yaml")
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
    print("\n".join(lines), flush=True)
    os.sys.stdout.flush()
