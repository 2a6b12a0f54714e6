"""Find the samples of a split on disk: VOC 2012, SBD, train_aug, or a local parquet dataset.

A source only lists files; reading and validating them is `vocseg.data.reading`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

VOC_SPLITS = ("train", "val", "trainval")
SBD_SPLITS = ("sbd_train", "sbd_val")
SPLITS = VOC_SPLITS + SBD_SPLITS + ("train_aug",)


class DataError(ValueError):
    """A data set on disk is not what it should be. The message names the file and the expectation."""


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: Path  # JPEG
    mask_path: Path  # VOC: palette PNG of class ids; SBD: .mat with GTcls.Segmentation
    source: str  # "voc" or "sbd": which tree both files come from


def resolve_voc_root(data_root: str | os.PathLike | None) -> Path:
    """Return the VOC2012 folder, given it, VOCdevkit, or the folder holding VOCdevkit ($DATASET_PATH by default)."""
    if data_root is None:
        data_root = os.environ.get("DATASET_PATH")
        if not data_root:
            raise DataError("no VOC root given: pass --data_root (or set DATASET_PATH) to the folder holding "
                            "VOCdevkit/VOC2012")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"VOC root {root} does not exist or is not a folder")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DataError(f"{root} is not a VOC 2012 tree: expected VOC2012/ImageSets/Segmentation under it, "
                    "or under VOCdevkit/ or VOCdevkit/VOC2012/")


def resolve_sbd_root(sbd_root: str | os.PathLike | None) -> Path:
    """Return SBD's `dataset` folder, given it or benchmark_RELEASE ($SBD_DATASET_PATH by default)."""
    if sbd_root is None:
        sbd_root = os.environ.get("SBD_DATASET_PATH")
        if not sbd_root:
            raise DataError("no SBD root given: pass --sbd_root (or set SBD_DATASET_PATH) to benchmark_RELEASE")
    root = Path(sbd_root).expanduser()
    if not root.is_dir():
        raise DataError(f"SBD root {root} does not exist or is not a folder")
    for candidate in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise DataError(f"{root} is not an SBD tree: expected dataset/cls/ (benchmark_RELEASE/dataset/cls) under it")


def read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"split file {path} is missing")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {path} lists no ids")
    seen, repeated = set(), []
    for sample_id in ids:
        if sample_id in seen and sample_id not in repeated:
            repeated.append(sample_id)
        seen.add(sample_id)
    if repeated:  # a repeated id would be trained on twice per epoch and scored twice
        raise DataError(f"split file {path} lists {len(repeated)} id(s) more than once: "
                        f"{', '.join(repeated[:5])}{', ...' if len(repeated) > 5 else ''}")
    return ids


def voc_samples(voc_root: Path, split: str) -> list[Sample]:
    ids = read_split_file(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return [Sample(i, voc_root / "JPEGImages" / f"{i}.jpg", voc_root / "SegmentationClass" / f"{i}.png", "voc")
            for i in ids]


def sbd_samples(sbd_dataset: Path, split: str) -> list[Sample]:
    ids = read_split_file(sbd_dataset / f"{split}.txt")
    return [Sample(i, sbd_dataset / "img" / f"{i}.jpg", sbd_dataset / "cls" / f"{i}.mat", "sbd") for i in ids]


def train_aug_samples(voc_root: Path, sbd_dataset: Path) -> list[Sample]:
    """(VOC train ∪ SBD train ∪ SBD val) − VOC val, sorted by id: 10582 on the real data.

    VOC-train ids keep VOC's mask (with its 255 borders) and VOC's JPEG; the others use SBD's.
    """
    voc_train = {s.id: s for s in voc_samples(voc_root, "train")}
    voc_val_ids = set(read_split_file(voc_root / "ImageSets" / "Segmentation" / "val.txt"))
    chosen = dict(voc_train)
    for split in ("train", "val"):
        for sample in sbd_samples(sbd_dataset, split):
            if sample.id not in voc_val_ids and sample.id not in chosen:
                chosen[sample.id] = sample
    return [chosen[i] for i in sorted(chosen)]


def list_samples(split: str, data_root=None, sbd_root=None) -> list[Sample]:
    """The samples of `split` (one of SPLITS), in a deterministic order, without duplicates."""
    if split in VOC_SPLITS:
        return voc_samples(resolve_voc_root(data_root), split)
    if split in SBD_SPLITS:
        return sbd_samples(resolve_sbd_root(sbd_root), split.removeprefix("sbd_"))
    if split == "train_aug":
        return train_aug_samples(resolve_voc_root(data_root), resolve_sbd_root(sbd_root))
    raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)} (or a parquet data_root)")


def find_parquet_files(data_root: str | os.PathLike | None, split: str) -> list[Path] | None:
    """Parquet files of `split` if data_root is a parquet file or a Hub-style parquet folder, else None.

    Hub layouts: data/{split}-*.parquet, {split}/*.parquet, {split}.parquet / {split}-*.parquet at the top, or a
    single file. Only those fixed depths are looked at, and a folder holding a VOC tree is never a parquet
    set: the folder that holds VOCdevkit often holds other data sets too.
    """
    if data_root is None:
        return None
    root = Path(data_root).expanduser()
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    if not root.is_dir():
        return None
    try:
        resolve_voc_root(root)
        return None
    except DataError:
        pass
    candidates = list(root.glob("*.parquet")) + list(root.glob("data/*.parquet")) + list(root.glob("*/*.parquet"))
    if not candidates:
        return None
    files = sorted({p for p in candidates
                    if p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split})
    if not files:
        raise DataError(f"parquet folder {root} has no files for split {split!r}: expected "
                        f"data/{split}-*.parquet, {split}/*.parquet or {split}.parquet")
    return files


def check_split_available(split: str, data_root=None, sbd_root=None) -> None:
    """Raise the DataError `load_split` would, from the split files alone (nothing decoded): a fast first check."""
    if not find_parquet_files(data_root, split):
        list_samples(split, data_root, sbd_root)
