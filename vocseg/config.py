"""TrainConfig: one typed object that is the CLI, the recipe file and the ClearML hyperparameters.

    train.py --config configs/NAME.yaml --learning_rate 0.02      # CLI overrides the recipe

Each field's help text starts with its section, which groups it for ClearML (General / Data / Model / Optim).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser


def _configs_dir() -> Path:
    """The recipes: installed with the package as vocseg/configs (pip install .), else configs/ of the checkout."""
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


CONFIGS_DIR = _configs_dir()
DEMO_RECIPE = CONFIGS_DIR / "demo.yaml"
REAL_DATA_RECIPE = CONFIGS_DIR / "deeplabv3_r101_voc_aug.yaml"


def _f(default, section: str, help: str):
    # HfArgumentParser passes metadata on to argparse, so the section lives in the help text only.
    return field(default=default, metadata={"help": f"[{section}] {help}"})


@dataclass
class TrainConfig:
    # General
    recipe: str | None = _f(None, "General", "recipe name (set from --config; names the run)")
    output_dir: str | None = _f(None, "General", "where checkpoints, best_model/ and results go "
                                "(default: outputs/<run name>)")
    run_name: str | None = _f(None, "General", "run name (default: <recipe>-<timestamp>)")
    seed: int = _f(42, "General", "seed for weights, shuffling and augmentation")
    max_train_steps: int | None = _f(None, "General", "optimiser steps to train (overrides num_train_epochs)")
    num_train_epochs: int | None = _f(None, "General", "epochs to train when max_train_steps is not set")
    eval_steps: int = _f(1000, "General", "evaluate on the val split every N optimiser steps (and at the end)")
    checkpointing_steps: int = _f(1000, "General", "save a resumable checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int = _f(2, "General", "keep only the last N checkpoints")
    resume_from_checkpoint: str | None = _f(None, "General", "'latest' or a checkpoint folder to resume from")
    logging_steps: int = _f(20, "General", "log train loss / lr / throughput every N steps")
    tracker: Literal["clearml", "tensorboard", "all", "none"] = _f(
        "clearml", "General", "clearml (offline automatically when no server is configured), tensorboard "
        "(under output_dir), all, or none")
    clearml_project: str = _f("Pascal-VOC12 Training", "General", "ClearML project")
    clearml_task_name: str | None = _f(None, "General", "ClearML task name (default: the run name)")
    clearml_output_uri: str | None = _f(None, "General", "where ClearML uploads models (default: "
                                        "$CLEARML_OUTPUT_URI / clearml.conf; none: keep local)")
    clearml_queue: str | None = _f(None, "General", "create the task, enqueue it here for clearml-agent, exit")
    num_debug_samples: int = _f(4, "General", "val images shown as image | truth | prediction at each eval")
    num_processes: int | None = _f(None, "General", "processes the run was launched with (recorded; a "
                                   "clearml-agent replay relaunches with this many)")
    # Data
    data_root: str | None = _f(None, "Data", "VOC root: VOC2012, VOCdevkit or their parent, or a parquet "
                               "folder (default: $DATASET_PATH)")
    sbd_root: str | None = _f(None, "Data", "SBD benchmark_RELEASE (default: $SBD_DATASET_PATH)")
    synthetic_data: bool = _f(False, "Data", "generate and use the synthetic demo tree (only when no data_root "
                              "is given)")
    train_split: str = _f("train_aug", "Data", "train / trainval / sbd_train / train_aug / parquet split")
    val_split: str = _f("val", "Data", "split scored every eval_steps")
    cache_dir: str | None = _f(None, "Data", "Arrow cache (default: ~/.cache/vocseg/datasets)")
    bad_samples: Literal["error", "skip"] = _f("error", "Data", "stop at a bad sample, or skip and report it")
    crop_size: int = _f(512, "Data", "square training crop")
    scale_min: float = _f(0.5, "Data", "random scale range, lower end")
    scale_max: float = _f(2.0, "Data", "random scale range, upper end")
    photometric: bool = _f(False, "Data", "colour jitter during training")
    per_device_train_batch_size: int = _f(8, "Data", "train batch per process")
    per_device_eval_batch_size: int = _f(1, "Data", "eval batch per process (1: native sizes, no padding)")
    num_workers: int = _f(4, "Data", "DataLoader workers per process")
    max_eval_samples: int | None = _f(None, "Data", "score only the first N val samples (quick checks)")
    # Model
    model: str = _f("deeplabv3_resnet101", "Model", "segformer-b0..b5, deeplabv3_resnet50/101, "
                    "deeplabv3_mobilenet_v3_large")
    pretrained: str | None = _f(None, "Model", "SegFormer: local dir or Hub id; DeepLab: state dict / export dir")
    backbone_weights: str | None = _f(None, "Model", "local file of ImageNet backbone weights")
    aux_loss: bool | None = _f(None, "Model", "DeepLab auxiliary head (default: on)")
    aux_weight: float = _f(0.4, "Model", "weight of the auxiliary loss")
    sync_bn: bool = _f(False, "Model", "SyncBatchNorm for DeepLab under multi-process training")
    channels_last: bool = _f(False, "Model", "channels_last memory format")
    torch_compile: bool = _f(False, "Model", "torch.compile the model")
    # Optim
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "Optim", "optimiser")
    learning_rate: float = _f(0.01, "Optim", "peak learning rate (backbone)")
    head_lr_mult: float = _f(1.0, "Optim", "learning-rate multiplier for the decode head")
    weight_decay: float = _f(5e-4, "Optim", "weight decay (not applied to norms and biases)")
    momentum: float = _f(0.9, "Optim", "SGD momentum")
    adam_beta1: float = _f(0.9, "Optim", "AdamW beta1")
    adam_beta2: float = _f(0.999, "Optim", "AdamW beta2")
    lr_warmup_steps: int = _f(0, "Optim", "linear warmup steps")
    poly_power: float = _f(0.9, "Optim", "power of the poly decay (1.0 = linear)")
    min_learning_rate: float = _f(0.0, "Optim", "learning rate of every param group (head too) at the last step")
    gradient_accumulation_steps: int = _f(1, "Optim", "micro-batches per optimiser step")
    max_grad_norm: float | None = _f(None, "Optim", "clip gradients to this norm (none: no clipping)")

    def sections(self) -> dict[str, dict]:
        """The config grouped as ClearML hyperparameter sections."""
        out: dict[str, dict] = {}
        for f in dataclasses.fields(self):
            out.setdefault(section_of(f.name), {})[f.name] = getattr(self, f.name)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def section_of(name: str) -> str:
    """General / Data / Model / Optim, from the field's help text."""
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)
    return help_text[1:help_text.index("]")]


