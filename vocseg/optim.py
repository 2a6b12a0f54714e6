"""Optimiser with parameter groups, and the poly-with-warmup learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn


WEIGHT_DECAY_POLICIES = ("all", "no_norm_bias", "no_norm_pos")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def decayed(model, policy: str) -> dict[str, bool]:
    """Parameter name -> whether weight decay applies to it under `policy`.

    - "all": every parameter, as mmseg's DeepLab schedule (configs/_base_/schedules/schedule_20k.py: SGD
      weight_decay 5e-4, no paramwise_cfg, so mmcv's DefaultOptimizerConstructor decays everything).
    - "no_norm_bias": not the 1-D tensors (norm weights and biases, conv/linear biases): the common
      "no bias decay" recipe (e.g. timm, torchvision's references); vocseg's default.
    - "no_norm_pos": SegFormer's official recipe (local_configs/segformer/B*/*.py: paramwise_cfg
      custom_keys pos_block decay_mult 0, norm decay_mult 0, head lr_mult 10). mmcv matches custom keys as
      substrings of the parameter's full name, longest key first, ties alphabetically, so "head" is tried
      before "norm": the decode head's own BatchNorm is decayed, only the encoder's norms (and anything
      named pos_block) are not; biases are decayed. Here "norm" means a normalisation layer (all of MiT's
      parameters named *norm* in transformers' SegFormer are LayerNorms; a DeepLab ResNet's BNs are named
      bn*, so mmcv's substring rule would miss them), and the head is vocseg's `is_head_parameter`.
    """
    if policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"weight_decay_policy must be one of {', '.join(WEIGHT_DECAY_POLICIES)}, got {policy!r}")
    out = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if policy == "all":
                out[name] = True
            elif policy == "no_norm_bias":
                out[name] = param.ndim > 1
            else:
                exempt = "pos_block" in name or (isinstance(module, _NORM_TYPES) and not model.is_head_parameter(name))
                out[name] = not exempt
    return out


def parameter_groups(model, learning_rate: float, weight_decay: float, head_lr_mult: float,
                     policy: str = "no_norm_bias") -> list[dict]:
    """Up to four groups: (backbone | head) x (decayed | not decayed), decay as `policy` says (see `decayed`).

    The randomly initialised head may learn faster (head_lr_mult, 10 in the SegFormer recipe).
    """
    decay_of = decayed(model, policy)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if model.is_head_parameter(name) else "backbone"
        decay = "decay" if decay_of[name] else "no_decay"
        groups.setdefault((part, decay), []).append(param)
    return [
        {"name": f"{part}_{decay}", "params": params,
         "lr": learning_rate * (head_lr_mult if part == "head" else 1.0),
         "weight_decay": weight_decay if decay == "decay" else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.head_lr_mult,
                              getattr(cfg, "weight_decay_policy", "no_norm_bias"))
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
