"""Build, export and reload the segmentation models vocseg trains, behind one interface.

Every model is wrapped in `SegmentationModel`, whose forward takes ImageNet-normalised images and returns
21-class logits already resized to the size the caller asks for, so the trainer, evaluator and exporter
never need to know whether a SegFormer or a torchvision DeepLabV3 is inside.

Nothing here touches the network: `pretrained` / `backbone_weights` are local paths (or, for SegFormer,
a Hub id that is only fetched if the user asks for it).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vocseg.constants import ID2LABEL, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, LABEL2ID, NUM_CLASSES
from vocseg.errors import UsageError
from vocseg.mmseg_heads import ASPPHead, FCNHead, deep_stem_backbone
from vocseg.model_card import model_card
from vocseg.protocol import ScaleProtocol

logger = logging.getLogger("vocseg")

# Published Mix-Transformer sizes (SegFormer paper, Table 6; the nvidia/mit-bX configs):
# (hidden_sizes, depths, decoder_hidden_size). Heads [1, 2, 5, 8], sr_ratios [8, 4, 2, 1] and MLP ratio 4
# are shared by all sizes and are SegformerConfig's defaults.
SEGFORMER_SIZES = {
    "segformer-b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "segformer-b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "segformer-b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "segformer-b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "segformer-b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "segformer-b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
DEEPLAB_NAMES = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")
MODEL_NAMES = (*SEGFORMER_SIZES, *DEEPLAB_NAMES)
DECODE_HEADS = ("torchvision", "mmseg")
RESNET_STEMS = ("plain", "deep")

META_FILE = "vocseg_model.json"
WEIGHTS_FILE = "model.safetensors"
# Parameters of these sub-modules are the randomly initialised head (optimiser applies a head lr multiplier).
_HEAD_MODULES = {"segformer": {"decode_head"}, "deeplab": {"classifier", "aux_classifier"}}


class SegmentationModel(nn.Module):
    """One interface over SegFormer and DeepLabV3: normalised images in, 21-class logits at `output_size` out."""

    def __init__(self, name: str, inner: nn.Module):
        super().__init__()
        self.name = name
        self.family = "segformer" if name.startswith("segformer") else "deeplab"
        self.inner = inner
        self.num_classes = NUM_CLASSES
        self.image_mean = IMAGENET_MEAN
        self.image_std = IMAGENET_STD
        self.decode_head = "torchvision" if self.family == "deeplab" else "segformer"
        self.resnet_stem = "plain"
        # How the model was trained and is scored (vocseg.protocol); saved with every export.
        self.protocol = ScaleProtocol()

    @property
    def min_input_size(self) -> int:
        """Smallest side the model accepts: SegFormer's first attention reduces a 1/4-size map by 8 (sr_ratio)."""
        return 29 if self.family == "segformer" else 1

    @property
    def has_aux(self) -> bool:
        return getattr(self.inner, "aux_classifier", None) is not None

    def forward(self, pixel_values: torch.Tensor, output_size: tuple[int, int] | None = None) -> dict:
        size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])
        if self.family == "segformer":
            outputs = {"logits": self.inner(pixel_values=pixel_values).logits}  # H/4 x W/4
        else:
            # Run torchvision's DeepLabV3 pieces ourselves instead of inner(x): its forward upsamples to the input
            # size, and a second resize to output_size would blur twice. With output_size == input size this is
            # exactly torchvision's computation.
            features = self.inner.backbone(pixel_values)
            outputs = {"logits": self.inner.classifier(features["out"])}
            if self.has_aux:
                outputs["aux_logits"] = self.inner.aux_classifier(features["aux"])
        return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in outputs.items()}

    def is_head_parameter(self, name: str) -> bool:
        """True for parameters of the decode head / classifiers; works with 'inner.'/'module.' prefixes."""
        return bool(_HEAD_MODULES[self.family] & set(name.split(".")))


def head_parameter_names(model: SegmentationModel) -> set[str]:
    return {name for name, _ in model.named_parameters() if model.is_head_parameter(name)}


# ----------------------------------------------------------------------------------------------- building


