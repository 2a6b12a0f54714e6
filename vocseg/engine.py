"""The training loop, as plain functions read top to bottom: train() -> train_step / evaluate / checkpoints.

Everything device-, precision- and process-related is accelerate's: the same code runs on one
CPU, one GPU or N GPUs, in fp32/bf16/fp16, depending on `accelerate launch` / `accelerate config`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from vocseg.checkpoint import resolve_resume, save_checkpoint
from vocseg.config import CONFIGS_DIR, TrainConfig, config_from_dict
from vocseg.constants import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from vocseg.data import load_split
from vocseg.data.synthetic import make_synthetic_tree
from vocseg.log import setup_logging
from vocseg.data.transforms import (SegmentationTransform, build_eval_augment, build_train_augment, collate,
                                    normalize_on_device, with_augmentation)
from vocseg.metrics import batch_confusion_matrices, scores_from_matrix
from vocseg.models import build_model, export_model
from vocseg.optim import build_optimizer, build_scheduler
from vocseg.tracking import Reporter, connect_config, sample_panel, start_task, uses_clearml

logger = logging.getLogger("vocseg")  # main process only: see vocseg.log.setup_logging


@dataclass
class TrainState:
    """Loop position and best score; saved in every checkpoint (accelerator.register_for_checkpointing)."""
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)
    best_eval_mean_iou: float = -1.0
    best_step: int = -1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochShuffleSampler(Sampler):
    """A permutation that is a function of (seed, epoch) only, so a resumed run sees the same order.

    The epoch method is deliberately not called `set_epoch`: accelerate's DataLoaderShard calls
    `sampler.set_epoch(<its own iteration counter>)`, which restarts at 0 after a resume.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_shuffle_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class StopRequest:
    """SIGTERM / SIGINT ask the loop to save a checkpoint and leave at the next optimiser step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no signal handling
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------- setup

def resolve_run(cfg: TrainConfig, state: PartialState) -> tuple[TrainConfig, Reporter]:
    """Name the run, create the ClearML task and read the config back from it, all on the main process;
    then give every rank that same config, before anything is built from it."""
    reporter = Reporter()
    if state.is_main_process:
        if cfg.synthetic_data and cfg.data_root:  # an explicit data root wins over the demo's synthetic tree
            logger.info(f"data_root {cfg.data_root} given: not using the synthetic demo data")
            cfg.synthetic_data = False
        cfg.run_name = cfg.run_name or f"{cfg.recipe or cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.output_dir = cfg.output_dir or str(Path("outputs") / cfg.run_name)
        if cfg.clearml_queue and state.num_processes > 1:
            raise ValueError("--clearml_queue enqueues the run and exits: start it as one process "
                             "(python train.py ... --clearml_queue Q --num_processes N for an N-GPU replay)")
        # Recorded for clearml-agent replays; enqueued from a laptop, it is the N asked for.
        cfg.num_processes = (cfg.num_processes or state.num_processes) if cfg.clearml_queue else state.num_processes
        if uses_clearml(cfg):
            task, offline = start_task(cfg, state.num_processes, os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
            recipe = CONFIGS_DIR / f"{cfg.recipe}.yaml"
            cfg = connect_config(task, cfg, str(recipe) if recipe.is_file() else None)
            reporter = Reporter(task, offline)
            if cfg.clearml_queue and task.running_locally():
                logger.info(f"enqueued ClearML task {task.id} on queue {cfg.clearml_queue}; exiting")
                task.execute_remotely(queue_name=cfg.clearml_queue, exit_process=True)
    payload = [cfg.to_dict()]
    broadcast_object_list(payload)
    cfg = config_from_dict(payload[0])
    fingerprints = gather_object([hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"processes disagree on the config: {fingerprints}")
    logger.info(f"config {fingerprints[0]} identical on {len(fingerprints)} process(es)")
    return cfg, reporter


def demo_data_root(seed: int = 0) -> Path:
    root = Path(os.environ.get("VOCSEG_CACHE", Path.home() / ".cache" / "vocseg")) / f"synthetic-demo-v1-seed{seed}"
    if not (root / "synthetic_manifest.json").exists():
        make_synthetic_tree(root, num_train=300, num_val=100, sbd=True, seed=seed, scale=0.5)
    return root


def build_dataloaders(cfg: TrainConfig, accelerator: Accelerator, image_mean, image_std):
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

    augment = build_train_augment(cfg.crop_size, (cfg.scale_min, cfg.scale_max), photometric=cfg.photometric,
                                  mean=image_mean, std=image_std)
    train_transform = SegmentationTransform(augment, seed=cfg.seed)
    sampler = EpochShuffleSampler(len(train_set), cfg.seed)
    pin = accelerator.device.type == "cuda"
    # Own generators: building a loader iterator must not draw from the global torch RNG, which
    # also drives dropout / drop-path; otherwise a resumed run diverges from an uninterrupted one.
    train_loader = DataLoader(with_augmentation(train_set, train_transform), batch_size=cfg.per_device_train_batch_size,
                              sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers, drop_last=True,
                              pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(with_augmentation(val_set, build_eval_augment(image_mean, image_std)),
                            batch_size=cfg.per_device_eval_batch_size, shuffle=False, collate_fn=collate,
                            num_workers=cfg.num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(0))
    global_batch = cfg.per_device_train_batch_size * accelerator.num_processes
    if len(train_set) < global_batch:
        raise ValueError(f"train split {cfg.train_split} has {len(train_set)} samples, fewer than one global batch "
                         f"({global_batch}): lower per_device_train_batch_size")
    return train_loader, val_loader, sampler, train_transform, len(train_set), len(val_set)


def every(step: int, interval: int) -> bool:
    """True every `interval` steps; 0 (or less) turns the periodic action off (it still runs at the end)."""
    return interval > 0 and step % interval == 0


def total_train_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    if cfg.num_train_epochs is None:
        raise ValueError("set max_train_steps or num_train_epochs")
    return cfg.num_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------- steps

def segmentation_loss(outputs: dict, labels: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy over labelled pixels (255 ignored), plus the weighted aux-head loss for DeepLab."""
    def ce(logits):
        # Sum / count instead of the mean: a crop made only of padding (all 255) gives 0, not NaN.
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    main = ce(outputs["logits"])
    parts = {"loss_main": main.detach()}
    loss = main
    if "aux_logits" in outputs:
        aux = ce(outputs["aux_logits"])
        parts["loss_aux"] = aux.detach()
        loss = main + aux_weight * aux
    return loss, parts


