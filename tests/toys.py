"""Small, exactly computable stand-ins for the maths tests: a toy segmentation model and a tiny VOC tree.

The toy model is wrapped in the real `vocseg.models.SegmentationModel` (so the engine's head/backbone split,
forward and export are the real ones) around an inner module laid out like torchvision's DeepLabV3
(`backbone(x)["out"]` -> `classifier`). Everything in it is per sample: 1x1 convolutions and a GroupNorm,
no BatchNorm, no dropout. That is what makes gradient accumulation exactly equivalent to a larger batch,
and the forward equivariant to horizontal flips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from vocseg.constants import IGNORE_INDEX, NUM_CLASSES
from vocseg.data.synthetic import save_palette_png
from vocseg.models import SegmentationModel

TOY_CHANNELS = 6


class ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, TOY_CHANNELS, kernel_size=1)
        self.norm = nn.GroupNorm(2, TOY_CHANNELS)

    def forward(self, x: torch.Tensor) -> dict:
        x = x.to(self.conv.weight.dtype)  # the engine hands over float32 pixels; a float64 toy stays float64
        return {"out": torch.tanh(self.norm(self.conv(x)))}


class ToyDeepLab(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ToyBackbone()
        self.classifier = nn.Conv2d(TOY_CHANNELS, NUM_CLASSES, kernel_size=1)


def toy_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> SegmentationModel:
    """Weights drawn from their own generator: the same toy whatever the global RNG did before."""
    inner = ToyDeepLab()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in inner.parameters():
            # Norm weights near 1, everything else small: GroupNorm and biases must differ from their defaults
            # so that weight decay on them would show.
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + (1.0 if param.ndim == 1 else 0.0))
    return SegmentationModel("deeplabv3_mobilenet_v3_large", inner.to(dtype))


def write_flat_tree(root: Path, num_train: int, num_val: int, size: tuple[int, int], void: bool,
                    seed: int = 0) -> Path:
    """A VOC 2012 tree of `size` images: blocks of classes 0-4 coloured by class plus noise, lossless images.

    `void=False` leaves no 255 pixels, so every crop of `size` has the same number of labelled pixels.
    The images are PNG bytes in `.jpg` files: decoders sniff the format, and the tests can then recompute
    the model's input exactly.
    """
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    height, width = size
    ids = [f"2007_{i:06d}" for i in range(num_train + num_val)]
    colours = rng.integers(0, 256, size=(NUM_CLASSES, 3))
    for sample_id in ids:
        mask = rng.integers(0, 5, size=(height // 4, width // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        if void:
            mask[rng.random(mask.shape) < 0.2] = IGNORE_INDEX
        image = (colours[np.minimum(mask, NUM_CLASSES - 1)] + rng.normal(0, 20, (height, width, 3))).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(voc / "JPEGImages" / f"{sample_id}.jpg", format="PNG")
        save_palette_png(mask, voc / "SegmentationClass" / f"{sample_id}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:num_train]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[num_train:]) + "\n")
    return root
