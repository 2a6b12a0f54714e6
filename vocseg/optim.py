"""Optimiser with parameter groups, and the poly-with-warmup learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_polynomial_decay_schedule_with_warmup


def parameter_groups(model, learning_rate: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """Four groups: (backbone | head) x (decayed | not decayed).

    Norm weights and biases (1-D tensors) get no weight decay, as in mmseg and the SegFormer recipe;
    the randomly initialised head may learn faster (head_lr_mult, 10 in the SegFormer recipe).
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if model.is_head_parameter(name) else "backbone"
        decay = "no_decay" if param.ndim <= 1 else "decay"
        groups.setdefault((part, decay), []).append(param)
    return [
        {"name": f"{part}_{decay}", "params": params,
         "lr": learning_rate * (head_lr_mult if part == "head" else 1.0),
         "weight_decay": weight_decay if decay == "decay" else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.head_lr_mult)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected sgd or adamw")


def build_scheduler(cfg, optimizer, total_steps: int):
    """Linear warmup from 0, then (1 - t)^power decay to min_learning_rate, one step per optimiser step.

    transformers scales every group by the same factor, so the head multiplier is kept throughout.
    The scheduler is deliberately NOT passed to accelerator.prepare: accelerate would step it once
    per process, making the schedule depend on the world size.
    """
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
        lr_end=cfg.min_learning_rate if cfg.min_learning_rate > 0 else 1e-12 * cfg.learning_rate,
        power=cfg.poly_power)
