"""vocseg: Pascal VOC 2012 semantic segmentation on HuggingFace Accelerate, tracked in ClearML."""

import os

# albumentations checks PyPI for a newer version at import; training must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
