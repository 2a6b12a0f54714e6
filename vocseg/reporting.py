"""TensorBoard as a first-class view without a server, and one place that fans reports out to every tracker.

TensorBoard gets what ClearML gets, under the same grouping (`title/series`): `loss/train`,
`learning_rate/<param group>`, `mIoU/val`, `IoU_per_class/<class>`, the confusion matrix as an image and
the image | truth | prediction | overlay panels, so `tensorboard --logdir outputs/` shows a run completely.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import yaml

from vocseg.constants import VOC_CLASSES

TENSORBOARD_DIR = "tensorboard"


def scalar_title(key: str) -> tuple[str, str]:
    """The (title, series) a training value is shown under, the same in ClearML and TensorBoard."""
    if key == "train_loss":
        return "loss", "train"
    if key == "train_loss_aux":
        return "loss", "train_aux"
    if key.startswith("lr_"):
        return "learning_rate", key.removeprefix("lr_")
    if key == "train_grad_norm":
        return "grad_norm", "train"
    if key == "train_throughput_img_s":
        return "throughput", "images_per_s"
    if key.endswith("_memory_gb"):
        return "memory_gb", key.removesuffix("_memory_gb")
    if key == "epoch":
        return "epoch", "train"
    return key, key


def confusion_matrix_image(matrix: np.ndarray, cell: int = 22) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB heatmap with class names on the rows, ids on the columns."""
    matrix = np.asarray(matrix, dtype=np.float64)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(normalised)
    heat = cv2.applyColorMap((normalised * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    heat = cv2.resize(heat, (n * cell, n * cell), interpolation=cv2.INTER_NEAREST)
    left, top = 118, 26
    image = np.full((top + n * cell, left + n * cell, 3), 255, np.uint8)
    image[top:, left:] = heat
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, name in enumerate(VOC_CLASSES[:n]):
        cv2.putText(image, f"{i:2d} {name}"[:16], (2, top + i * cell + cell - 7), font, 0.38, (0, 0, 0), 1)
        cv2.putText(image, str(i), (left + i * cell + 3, top - 8), font, 0.33, (0, 0, 0), 1)
    return image


class TensorBoardReporter:
    """Writes the run's scalars, per-class IoU, confusion matrix and sample panels under output_dir/tensorboard."""

    def __init__(self, output_dir, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def train(self, step: int, values: dict) -> None:
        for key, value in values.items():
            title, series = scalar_title(key)
            self.writer.add_scalar(f"{title}/{series}", float(value), step)

    def evaluation(self, step: int, results: dict, matrix) -> None:
        titles = (("mIoU", "eval_mean_iou"), ("mAcc", "eval_mean_accuracy"), ("aAcc", "eval_overall_accuracy"))
        for title, key in titles:
            if results[key] is not None:
                self.writer.add_scalar(f"{title}/val", results[key], step)
        for name, iou in results["eval_per_category_iou"].items():
            if iou is not None and not math.isnan(iou):  # undefined IoUs are left out, not drawn as 0
                self.writer.add_scalar(f"IoU_per_class/{name}", iou, step)
        self.writer.add_image("confusion_matrix/val", confusion_matrix_image(np.asarray(matrix)), step,
                              dataformats="HWC")

    def samples(self, step: int, panels) -> None:
        for sample_id, panel in panels:
            self.writer.add_image(f"val_samples/{sample_id}", panel, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Reporters:
    """Sends each report to every active tracker (ClearML's Reporter, TensorBoardReporter)."""

    def __init__(self, *reporters):
        self.reporters = [r for r in reporters if r is not None and getattr(r, "active", True)]

    @property
    def active(self) -> bool:
        return bool(self.reporters)

    def _each(self, method: str, *args) -> None:
        for reporter in self.reporters:
            if hasattr(reporter, method):
                getattr(reporter, method)(*args)

    def train(self, step, values):
        self._each("train", step, values)

    def evaluation(self, step, results, matrix):
        self._each("evaluation", step, results, matrix)

    def samples(self, step, panels):
        self._each("samples", step, panels)

    def best_model(self, path, step, miou):
        self._each("best_model", path, step, miou)

    def artifact(self, name, obj):
        self._each("artifact", name, obj)