def build_model(cfg) -> SegmentationModel:
    """Build `cfg.model` with 21 VOC classes; optional `pretrained`, `backbone_weights`, `aux_loss`, `decode_head`,
    `resnet_stem` and scale-protocol (`scale_convention`, `resize_base`, `align`) attributes."""
    name = getattr(cfg, "model", None)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    pretrained = getattr(cfg, "pretrained", None)
    backbone_weights = getattr(cfg, "backbone_weights", None)
    if name in SEGFORMER_SIZES:
        model = SegmentationModel(name, _build_segformer(name, pretrained))
        if backbone_weights:
            _load_segformer_encoder(model.inner, backbone_weights)
    else:
        aux_loss = getattr(cfg, "aux_loss", None)
        model = _build_deeplab_model(name, True if aux_loss is None else bool(aux_loss),
                                     getattr(cfg, "decode_head", None) or "torchvision",
                                     getattr(cfg, "resnet_stem", None) or "plain")
        if backbone_weights:
            _load_deeplab_backbone(model.inner, name, backbone_weights)
        if pretrained:
            path = Path(pretrained)
            _load_strict(model.inner, _read_state_dict(path / WEIGHTS_FILE if path.is_dir() else path), path,
                         # Full-model checkpoints (e.g. torchvision's COCO-VOC ones) carry an aux head; a model
                         # built without one just does not need it.
                         ignore_prefixes=() if model.has_aux else ("aux_classifier.",))
    model.protocol = ScaleProtocol.from_values(cfg)
    counts = parameter_counts(model)
    logger.info(f"model {name}: {counts['total'] / 1e6:.2f}M parameters (backbone {counts['backbone'] / 1e6:.2f}M, "
                f"decode head {counts['decode_head'] / 1e6:.2f}M, aux head {counts['aux_head'] / 1e6:.2f}M)")
    return model


def parameter_counts(model: SegmentationModel) -> dict[str, int]:
    """Parameters of the backbone, the decode head, the aux head (0 if none) and in total."""
    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    if model.family == "segformer":
        heads = {"decode_head": count(model.inner.decode_head), "aux_head": 0}
    else:
        heads = {"decode_head": count(model.inner.classifier), "aux_head": count(model.inner.aux_classifier)}
    total = count(model)
    return {"backbone": total - heads["decode_head"] - heads["aux_head"], **heads, "total": total}


def _build_deeplab_model(name: str, aux_loss: bool, decode_head: str, resnet_stem: str) -> SegmentationModel:
    """torchvision's DeepLabV3, optionally with mmseg's heads (ASPPHead / FCNHead) and the ResNetV1c deep stem.

    torchvision's deeplabv3_resnet50/101 already is mmseg's "d8" backbone: strides (1, 2, 1, 1), dilations
    (1, 1, 2, 4) with the first block of layer3/layer4 at half the dilation (mmseg's contract_dilation=True,
    mmseg/models/utils/res_layer.py), no multi-grid, aux head on layer3 (1024 channels).
    """
    if decode_head not in DECODE_HEADS:
        raise ValueError(f"decode_head must be one of {', '.join(DECODE_HEADS)}, got {decode_head!r}")
    if resnet_stem not in RESNET_STEMS:
        raise ValueError(f"resnet_stem must be one of {', '.join(RESNET_STEMS)}, got {resnet_stem!r}")
    inner = _build_deeplab(name, aux_loss)
    if resnet_stem == "deep":
        if "resnet" not in name:
            raise ValueError(f"resnet_stem deep needs a ResNet backbone, not {name}")
        inner.backbone = deep_stem_backbone(inner.backbone)
    if decode_head == "mmseg":
        inner.classifier = ASPPHead(inner.classifier[0].convs[0][0].in_channels, num_classes=NUM_CLASSES)
        if inner.aux_classifier is not None:
            inner.aux_classifier = FCNHead(inner.aux_classifier[0].in_channels, num_classes=NUM_CLASSES)
    model = SegmentationModel(name, inner)
    model.decode_head, model.resnet_stem = decode_head, resnet_stem
    return model


def _segformer_config(name: str):
    from transformers import SegformerConfig

    hidden_sizes, depths, decoder_hidden_size = SEGFORMER_SIZES[name]
    return SegformerConfig(hidden_sizes=hidden_sizes, depths=depths, decoder_hidden_size=decoder_hidden_size,
                           num_labels=NUM_CLASSES, id2label=dict(ID2LABEL), label2id=dict(LABEL2ID),
                           semantic_loss_ignore_index=IGNORE_INDEX)


