"""ClearML: one task per run, created by the main process, with the config as editable hyperparameters.

Why not accelerate's ClearMLTracker: it stores the config with `connect_configuration` (not an
editable hyperparameter section, so neither a clone edited in the UI nor the HyperParameterOptimizer
can change it, and edits would reach rank 0 only). Here the main process creates the task, connects
each config section with `task.connect`, reads the values back (a clone run by clearml-agent gets
the edited ones) and the engine broadcasts that config to every rank before building anything.

No server configured, one that does not answer debug.ping within a few seconds, or a Task.init that
fails or overruns its deadline (vocseg.clearml_connection): offline mode, which needs no network; the
session records the script/repository/packages an agent needs and is uploaded later with
`python -m vocseg clearml-import ZIP`. Under clearml-agent the rules of vocseg.remote apply (own folder,
no inherited resume, recorded precision).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from vocseg.clearml_connection import (ClearMLTimeout, configured_api_host, deadline, deadline_seconds,  # noqa: F401
                                       offline_reason, unreachable_reason)
from vocseg.config import TrainConfig, config_from_dict
from vocseg.constants import LABEL2ID, VOC_CLASSES, VOC_PALETTE
from vocseg.provenance import entry_script, installed_packages, script_info
from vocseg.remote import remote_run_config

logger = logging.getLogger("vocseg")


def uses_clearml(cfg: TrainConfig) -> bool:
    return cfg.tracker in ("clearml", "all")


def _init_arguments(cfg: TrainConfig, world_size: int, offline: bool) -> dict:
    return dict(
        project_name=cfg.clearml_project,
        task_name=cfg.clearml_task_name or cfg.run_name,
        tags=[cfg.model, cfg.train_split, f"precision:{cfg.mixed_precision or 'no'}", f"processes:{world_size}"],
        reuse_last_task_id=False,
        output_uri=cfg.clearml_output_uri or os.environ.get("CLEARML_OUTPUT_URI") or None,
        auto_connect_arg_parser=False,  # the config is connected section by section (connect_config)
        # No framework hooks (torch.save would register every checkpoint as a model) and, offline,
        # no repository detection: it may contact an update server (record_local_provenance does it locally).
        auto_connect_frameworks={"pytorch": False, "tensorboard": False, "matplotlib": False,
                                 "detect_repository": not offline},
        auto_resource_monitoring=not offline,
    )


def start_task(cfg: TrainConfig, world_size: int):
    """Main process only: create (or, under clearml-agent, attach to) the task. Returns (task, offline).

    Bounded in time: no server, a server that does not answer debug.ping, or a Task.init that fails or runs
    past its deadline ($VOCSEG_CLEARML_TIMEOUT) gives one warning line and an offline task, uploaded later
    with `python -m vocseg clearml-import`. The other ranks wait for this in the config broadcast.
    """
    from clearml import Task

    if os.environ.get("CLEARML_TASK_ID"):
        return attach_agent_task(cfg, world_size), False
    reason = offline_reason()
    if reason is None:
        task, reason = _init_online(cfg, world_size)
        if task is not None:
            return task, False
    logger.warning(f"ClearML runs offline: {reason}. The session is uploaded later with "
                   "python -m vocseg clearml-import (printed at the end)")
    Task.set_offline(True)  # also turns every request of an abandoned online Task.init into a no-op
    # ClearML reports from a forked subprocess on Linux (sdk.development.report_use_subprocess, the class
    # attribute it is read into). Offline it only appends to local files, yet it costs a fork of the whole
    # trainer (its RSS counted again) and ~10 s at close waiting for it: report from a thread instead.
    Task._report_subprocess_enabled = False
    task = Task.init(**_init_arguments(cfg, world_size, offline=True))
    record_local_provenance(task)
    return task, True


def _init_online(cfg: TrainConfig, world_size: int):
    """(task, None), or (None, why not) when Task.init failed or ran past the deadline."""
    from clearml import Task

    seconds = deadline_seconds()
    try:
        with deadline(seconds, "ClearML Task.init"):
            return Task.init(**_init_arguments(cfg, world_size, offline=False)), None
    except ClearMLTimeout as error:
        reason = str(error)
    except Exception as error:  # e.g. wrong credentials: the run still records, offline
        reason = f"Task.init failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
    _forget_unfinished_task(Task)
    return None, reason


def _forget_unfinished_task(Task) -> None:
    """An interrupted Task.init may already have registered its task as the process's main task; the offline
    Task.init would then hand that half-made online task back. Drop it (clearml 2.1.12 keeps it in the
    name-mangled class attribute below; Task.set_offline, called next, silences its background threads)."""
    if Task.current_task() is not None:
        Task._Task__main_task = None


def attach_agent_task(cfg: TrainConfig, world_size: int):
    """Under clearml-agent the task exists on the server; offline is no option (the SDK refuses it there),
    so a server that does not answer stops the replay with one line instead of hanging it."""
    from clearml import Task

    task_id = os.environ["CLEARML_TASK_ID"]
    host = configured_api_host()
    reason = unreachable_reason(host) if host else None
    if reason:
        raise RuntimeError(f"clearml-agent task {task_id}: {reason}; stopping the replay")
    try:
        with deadline(deadline_seconds(), f"ClearML Task.init of agent task {task_id}"):
            return Task.init(**_init_arguments(cfg, world_size, offline=False))
    except ClearMLTimeout as error:
        raise RuntimeError(f"clearml-agent task {task_id}: {error}; stopping the replay") from None


def record_local_provenance(task) -> None:
    """Offline sessions get the script section an agent needs to re-run them after clearml-import: repository,
    branch, commit, uncommitted diff, entry point, working directory and installed packages, read locally."""
    from clearml.backend_api.services import tasks

    info = script_info(entry_script())
    if info is None:
        logger.warning(f"{entry_script()} is not in a git work tree: the offline session records no repository, "
                       "so an agent cannot re-run it after clearml-import")
        script = tasks.Script(entry_point=entry_script().name, working_dir=".")
    else:
        script = tasks.Script(repository=info.repository, branch=info.branch, version_num=info.commit,
                              diff=info.diff, working_dir=info.working_dir, entry_point=info.entry_point,
                              binary=info.binary)
    # Task.set_script fails offline in clearml 2.1.12 (the task has no script object yet): set it whole.
    task._update_script(script)
    task.set_packages(installed_packages())


def connect_config(task, cfg: TrainConfig, recipe_path: str | None = None) -> TrainConfig:
    """Connect each section as hyperparameters and return the config as ClearML hands it back.

    Run locally that is the same config; run by clearml-agent it carries the values edited in the UI
    (or chosen by the HyperParameterOptimizer), as strings: they are converted back to field types.
    The recipe file is attached when the run starts locally; a replay keeps its original's (the agent's
    train.py has no --config and would otherwise attach the default demo recipe).
    """
    values = {}
    for section, fields in cfg.sections().items():
        connected = task.connect(dict(fields), name=section)
        values.update({k: connected[k] for k in fields})
    if recipe_path and Path(recipe_path).is_file() and task.running_locally():
        task.set_configuration_object(name="recipe", config_text=Path(recipe_path).read_text(),
                                      config_type="yaml", description=f"recipe file {recipe_path}")
    return config_from_dict(values, coerce=True)


def adopt_task_run(task, cfg: TrainConfig) -> TrainConfig:
    """Under clearml-agent: the task's own run folder, and a resume only of its own checkpoints (vocseg.remote).
    Every run records where its folder is (user property `run_folder`, read back by clearml-import)."""
    if not task.running_locally():
        recorded = cfg.output_dir
        cfg = remote_run_config(cfg, task.name, task.id)
        for name in ("output_dir", "run_name", "resume_from_checkpoint"):  # the task shows what this run did
            task.set_parameter(f"General/{name}", getattr(cfg, name) or "")
        logger.info(f"clearml-agent replay of task {task.id}: run folder {cfg.output_dir} (recorded: {recorded}), "
                    + ("resuming its own latest checkpoint" if cfg.resume_from_checkpoint else "starting from step 0"))
    task.set_user_properties(run_folder=str(Path(cfg.output_dir).resolve()))
    return cfg


def register_best_model(task, folder, step: int, miou: float, model=None, upload_uri: str | None = None):
    """Register an export folder as the task's output model `best_model`, with mIoU/step metadata.

    The whole folder (weights, config, image processor, vocseg_model.json), so that
    `vocseg.models.load_model(InputModel(id).get_local_copy())` rebuilds the model from the registry alone:
    uploaded as one package when there is a destination (`upload_uri`, or the task's output_uri), else
    registered in place (the folder always holds the current best; only this machine can read it).
    Pass the `model` returned by an earlier call to update the same registry entry.
    """
    from clearml import OutputModel

    folder = Path(folder).resolve()
    if model is None:
        model = OutputModel(task=task, name="best_model", framework="PyTorch", label_enumeration=LABEL2ID,
                            comment="vocseg export folder of the best val mIoU (vocseg.models.load_model)")
    if upload_uri or task.output_uri:
        # auto_delete_file=False: ClearML's default deletes the source folder after packing it.
        model.update_weights_package(weights_path=str(folder), upload_uri=upload_uri, target_filename="best_model",
                                     iteration=step, auto_delete_file=False)
    else:
        model.update_weights(register_uri=str(folder), iteration=step)
    model.set_all_metadata({"mIoU": {"value": f"{miou:.6f}", "type": "float"},
                            "step": {"value": str(step), "type": "int"}}, replace=True)
    return model


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
        self._best_model = None  # one registry entry per run, updated at each improvement

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
        """Register the exported best model folder (vocseg.tracking.register_best_model). Not offline:
        clearml-import registers it from the run folder after uploading the session."""
        if not self.active or self.offline:
            return
        self._best_model = register_best_model(self.task, path, step, miou, model=self._best_model)

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


def recorded_task(task_id: str) -> tuple[str, dict]:
    """(name, hyperparameters as strings) of a task on the server, fetched within the deadline."""
    from clearml import Task

    host = configured_api_host()
    reason = unreachable_reason(host) if host else None
    if reason:
        raise RuntimeError(f"clearml-agent task {task_id}: {reason}")
    try:
        with deadline(deadline_seconds(), f"reading ClearML task {task_id}"):
            task = Task.get_task(task_id=task_id)
            return task.name, dict(task.get_parameters() or {})
    except ClearMLTimeout as error:
        raise RuntimeError(f"clearml-agent task {task_id}: {error}") from None
