"""The scale convention: at what size an image is trained on, predicted at and scored.

Shared by training (random scale), the in-loop evaluation, `vocseg evaluate` and `vocseg predict`, and
stored with every export and checkpoint so a model is scored the way it was trained.

- ``native``: the image as stored (VOC: at most 500 px a side). Training scales it by r ~ U(scale_min,
  scale_max); evaluation runs it as it is.
- ``fit``: mmsegmentation's convention. The image is fitted into ``resize_base`` = (long, short) keeping
  its aspect ratio, as ``mmcv.rescale_size`` does (scale factor = min(long / long side, short / short
  side); sizes rounded half up): on VOC that is short side 512, 1.37x a 500x375 image. Training draws
  r ~ U(scale_min, scale_max) and fits the image into (int(long * r), int(short * r)) -- mmseg 0.x
  ``Resize.random_sample_ratio`` (mmseg/datasets/pipelines/transforms.py), i.e. r times the fitted size.
  Evaluation runs the fitted image and scores the logits resized back to the label's native size;
  multi-scale ratios multiply the fitted size.

``align`` > 1 rounds the *evaluation* size up to a multiple of it, after fitting, as SegFormer's
``AlignedResize`` (NVlabs/SegFormer mmseg/datasets/pipelines/transforms.py, ``_align``: ceil to
``size_divisor`` = 32) does in its test pipeline; training is not aligned (SegFormer trains with plain
``Resize``). Nothing here imports torch or OpenCV, so any module can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALE_CONVENTIONS = ("native", "fit")
PROTOCOL_KEYS = ("scale_convention", "resize_base", "align")
DEFAULT_RESIZE_BASE = (2048, 512)


def round_half_up(value: float) -> int:
    """int(x + 0.5), mmcv's ``_scale_size`` rounding (not Python's round-half-even)."""
    return int(value + 0.5)


def rescaled_size(height: int, width: int, box: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image fitted into `box` = (long, short) keeping its ratio: mmcv.rescale_size."""
    longest, shortest = max(box), min(box)
    factor = min(longest / max(height, width), shortest / min(height, width))
    return max(1, round_half_up(height * factor)), max(1, round_half_up(width * factor))


def scaled_box(resize_base: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The fit box for a ratio, truncated as mmseg does: (int(long * r), int(short * r))."""
    return int(resize_base[0] * ratio), int(resize_base[1] * ratio)


def aligned(size: int, align: int) -> int:
    """`size` rounded up to a multiple of `align` (AlignedResize._align)."""
    return int(math.ceil(size / align)) * align if align > 1 else size


@dataclass(frozen=True)
class ScaleProtocol:
    """scale_convention / resize_base / align as one value (see the module docstring)."""

    scale_convention: str = "native"
    resize_base: tuple[int, int] = DEFAULT_RESIZE_BASE
    align: int = 1

    def __post_init__(self):
        if self.scale_convention not in SCALE_CONVENTIONS:
            raise ValueError(f"scale_convention must be one of {', '.join(SCALE_CONVENTIONS)}, "
                             f"got {self.scale_convention!r}")
        base = tuple(int(v) for v in self.resize_base)
        if len(base) != 2 or min(base) < 1:
            raise ValueError(f"resize_base must be two positive sizes [long, short], got {list(self.resize_base)}")
        object.__setattr__(self, "resize_base", base)
        if int(self.align) < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")
        object.__setattr__(self, "align", int(self.align))

    @classmethod
    def from_values(cls, values) -> ScaleProtocol:
        """From a mapping or an object with the three config keys; missing keys keep their defaults."""
        get = values.get if isinstance(values, dict) else (lambda key, default=None: getattr(values, key, default))
        found = {key: get(key) for key in PROTOCOL_KEYS if get(key) is not None}
        return cls(**found)

    def to_dict(self) -> dict:
        return {"scale_convention": self.scale_convention, "resize_base": list(self.resize_base), "align": self.align}

    def replace(self, **overrides) -> ScaleProtocol:
        """A copy with the overrides that are not None (CLI flags left unset keep the model's protocol)."""
        return ScaleProtocol.from_values({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def resizes(self) -> bool:
        return self.scale_convention == "fit" or self.align > 1

    def eval_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of (height, width) is predicted at (single scale): fitted, then aligned."""
        if self.scale_convention == "fit":
            height, width = rescaled_size(height, width, self.resize_base)
        return aligned(height, self.align), aligned(width, self.align)

    def describe(self) -> str:
        if self.scale_convention == "native":
            text = "native size"
        else:
            text = f"fitted into {self.resize_base[0]}x{self.resize_base[1]} (keep ratio)"
        return text + (f", aligned to {self.align}" if self.align > 1 else "")
