"""TrainConfig: one typed object that is the CLI, the recipe file and the ClearML hyperparameters.

    train.py --config configs/NAME.yaml --learning_rate 0.02      # CLI overrides the recipe

Each field's help text starts with its section, which groups it for ClearML (General / Data / Model / Optim).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from vocseg.errors import UsageError


def _configs_dir() -> Path:
    """The recipes: installed with the package as vocseg/configs (pip install .), else configs/ of the checkout."""
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


CONFIGS_DIR = _configs_dir()
DEMO_RECIPE = CONFIGS_DIR / "demo.yaml"
REAL_DATA_RECIPE = CONFIGS_DIR / "deeplabv3_r101_voc_aug.yaml"


def _f(default, section: str, help: str):
    # HfArgumentParser passes metadata on to argparse, so the section lives in the help text only.
    if isinstance(default, list):  # a mutable default needs a factory
        return field(default_factory=lambda: list(default), metadata={"help": f"[{section}] {help}"})
    return field(default=default, metadata={"help": f"[{section}] {help}"})


PHOTOMETRIC_MODES = ("none", "jitter", "mmseg")
# Recipes, configs and ClearML values written before `photometric` took a mode held a boolean.
_PHOTOMETRIC_BOOLEANS = {"true": "jitter", "1": "jitter", "yes": "jitter", "false": "none", "0": "none", "no": "none"}


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
    resume_from_checkpoint: str | None = _f(None, "General", "'latest' or a checkpoint folder to resume from "
                                            "(the run's own config is used; see allow_config_change)")
    overwrite_output_dir: bool = _f(False, "General", "start afresh in a non-empty output_dir: its content is "
                                    "moved aside to <output_dir>.replaced-<time>/, never deleted")
    allow_config_change: bool = _f(False, "General", "when resuming, accept flags that change the run's training "
                                   "config (recorded in config_changes.jsonl; config.yaml stays as it was)")
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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None, "General", "no / fp16 / bf16 (default: the launcher's: accelerate launch --mixed_precision or accelerate "
        "config); the resolved value is recorded, so a clearml-agent replay trains in the same precision")
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
    scale_min: float = _f(0.5, "Data", "random scale range, lower end (a ratio of the native or the fitted size)")
    scale_max: float = _f(2.0, "Data", "random scale range, upper end")
    scale_convention: Literal["native", "fit"] = _f(
        "native", "Data", "native: scales are of the stored image; fit: mmseg's, the image is first fitted into "
        "resize_base keeping its ratio (training scales, evaluation and ms ratios are of that fitted size)")
    resize_base: list[int] = _f([2048, 512], "Data", "fit box [long, short] for scale_convention fit "
                                "(mmseg's VOC/ADE20K: 2048 512)")
    align: int = _f(1, "Data", "round the evaluation size up to a multiple of this (32: SegFormer's AlignedResize; "
                    "1: none)")
    cat_max_ratio: float = _f(1.0, "Data", "redraw a crop (up to 10 times) while one class covers >= this share of "
                              "its labelled pixels, as mmseg's RandomCrop (0.75 in its recipes; 1.0: off)")
    photometric: str = _f("none", "Data", "none, jitter (ColorJitter) or mmseg (PhotoMetricDistortion, before "
                          "padding); true/false are read as jitter/none")
    pad_fill: Literal["zero", "mean"] = _f("zero", "Data", "image padding of crops larger than the scaled image: "
                                           "zero (black) or mean (the mean colour, 0 after normalising, as mmseg)")
    per_device_train_batch_size: int = _f(8, "Data", "train batch per process")
    global_batch_size: int | None = _f(None, "Data", "the global batch the recipe was tuned for; a warning when "
                                       "per_device_train_batch_size x processes x accumulation differs")
    per_device_eval_batch_size: int = _f(1, "Data", "eval batch per process (1: native sizes, no padding)")
    num_workers: int = _f(4, "Data", "DataLoader workers per process")
    max_eval_samples: int | None = _f(None, "Data", "score only the first N val samples (quick checks)")
    max_eval_size: int | None = _f(None, "Data", "evaluate images whose long side exceeds N px at N px (logits "
                                   "are scored at the label's native size); none: always native")
    # Model
    model: str = _f("deeplabv3_resnet101", "Model", "segformer-b0..b5, deeplabv3_resnet50/101, "
                    "deeplabv3_mobilenet_v3_large")
    pretrained: str | None = _f(None, "Model", "SegFormer: local dir or Hub id; DeepLab: state dict / export dir")
    backbone_weights: str | None = _f(None, "Model", "local file of ImageNet backbone weights")
    aux_loss: bool | None = _f(None, "Model", "DeepLab auxiliary head (default: on)")
    aux_weight: float = _f(0.4, "Model", "weight of the auxiliary loss")
    decode_head: Literal["torchvision", "mmseg"] = _f(
        "torchvision", "Model", "DeepLab heads: torchvision's (ASPP 256) or mmseg's (ASPPHead 512, dilations 1 12 24 "
        "36, FCNHead aux; trained from scratch)")
    resnet_stem: Literal["plain", "deep"] = _f(
        "plain", "Model", "DeepLab-ResNet stem: plain (7x7, torchvision weights) or deep (ResNetV1c: three 3x3 convs, "
        "mmseg's open-mmlab resnet*_v1c weights)")
    sync_bn: bool = _f(False, "Model", "SyncBatchNorm under multi-process CUDA training (DeepLab, SegFormer's head)")
    channels_last: bool = _f(False, "Model", "channels_last memory format")
    torch_compile: bool = _f(False, "Model", "torch.compile the model")
    # Optim
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "Optim", "optimiser")
    learning_rate: float = _f(0.01, "Optim", "peak learning rate (backbone)")
    head_lr_mult: float = _f(1.0, "Optim", "learning-rate multiplier for the decode head")
    weight_decay: float = _f(5e-4, "Optim", "weight decay (see weight_decay_policy)")
    weight_decay_policy: Literal["all", "no_norm_bias", "no_norm_pos"] = _f(
        "no_norm_bias", "Optim", "what is decayed: all (mmseg's DeepLab), no_norm_bias (norms and biases exempt), "
        "no_norm_pos (SegFormer's: encoder norms and pos_block exempt)")
    loss_average: Literal["labelled", "all"] = _f(
        "labelled", "Optim", "cross-entropy averaged over labelled pixels, or over all pixels (255 ones count "
        "in the denominator, as mmseg 0.x's default avg_non_ignore=False)")
    momentum: float = _f(0.9, "Optim", "SGD momentum")
    adam_beta1: float = _f(0.9, "Optim", "AdamW beta1")
    adam_beta2: float = _f(0.999, "Optim", "AdamW beta2")
    lr_warmup_steps: int = _f(0, "Optim", "linear warmup steps")
    poly_power: float = _f(0.9, "Optim", "power of the poly decay (1.0 = linear)")
    min_learning_rate: float = _f(0.0, "Optim", "learning rate of every param group (head too) at the last step")
    gradient_accumulation_steps: int = _f(1, "Optim", "micro-batches per optimiser step")
    max_grad_norm: float | None = _f(None, "Optim", "clip gradients to this norm (none: no clipping)")
    on_nonfinite: Literal["stop", "skip"] = _f("stop", "Optim", "non-finite loss or gradient norm: stop the run "
                                               "(nothing is saved from it), or skip that step (fp32/bf16; one host "
                                               "sync per step) and stop after max_nonfinite_steps skipped steps; "
                                               "fp16's GradScaler skips overflowing steps itself")
    max_nonfinite_steps: int = _f(10, "Optim", "skipped steps before giving up (on_nonfinite skip: in all; fp16 "
                                  "scaler skips: in a row)")

    def __post_init__(self):
        self.photometric = _photometric_mode(self.photometric)
        self.resize_base = parse_int_list(self.resize_base, "resize_base")
        check_choices(self)

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


class ConfigError(UsageError):
    """A bad recipe, flag or value; the message names the key."""


def _photometric_mode(value) -> str:
    """none / jitter / mmseg; the booleans older recipes and ClearML tasks hold map to jitter / none."""
    if isinstance(value, bool):
        return "jitter" if value else "none"
    text = str(value).strip().lower()
    mode = _PHOTOMETRIC_BOOLEANS.get(text, text)
    if mode not in PHOTOMETRIC_MODES:
        raise ConfigError(f"config key photometric: {value!r} is not one of {', '.join(PHOTOMETRIC_MODES)} "
                          "(or true/false)")
    return mode


def parse_int_list(value, name: str) -> list[int]:
    """[2048, 512] from a list, a tuple, or the strings ClearML and shells hand back.

    Accepted strings: '[2048, 512]', '2048,512', '2048 512'.
    """
    items = value
    if isinstance(value, str):
        items = value.strip().strip("[]()").replace(",", " ").split()
    try:
        numbers = [float(v) for v in items]
        if not all(n.is_integer() for n in numbers):
            raise ValueError(value)
        return [int(n) for n in numbers]
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name}: {value!r} is not a list of whole numbers") from None


@functools.lru_cache(maxsize=1)
def _literal_choices() -> dict[str, tuple]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


def check_choices(cfg: TrainConfig) -> None:
    """Literal-typed keys hold one of their choices (checked whenever a config is built)."""
    for name, choices in _literal_choices().items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"config key {name}: {getattr(cfg, name)!r} is not one of {', '.join(choices)}")


def global_batch_warning(cfg: TrainConfig, num_processes: int) -> str | None:
    """A sentence when the run's global batch differs from the recipe's `global_batch_size`, else None."""
    actual = cfg.per_device_train_batch_size * num_processes * cfg.gradient_accumulation_steps
    if cfg.global_batch_size is None or actual == cfg.global_batch_size:
        return None
    return (f"global batch {actual} (per_device_train_batch_size {cfg.per_device_train_batch_size} x "
            f"{num_processes} process(es) x gradient_accumulation_steps {cfg.gradient_accumulation_steps}) differs "
            f"from the recipe's global_batch_size {cfg.global_batch_size}: its learning rate and schedule were "
            "tuned for that batch")


def load_recipe(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file() and (CONFIGS_DIR / path).is_file():
        path = CONFIGS_DIR / path
    if not path.is_file() and (CONFIGS_DIR / f"{path}.yaml").is_file():
        path = CONFIGS_DIR / f"{path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(f"recipe {path} not found (shipped recipes: {shipped})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config keys to values")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"recipe {path} has unknown key(s): {', '.join(unknown)}")
    values.setdefault("recipe", path.stem)
    return values


def real_data_given(argv: list[str]) -> bool:
    return any(a == "--data_root" or a.startswith("--data_root=") for a in argv) or bool(os.environ.get("DATASET_PATH"))


def default_recipe(argv: list[str] = ()) -> tuple[Path, str]:
    """No --config: the real-data recipe when real data is given (--data_root or $DATASET_PATH), else the demo."""
    if real_data_given(list(argv)):
        source = "--data_root" if any(a.startswith("--data_root") for a in argv) else "$DATASET_PATH"
        return REAL_DATA_RECIPE, f"default recipe for real data ({source} given, no --config)"
    return DEMO_RECIPE, "default recipe: the synthetic demo (no --config, no --data_root, no $DATASET_PATH)"


@dataclass
class ParsedArgs:
    """A parsed command line: the config, the keys the user set (recipe or flags), and where it came from."""
    cfg: TrainConfig
    explicit: set[str]
    origin: str  # one line for the log: which recipe (or run config) and why


def _pop_option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _report_to_tracker(value: str) -> str:
    """HF's --report_to (names separated by commas or spaces) as vocseg's tracker."""
    names = {n for n in value.replace(",", " ").split() if n}
    if not names <= {"clearml", "tensorboard", "all", "none"}:
        raise ConfigError(f"--report_to {value}: vocseg reports to clearml, tensorboard, all or none")
    if "all" in names or names == {"clearml", "tensorboard"}:
        return "all"
    return next(iter(names)) if len(names) == 1 else "none"


def _explicit_keys(argv: list[str]) -> set[str]:
    hints = typing.get_type_hints(TrainConfig)
    keys = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name not in hints and name.startswith("no_") and name[3:] in hints:
                name = name[3:]  # --no_aux_loss
            keys.add(name)
    return keys & FIELD_NAMES


def _run_config_for_resume(argv: list[str]) -> tuple[dict, str] | None:
    """Resuming: the run's own config (the checkpoint's, else output_dir/config.yaml) is the base, not a recipe."""
    from vocseg.checkpoint import run_config_path

    resume = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--resume_from_checkpoint"), None)
    resume = resume or next((a.split("=", 1)[1] for a in argv if a.startswith("--resume_from_checkpoint=")), None)
    output_dir = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output_dir"), None)
    output_dir = output_dir or next((a.split("=", 1)[1] for a in argv if a.startswith("--output_dir=")), None)
    if not resume or resume.lower() in ("none", "null"):
        return None
    path = run_config_path(resume, output_dir)
    if path is None:
        return None
    values = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"run config {path} has unknown key(s): {', '.join(unknown)}")
    return values, f"resuming: the run's config {path}"


def parse_args(argv: list[str] | None = None) -> ParsedArgs:
    """Recipe file (--config, the default recipe, or the resumed run's config) first, then CLI flags on top."""
    argv = list(sys.argv[1:] if argv is None else argv)
    report_to = _pop_option(argv, "--report_to")
    if report_to is not None:
        argv += ["--tracker", _report_to_tracker(report_to)]
    recipe_path = _pop_option(argv, "--config")
    explicit = _explicit_keys(argv)
    resumed = _run_config_for_resume(argv)
    if resumed and not recipe_path:
        base, origin = resumed
    else:
        default_path, reason = default_recipe(argv)
        base = load_recipe(recipe_path or default_path)
        origin = f"recipe {base['recipe']}: " + (f"--config {recipe_path}" if recipe_path else reason)
        if recipe_path:
            explicit |= set(base)
    # `--max_train_steps none` (to train by epochs with a recipe that sets steps): argparse would
    # reject "none" for an int, so optional fields given none/null are cleared here.
    hints = typing.get_type_hints(TrainConfig)
    for i in range(len(argv) - 2, -1, -1):
        name = argv[i].removeprefix("--")
        if name in hints and type(None) in typing.get_args(hints[name]) and argv[i + 1].lower() in ("none", "null"):
            base[name] = None
            del argv[i:i + 2]
    for i, arg in enumerate(argv):  # a bare `--photometric`, as when it was a boolean flag, still means jitter
        if arg == "--photometric" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "true")
    parser = HfArgumentParser(TrainConfig)
    parser.add_argument("--config", help="recipe YAML (configs/NAME.yaml or a path); CLI flags override it")

    def one_line_error(message):  # argparse would print the whole usage text and exit
        raise ConfigError(f"{message} (see train.py --help)")

    parser.error = one_line_error
    parser.set_defaults(**base)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)} (see train.py --help)")
    values = {k: v for k, v in vars(namespace).items() if k in FIELD_NAMES}
    return ParsedArgs(TrainConfig(**values), explicit, origin)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_args(argv).cfg


