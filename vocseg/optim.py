"""Optimiser with parameter groups, and the poly-with-warmup learning-rate schedule."""

from __future__ import annotations

import torch


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


def poly_warmup_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                   power: float) -> float:
    """The learning rate of a param group whose peak is `base_lr`, after `step` optimiser steps:

        step < warmup:  base_lr * step / warmup                                   (linear from 0)
        after:          (base_lr - min_lr) * (1 - (step - warmup) / (total - warmup)) ** power + min_lr

    so every group ends at `min_lr` whatever its multiplier: mmseg's PolyLR (mmengine's PolyParamScheduler
    applies one `eta_min` to every group) after a LinearLR warmup that ends where the poly part begins.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    remaining = 1 - (step - warmup_steps) / (total_steps - warmup_steps)
    return (base_lr - min_lr) * remaining ** power + min_lr


def build_scheduler(cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then (1 - t)^power decay to min_learning_rate in EVERY param group (the head too),
    one step per optimiser step (see poly_warmup_lr).

    transformers' get_polynomial_decay_schedule_with_warmup scales all groups by one factor, so a head
    with head_lr_mult 10 would end at 10 x min_learning_rate: hence one factor per group here.
    The factors are closures on purpose: LambdaLR does not save functions in its state_dict, so a resumed
    run follows the schedule of its (possibly edited) config, not the one frozen in the checkpoint.
    The scheduler is deliberately NOT passed to accelerator.prepare: accelerate would step it once
    per process, making the schedule depend on the world size.
    """
    def factor_for(base_lr: float):
        def factor(step: int) -> float:
            lr = poly_warmup_lr(step, base_lr, cfg.min_learning_rate, cfg.lr_warmup_steps, total_steps, cfg.poly_power)
            return lr / base_lr if base_lr else 0.0
        return factor

    factors = [factor_for(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
