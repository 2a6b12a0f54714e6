"""The data layer: find samples on disk, cache them as a `datasets.Dataset`, augment them lazily."""

from vocseg.data.dataset import bad_samples_of, load_split
from vocseg.data.sources import SPLITS, DataError, list_samples

__all__ = ["DataError", "SPLITS", "bad_samples_of", "list_samples", "load_split"]
