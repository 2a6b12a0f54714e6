"""The training loop, as plain functions read top to bottom: train() -> build_run -> train_loop -> finish.

Everything device-, precision- and process-related is accelerate's: the same code runs on one
CPU, one GPU or N GPUs, in fp32/bf16/fp16, depending on `accelerate launch` / `accelerate config`.
What vocseg adds around it: a run folder owned by one run (vocseg.run_folder), a loop position that
survives a change of world size (vocseg.sampling), stop requests and divergence detection without
per-step host syncs (vocseg.control), and an exact evaluation under any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader

from vocseg.checkpoint import RUN_CONFIG_FILE, list_checkpoints, save_checkpoint
from vocseg.config import (CONFIGS_DIR, TrainConfig, check_warmup, config_from_dict, global_batch_warning,
                           validate_config)
from vocseg.constants import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from vocseg.control import NonFiniteMonitor, StopAgreement, StopRequest
from vocseg.data import load_split
from vocseg.data.sources import check_split_available
from vocseg.data.synthetic import make_synthetic_tree
from vocseg.data.transforms import SegmentationTransform, augments_for, collate, normalize_on_device, with_augmentation
from vocseg.errors import EvaluationFailed, TrainingDiverged, UsageError, on_main_then_everywhere
from vocseg.inference import logits_at_label_size, predict_logits
from vocseg.log import setup_logging
from vocseg.losses import segmentation_loss
from vocseg.metrics import batch_confusion_matrices, scores_from_matrix
from vocseg.models import build_model, export_model
from vocseg.optim import build_optimizer, build_scheduler
from vocseg.progress import TrainProgress, progress_bar
from vocseg.reporting import TensorBoardReporter, Reporters
from vocseg.run_folder import check_output_dir_free, check_resume_config, check_shared_folder, claim_folder
from vocseg.sampling import EpochShuffleSampler, eval_batches, sample_sizes
from vocseg.remote import resolve_mixed_precision
from vocseg.tracking import Reporter, adopt_task_run, connect_config, sample_panel, start_task, uses_clearml

logger = logging.getLogger("vocseg")  # main process only: see vocseg.log.setup_logging


@dataclass
class TrainState:
    """Loop position and best score; saved in every checkpoint (accelerator.register_for_checkpointing).

    The position is in *samples* of the epoch's permutation, with the layout that consumed them, so a run
    resumed with another number of processes continues at exactly the same sample.
    """
    step: int = 0  # optimiser steps done
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of `epoch`'s permutation already consumed (all ranks together)
    total_steps: int = 0  # fixed by the first run: the LR schedule's length
    global_batch_size: int = 0
    num_processes: int = 0
    per_device_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    best_eval_mean_iou: float = -1.0
    best_step: int = -1
    legacy_batch_in_epoch: int | None = None  # checkpoints written before positions were counted in samples

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if "batch_in_epoch" in state and "samples_in_epoch" not in state:
            state = {**state, "legacy_batch_in_epoch": state.pop("batch_in_epoch")}
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


@dataclass
class Run:
    """What the loop's functions share: built once by build_run."""
    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    sampler: EpochShuffleSampler
    train_transform: SegmentationTransform
    val_view: object  # the augmented val dataset (eval transform applied lazily)
    state: TrainState
    reporter: Reporters
    output_dir: Path
    stop: StopRequest = None
    agreement: StopAgreement = None
    monitor: NonFiniteMonitor = None
    progress: TrainProgress = None
    last_eval: dict | None = None
    last_saved_step: int = -1
    skipped_steps: int = 0  # --on_nonfinite skip
    scaler_skips: int = 0  # fp16 steps skipped in a row by the gradient scaler
    window: dict = field(default_factory=dict)  # loss / samples since the last log line (device tensors)
    totals: dict = field(default_factory=dict)  # loss / samples / time of this session, for all_results.json
    mean: tuple = (0.0, 0.0, 0.0)  # the model's input normalisation
    std: tuple = (1.0, 1.0, 1.0)
    parameters: list = field(default_factory=list)  # the trainable parameters, listed once


# ----------------------------------------------------------------------------------------------------- setup