def _build_segformer(name: str, pretrained: str | None):
    from transformers import SegformerForSemanticSegmentation

    if not pretrained:
        return SegformerForSemanticSegmentation(_segformer_config(name))
    local_only = _pretrained_source(pretrained)
    # ignore_mismatched_sizes: an ADE/Cityscapes checkpoint's classifier has another class count; it is
    # re-initialised for VOC's 21 classes while the encoder (and decoder MLPs) keep their weights.
    inner = SegformerForSemanticSegmentation.from_pretrained(
        pretrained, num_labels=NUM_CLASSES, id2label=dict(ID2LABEL), label2id=dict(LABEL2ID),
        semantic_loss_ignore_index=IGNORE_INDEX, ignore_mismatched_sizes=True, local_files_only=local_only)
    hidden_sizes, depths, _ = SEGFORMER_SIZES[name]
    if list(inner.config.hidden_sizes) != hidden_sizes or list(inner.config.depths) != depths:
        # Otherwise the model would silently be another size than the name the run (and export) reports.
        raise ValueError(f"pretrained {pretrained!r} is not a {name} (hidden_sizes={inner.config.hidden_sizes}, "
                         f"depths={inner.config.depths})")
    return inner


def _pretrained_source(pretrained: str) -> bool:
    """True when `pretrained` can be read without the network (a folder, or a Hub id already in the HF cache).

    A Hub id that is neither cached nor reachable fails here, in seconds and with the way out, instead of after
    ~30 s of download retries with an OSError that does not mention local folders.
    """
    if Path(pretrained).expanduser().exists():
        return True
    if "/" not in pretrained or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise UsageError(f"--pretrained {pretrained}: no such folder (and not a Hub id like nvidia/mit-b2)")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        return True
    hint = (f"download it where there is network (hf download {pretrained} --local-dir DIR) and pass "
            "--pretrained DIR")
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"--pretrained {pretrained}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         + hint)
    host = constants.ENDPOINT.split("://", 1)[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as error:
        raise UsageError(f"--pretrained {pretrained}: not in the local Hugging Face cache and {host} is unreachable "
                         f"({error}): {hint}") from None
    return False


def _build_deeplab(name: str, aux_loss: bool) -> nn.Module:
    from torchvision.models import segmentation

    # weights=None everywhere: torchvision would otherwise try to download; local weights are loaded after.
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                       aux_loss=aux_loss)