class ConfigError(ValueError):
    pass


def load_recipe(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file() and (CONFIGS_DIR / path).is_file():
        path = CONFIGS_DIR / path
    if not path.is_file() and (CONFIGS_DIR / f"{path}.yaml").is_file():
        path = CONFIGS_DIR / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found (recipes ship in {CONFIGS_DIR})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config keys to values")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"recipe {path} has unknown key(s): {', '.join(unknown)}")
    values.setdefault("recipe", path.stem)
    return values


def default_recipe() -> Path:
    """No --config: the real-data recipe when DATASET_PATH is set, else the synthetic demo."""
    return REAL_DATA_RECIPE if os.environ.get("DATASET_PATH") else DEMO_RECIPE


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Recipe file (--config, or the default recipe) first, then CLI flags on top."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            recipe_path = argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--config="):
            recipe_path = arg.split("=", 1)[1]
            del argv[i]
            break
    recipe = load_recipe(recipe_path or default_recipe())
    # `--max_train_steps none` (to train by epochs with a recipe that sets steps): argparse would
    # reject "none" for an int, so optional fields given none/null are cleared here.
    hints = typing.get_type_hints(TrainConfig)
    for i in range(len(argv) - 2, -1, -1):
        name = argv[i].removeprefix("--")
        if name in hints and type(None) in typing.get_args(hints[name]) and argv[i + 1].lower() in ("none", "null"):
            recipe[name] = None
            del argv[i:i + 2]
    parser = HfArgumentParser(TrainConfig)
    parser.add_argument("--config", help="recipe YAML (configs/NAME.yaml or a path); CLI flags override it")
    parser.set_defaults(**recipe)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown argument(s): {' '.join(unknown)}")
    values = {k: v for k, v in vars(namespace).items() if k in FIELD_NAMES}
    return TrainConfig(**values)


def config_from_dict(values: dict, coerce: bool = False) -> TrainConfig:
    """Build a config from a dict; `coerce` converts strings (as ClearML returns edited values) to field types."""
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    if coerce:
        hints = typing.get_type_hints(TrainConfig)
        values = {k: coerce_value(hints[k], v, k) for k, v in values.items()}
    return TrainConfig(**values)


def coerce_value(annotation, value, name: str = ""):
    """'0.02' -> 0.02 for a float field, '' / 'None' -> None for an optional one, 'False' -> False, ..."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if not optional and value is None:
            raise ConfigError(f"config key {name} may not be empty")
        return None
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if typing.get_origin(base) is Literal:
        if str(value) not in base.__args__:
            raise ConfigError(f"config key {name}: {value!r} is not one of {', '.join(base.__args__)}")
        return str(value)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if base is int:
            return int(float(value)) if isinstance(value, str) and float(value).is_integer() else int(value)
        if base is float:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name}: {value!r} is not a valid {base.__name__}") from None
    return str(value) if base is str else value
