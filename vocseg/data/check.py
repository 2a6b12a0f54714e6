"""`python -m vocseg check-data`: validate downloaded VOC / SBD trees before training on them."""

from __future__ import annotations

import logging
import sys

import numpy as np
from tqdm import tqdm

from vocseg.constants import IGNORE_INDEX, NUM_CLASSES, OFFICIAL_SPLIT_SIZES, VOC_CLASSES
from vocseg.data.dataset import _sample_example
from vocseg.data.reading import decode_mask
from vocseg.data.sources import (SBD_SPLITS, VOC_SPLITS, DataError, list_samples, resolve_sbd_root,
                                 resolve_voc_root)
from vocseg.errors import OneLineArgumentParser

logger = logging.getLogger("vocseg")


def check_trees(data_root=None, sbd_root=None, progress: bool = True) -> dict:
    """Validate every sample of every split the given roots provide; each file is read once.

    Returns {"splits": {split: {"count", "official", "bad": [...], "class_pixels": [21]}}, "errors": [...]}.
    """
    report = {"splits": {}, "errors": []}
    splits = []
    roots = {}
    for name, resolve, root, names in (("VOC", resolve_voc_root, data_root, VOC_SPLITS),
                                       ("SBD", resolve_sbd_root, sbd_root, SBD_SPLITS)):
        try:
            roots[name] = resolve(root)
            splits += names
        except DataError as error:
            report["errors"].append(f"{name}: {error}")
    if "VOC" in roots and "SBD" in roots:
        splits.append("train_aug")

    checked: dict[tuple[str, str], tuple[str | None, np.ndarray | None]] = {}
    for split in splits:
        try:
            samples = list_samples(split, data_root, sbd_root)
        except DataError as error:
            report["errors"].append(f"{split}: {error}")
            continue
        entry = {"count": len(samples), "official": OFFICIAL_SPLIT_SIZES.get(split), "bad": [],
                 "class_pixels": np.zeros(NUM_CLASSES + 1, np.int64)}  # last bin: 255
        for sample in tqdm(samples, desc=f"checking {split}", disable=not progress, leave=False):
            key = (sample.source, sample.id)
            if key not in checked:
                try:
                    example = _sample_example(sample)
                    mask = decode_mask(example["label"]["bytes"], str(sample.mask_path))
                    mask = np.where(mask == IGNORE_INDEX, NUM_CLASSES, mask)
                    checked[key] = (None, np.bincount(mask.ravel(), minlength=NUM_CLASSES + 1))
                except DataError as error:
                    checked[key] = (str(error), None)
            reason, histogram = checked[key]
            if reason:
                entry["bad"].append({"id": sample.id, "reason": reason})
            else:
                entry["class_pixels"] += histogram
        report["splits"][split] = entry
    return report


def format_report(report: dict) -> str:
    lines = [f"{'split':<10} {'found':>7} {'official':>9} {'bad':>5}"]
    for split, entry in report["splits"].items():
        note = "" if entry["official"] in (None, entry["count"]) else "  (differs from the official count)"
        lines.append(f"{split:<10} {entry['count']:>7} {entry['official'] or '-':>9} {len(entry['bad']):>5}{note}")
    if report["splits"]:
        lines.append("\nclass pixel frequencies (% of labelled pixels; void = 255 border pixels, % of all):")
        splits = list(report["splits"])
        lines.append(f"{'class':<12} " + " ".join(f"{s:>9}" for s in splits))
        for c, name in enumerate(VOC_CLASSES + ("void",)):
            cells = []
            for s in splits:
                pixels = report["splits"][s]["class_pixels"]
                total = pixels.sum() if c == NUM_CLASSES else pixels[:NUM_CLASSES].sum()
                cells.append(f"{100.0 * pixels[c] / total:9.2f}" if total else f"{'-':>9}")
            lines.append(f"{name:<12} " + " ".join(cells))
    bad = [(s, b) for s, e in report["splits"].items() for b in e["bad"]]
    if bad:
        lines.append(f"\n{len(bad)} bad sample(s):")
        lines += [f"  [{s}] {b['id']}: {b['reason']}" for s, b in bad]
    for error in report["errors"]:
        lines.append(f"problem: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg check-data", description=__doc__)
    parser.add_argument("--data_root", default=None, help="VOC root (default: $DATASET_PATH)")
    parser.add_argument("--sbd_root", default=None, help="SBD benchmark_RELEASE (default: $SBD_DATASET_PATH)")
    parser.add_argument("--strict", action="store_true", help="also fail when a count differs from the official one")
    args = parser.parse_args(argv)
    report = check_trees(args.data_root, args.sbd_root, progress=sys.stderr.isatty())
    print(format_report(report))
    found_any = bool(report["splits"])
    has_bad = any(e["bad"] for e in report["splits"].values())
    split_errors = [e for e in report["errors"] if not e.startswith(("VOC:", "SBD:"))]
    # A missing SBD tree is fine when only VOC was asked for, and vice versa; nothing found is not.
    asked_but_missing = [e for e in report["errors"]
                         if (e.startswith("VOC:") and (args.data_root or not args.sbd_root))
                         or (e.startswith("SBD:") and args.sbd_root)]
    off_count = args.strict and any(e["official"] not in (None, e["count"]) for e in report["splits"].values())
    problems = not found_any or has_bad or split_errors or asked_but_missing or off_count
    print("\nresult: " + ("PROBLEMS FOUND" if problems else "OK"))
    return 1 if problems else 0