def _name_and_track(cfg: TrainConfig, state: PartialState) -> tuple[dict, Reporter]:
    """Main process: name the run, check its folder is free, create the ClearML task and read the config back."""
    if cfg.synthetic_data and cfg.data_root:  # an explicit data root wins over the demo's synthetic tree
        logger.info(f"data_root {cfg.data_root} given: not using the synthetic demo data")
        cfg.synthetic_data = False
    cfg.run_name = cfg.run_name or f"{cfg.recipe or cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.output_dir = cfg.output_dir or str(Path("outputs") / cfg.run_name)
    if cfg.clearml_queue and state.num_processes > 1:
        raise UsageError("--clearml_queue enqueues the run and exits: start it as one process "
                         "(python train.py ... --clearml_queue Q --num_processes N for an N-GPU replay)")
    # Recorded for clearml-agent replays; enqueued from a laptop, it is the N asked for.
    cfg.num_processes = (cfg.num_processes or state.num_processes) if cfg.clearml_queue else state.num_processes
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)  # recorded: a replay trains the same way
    if not cfg.clearml_queue and not os.environ.get("CLEARML_TASK_ID"):  # an agent's folder comes from its task
        check_output_dir_free(Path(cfg.output_dir), cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        if not cfg.synthetic_data:  # a wrong --data_root fails here, in a second, not after the model is built
            for split in (cfg.train_split, cfg.val_split):
                check_split_available(split, cfg.data_root, cfg.sbd_root)
    reporter = Reporter()
    if uses_clearml(cfg):
        task, offline = start_task(cfg, state.num_processes)
        recipe = CONFIGS_DIR / f"{cfg.recipe}.yaml"
        cfg = connect_config(task, cfg, str(recipe) if recipe.is_file() else None)
        cfg = adopt_task_run(task, cfg)  # under clearml-agent: the task's own folder, resuming only itself
        validate_config(cfg)  # values edited on the server are checked like flags
        reporter = Reporter(task, offline)
        if cfg.clearml_queue and task.running_locally():
            logger.info(f"enqueued ClearML task {task.id} on queue {cfg.clearml_queue}; exiting")
            task.execute_remotely(queue_name=cfg.clearml_queue, exit_process=True)
    return cfg.to_dict(), reporter


def resolve_run(cfg: TrainConfig, state: PartialState) -> tuple[TrainConfig, Reporter]:
    """Name the run and create the ClearML task on the main process; then give every rank that same config,
    before anything is built from it (an error on the main process reaches every rank)."""
    kept = {}

    def on_main():
        values, kept["reporter"] = _name_and_track(cfg, state)
        return values

    cfg = config_from_dict(on_main_then_everywhere(state, on_main))
    fingerprints = gather_object([hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"processes disagree on the config: {fingerprints}")
    logger.info(f"config {fingerprints[0]} identical on {len(fingerprints)} process(es)")
    return cfg, kept.get("reporter", Reporter())


@dataclass
class Claim:
    """The main process's decision about the run folder, broadcast to every rank."""
    token: str
    resume: str | None
    saved_config: dict | None


def claim_run_folder(cfg: TrainConfig) -> tuple[Claim, object]:
    """Main process: lock the folder, decide what to resume, check the resumed config, write config.yaml."""
    output_dir = Path(cfg.output_dir)
    lock, resume = claim_folder(output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
    try:
        saved = None
        if resume is not None:
            source = resume / RUN_CONFIG_FILE if (resume / RUN_CONFIG_FILE).is_file() else output_dir / "config.yaml"
            saved = yaml.safe_load(source.read_text()) if source.is_file() else None
            if saved:
                check_resume_config(saved, cfg.to_dict(), cfg.allow_config_change, output_dir, resume)
        else:
            cfg.save(output_dir / "config.yaml")  # the run's config as it started; resumes never overwrite it
    except BaseException:
        lock.release()
        raise
    return Claim(lock.token, str(resume) if resume else None, saved), lock


def plan_layout(cfg: TrainConfig, saved: dict | None, num_processes: int) -> int:
    """Gradient accumulation for this session: the run's global batch is kept when the world size changes.

    Resumed on fewer processes, accumulation grows to keep per-device batch x processes x accumulation equal to
    the run's; where no whole number does it, the resume is refused with the flags that would.
    """
    accumulation = cfg.gradient_accumulation_steps
    if not saved or not saved.get("num_processes"):
        return accumulation
    recorded = saved["per_device_train_batch_size"] * saved["num_processes"] * saved["gradient_accumulation_steps"]
    per_step = cfg.per_device_train_batch_size * num_processes
    if per_step * accumulation == recorded or cfg.allow_config_change:
        return accumulation
    if recorded % per_step == 0:
        logger.warning(f"the run's global batch is {recorded}; with {num_processes} process(es) x "
                       f"{cfg.per_device_train_batch_size} per device, gradient_accumulation_steps "
                       f"{accumulation} -> {recorded // per_step} keeps it")
        return recorded // per_step
    options = [f"--per_device_train_batch_size {recorded // (num_processes * a)} --gradient_accumulation_steps {a}"
               for a in range(1, recorded + 1) if recorded % (num_processes * a) == 0][:2]
    raise UsageError(f"the run's global batch is {recorded} ({saved['per_device_train_batch_size']} x "
                     f"{saved['num_processes']} process(es) x {saved['gradient_accumulation_steps']}); "
                     f"{num_processes} process(es) x {cfg.per_device_train_batch_size} cannot make it: resume with "
                     + (" or ".join(options) if options else f"a process count that divides {recorded}"))


def demo_data_path(seed: int = 0) -> Path:
    return Path(os.environ.get("VOCSEG_CACHE", Path.home() / ".cache" / "vocseg")) / f"synthetic-demo-v1-seed{seed}"


def demo_data_root(seed: int = 0) -> Path:
    """The synthetic demo tree, written on first use."""
    root = demo_data_path(seed)
    if not (root / "synthetic_manifest.json").exists():
        make_synthetic_tree(root, num_train=300, num_val=100, sbd=True, seed=seed, scale=0.5)
    return root


def build_datasets(cfg: TrainConfig, accelerator: Accelerator):
    data_root, sbd_root = cfg.data_root, cfg.sbd_root
    # One process per machine builds the Arrow caches (and the demo tree); the others then read them.
    with accelerator.local_main_process_first():
        if cfg.synthetic_data:
            data_root = demo_data_root()
            sbd_root = data_root / "benchmark_RELEASE"
        train_set = load_split(cfg.train_split, data_root, sbd_root, cfg.cache_dir, cfg.bad_samples)
        val_set = load_split(cfg.val_split, data_root, sbd_root, cfg.cache_dir, cfg.bad_samples)
    if cfg.max_eval_samples:
        val_set = val_set.select(range(min(cfg.max_eval_samples, len(val_set))))
    return train_set, val_set


def build_train_loader(cfg: TrainConfig, accelerator: Accelerator, train_set, augment):
    global_batch = cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    if len(train_set) < global_batch:
        raise UsageError(f"train split {cfg.train_split} has {len(train_set)} samples, fewer than one global batch "
                         f"({global_batch} = {cfg.per_device_train_batch_size} per device x {accelerator.num_processes}"
                         f" process(es) x {cfg.gradient_accumulation_steps} accumulation): lower "
                         "per_device_train_batch_size")
    transform = SegmentationTransform(augment, seed=cfg.seed)
    sampler = EpochShuffleSampler(len(train_set), cfg.seed, global_batch)
    # Own generator: building a loader iterator must not draw from the global torch RNG, which also drives
    # dropout / drop-path; otherwise a resumed run diverges from an uninterrupted one.
    loader = DataLoader(with_augmentation(train_set, transform), batch_size=cfg.per_device_train_batch_size,
                        sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers, drop_last=True,
                        pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler, transform


def total_train_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    total = cfg.num_train_epochs * steps_per_epoch
    check_warmup(cfg.lr_warmup_steps, total)
    return total


def build_reporters(cfg: TrainConfig, accelerator: Accelerator, clearml: Reporter, output_dir: Path) -> Reporters:
    tensorboard = None
    if accelerator.is_main_process and cfg.tracker in ("tensorboard", "all"):
        tensorboard = TensorBoardReporter(output_dir, cfg.to_dict())
    return Reporters(clearml, tensorboard)


def build_run(cfg: TrainConfig, clearml: Reporter, claim: Claim) -> Run:
    """Accelerator, model, data, optimiser, schedule, and the resumed position: everything the loop needs."""
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, project_dir=str(output_dir))
    configure_cpu_threads(accelerator.device.type == "cpu")
    batch_warning = global_batch_warning(cfg, accelerator.num_processes)
    if batch_warning:
        logger.warning(batch_warning)
    set_seed(cfg.seed)

    model = build_model(cfg)
    if not (cfg.synthetic_data or cfg.pretrained or cfg.backbone_weights):
        logger.warning(f"{cfg.model} starts from random weights: published recipe figures assume ImageNet "
                       "weights (--backbone_weights FILE for DeepLab, --pretrained DIR_OR_HUB_ID for SegFormer)")
    mean, std = model.image_mean, model.image_std
    if cfg.sync_bn and accelerator.num_processes > 1:  # DeepLab's BatchNorms, SegFormer's decode-head one
        if accelerator.device.type == "cuda":  # torch's SyncBatchNorm has no CPU implementation
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("sync_bn needs CUDA devices; keeping per-process BatchNorm")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, val_set = build_datasets(cfg, accelerator)
    train_augment, eval_augment = augments_for(cfg, mean, std)  # the scale protocol (native / fit), crops, colour
    train_loader, sampler, transform = build_train_loader(cfg, accelerator, train_set, train_augment)
    val_view = with_augmentation(val_set, eval_augment)
    optimizer = build_optimizer(cfg, model)
    if cfg.torch_compile:
        model = torch.compile(model)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = sampler.samples_per_epoch // sampler.global_batch_size
    state = TrainState(total_steps=total_train_steps(cfg, steps_per_epoch), global_batch_size=sampler.global_batch_size,
                       num_processes=accelerator.num_processes, per_device_batch_size=cfg.per_device_train_batch_size,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    planned_total = state.total_steps
    scheduler = build_scheduler(cfg, optimizer, state.total_steps)
    accelerator.register_for_checkpointing(scheduler, state)
    run = Run(cfg, accelerator, model, optimizer, scheduler, train_loader, sampler, transform, val_view, state,
              Reporters(), output_dir, mean=mean, std=std,
              parameters=[p for p in model.parameters() if p.requires_grad])
    if claim.resume is not None:
        resume_position(run, Path(claim.resume), planned_total)
    run.reporter = build_reporters(cfg, accelerator, clearml, output_dir)  # last: a failed setup leaves no logs
    if claim.resume is None:
        run.reporter.artifact("config", cfg.to_dict())
    logger.info(f"training {cfg.model} on {cfg.train_split} ({len(train_set)} samples, {steps_per_epoch} steps per "
                f"epoch), scoring on {cfg.val_split} ({len(val_set)}); {state.total_steps} steps of "
                f"{cfg.per_device_train_batch_size} x {accelerator.num_processes} process(es) x "
                f"{cfg.gradient_accumulation_steps} accumulation; {accelerator.device}, mixed precision "
                f"{accelerator.mixed_precision}; output {output_dir}")
    return run


def resume_position(run: Run, checkpoint: Path, planned_total: int) -> None:
    """Load the checkpoint and check the loop can continue exactly where it stopped."""
    accelerator, state, cfg = run.accelerator, run.state, run.cfg
    missing = [i for i in range(accelerator.num_processes) if not (checkpoint / f"random_states_{i}.pkl").is_file()]
    if missing:
        logger.warning(f"{checkpoint} has no RNG state for rank(s) {missing} (it was written by fewer processes): "
                       "their dropout / drop-path randomness starts afresh; data order and LR schedule stay exact")
    layout = (state.global_batch_size, state.num_processes, state.per_device_batch_size,
              state.gradient_accumulation_steps)
    accelerator.load_state(str(checkpoint))
    # load_state restores accelerate's micro-batch counter, which counts in the old accumulation. A checkpoint
    # sits on an optimiser-step boundary, so this session's first window starts at its first micro-batch.
    accelerator.step = 0
    if state.legacy_batch_in_epoch is not None:  # older checkpoints counted per-process batches
        per_step = cfg.per_device_train_batch_size * accelerator.num_processes
        state.samples_in_epoch = state.legacy_batch_in_epoch * per_step
        state.legacy_batch_in_epoch = None
        logger.warning(f"{checkpoint} predates sample-exact positions; assuming it was written with this layout")
    if state.samples_in_epoch % layout[0]:
        raise UsageError(f"{checkpoint} stopped after {state.samples_in_epoch} samples of epoch {state.epoch}, not a "
                         f"whole number of this session's global batches ({layout[0]}): resume with the run's global "
                         f"batch ({state.global_batch_size})")
    if state.total_steps != planned_total:
        if cfg.allow_config_change:
            logger.warning(f"schedule length {state.total_steps} -> {planned_total} steps (--allow_config_change)")
            state.total_steps = planned_total
        else:
            logger.warning(f"keeping the run's schedule of {state.total_steps} steps (this session computed "
                           f"{planned_total}: the split's size changed?)")
    (state.global_batch_size, state.num_processes, state.per_device_batch_size,
     state.gradient_accumulation_steps) = layout
    adopt_best_model(run, checkpoint)
    run.last_saved_step = state.step
    logger.info(f"resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, sample {state.samples_in_epoch} "
                f"of {run.sampler.samples_per_epoch}")


def adopt_best_model(run: Run, checkpoint: Path) -> None:
    """The evaluation right after a checkpoint is not in it: take its best score from best_model/ if newer."""
    meta_path = run.output_dir / "best_model" / "vocseg_model.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    step, miou = meta.get("step", -1), meta.get("eval_mean_iou")
    if miou is not None and step <= run.state.step and miou > run.state.best_eval_mean_iou:
        run.state.best_eval_mean_iou, run.state.best_step = miou, step


def configure_cpu_threads(accelerator_cpu: bool) -> None:
    """One CPU process uses every core unless told otherwise.

    `accelerate launch` hands its process OMP_NUM_THREADS=1 when it has no better idea (no --cpu, or one physical
    core): a default, not a choice, and it makes the quick start several times slower on a laptop. A count that
    was chosen is kept: VOCSEG_CPU_THREADS first, else OMP_NUM_THREADS other than the launcher's fallback (1 can
    be the right choice on a busy shared machine, where more threads than free cores run slower).
    """
    if not accelerator_cpu or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    omp = os.environ.get("OMP_NUM_THREADS")
    launcher_fallback = omp == "1" and "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by accelerate launch
    chosen = os.environ.get("VOCSEG_CPU_THREADS") or (None if launcher_fallback else omp)
    try:
        threads = int(chosen) if chosen else os.cpu_count() or 1
    except ValueError:
        raise UsageError(f"VOCSEG_CPU_THREADS / OMP_NUM_THREADS {chosen!r}: expected a whole number "
                         "of threads") from None
    torch.set_num_threads(max(threads, 1))


# ----------------------------------------------------------------------------------------------------- steps

def prepare_inputs(batch: dict, model_mean, model_std, channels_last: bool) -> torch.Tensor:
    pixel_values = normalize_on_device(batch["pixel_values"], model_mean, model_std)
    return pixel_values.contiguous(memory_format=torch.channels_last) if channels_last else pixel_values


def train_micro_step(run: Run, batch: dict) -> None:
    """Forward and backward of one micro-batch; on the last of an accumulation window, the optimiser step."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    with accelerator.accumulate(model):
        outputs = model(prepare_inputs(batch, run.mean, run.std, cfg.channels_last),
                        output_size=batch["labels"].shape[-2:])
        loss, parts = segmentation_loss(outputs, batch["labels"], cfg.aux_weight, cfg.loss_average)
        accelerator.backward(loss)
        window = run.window
        window["loss"] = window.get("loss", 0) + loss.detach()  # tensors: .item() would sync every step
        window["accumulated"] = window.get("accumulated", 0) + loss.detach()
        window["aux"] = parts.get("loss_aux")
        if accelerator.sync_gradients:
            grad_norm = clip_or_measure_grad_norm(run)
            window["grad_norm"] = grad_norm
            optimizer_step(run, window["accumulated"], grad_norm)
            run.optimizer.zero_grad(set_to_none=True)
            window["accumulated"] = 0


def clip_or_measure_grad_norm(run: Run) -> torch.Tensor:
    """The gradients' total norm (logged, and checked for divergence), clipped when max_grad_norm is set.

    Without clipping only the norm is computed: clip_grad_norm_(inf) would also multiply every gradient by 1.
    """
    accelerator, parameters = run.accelerator, run.parameters
    sharded = accelerator.distributed_type not in ("NO", "MULTI_GPU", "MULTI_CPU")  # FSDP / DeepSpeed: theirs
    if run.cfg.max_grad_norm or sharded:
        return accelerator.clip_grad_norm_(parameters, run.cfg.max_grad_norm or float("inf"))
    accelerator.unscale_gradients()  # fp16: the norm of the true gradients, not of the scaled ones
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def optimizer_step(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Step the weights and the schedule, unless the step is non-finite and is to be skipped.

    fp16: the GradScaler already skips overflowing steps (and shrinks its scale); those are normal and move
    no LR, but a scaler that skips max_nonfinite_steps steps in a row has diverged. Otherwise non-finite
    steps are counted on the device (`stop`) or checked here with a host sync (`skip`).
    """
    accelerator, cfg = run.accelerator, run.cfg
    if accelerator.scaler is None and cfg.on_nonfinite == "skip" and not _finite(loss, grad_norm):
        skip_step(run)
        return
    run.optimizer.step()
    if accelerator.optimizer_step_was_skipped:  # fp16 overflow (known only with a scaler: no extra sync)
        run.scaler_skips += 1
        if run.scaler_skips >= cfg.max_nonfinite_steps:
            raise TrainingDiverged(f"fp16: the gradient scaler skipped {run.scaler_skips} steps in a row (to step "
                                   f"{run.state.step + 1}); {last_good_checkpoint(run)}: lower the learning rate "
                                   "or train in bf16")
        return
    run.scaler_skips = 0
    run.scheduler.step()
    run.monitor.record(run.state.step + 1, loss, grad_norm)


def _finite(loss, grad_norm) -> bool:
    return bool(torch.isfinite(loss).all()) and bool(torch.isfinite(torch.as_tensor(grad_norm)).all())


def skip_step(run: Run) -> None:
    """--on_nonfinite skip: leave the weights and the LR as they are, count it, give up after too many."""
    run.skipped_steps += 1
    logger.warning(f"step {run.state.step + 1}: non-finite loss or gradient norm, step skipped "
                   f"({run.skipped_steps} of at most {run.cfg.max_nonfinite_steps})")
    if run.skipped_steps >= run.cfg.max_nonfinite_steps:
        raise TrainingDiverged(f"{run.skipped_steps} steps with a non-finite loss or gradient norm (last at step "
                               f"{run.state.step + 1}); {last_good_checkpoint(run)}: lower the learning rate")


def last_good_checkpoint(run: Run) -> str:
    checkpoints = list_checkpoints(run.output_dir)
    return f"last good checkpoint: {checkpoints[-1]}" if checkpoints else "no checkpoint was written"


def ensure_finite(run: Run) -> None:
    """Before anything is logged as progress, saved or exported: stop if a step went non-finite since."""
    bad, first = run.monitor.read(run.accelerator)
    if bad:
        raise TrainingDiverged(f"the loss or gradient norm became non-finite at step {first} (learning rate too "
                               f"high?); nothing was saved from it; {last_good_checkpoint(run)}")


# ------------------------------------------------------------------------------------------------------ loop

def every(step: int, interval: int) -> bool:
    """True every `interval` steps; 0 (or less) turns the periodic action off (it still runs at the end)."""
    return interval > 0 and step % interval == 0


def train_loop(run: Run) -> bool:
    """Train to total_steps or until a stop request; returns True if stopped early (checkpoint saved)."""
    state, accelerator = run.state, run.accelerator
    run.model.train()
    run.window.update(start=time.perf_counter(), samples=0, count=0)
    stopped = False
    while state.step < state.total_steps and not stopped:
        run.sampler.set_position(state.epoch, state.samples_in_epoch)
        run.train_transform.epoch = state.epoch  # before the iterator exists: workers copy the transform then
        if len(run.train_loader) == 0:
            raise RuntimeError(f"no training batch left in epoch {state.epoch} at sample {state.samples_in_epoch}")
        for batch in run.train_loader:
            train_micro_step(run, batch)
            run.window["count"] += 1
            if not accelerator.sync_gradients:
                continue
            advance(run)
            stopped = run.agreement.poll(run.stop.requested)
            stopped = after_step(run, stopped)
            if state.step >= state.total_steps or stopped:
                break
    return stopped


def advance(run: Run) -> None:
    state = run.state
    state.step += 1
    state.samples_in_epoch += state.global_batch_size
    run.window["samples"] += state.global_batch_size
    if state.samples_in_epoch >= run.sampler.samples_per_epoch:  # the epoch's last step
        state.epoch, state.samples_in_epoch = state.epoch + 1, 0
    run.progress.update(state.step)


def after_step(run: Run, stop_agreed: bool) -> bool:
    """Log, checkpoint, then evaluate (in that order: an evaluation that fails leaves the step saved).

    Returns True when the run must stop (a stop request, honoured before any evaluation).
    """
    cfg, state = run.cfg, run.state
    last = state.step >= state.total_steps
    if every(state.step, cfg.logging_steps) or last or stop_agreed:
        log_train(run)
    if stop_agreed:
        save(run)
        return True
    will_save = every(state.step, cfg.checkpointing_steps) or last
    will_eval = every(state.step, cfg.eval_steps) or last
    if will_save or will_eval:  # nothing is saved, scored or exported from a diverged model
        ensure_finite(run)
        ensure_finite_weights(run)
    if will_save:
        save(run)
    if will_eval:
        run.last_eval = run_evaluation(run)
        if run.last_eval is None:  # stopped during the evaluation
            save(run)
            return True
    return False


def ensure_finite_weights(run: Run) -> None:
    """An update can overflow the weights (or BatchNorm statistics) while its loss and gradient were finite."""
    tensors = [*run.model.parameters(), *(b for b in run.model.buffers() if b.is_floating_point())]
    finite = torch.stack([t.detach().isfinite().all() for t in tensors]).all()
    if not bool(finite):
        raise TrainingDiverged(f"the weights became non-finite at step {run.state.step} (learning rate too high?); "
                               f"nothing was saved from them; {last_good_checkpoint(run)}")


def save(run: Run) -> None:
    if run.last_saved_step == run.state.step:
        return
    ensure_finite(run)
    ensure_finite_weights(run)
    path = save_checkpoint(run.accelerator, run.output_dir, run.state.step, run.cfg.checkpoints_total_limit,
                           run.cfg.to_dict())
    run.last_saved_step = run.state.step
    logger.info(f"checkpoint saved: {path}")


def log_train(run: Run) -> None:
    """One line (and one tracker point) every logging_steps: loss and throughput over all ranks, lr per group."""
    accelerator, state, window = run.accelerator, run.state, run.window
    elapsed = time.perf_counter() - window["start"]
    loss = window.get("loss", torch.zeros(())) / max(window["count"], 1)
    if accelerator.num_processes > 1:
        loss = accelerator.reduce(torch.as_tensor(loss, device=accelerator.device), "mean")
    ensure_finite(run)
    values = {"train_loss": float(loss), "train_throughput_img_s": window["samples"] / max(elapsed, 1e-9),
              "epoch": state.epoch}
    if window.get("aux") is not None:
        values["train_loss_aux"] = float(window["aux"])
    for group in run.optimizer.param_groups:
        values[f"lr_{group['name']}"] = group["lr"]
    if window.get("grad_norm") is not None:
        values["train_grad_norm"] = float(window["grad_norm"])
    if torch.cuda.is_available():
        values["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    values["cpu_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (Linux: KiB)
    run.reporter.train(state.step, values)
    if accelerator.is_main_process:
        with (run.output_dir / "train_log.jsonl").open("a") as f:
            f.write(json.dumps({"step": state.step, **values}) + "\n")
    totals = run.totals
    totals["loss_sum"] = totals.get("loss_sum", 0.0) + values["train_loss"] * window["count"]
    totals["micro_batches"] = totals.get("micro_batches", 0) + window["count"]
    logger.info(f"step {state.step}/{state.total_steps} | epoch {state.epoch} | loss {values['train_loss']:.4f} | "
                f"lr {run.optimizer.param_groups[0]['lr']:.3g} | {values['train_throughput_img_s']:.1f} img/s | "
                f"ETA {run.progress.eta(state.step)}")
    window.update(loss=0, count=0, samples=0, start=time.perf_counter())


# ------------------------------------------------------------------------------------------------ evaluation

@dataclass
class EvalOptions:
    batch_size: int = 1
    num_workers: int = 0
    channels_last: bool = False
    max_eval_size: int | None = None
    predict: object = None  # (pixel_values, label_size) -> logits, e.g. sliding window / TTA
    desc: str = "eval"


def eval_loader(dataset, accelerator, options: EvalOptions) -> DataLoader:
    """This rank's share of the split, same-size images batched together (batch 1 needs no sizes)."""
    sizes = len(dataset) if options.batch_size == 1 else sample_sizes(dataset)
    batches = eval_batches(sizes, options.batch_size, accelerator.process_index, accelerator.num_processes)
    # Own generator: creating the iterator must not draw from the global RNG (dropout of the training after it).
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=options.num_workers,
                      pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(0))


def forward_for_eval(model, pixel_values, batch: dict, options: EvalOptions) -> torch.Tensor:
    """Logits at each label's size; images over max_eval_size run smaller (still scored at native size)."""
    longest = max(pixel_values.shape[-2:])
    if options.max_eval_size and longest > options.max_eval_size:
        scale = options.max_eval_size / longest
        size = [max(1, round(side * scale)) for side in pixel_values.shape[-2:]]
        pixel_values = torch.nn.functional.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        batch = {**batch, "image_sizes": [tuple(size)] * len(batch["ids"])}  # batches hold one size (eval_batches)
    forward = options.predict or (lambda images, output_size: predict_logits(model, images, output_size=output_size))
    return logits_at_label_size(forward, pixel_values, batch)


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        word in text for word in ("out of memory", "can't allocate", "cannot allocate", "allocat"))


@torch.inference_mode()
def evaluate(model, dataset, accelerator: Accelerator, options: EvalOptions | None = None,
             stop: StopRequest | None = None, agreement: StopAgreement | None = None) -> torch.Tensor | None:
    """The [C, C] confusion matrix of the whole split at native label resolution, exact under any world size.

    Each rank scores its own samples (no padding, no duplicates) and the matrices are summed once. A stop
    request between batches abandons the evaluation on every rank (returns None).
    """
    options = options or EvalOptions()
    was_training = model.training
    model.eval()
    total = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=accelerator.device)
    aborted = False
    channels_last = options.channels_last
    with accelerator.autocast():
        for batch in progress_bar(eval_loader(dataset, accelerator, options), desc=options.desc, leave=False,
                                  main_process=accelerator.is_local_main_process):
            if stop is not None and stop.requested:
                aborted = True
                break
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            pixel_values = prepare_inputs({"pixel_values": batch["pixel_values"].to(accelerator.device)},
                                          model.image_mean, model.image_std, channels_last)
            try:
                logits = forward_for_eval(model, pixel_values, batch, options)
            except (RuntimeError, MemoryError) as error:
                if not _is_out_of_memory(error):
                    raise
                height, width = labels.shape[-2:]
                raise EvaluationFailed(f"evaluation ran out of memory on {', '.join(batch['ids'])} ({width}x{height} "
                                       f"px): {str(error).splitlines()[0][:160]}; evaluate huge images smaller with "
                                       "--max_eval_size 2048 (or score them with a sliding window: vocseg evaluate "
                                       "--mode slide)") from None
            total += batch_confusion_matrices(logits.argmax(1), labels, NUM_CLASSES, IGNORE_INDEX).sum(0)
    model.train(was_training)
    if agreement is not None:
        aborted = agreement.now(aborted)
    if aborted:
        return None
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return total.cpu()


def eval_results(matrix: torch.Tensor) -> dict:
    """Scores in the all_results.json shape: per-class IoU by class name, None where undefined."""
    scores = scores_from_matrix(matrix)

    def number(x):
        return None if x is None or math.isnan(x) else float(x)

    return {
        "eval_mean_iou": number(scores["mean_iou"]),
        "eval_mean_accuracy": number(scores["mean_accuracy"]),
        "eval_overall_accuracy": number(scores["overall_accuracy"]),
        "eval_per_category_iou": {name: number(v) for name, v in zip(VOC_CLASSES, scores["per_category_iou"])},
        "eval_per_category_accuracy": {name: number(v)
                                       for name, v in zip(VOC_CLASSES, scores["per_category_accuracy"])},
    }


def share_batchnorm_statistics(model, accelerator: Accelerator) -> None:
    """Give every rank rank 0's BatchNorm running statistics, which the exported model carries: without it each
    rank scores its share of the split with its own statistics and the logged mIoU is not the export's."""
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def run_evaluation(run: Run) -> dict | None:
    """Score the val split, report it, export a new best model. None if a stop request cut it short."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    share_batchnorm_statistics(run.model, accelerator)
    bare = accelerator.unwrap_model(run.model)
    options = EvalOptions(batch_size=cfg.per_device_eval_batch_size, num_workers=cfg.num_workers,
                          channels_last=cfg.channels_last, max_eval_size=cfg.max_eval_size, desc=f"eval @ {state.step}")
    try:
        matrix = evaluate(bare, run.val_view, accelerator, options, run.stop, run.agreement)
    except EvaluationFailed as error:
        raise EvaluationFailed(f"step {state.step}: {error}; training state up to step {run.last_saved_step} is "
                               f"saved in {run.output_dir / 'checkpoints'}") from None
    if matrix is None:
        logger.info(f"evaluation at step {state.step} abandoned: stop requested")
        return None
    results = eval_results(matrix)
    miou = results["eval_mean_iou"]
    run.reporter.evaluation(state.step, results, matrix)
    if run.reporter.active and cfg.num_debug_samples:
        run.reporter.samples(state.step, debug_panels(bare, run.val_view, cfg.num_debug_samples, accelerator.device))
    improved = miou is not None and miou > state.best_eval_mean_iou
    if improved:
        state.best_eval_mean_iou, state.best_step = miou, state.step
        if accelerator.is_main_process:
            export_model(bare, run.output_dir / "best_model",
                         extra={"eval_mean_iou": miou, "step": state.step, "val_split": cfg.val_split,
                                "selected_on": cfg.val_split, "train_config": cfg.to_dict(),
                                "eval_per_category_iou": results["eval_per_category_iou"]})
            run.reporter.best_model(run.output_dir / "best_model", state.step, miou)
        accelerator.wait_for_everyone()
    logger.info(f"eval step {state.step} | mIoU {_fmt(miou)} | mAcc {_fmt(results['eval_mean_accuracy'])} | "
                f"aAcc {_fmt(results['eval_overall_accuracy'])}" + (" | new best, exported" if improved else ""))
    if accelerator.is_main_process:
        with (run.output_dir / "eval_results.jsonl").open("a") as f:
            f.write(json.dumps({"step": state.step, **results}) + "\n")
    return results


@torch.inference_mode()
def debug_panels(model, val_view, count: int, device) -> list:
    """image | truth | prediction | overlay for the first `count` val images: the same ids at every eval.

    Uses the unwrapped model on the main process only: a DDP forward would wait for the other ranks.
    """
    was_training = model.training
    model.eval()
    panels = []
    for index in range(min(count, len(val_view))):
        example = val_view[index]
        pixels = example["pixel_values"][None].to(device)
        logits = model(normalize_on_device(pixels, model.image_mean, model.image_std),
                       output_size=example["labels"].shape)["logits"]
        image = example["pixel_values"].permute(1, 2, 0).numpy()
        if image.shape[:2] != tuple(example["labels"].shape):  # resized by the eval protocol: show it at label size
            image = cv2.resize(image, tuple(example["labels"].shape)[::-1], interpolation=cv2.INTER_LINEAR)
        prediction = logits[0].argmax(0).cpu().numpy()
        panels.append((example["id"], sample_panel(image, example["labels"].numpy(), prediction)))
    model.train(was_training)
    return panels


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> dict:
    """Train `cfg`; returns the results (also written to output_dir/all_results.json when the run finishes)."""
    setup_logging()
    validate_config(cfg)
    # cpu= from the env as Accelerator does: a bare PartialState() ignores ACCELERATE_USE_CPU and, with no
    # GPU, would make every process of a CPU multi-process launch believe it is alone.
    partial = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg, clearml = resolve_run(cfg, partial)
    locks = []

    def claim():
        claim_result, lock = claim_run_folder(cfg)
        locks.append(lock)
        return claim_result

    claim_result = on_main_then_everywhere(partial, claim)
    try:
        try:
            check_shared_folder(partial, Path(cfg.output_dir), claim_result.token)
            cfg.gradient_accumulation_steps = plan_layout(cfg, claim_result.saved_config, partial.num_processes)
            run = build_run(cfg, clearml, claim_result)
        except BaseException:
            if partial.is_main_process and claim_result.resume is None:
                unclaim_fresh_folder(Path(cfg.output_dir))
            raise
        return train_and_finish(run)
    finally:
        for lock in locks:
            lock.release()


def unclaim_fresh_folder(output_dir: Path) -> None:
    """Setup failed before training began (bad weights file, data, ...): take back the config.yaml this run
    wrote seconds ago, so the same command can simply be run again once fixed. Nothing else is touched."""
    (output_dir / "config.yaml").unlink(missing_ok=True)


def train_and_finish(run: Run) -> dict:
    run.stop, run.agreement = StopRequest(), StopAgreement(run.accelerator.num_processes)
    run.monitor = NonFiniteMonitor(run.accelerator.device)
    run.progress = TrainProgress(run.state.total_steps, run.state.step, run.accelerator.is_local_main_process)
    started = time.perf_counter()
    step_at_start = run.state.step
    try:
        interrupted = train_loop(run)
    finally:
        run.progress.close()
        run.stop.restore()
        run.agreement.close()
    run.totals.update(runtime=time.perf_counter() - started, steps=run.state.step - step_at_start)
    if interrupted:
        logger.info(f"stopped by {run.stop.signal_name or 'a signal'} at step {run.state.step}; checkpoint saved. "
                    f"Resume with: --output_dir {run.output_dir} --resume_from_checkpoint latest")
    elif run.last_eval is None:  # resumed at the very end: score once so results exist
        run.last_eval = run_evaluation(run)
    return finish(run, interrupted)


def finish(run: Run, interrupted: bool) -> dict:
    accelerator, state, totals = run.accelerator, run.state, run.totals
    results = {}
    if run.last_eval is not None and not interrupted:
        runtime = totals.get("runtime", 0.0)
        results = {**run.last_eval, "step": state.step, "epoch": state.epoch,
                   "best_eval_mean_iou": state.best_eval_mean_iou, "best_step": state.best_step,
                   "best_model_selected_on": run.cfg.val_split,
                   "train_loss": totals["loss_sum"] / totals["micro_batches"] if totals.get("micro_batches") else None,
                   "train_runtime": runtime,
                   "train_samples_per_second": totals.get("steps", 0) * state.global_batch_size / max(runtime, 1e-9),
                   "train_steps_per_second": totals.get("steps", 0) / max(runtime, 1e-9)}
        if accelerator.is_main_process:
            (run.output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    if results:
        run.reporter.artifact("all_results", results)
    offline_session = None
    for reporter in run.reporter.reporters:
        closed = reporter.close() if hasattr(reporter, "close") else None
        offline_session = offline_session or closed
    accelerator.end_training()
    if offline_session:
        results["clearml_offline_session"] = offline_session
        logger.info(f"ClearML offline session: {offline_session}; upload it with: "
                    f"python -m vocseg clearml-import {offline_session}")
    if run.cfg.tracker in ("tensorboard", "all"):
        results["tensorboard_dir"] = str(run.output_dir / "tensorboard")
    results["interrupted"] = interrupted
    results["output_dir"] = str(run.output_dir)
    return results
