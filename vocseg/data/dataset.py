"""`load_split`: a VOC/SBD/train_aug/parquet split as a validated, cached `datasets.Dataset`."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from vocseg.data.reading import make_example, read_file, read_sbd_mat
from vocseg.data.sources import DataError, Sample, find_parquet_files, list_samples

logger = logging.getLogger("vocseg")

# Bump when what the loader stores changes, so old caches are not reused.
LOADER_VERSION = "1"
FEATURES = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()})
BAD_SAMPLE_POLICIES = ("error", "skip")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
MASK_COLUMNS = ("label", "mask", "annotation", "semantic_segmentation")
ID_COLUMNS = ("id", "image_id", "name", "file_name")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VOCSEG_CACHE", Path.home() / ".cache" / "vocseg")) / "datasets"


def _file_state(path: Path) -> str:
    """Size, mtime and inode: any edit or replacement of the file changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def split_fingerprint(split: str, files: list[Path], bad_samples: str, extra: list[str] = ()) -> str:
    digest = hashlib.sha256(f"vocseg-loader-{LOADER_VERSION}|{split}|{bad_samples}".encode())
    for line in extra:
        digest.update(line.encode())
    for path in files:
        digest.update(f"|{path}={_file_state(path)}".encode())
    return digest.hexdigest()[:32]


def _sample_example(sample: Sample) -> dict:
    image = read_file(sample.image_path, "image", sample.id)
    if sample.mask_path.suffix == ".mat":
        if not sample.mask_path.is_file():
            read_file(sample.mask_path, "mask", sample.id)  # raises the "missing" error
        mask = read_sbd_mat(sample.mask_path)
    else:
        mask = read_file(sample.mask_path, "mask", sample.id)
    return make_example(sample.id, image, str(sample.image_path), mask, str(sample.mask_path))


def _first_column(names: list[str], candidates: tuple[str, ...], file: Path, what: str) -> str | None:
    found = next((c for c in candidates if c in names), None)
    if found is None and what:
        raise DataError(f"parquet file {file} has no {what} column: expected one of {', '.join(candidates)}, "
                        f"found {', '.join(names)}")
    return found


def _cell_bytes(cell, file: Path, row: int, column: str) -> tuple[bytes, str]:
    """A Hub-style image cell is {'bytes': ..., 'path': ...}; plain binary cells are accepted too."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"], f"{file}[{row}].{column}" + (f" ({cell['path']})" if cell.get("path") else "")
        if cell.get("path") and Path(cell["path"]).is_file():
            return Path(cell["path"]).read_bytes(), cell["path"]
    elif isinstance(cell, bytes):
        return cell, f"{file}[{row}].{column}"
    raise DataError(f"parquet file {file} row {row} column {column!r}: expected encoded image bytes")


def _parquet_rows(files: list[Path]):
    for file in files:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        image_col = _first_column(names, IMAGE_COLUMNS, file, "image")
        mask_col = _first_column(names, MASK_COLUMNS, file, "mask")
        id_col = _first_column(names, ID_COLUMNS, file, "")
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=[c for c in (id_col, image_col, mask_col) if c]):
            for record in batch.to_pylist():
                sample_id = str(record[id_col]) if id_col else f"{file.stem}_{row:06d}"
                yield sample_id, file, row, record[image_col], record[mask_col], image_col, mask_col
                row += 1


def _parquet_example(sample_id, file, row, image_cell, mask_cell, image_col, mask_col) -> dict:
    image, image_name = _cell_bytes(image_cell, file, row, image_col)
    mask, mask_name = _cell_bytes(mask_cell, file, row, mask_col)
    return make_example(sample_id, image, image_name, mask, mask_name)


def _generate(items, to_example, bad_samples: str, bad: list):
    for item in items:
        try:
            yield to_example(*item) if isinstance(item, tuple) else to_example(item)
        except DataError as error:
            if bad_samples == "error":
                raise
            sample_id = item[0] if isinstance(item, tuple) else item.id
            bad.append({"id": sample_id, "reason": str(error)})


def load_split(split: str, data_root=None, sbd_root=None, cache_dir=None, bad_samples: str = "error",
               num_proc: int | None = None) -> datasets.Dataset:
    """Load a split as a `datasets.Dataset` with columns `id`, `image`, `label` (both `datasets.Image`).

    split: train / val / trainval (VOC), sbd_train / sbd_val (SBD), train_aug, or any split name of
        a parquet data_root. Roots default to $DATASET_PATH and $SBD_DATASET_PATH.
    bad_samples: "error" raises a `DataError` naming the file at the first bad sample; "skip"
        leaves bad samples out and logs how many and which (also in `dataset.info.description`).

    Samples are validated once, when the Arrow cache is built; the cache key covers every file's
    size, mtime and inode, so an edited or replaced file rebuilds the split instead of serving stale data.
    """
    if bad_samples not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_POLICIES}, got {bad_samples!r}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    parquet_files = find_parquet_files(data_root, split)
    if parquet_files:
        items, to_example, files = _parquet_rows(parquet_files), _parquet_example, parquet_files
        extra = []
    else:
        samples = list_samples(split, data_root, sbd_root)
        items, to_example = samples, _sample_example
        files = [p for s in samples for p in (s.image_path, s.mask_path)]
        extra = [f"|{s.id}:{s.source}" for s in samples]
    fingerprint = split_fingerprint(split, files, bad_samples, extra)

    bad: list[dict] = []
    generator = functools.partial(_generate, items, to_example, bad_samples, bad)
    try:
        dataset = datasets.Dataset.from_generator(generator, features=FEATURES, cache_dir=str(cache_dir),
                                                  fingerprint=fingerprint, num_proc=num_proc,
                                                  split=datasets.NamedSplit(split))
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None  # our message names the file; datasets' wrapper does not
        raise
    report_path = Path(dataset.cache_files[0]["filename"]).parent / f"vocseg-bad-samples-{split}.json"
    if bad or not report_path.exists():
        report_path.write_text(json.dumps(bad, indent=1))  # built just now: remember for cached loads
    bad = json.loads(report_path.read_text())
    if bad:
        logger.warning("split %s: skipped %d bad sample(s): %s", split, len(bad),
                       "; ".join(f"{b['id']} ({b['reason']})" for b in bad))
    if len(dataset) == 0:
        raise DataError(f"split {split} has no usable samples" + (f" ({len(bad)} skipped as bad)" if bad else ""))
    dataset.info.description = json.dumps({"split": split, "bad_samples": bad})
    return dataset


def bad_samples_of(dataset: datasets.Dataset) -> list[dict]:
    """The samples `load_split(..., bad_samples="skip")` left out: [{'id', 'reason'}, ...]."""
    try:
        return json.loads(dataset.info.description or "{}").get("bad_samples", [])
    except json.JSONDecodeError:
        return []
