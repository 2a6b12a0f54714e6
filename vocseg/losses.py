"""The training loss: per-pixel cross-entropy over 21 classes (255 ignored), plus DeepLab's weighted aux loss.

Only torch is imported here, so GPU benchmarks and other scripts can use the very loss the trainer uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vocseg.constants import IGNORE_INDEX

LOSS_AVERAGES = ("labelled", "all")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, average: str = "labelled") -> torch.Tensor:
    """Mean cross-entropy of [B, C, H, W] logits against [B, H, W] labels; 255 pixels add no loss.

    average "labelled": the sum over labelled pixels divided by their count (PyTorch's own mean with
    ignore_index). "all": divided by every pixel, ignored ones included: mmseg 0.x's default
    (CrossEntropyLoss with avg_non_ignore=False, mmseg/models/losses/cross_entropy_loss.py:
    F.cross_entropy(reduction='none', ignore_index) then a plain mean), so crops with many 255 pixels
    (VOC's borders, the padding) weigh less. Sum / count instead of the mean: a crop made only of
    padding gives 0, not NaN.
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"loss average must be one of {', '.join(LOSS_AVERAGES)}, got {average!r}")
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = labels.numel() if average == "all" else (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def segmentation_loss(outputs: dict, labels: torch.Tensor, aux_weight: float,
                      average: str = "labelled") -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the main logits, plus `aux_weight` x that of `aux_logits` when the model has an aux head.

    Returns (loss, parts) where parts holds the detached `loss_main` (and `loss_aux`) for logging.
    """
    main = cross_entropy(outputs["logits"], labels, average)
    parts = {"loss_main": main.detach()}
    loss = main
    if "aux_logits" in outputs:
        aux = cross_entropy(outputs["aux_logits"], labels, average)
        parts["loss_aux"] = aux.detach()
        loss = main + aux_weight * aux
    return loss, parts
