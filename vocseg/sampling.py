"""Which samples each step and each rank sees: the training order, and the evaluation split across ranks.

Training: one permutation per epoch, a function of (seed, epoch) only, cut to a whole number of *global*
batches (per-device batch x processes x accumulation). The loop position is the number of samples of that
permutation already consumed, so a run resumed on another number of processes (same global batch) continues
at exactly the same sample: accelerate deals the remaining per-device batches round-robin to the ranks.

Evaluation: every sample on exactly one rank, images of the same size batched together (a padded batch
would change what the model sees), matrices summed once at the end: exact for any batch size and world size.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler):
    """A permutation of (seed, epoch), cut to whole global batches, started at a sample offset.

    The epoch method is deliberately not called `set_epoch`: accelerate's DataLoaderShard calls
    `sampler.set_epoch(<its own iteration counter>)`, which restarts at 0 after a resume.
    """

    def __init__(self, num_samples: int, seed: int, global_batch_size: int = 1):
        self.num_samples, self.seed, self.global_batch_size = num_samples, seed, global_batch_size
        self.epoch, self.start = 0, 0

    @property
    def samples_per_epoch(self) -> int:
        """Samples used per epoch: the permutation's tail that does not fill a global batch is left out."""
        return self.num_samples // self.global_batch_size * self.global_batch_size

    def set_position(self, epoch: int, samples_consumed: int = 0) -> None:
        self.epoch, self.start = epoch, samples_consumed

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()[:self.samples_per_epoch]

    def __iter__(self):
        return iter(self.permutation(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


def sample_sizes(dataset) -> list[tuple[int, int]]:
    """(height, width) of every sample of a `load_split` dataset, from the PNG mask headers (nothing decoded);
    for a plain list of examples (tests, user code), of their `labels`."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return [tuple(dataset[i]["labels"].shape[-2:]) for i in range(len(dataset))]

    plain = dataset.with_format(None)  # no augmentation transform: just the stored cells
    labels = plain.cast_column("label", datasets.Image(decode=False))["label"]
    sizes = []
    for cell in labels:
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
        with Image.open(source) as image:
            sizes.append((image.height, image.width))
    return sizes


def eval_batches(sizes: list[tuple[int, int]] | int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of sample indices: same-size images only share a batch; every sample on one rank.

    `sizes` may be the number of samples when batch_size is 1 (no sizes needed). Batches are dealt
    round-robin over the ranks, so each rank gets a similar share whatever the size mix.
    """
    if isinstance(sizes, int):
        batches = [[i] for i in range(sizes)]
    else:
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            by_size.setdefault(tuple(size), []).append(index)
        batches = [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
        batches.sort(key=lambda batch: batch[0])  # dataset order: the same batches whatever the dict did
    return batches[rank::world_size]
