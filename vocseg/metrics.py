"""Streaming confusion-matrix metric for semantic segmentation: mean IoU and pixel accuracies.

Only a [C, C] int64 matrix is kept between batches, so evaluating the whole VOC val set costs
C*C*8 bytes of state instead of holding every prediction map until the end. Matrices add, so
per-process (or per-sample) matrices can be summed after a distributed gather and then scored.
"""

from __future__ import annotations

import numpy as np
import torch

from .constants import IGNORE_INDEX, NUM_CLASSES


def _to_index_tensor(x, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biu":
            raise TypeError(f"expected an integer class-index map, got numpy dtype {x.dtype}")
        # torch has only partial support for uint16/uint32/uint64, so widen those on the host.
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            x = x.astype(np.int64)
        x = torch.from_numpy(x)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"expected an integer class-index map, got {x.dtype} (argmax the logits first)")
    if x.dtype == torch.bool or x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        x = x.long()  # aminmax and friends do not support these
    return x.to(device) if device is not None else x


def _in_range(values: torch.Tensor, num_classes: int) -> bool:
    if values.numel() == 0:
        return True
    lo, hi = torch.aminmax(values)
    return bool(lo >= 0) and bool(hi < num_classes)


def _check_range(name: str, values: torch.Tensor, num_classes: int, allowed: str = "") -> None:
    # An out-of-range value would otherwise silently land in another cell of the flat bincount.
    if not _in_range(values, num_classes):
        bad = torch.unique(values[(values < 0) | (values >= num_classes)])[:10].tolist()
        raise ValueError(f"{name} must be in [0, {num_classes}){allowed}; found {bad}")


def _pixel_keys(preds, labels, num_classes: int, ignore_index: int, device=None, batched=False):
    """Validate the maps and return (keys, cells): one bincount key per pixel, C*label + pred
    (plus sample*C*C when batched), and the number of real cells. Ignored pixels get key == cells,
    an overflow bin that callers slice off after the bincount."""
    labels = _to_index_tensor(labels, device)
    preds = _to_index_tensor(preds, labels.device)
    if preds.shape != labels.shape:
        raise ValueError(
            f"preds and labels must have the same shape, got preds {tuple(preds.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if batched and labels.dim() != 3:
        raise ValueError(f"expected [B, H, W] maps, got shape {tuple(labels.shape)}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        labels = labels.long()  # else e.g. uint8 labels == -1 wraps around and matches 255
    # Labels stay in their own (usually uint8) dtype until the key is built, and ignored pixels
    # are overwritten rather than boolean-indexed away: on CPU, masked selection costs several
    # times more than these elementwise passes.
    ignored = labels == ignore_index
    lab = labels.masked_fill(ignored, 0)
    _check_range("labels", lab, num_classes, allowed=f" or equal ignore_index={ignore_index}")
    # Predictions under ignored labels are never counted, so they may be anything (evaluate's
    # documented example has 255s there); only look closer when the whole-map check fails.
    if not _in_range(preds, num_classes):
        _check_range("predictions", preds.masked_fill(ignored, 0), num_classes)
    cells = num_classes * num_classes
    key = torch.add(preds.long(), lab, alpha=num_classes)  # C*label + pred, in int64
    if batched:
        key += torch.arange(labels.shape[0], device=key.device).view(-1, 1, 1) * cells
        cells *= labels.shape[0]
    return key.masked_fill_(ignored, cells).flatten(), cells


def batch_confusion_matrices(
    preds, labels, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """One [C, C] confusion matrix per sample of [B, H, W] maps, as a [B, C, C] int64 tensor.

    Meant for `accelerator.gather_for_metrics`: because each row belongs to one sample, the
    duplicate samples DDP pads the last batch with are dropped exactly, which a per-process
    summed matrix could not allow.
    """
    key, cells = _pixel_keys(preds, labels, num_classes, ignore_index, batched=True)
    counts = torch.bincount(key, minlength=cells + 1)[:cells]
    return counts.view(-1, num_classes, num_classes)


def _nanmean(x: np.ndarray) -> float:
    # Written out so that "no class defined" gives NaN without numpy's empty-slice warning.
    defined = x[~np.isnan(x)]
    return float(defined.mean()) if defined.size else float("nan")


def scores_from_matrix(matrix) -> dict:
    """Score a confusion matrix (rows = ground truth, cols = prediction) from anywhere.

    Returns mean_iou, mean_accuracy, overall_accuracy (floats) and per_category_iou,
    per_category_accuracy (float64 arrays, NaN for classes where the score is undefined).
    Undefined classes are left out of the means, as in HuggingFace evaluate's mean_iou.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)  # exact for counts below 2**53
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square [C, C] matrix, got shape {m.shape}")
    tp = np.diag(m)
    label_area = m.sum(axis=1)
    pred_area = m.sum(axis=0)
    union = label_area + pred_area - tp
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(label_area > 0, tp / label_area, np.nan)
    return {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(acc),
        "overall_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


class ConfusionMatrix:
    """Accumulates a [C, C] int64 confusion matrix (rows = ground truth, cols = prediction).

    With `device=None` the matrix follows the device of the maps it is fed, so GPU predictions
    are counted on the GPU and only C*C numbers ever need to leave it.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._follow_inputs = device is None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, preds, labels) -> None:
        """Count integer class-index maps of shape [B, H, W] or [H, W]; ignore_index labels are skipped."""
        # numpy maps go straight to the matrix's device rather than dragging the matrix to the host.
        device = self.matrix.device if not isinstance(labels, torch.Tensor) else None
        key, cells = _pixel_keys(preds, labels, self.num_classes, self.ignore_index, device)
        counts = torch.bincount(key, minlength=cells + 1)[:cells].view(self.num_classes, self.num_classes)
        if self._follow_inputs and counts.device != self.matrix.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts.to(self.matrix.device)

    def update_from_matrix(self, matrix) -> None:
        """Add another confusion matrix, e.g. one reduced across processes."""
        if isinstance(matrix, ConfusionMatrix):
            if (matrix.num_classes, matrix.ignore_index) != (self.num_classes, self.ignore_index):
                raise ValueError("cannot merge confusion matrices with different num_classes/ignore_index")
            matrix = matrix.matrix
        if not isinstance(matrix, torch.Tensor):
            arr = np.asarray(matrix)
            matrix = torch.from_numpy(arr.astype(np.int64) if arr.dtype.kind in "biu" else arr)
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"expected a matrix of shape {tuple(self.matrix.shape)}, got {tuple(matrix.shape)}")
        if matrix.is_floating_point() or bool((matrix < 0).any()):
            raise ValueError("a confusion matrix holds non-negative integer counts")
        self.matrix += matrix.long().to(self.matrix.device)

    def __iadd__(self, other):
        self.update_from_matrix(other)
        return self

    def compute(self) -> dict:
        return scores_from_matrix(self.matrix)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.matrix.sum())}, device={self.matrix.device})"
        )
