"""ClearML: one task per run, created by the main process, with the config as editable hyperparameters.

Why not accelerate's ClearMLTracker: it stores the config with `connect_configuration` (not an
editable hyperparameter section, so neither a clone edited in the UI nor the HyperParameterOptimizer
can change it, and edits would reach rank 0 only). Here the main process creates the task, connects
each config section with `task.connect`, reads the values back (a clone run by clearml-agent gets
the edited ones) and the engine broadcasts that config to every rank before building anything.

No server configured, or one that does not answer within a few seconds: offline mode, which needs
no network; the session can be uploaded later with `python -m vocseg clearml-import ZIP`.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from vocseg.config import TrainConfig, config_from_dict
from vocseg.constants import LABEL2ID, VOC_CLASSES, VOC_PALETTE

logger = logging.getLogger("vocseg")

REACHABILITY_TIMEOUT_S = 3.0
_FALSE = ("", "0", "false", "no", "off")


def uses_clearml(cfg: TrainConfig) -> bool:
    return cfg.tracker in ("clearml", "all")


def configured_api_host() -> str | None:
    """The API server from $CLEARML_API_HOST or clearml.conf; None when no server is configured at all."""
    if os.environ.get("CLEARML_API_HOST"):
        return os.environ["CLEARML_API_HOST"]
    config_file = Path(os.environ.get("CLEARML_CONFIG_FILE", Path.home() / "clearml.conf")).expanduser()
    has_credentials = bool(os.environ.get("CLEARML_API_ACCESS_KEY") or os.environ.get("CLEARML_API_SECRET_KEY"))
    if not config_file.is_file() and not has_credentials:
        return None
    from clearml.backend_api import Session

    return Session.get_api_server_host()


def unreachable_reason(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the server opens within `timeout`; else why not.

    The SDK itself retries an unreachable server for minutes; a run must not hang on that.
    """
    parsed = urlparse(url if "://" in url else f"http://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return f"ClearML server {url} is unreachable ({error})"


def offline_reason() -> str | None:
    if os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() not in _FALSE:
        return "CLEARML_OFFLINE_MODE is set"
    if os.environ.get("CLEARML_TASK_ID"):
        return None  # launched by clearml-agent: the server is there by definition
    host = configured_api_host()
    if host is None:
        return "no ClearML server configured (no clearml.conf, no CLEARML_API_HOST)"
    return unreachable_reason(host)


def start_task(cfg: TrainConfig, world_size: int, mixed_precision: str):
    """Main process only: create (or, under clearml-agent, attach to) the task. Returns (task, offline)."""
    from clearml import Task

    reason = offline_reason()
    if reason:
        Task.set_offline(True)
        # ClearML reports from a forked subprocess on Linux (sdk.development.report_use_subprocess, the class
        # attribute it is read into). Offline it only appends to local files, yet it costs a fork of the whole
        # trainer (its RSS counted again) and ~10 s at close waiting for it: report from a thread instead.
        Task._report_subprocess_enabled = False
        logger.warning(f"ClearML runs offline: {reason}. The session is uploaded later with "
                       "python -m vocseg clearml-import (printed at the end)")
    task = Task.init(
        project_name=cfg.clearml_project,
        task_name=cfg.clearml_task_name or cfg.run_name,
        tags=[cfg.model, cfg.train_split, f"precision:{mixed_precision}", f"processes:{world_size}"],
        reuse_last_task_id=False,
        output_uri=cfg.clearml_output_uri or os.environ.get("CLEARML_OUTPUT_URI") or None,
        auto_connect_arg_parser=False,  # the config is connected section by section below
        # No framework hooks (torch.save would register every checkpoint as a model) and, offline,
        # no repository detection: it may contact an update server.
        auto_connect_frameworks={"pytorch": False, "tensorboard": False, "matplotlib": False,
                                 "detect_repository": not reason},
        auto_resource_monitoring=not reason,
    )
    return task, bool(reason)


def connect_config(task, cfg: TrainConfig, recipe_path: str | None = None) -> TrainConfig:
    """Connect each section as hyperparameters and return the config as ClearML hands it back.

    Run locally that is the same config; run by clearml-agent it carries the values edited in the UI
    (or chosen by the HyperParameterOptimizer), as strings: they are converted back to field types.
    """
    values = {}
    for section, fields in cfg.sections().items():
        connected = task.connect(dict(fields), name=section)
        values.update({k: connected[k] for k in fields})
    if recipe_path and Path(recipe_path).is_file():
        task.set_configuration_object(name="recipe", config_text=Path(recipe_path).read_text(),
                                      config_type="yaml", description=f"recipe file {recipe_path}")
    return config_from_dict(values, coerce=True)


def colourise(mask: np.ndarray) -> np.ndarray:
    return np.asarray(VOC_PALETTE, dtype=np.uint8)[mask.astype(np.int64).clip(0, 255)]


def sample_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction | overlay, in the VOC palette."""
    truth, predicted = colourise(label), colourise(prediction)
    overlay = (0.5 * image + 0.5 * predicted).astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, truth, gap, predicted, gap, overlay], axis=1)


class Reporter:
    """Everything the run shows in ClearML, under stable titles/series so runs line up when compared.

    A no-op without a task (other ranks, or tracker none/tensorboard).
    """

    def __init__(self, task=None, offline: bool = False):
        self.task = task
        self.offline = offline
        self.logger = task.get_logger() if task is not None else None

    @property
    def active(self) -> bool:
        return self.logger is not None

    def train(self, step: int, values: dict) -> None:
        if not self.active:
            return
        for key, value in values.items():
            if key == "train_loss":
                title, series = "loss", "train"
            elif key == "train_loss_aux":
                title, series = "loss", "train_aux"
            elif key.startswith("lr_"):
                title, series = "learning_rate", key.removeprefix("lr_")
            elif key == "train_grad_norm":
                title, series = "grad_norm", "train"
            elif key == "train_throughput_img_s":
                title, series = "throughput", "images_per_s"
            elif key.endswith("_memory_gb"):
                title, series = "memory_gb", key.removesuffix("_memory_gb")
            else:
                title, series = key, key
            self.logger.report_scalar(title, series, float(value), iteration=step)

    def evaluation(self, step: int, results: dict, matrix) -> None:
        if not self.active:
            return
        for title, key in (("mIoU", "eval_mean_iou"), ("mAcc", "eval_mean_accuracy"),
                           ("aAcc", "eval_overall_accuracy")):
            if results[key] is not None:
                self.logger.report_scalar(title, "val", results[key], iteration=step)
        per_class = results["eval_per_category_iou"]
        for name, iou in per_class.items():
            if iou is not None:  # ClearML stores NaN as 0.0: an undefined IoU is left out, not reported as 0
                self.logger.report_scalar("IoU per class", name, iou, iteration=step)
        matrix = np.asarray(matrix, dtype=np.float64)
        normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        self.logger.report_confusion_matrix("Confusion matrix (rows: truth, normalised)", "val", normalised,
                                            iteration=step, xaxis="predicted", yaxis="truth",
                                            xlabels=list(VOC_CLASSES), ylabels=list(VOC_CLASSES),
                                            yaxis_reversed=True)
        self.logger.report_histogram("IoU per class (bar)", "val", [iou or 0.0 for iou in per_class.values()],
                                     iteration=step, xlabels=list(per_class), yaxis="IoU")

    def samples(self, step: int, panels: list[tuple[str, np.ndarray]]) -> None:
        if not self.active:
            return
        for sample_id, panel in panels:
            self.logger.report_image("val samples (image | truth | prediction | overlay)", sample_id,
                                     iteration=step, image=panel)

    def best_model(self, path: Path, step: int, miou: float) -> None:
        """Register the exported best model (uploaded when output_uri is set). Not offline: it crashes there."""
        if not self.active or self.offline:
            return
        from clearml import OutputModel

        weights = path / "model.safetensors"
        model = OutputModel(task=self.task, name="best_model", framework="PyTorch", label_enumeration=LABEL2ID,
                            comment=f"best val mIoU {miou:.4f} at step {step}")
        model.update_weights(weights_filename=str(weights), iteration=step, auto_delete_file=False)

    def artifact(self, name: str, obj) -> None:
        if self.active:
            self.task.upload_artifact(name, obj)

    def close(self) -> str | None:
        """Close the task; offline, return the session zip to upload later."""
        if self.task is None:
            return None
        folder = self.task.get_offline_mode_folder() if self.offline else None
        self.task.close()
        return f"{folder}.zip" if folder else None