# ------------------------------------------------------------------------------------------ weight files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never run pickled code
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _load_strict(module: nn.Module, state: dict, path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """load_state_dict, but the error names the file and lists missing / unexpected keys (a few of each).

    BatchNorm's `num_batches_tracked` may be absent (files saved before PyTorch 0.4.1, e.g. torchvision's V1
    ImageNet weights): load_state_dict fills it in itself, so it does not count as missing.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = set(module.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match {type(module).__name__}: "
                         f"{len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches, e.g. a file for another model size
        raise ValueError(f"weights in {path} do not fit {type(module).__name__}: {err}") from err


def backbone_state(state: dict) -> dict[str, torch.Tensor]:
    """The ResNet backbone part of an ImageNet / mmseg checkpoint, in the key names of DeepLab's `backbone`.

    Accepts torchvision's classifier files (conv1/bn1/layerN.*, fc.*) and open-mmlab's ResNetV1c files
    (`open-mmlab://resnet101_v1c`: optionally wrapped in {"state_dict": ...}, keys stem.{0,1,3,4,6,7}.*
    for the three conv+BN pairs of the deep stem, then layerN.M.{conv1,bn1,...,downsample.0/1}.*, fc.*),
    also as the backbone of a whole mmseg segmentor checkpoint ("backbone." prefix, decode_head.* and
    auxiliary_head.* left out) or saved from DDP ("module." prefix). The model's deep stem uses mmseg's
    layout, so after unwrapping every backbone key keeps its name.
    """
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier


def _load_deeplab_backbone(inner: nn.Module, name: str, path) -> None:
    """Load ImageNet weights into the backbone: torchvision classifier files (resnet50/101 V1 or V2,
    mobilenet_v3_large) for the plain stem, open-mmlab ResNetV1c files for the deep stem."""
    state = _read_state_dict(Path(path))
    if name.endswith("mobilenet_v3_large"):
        # DeepLab's backbone is mobilenet's `features` Sequential, so its keys lack the "features." prefix;
        # the ImageNet classifier head is not part of it.
        state = {k.removeprefix("features."): v for k, v in state.items()}
        _load_strict(inner.backbone, state, path, ignore_prefixes=("classifier.",))
        return
    state = backbone_state(state)
    deep_model, deep_file = hasattr(inner.backbone, "stem"), "stem.0.weight" in state
    if deep_model != deep_file:
        file_stem, model_stem = ("deep" if deep_file else "plain"), ("deep" if deep_model else "plain")
        raise ValueError(f"weights in {path} are for a {file_stem}-stem ResNet "
                         f"({'open-mmlab ResNetV1c' if deep_file else 'torchvision'}), the model has the "
                         f"{model_stem} stem: set resnet_stem {file_stem}")
    _load_strict(inner.backbone, state, path)


def _load_segformer_encoder(inner: nn.Module, path) -> None:
    """Load MiT encoder weights (an nvidia/mit-bX style directory or weights file) into `inner.segformer`."""
    from transformers import SegformerModel

    file = Path(path)
    if file.is_dir():
        found = [file / f for f in ("model.safetensors", "pytorch_model.bin") if (file / f).is_file()]
        if not found:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {file}")
        file = found[0]
    # Checkpoints on disk use SegFormer's original key names (encoder.block.0.0.attention.self.query...), which
    # transformers 5 renames while loading; so load through from_pretrained rather than load_state_dict.
    # It also drops the "segformer." prefix and leaves out an ImageNet "classifier" or a "decode_head".
    try:
        encoder, info = SegformerModel.from_pretrained(None, config=copy.deepcopy(inner.config),
                                                       state_dict=_read_state_dict(file), output_loading_info=True)
    except RuntimeError as err:  # shape mismatches: a checkpoint of another MiT size
        raise ValueError(f"encoder weights in {file} do not fit {inner.config.hidden_sizes}: {err}") from err
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(("classifier.", "decode_head.")))
        raise ValueError(f"encoder weights in {file} do not match SegformerModel: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    inner.segformer.load_state_dict(encoder.state_dict())


# ---------------------------------------------------------------------------------------- export / reload


def export_model(model: SegmentationModel, out_dir, extra: dict | None = None) -> Path:
    """Write `model` to `out_dir` atomically: readers see the old export or the new one, never half of one.

    SegFormer exports are plain transformers directories (plus an image processor that reproduces vocseg's
    eval preprocessing: no resize, /255, ImageNet normalisation), so `transformers.pipeline(
    "image-segmentation", model=out_dir)` works. DeepLab exports are `model.safetensors`. Both carry
    `vocseg_model.json`, which `load_model` reads.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / META_FILE).is_file() and (out_dir.is_file() or any(out_dir.iterdir())):
        # Replacing the directory deletes it: refuse unless it is an earlier vocseg export.
        raise FileExistsError(f"{out_dir} exists and is not a vocseg model export; refusing to replace it")
    meta = {"model": model.name, "num_classes": model.num_classes, "id2label": {str(k): v for k, v in ID2LABEL.items()},
            "image_mean": list(model.image_mean), "image_std": list(model.image_std),
            "eval_protocol": model.protocol.to_dict()}
    if model.family == "deeplab":
        meta.update(aux_loss=model.has_aux, decode_head=model.decode_head, resnet_stem=model.resnet_stem)
    clash = set(extra or {}) & set(meta)
    if clash:
        raise ValueError(f"extra metadata must not override {sorted(clash)}")
    meta.update(extra or {})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))  # same filesystem: rename works
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; an export is meant to be shared
    old = None
    try:
        if model.family == "segformer":
            from transformers import SegformerImageProcessor

            model.inner.save_pretrained(tmp)  # transformers 5 always writes safetensors
            SegformerImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                                    image_std=list(IMAGENET_STD), do_reduce_labels=False).save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in model.inner.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(meta))
        # A directory cannot be os.replace'd over a non-empty one: move the old export aside first, and delete
        # it only once the new one is in place.
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / "export", out_dir)  # put the previous export back
            shutil.rmtree(old, ignore_errors=True)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_model(path) -> SegmentationModel:
    """Rebuild a model written by `export_model` (local directory only)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a vocseg model export (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    name = meta.get("model")
    if name not in MODEL_NAMES:
        raise ValueError(f"{meta_path}: unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if name in SEGFORMER_SIZES:
        from transformers import SegformerForSemanticSegmentation

        model = SegmentationModel(name, SegformerForSemanticSegmentation.from_pretrained(path))
    else:
        model = _build_deeplab_model(name, bool(meta.get("aux_loss", True)), meta.get("decode_head", "torchvision"),
                                     meta.get("resnet_stem", "plain"))
        _load_strict(model.inner, _read_state_dict(path / WEIGHTS_FILE), path / WEIGHTS_FILE)
    # Exports written before the protocol was recorded: the run's config, else native.
    model.protocol = ScaleProtocol.from_values(meta.get("eval_protocol") or meta.get("train_config") or {})
    return model
