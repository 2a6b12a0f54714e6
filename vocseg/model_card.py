"""README.md for an exported model: what it is, what it was trained on and how, how it was scored.

Written into every export (best_model/, `vocseg export`), so a model pushed to the Hub or registered in
ClearML explains itself. The YAML header is the Hub's model-card metadata.
"""

from __future__ import annotations

import yaml

from vocseg.constants import VOC_CLASSES


def _scores_table(meta: dict) -> list[str]:
    per_class = meta.get("eval_per_category_iou") or {}
    if not per_class:
        return []
    lines = ["", "| class | IoU |", "|---|---|"]
    for name in VOC_CLASSES:
        iou = per_class.get(name)
        lines.append(f"| {name} | {'-' if iou is None else f'{100 * iou:.2f}'} |")
    return lines


def model_card(meta: dict) -> str:
    """Markdown text of the card for an export whose vocseg_model.json holds `meta`."""
    config = meta.get("train_config") or {}
    miou = meta.get("eval_mean_iou")
    header = {"library_name": "transformers" if str(meta.get("model", "")).startswith("segformer") else "pytorch",
              "tags": ["semantic-segmentation", "vocseg", "pascal-voc"], "pipeline_tag": "image-segmentation"}
    if miou is not None:
        header["model-index"] = [{"name": meta.get("model"), "results": [{
            "task": {"type": "image-segmentation"},
            "dataset": {"name": "Pascal VOC 2012", "type": "pascal_voc", "split": meta.get("val_split", "val")},
            "metrics": [{"type": "mean_iou", "value": round(100 * miou, 2)}]}]}]
    synthetic = config.get("synthetic_data")
    data = ("the SYNTHETIC demo tree (coloured shapes in VOC format), not Pascal VOC" if synthetic else
            f"{config.get('train_split', '?')} of Pascal VOC 2012 (+ SBD for train_aug)")
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {meta.get('model')} for Pascal VOC semantic segmentation (vocseg)", "",
             f"- **Model**: {meta.get('model')}, {meta.get('num_classes', 21)} classes (VOC), trained with vocseg.",
             f"- **Trained on**: {data}.",
             f"- **Recipe**: {config.get('recipe', '?')} ({config.get('max_train_steps') or '?'} steps, crop "
             f"{config.get('crop_size', '?')}, {config.get('optimizer', '?')} lr {config.get('learning_rate', '?')}); "
             "the full config is `train_config` in vocseg_model.json.",
             "- **Scored**: dataset-level mIoU over one confusion matrix, 255 (void) ignored, at the label's "
             "native resolution" + (f", on {meta.get('val_split')} at step {meta.get('step')}" if miou is not None
                                     else "") + ".",
             ]
    if miou is not None:
        lines.append(f"- **mIoU**: {100 * miou:.2f}" + (f" (the best of the run's evaluations: selected on "
                                                       f"{meta['selected_on']}, so an optimistic estimate)"
                                                       if meta.get("selected_on") else ""))
    lines += _scores_table(meta)
    lines += ["", "## Use", "", "```python", "from vocseg.models import load_model",
              "model = load_model('PATH_TO_THIS_FOLDER').eval()   # normalised images in, 21-class logits out",
              "```", "", "or `python -m vocseg predict --model PATH_TO_THIS_FOLDER images/ --out preds/`.", ""]
    return "\n".join(lines)