def prepare_inputs(batch: dict, model_mean, model_std, channels_last: bool) -> torch.Tensor:
    pixel_values = normalize_on_device(batch["pixel_values"], model_mean, model_std)
    return pixel_values.contiguous(memory_format=torch.channels_last) if channels_last else pixel_values


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator, image_mean, image_std, channels_last: bool = False,
             desc: str = "eval", predict=None) -> torch.Tensor:
    """The [C, C] confusion matrix of the whole split at native label resolution, exact under DDP.

    One matrix per sample is gathered with `gather_for_metrics`, which drops the duplicate samples
    that even_batches pads the last batch with; summing per-rank matrices would count them twice.
    `predict(pixel_values, output_size) -> logits` replaces the plain forward (e.g. sliding window / TTA).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=accelerator.device)
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        labels = batch["labels"]
        pixel_values = prepare_inputs(batch, image_mean, image_std, channels_last)
        if predict is None:
            logits = model(pixel_values, output_size=labels.shape[-2:])["logits"]
        else:
            logits = predict(pixel_values, labels.shape[-2:])
        matrices = batch_confusion_matrices(logits.argmax(1), labels, NUM_CLASSES, IGNORE_INDEX)
        total += accelerator.gather_for_metrics(matrices).sum(0)
    model.train(was_training)
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


def configure_cpu_threads(accelerator_cpu: bool) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1; a single CPU process should use every core."""
    if accelerator_cpu and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.set_num_threads(os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> dict:
    setup_logging()
    # Before the Accelerator: the output dir must be known to the trackers, and Task.init reseeds the RNGs.
    # cpu= from the env as Accelerator does: a bare PartialState() ignores ACCELERATE_USE_CPU and, with no
    # GPU, would make every process of a CPU multi-process launch believe it is alone.
    cfg, reporter = resolve_run(cfg, PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")))
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, project_dir=str(output_dir),
                              log_with=["tensorboard"] if cfg.tracker in ("tensorboard", "all") else None)
    configure_cpu_threads(accelerator.device.type == "cpu")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "config.yaml")
        reporter.artifact("config", cfg.to_dict())
    if accelerator.log_with:
        accelerator.init_trackers(cfg.run_name, config={k: v for k, v in cfg.to_dict().items() if v is not None})
    set_seed(cfg.seed)

    model = build_model(cfg)
    if not (cfg.synthetic_data or cfg.pretrained or cfg.backbone_weights):
        logger.warning(f"{cfg.model} starts from random weights: published recipe figures assume ImageNet "
                       "weights (--backbone_weights FILE for DeepLab, --pretrained DIR_OR_HUB_ID for SegFormer)")
    mean, std = model.image_mean, model.image_std
    if cfg.sync_bn and accelerator.num_processes > 1 and model.family == "deeplab":
        if accelerator.device.type == "cuda":  # torch's SyncBatchNorm has no CPU implementation
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("sync_bn needs CUDA devices; keeping per-process BatchNorm")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, sampler, train_transform, num_train, num_val = build_dataloaders(
        cfg, accelerator, mean, std)
    val_view = val_loader.dataset
    optimizer = build_optimizer(cfg, model)
    if cfg.torch_compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    total_steps = total_train_steps(cfg, len(train_loader))
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    resume_path = resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if cfg.resume_from_checkpoint and resume_path is None:
        logger.warning(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no complete checkpoint in "
                       f"{output_dir / 'checkpoints'}, starting from step 0")
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        logger.info(f"resumed from {resume_path}: step {state.step}, epoch {state.epoch}, "
                    f"batch {state.batch_in_epoch} of the epoch")

    logger.info(f"training {cfg.model} on {cfg.train_split} ({num_train} samples), scoring on {cfg.val_split} "
                f"({num_val}); {total_steps} steps of {cfg.per_device_train_batch_size} x {accelerator.num_processes} "
                f"process(es) x {cfg.gradient_accumulation_steps} accumulation; {accelerator.device}, "
                f"mixed precision {accelerator.mixed_precision}; output {output_dir}")

    stop = StopRequest()
    last_eval: dict | None = None
    last_saved_step = state.step if resume_path else -1
    window = {"loss": 0.0, "count": 0, "start": time.perf_counter(), "samples": 0}
    progress = tqdm(total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    while state.step < total_steps and not stop.requested:
        sampler.set_shuffle_epoch(state.epoch)
        train_transform.epoch = state.epoch  # before the iterator exists: workers copy the transform then
        batches = (accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
                   if state.batch_in_epoch else train_loader)
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(prepare_inputs(batch, mean, std, cfg.channels_last),
                                output_size=batch["labels"].shape[-2:])
                loss, parts = segmentation_loss(outputs, batch["labels"], cfg.aux_weight)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:  # max_norm inf: measure the norm for the logs without clipping
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            window["loss"] = window["loss"] + loss.detach().float()  # a tensor: .item() would sync every step
            window["count"] += 1
            window["samples"] += batch["labels"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)

            if every(state.step, cfg.logging_steps) or state.step == total_steps:
                log_train(accelerator, reporter, state, window, optimizer, parts, grad_norm)
            if every(state.step, cfg.eval_steps) or state.step == total_steps:
                last_eval = run_evaluation(cfg, accelerator, reporter, model, val_loader, val_view, state, mean, std,
                                           output_dir)
            if every(state.step, cfg.checkpointing_steps) or state.step == total_steps:
                path = save_checkpoint(accelerator, output_dir, state.step, cfg.checkpoints_total_limit)
                logger.info(f"checkpoint saved: {path}")
                last_saved_step = state.step
            if accelerator.num_processes > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor(int(stop.requested), device=accelerator.device)
                stop.requested = bool(accelerator.reduce(flag, "max").item())
            if state.step >= total_steps or stop.requested:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    stop.restore()
    if state.batch_in_epoch >= len(train_loader):  # stopped on the epoch's last batch: that epoch is done
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    interrupted = state.step < total_steps
    if interrupted:
        if last_saved_step != state.step:
            save_checkpoint(accelerator, output_dir, state.step, cfg.checkpoints_total_limit)
        logger.info(f"stopped by a signal at step {state.step}; checkpoint saved. Resume with "
                    f"--output_dir {output_dir} --resume_from_checkpoint latest")
    elif last_eval is None:  # resumed at the very end: score once so results exist
        last_eval = run_evaluation(cfg, accelerator, reporter, model, val_loader, val_view, state, mean, std,
                                   output_dir)

    results = {}
    if last_eval is not None and not interrupted:
        results = {**last_eval, "step": state.step, "epoch": state.epoch,
                   "best_eval_mean_iou": state.best_eval_mean_iou, "best_step": state.best_step}
        if accelerator.is_main_process:
            (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if results:
        reporter.artifact("all_results", results)
    offline_session = reporter.close()
    if offline_session:
        results["clearml_offline_session"] = offline_session
        logger.info(f"ClearML offline session: {offline_session}; upload it with: "
                    f"python -m vocseg clearml-import {offline_session}")
    results["interrupted"] = interrupted
    results["output_dir"] = str(output_dir)
    return results


def log_train(accelerator, reporter, state, window, optimizer, parts, grad_norm) -> None:
    elapsed = time.perf_counter() - window["start"]
    loss = float(window["loss"]) / max(window["count"], 1)
    values = {"train_loss": loss, "train_throughput_img_s": window["samples"] / max(elapsed, 1e-9),
              "epoch": state.epoch}
    if "loss_aux" in parts:
        values["train_loss_aux"] = parts["loss_aux"].item()
    for group in optimizer.param_groups:
        values[f"lr_{group['name']}"] = group["lr"]
    if grad_norm is not None:
        values["train_grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        values["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    values["cpu_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (Linux: KiB)
    accelerator.log(values, step=state.step)
    reporter.train(state.step, values)
    lr = optimizer.param_groups[0]["lr"]
    logger.info(f"step {state.step} | epoch {state.epoch} | loss {loss:.4f} | lr {lr:.3g} | "
                f"{values['train_throughput_img_s']:.1f} img/s")
    window.update(loss=0.0, count=0, samples=0, start=time.perf_counter())


def run_evaluation(cfg, accelerator, reporter, model, val_loader, val_view, state, mean, std, output_dir) -> dict:
    matrix = evaluate(model, val_loader, accelerator, mean, std, cfg.channels_last, desc=f"eval @ {state.step}")
    results = eval_results(matrix)
    miou = results["eval_mean_iou"]
    accelerator.log({k: v for k, v in results.items() if isinstance(v, float)}, step=state.step)
    reporter.evaluation(state.step, results, matrix)
    if reporter.active and cfg.num_debug_samples:
        reporter.samples(state.step, debug_panels(accelerator.unwrap_model(model), val_view, cfg.num_debug_samples,
                                                  mean, std, accelerator.device))
    improved = miou is not None and miou > state.best_eval_mean_iou
    if improved:
        state.best_eval_mean_iou, state.best_step = miou, state.step
        if accelerator.is_main_process:
            export_model(accelerator.unwrap_model(model), output_dir / "best_model",
                         extra={"eval_mean_iou": miou, "step": state.step, "val_split": cfg.val_split,
                                "train_config": cfg.to_dict()})
            reporter.best_model(output_dir / "best_model", state.step, miou)
        accelerator.wait_for_everyone()
    logger.info(f"eval step {state.step} | mIoU {_fmt(miou)} | mAcc {_fmt(results['eval_mean_accuracy'])} | "
                f"aAcc {_fmt(results['eval_overall_accuracy'])}" + (" | new best, exported" if improved else ""))
    if accelerator.is_main_process:
        (output_dir / "eval_results.jsonl").open("a").write(json.dumps({"step": state.step, **results}) + "\n")
    return results


@torch.inference_mode()
def debug_panels(model, val_view, count: int, mean, std, device) -> list[tuple[str, np.ndarray]]:
    """image | truth | prediction | overlay for the first `count` val images: the same ids at every eval.

    Uses the unwrapped model on the main process only: a DDP forward would wait for the other ranks.
    """
    was_training = model.training
    model.eval()
    panels = []
    for index in range(min(count, len(val_view))):
        example = val_view[index]
        pixels = example["pixel_values"][None].to(device)
        logits = model(normalize_on_device(pixels, mean, std), output_size=example["labels"].shape)["logits"]
        image = example["pixel_values"].permute(1, 2, 0).numpy()
        prediction = logits[0].argmax(0).cpu().numpy()
        panels.append((example["id"], sample_panel(image, example["labels"].numpy(), prediction)))
    model.train(was_training)
    return panels


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
