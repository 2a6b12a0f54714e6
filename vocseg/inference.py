"""Test-time inference the way the segmentation literature reports it, and loading any saved model.

`predict_logits` runs a `SegmentationModel` on normalised images as a whole, or as mmsegmentation's sliding
window, optionally over several scales and with horizontal flips (the "ms+flip" numbers papers quote).
`load_model_or_checkpoint` reads an export (best_model/) or a training checkpoint folder (checkpoints/step_N).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vocseg.models import META_FILE, WEIGHTS_FILE, SegmentationModel, _load_strict, build_model, load_model
from vocseg.protocol import aligned

MODES = ("whole", "slide")
# Run-config keys that decide what a checkpoint's model is and how it is scored.
ARCHITECTURE_KEYS = ("model", "aux_loss", "decode_head", "resnet_stem", "scale_convention", "resize_base", "align")


def _check_window(crop_size: int, stride: int) -> None:
    if not 0 < stride <= crop_size:
        # A stride over the crop would leave pixels no window covers (mmseg asserts on that too).
        raise ValueError(f"need 0 < stride <= crop_size, got stride {stride}, crop_size {crop_size}")


def sliding_windows(height: int, width: int, crop_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, exactly as mmseg's `slide_inference` places them.

    A grid of `crop_size` windows every `stride` pixels; the last one of each row / column is moved back so
    it ends at the border. Along a side shorter than `crop_size` the window is the whole side, unpadded, as
    in mmseg's default test pipeline: both model families take any input size (SegFormer: >= 32 px a side).
    """
    _check_window(crop_size, stride)

    def spans(size: int) -> list[tuple[int, int]]:
        count = max(size - crop_size + stride - 1, 0) // stride + 1
        ends = [min(i * stride + crop_size, size) for i in range(count)]
        return [(max(end - crop_size, 0), end) for end in ends]

    return [(y1, y2, x1, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def _slide(model, pixel_values: torch.Tensor, crop_size: int, stride: int) -> torch.Tensor:
    """Logits at the input size: each window's logits summed into place, divided by how many windows saw a pixel."""
    height, width = pixel_values.shape[-2:]
    total = count = None
    for y1, y2, x1, x2 in sliding_windows(height, width, crop_size, stride):
        logits = model(pixel_values[..., y1:y2, x1:x2])["logits"]
        if total is None:  # float32 sums, also when the model runs in bf16 / fp16
            total = logits.new_zeros(*logits.shape[:2], height, width, dtype=torch.float32)
            count = logits.new_zeros(1, 1, height, width, dtype=torch.float32)
        total[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return total / count


def _views(model, pixel_values, mode, crop_size, stride, scales, flip, output_size=None, align=1):
    """Logits of each (scale, flip) view, at `output_size` (default: the input size) and the input's orientation."""
    size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])
    for scale in scales:
        image = pixel_values
        if scale != 1.0:
            # mmcv's rescale rounds half up: int(x * scale + 0.5); AlignedResize then rounds up to `align`.
            scaled = tuple(aligned(max(1, int(side * scale + 0.5)), align) for side in pixel_values.shape[-2:])
            image = F.interpolate(pixel_values, size=scaled, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            view = image.flip(-1) if flipped else image
            # Predict at the view's own size and resize afterwards, as mmseg does: a window that covers the
            # whole image then gives exactly the whole-image logits at every scale.
            logits = model(view)["logits"] if mode == "whole" else _slide(model, view, crop_size, stride)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            yield logits


@torch.no_grad()
def predict_logits(model, pixel_values: torch.Tensor, mode: str = "whole", crop_size: int = 512, stride: int = 341,
                   scales=(1.0,), flip: bool = False, output_size=None, align: int = 1) -> torch.Tensor:
    """Logits [B, C, H, W] at `output_size` (default: the size of `pixel_values`, normalised [B, 3, H, W]).

    Each view's logits are resized straight to `output_size`, as mmseg resizes every view to the original
    image (so a fit-protocol input is scored at its label's native size with one resize). `align` rounds
    each scaled view up to a multiple of it (SegFormer's AlignedResize in its multi-scale test).

    mode "whole" runs the image in one pass; "slide" runs `crop_size` windows every `stride` pixels
    (`sliding_windows`) and averages the logits where windows overlap; along a side shorter than the window,
    the window is that side (no padding, as in mmseg). `scales` resizes the image by each
    factor (bilinear, align_corners=False) first; `flip` adds the mirrored image of each scale.

    One view (the default) returns the model's logits untouched. Several views are merged like mmseg's
    test-time augmentation (and DeepLab's): the *softmax probabilities* of the views are averaged, and their
    log is returned, so softmax(output) is that average and argmax(output) the merged prediction.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales}")
    if mode == "slide":
        _check_window(crop_size, stride)  # before any compute
    views = _views(model, pixel_values, mode, crop_size, stride, scales, flip, output_size, align)
    num_views = len(scales) * (2 if flip else 1)
    if num_views == 1:
        return next(views)
    # log(mean(p)) accumulated as a running logsumexp of log-probabilities: one view in memory at a time
    # (a 50-megapixel image has 4 GB of logits per view), and no log(0) where probabilities underflow.
    total = None
    for logits in views:
        log_probs = logits.float().log_softmax(1)
        total = log_probs if total is None else torch.logaddexp(total, log_probs)
    return total - math.log(num_views)


def logits_at_label_size(forward, pixel_values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Logits [B, C, H, W] at the batch's (padded) label size, each sample's mapped onto its own label.

    `forward(pixel_values, output_size) -> logits at output_size`, e.g. `predict_logits(model, ...,
    output_size=...)`, which resizes the model's logits to the input size and then to `output_size`, as
    mmseg's whole_inference (encode_decode, then resize to ori_shape) does. When every image has its
    label's size (native protocol), or the batch is one sample, the forward goes straight to the label
    size. Otherwise (fit protocol, padded batch of several) each sample's logits are cut to its own image
    size and resized to its own label size: resizing the padded batch as a whole would stretch the padding
    into the picture.
    """
    label_shape = tuple(batch["labels"].shape[-2:])
    image_sizes, label_sizes = batch.get("image_sizes"), batch.get("label_sizes")
    if image_sizes is None or len(image_sizes) == 1 or list(image_sizes) == list(label_sizes):
        return forward(pixel_values, label_shape)
    logits = forward(pixel_values, tuple(pixel_values.shape[-2:]))
    out = logits.new_zeros(*logits.shape[:2], *label_shape)  # the rest is padding, labelled 255: never scored
    for i, ((h, w), (label_h, label_w)) in enumerate(zip(image_sizes, label_sizes)):
        out[i, :, :label_h, :label_w] = F.interpolate(logits[i:i + 1, :, :h, :w], size=(label_h, label_w),
                                                      mode="bilinear", align_corners=False)[0]
    return out


# ----------------------------------------------------------------------------------------------- loading


def _strip_wrappers(key: str) -> str:
    # accelerator.save_state stores the prepared model's keys: DDP adds "module.", torch.compile "_orig_mod.".
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_checkpoint(path) -> tuple[SegmentationModel, dict]:
    """The model of a training checkpoint folder (outputs/RUN/checkpoints/step_N) and its run's config.

    The folder holds `model.safetensors` (accelerator.save_state of the SegmentationModel); the run's
    config.yaml sits two levels up and says which architecture to build.
    """
    import yaml
    from safetensors.torch import load_file

    path = Path(path)
    weights, config_file = path / WEIGHTS_FILE, path.parent.parent / "config.yaml"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint folder (no {WEIGHTS_FILE})")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} looks like a checkpoint, but its run config {config_file} is missing "
                                "(expected outputs/RUN/config.yaml above outputs/RUN/checkpoints/step_N)")
    config = yaml.safe_load(config_file.read_text()) or {}
    # Architecture (and scale protocol) only: every weight comes from the checkpoint, so `pretrained` /
    # `backbone_weights` (local files or Hub ids this machine may not have) are deliberately not loaded.
    model = build_model(SimpleNamespace(**{key: config.get(key) for key in ARCHITECTURE_KEYS}))
    state = {_strip_wrappers(k): v for k, v in load_file(str(weights)).items()}
    _load_strict(model, state, weights)
    return model.eval(), config


def load_model_or_checkpoint(path) -> SegmentationModel:
    """An exported model folder (best_model/, `vocseg export`) or a training checkpoint folder, in eval mode."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return load_model(path).eval()
    if (path / WEIGHTS_FILE).is_file():
        return load_checkpoint(path)[0]
    raise FileNotFoundError(f"{path} is neither an exported model (no {META_FILE}) nor a training checkpoint "
                            f"folder (no {WEIGHTS_FILE})")