# ------------------------------------------------------------------------------------------------ validation

def validate_config(cfg: TrainConfig) -> None:
    """Refuse impossible values before anything is built: one ConfigError naming the key."""
    from vocseg.models import MODEL_NAMES

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r}: expected {expected}")

    def finite(value) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    need(cfg.model in MODEL_NAMES, "model", f"one of {', '.join(MODEL_NAMES)}")
    for key in ("crop_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "max_nonfinite_steps"):
        need(getattr(cfg, key) >= 1, key, "a whole number >= 1")
    for key in ("num_workers", "eval_steps", "checkpointing_steps", "checkpoints_total_limit", "num_debug_samples",
                "lr_warmup_steps", "seed"):
        need(getattr(cfg, key) >= 0, key, "a whole number >= 0")
    for key in ("max_train_steps", "num_train_epochs", "max_eval_samples"):
        need(getattr(cfg, key) is None or getattr(cfg, key) >= 1, key, "a whole number >= 1 (or none)")
    need(cfg.max_train_steps is not None or cfg.num_train_epochs is not None, "max_train_steps",
         "a number of steps (or set num_train_epochs)")
    need(cfg.max_eval_size is None or cfg.max_eval_size >= 32, "max_eval_size", "at least 32 px (or none)")
    need(finite(cfg.learning_rate) and cfg.learning_rate > 0, "learning_rate", "a finite number > 0")
    need(finite(cfg.min_learning_rate) and 0 <= cfg.min_learning_rate <= cfg.learning_rate, "min_learning_rate",
         f"a number between 0 and learning_rate ({cfg.learning_rate})")
    for key in ("weight_decay", "aux_weight"):
        need(finite(getattr(cfg, key)) and getattr(cfg, key) >= 0, key, "a finite number >= 0")
    for key in ("head_lr_mult", "poly_power"):
        need(finite(getattr(cfg, key)) and getattr(cfg, key) > 0, key, "a finite number > 0")
    for key in ("momentum", "adam_beta1", "adam_beta2"):
        need(finite(getattr(cfg, key)) and 0 <= getattr(cfg, key) < 1, key, "a number in [0, 1)")
    need(cfg.max_grad_norm is None or (finite(cfg.max_grad_norm) and cfg.max_grad_norm > 0), "max_grad_norm",
         "a finite number > 0 (or none)")
    need(finite(cfg.scale_min) and cfg.scale_min > 0, "scale_min", "a finite number > 0")
    need(finite(cfg.scale_max) and cfg.scale_max >= cfg.scale_min, "scale_max", f">= scale_min ({cfg.scale_min})")
    need(len(cfg.resize_base) == 2 and min(cfg.resize_base) >= 1, "resize_base", "two positive sizes [long, short]")
    need(cfg.align >= 1, "align", "a whole number >= 1 (1 = no alignment)")
    need(finite(cfg.cat_max_ratio) and 0 < cfg.cat_max_ratio <= 1, "cat_max_ratio", "a number in (0, 1] (1 = off)")
    need(cfg.global_batch_size is None or cfg.global_batch_size >= 1, "global_batch_size", "a whole number >= 1 "
         "(or none)")
    need(cfg.decode_head != "mmseg" or cfg.model.startswith("deeplabv3_"), "decode_head",
         f"torchvision for {cfg.model} (mmseg heads are for the DeepLabV3 models)")
    need(cfg.resnet_stem != "deep" or cfg.model in ("deeplabv3_resnet50", "deeplabv3_resnet101"), "resnet_stem",
         f"plain for {cfg.model} (the deep stem is for deeplabv3_resnet50/101)")
    check_choices(cfg)
    if cfg.max_train_steps is not None:
        check_warmup(cfg.lr_warmup_steps, cfg.max_train_steps)


def check_warmup(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps >= total_steps:
        raise ConfigError(f"lr_warmup_steps = {warmup_steps}: expected fewer than the {total_steps} training steps "
                          "(the learning rate would never decay): lower --lr_warmup_steps or train longer")


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
    if typing.get_origin(base) is list:
        return parse_int_list(value, name)
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
