"""Read and validate one sample: JPEG bytes + class-id mask, checked the way training needs them.

Images are kept as their original encoded bytes (EXIF stripped, see `strip_exif`) and decoded
later without EXIF rotation; masks are decoded with PIL (never cv2: it turns palette PNGs into
colours) and stored as palette PNGs whose pixel values are class ids.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from vocseg.constants import IGNORE_INDEX, NUM_CLASSES, VOC_PALETTE_FLAT
from vocseg.data.sources import DataError

VALID_LABELS = np.array(list(range(NUM_CLASSES)) + [IGNORE_INDEX])


def strip_exif(jpeg: bytes) -> bytes:
    """Drop APP1/Exif segments from a JPEG, losslessly (the entropy-coded data is untouched).

    Masks have no EXIF, so an image must never be rotated by its orientation tag; but
    `datasets.Image` decoding applies `exif_transpose` whenever the tag is there. Removing the
    segment makes every decoder (PIL, datasets, cv2) return the pixels as stored.
    """
    if jpeg[:2] != b"\xff\xd8":
        return jpeg  # not a JPEG (e.g. a PNG image from a parquet set): nothing to strip
    out, pos = [jpeg[:2]], 2
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        marker = jpeg[pos + 1]
        if marker == 0xDA:  # start of scan: the rest is image data
            break
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        segment = jpeg[pos:pos + 2 + length]
        if not (marker == 0xE1 and segment[4:10] == b"Exif\x00\x00"):
            out.append(segment)
        pos += 2 + length
    out.append(jpeg[pos:])
    return b"".join(out)


def check_image(data: bytes, name: str) -> tuple[int, int]:
    """Fully decode the image (catches truncated files) and return its (width, height) without EXIF rotation."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DataError(f"image {name} is not a readable image (truncated or corrupt?): {error}") from None


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Class ids of an index-mask image file (PNG, mode P or L)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            mask = np.array(image)  # palette PNGs give their indices: the class ids
    except Exception as error:
        raise DataError(f"mask {name} is not a readable image: {error}") from None
    if mode not in ("P", "L"):
        raise DataError(f"mask {name} has mode {mode}: expected an 8-bit index mask (palette 'P' or greyscale 'L') "
                        f"whose pixel values are class ids 0..{NUM_CLASSES - 1} or {IGNORE_INDEX}; an RGB colour "
                        "mask must be converted to class ids first")
    return mask


def read_sbd_mat(path: Path) -> np.ndarray:
    try:
        mask = scipy.io.loadmat(path)["GTcls"][0]["Segmentation"][0]
    except Exception as error:
        raise DataError(f"SBD mask {path} is not readable: expected a .mat file with GTcls.Segmentation ({error})") \
            from None
    return np.ascontiguousarray(mask.astype(np.uint8)) if mask.max(initial=0) <= 255 else mask


def check_mask_values(mask: np.ndarray, name: str) -> None:
    values = np.unique(mask)
    bad = np.setdiff1d(values, VALID_LABELS)
    if bad.size:
        raise DataError(f"mask {name} has pixel values {bad.tolist()[:10]} outside the class ids "
                        f"0..{NUM_CLASSES - 1} and {IGNORE_INDEX}")


def encode_mask_png(mask: np.ndarray) -> bytes:
    png = Image.fromarray(mask.astype(np.uint8), mode="P")
    png.putpalette(VOC_PALETTE_FLAT)
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    return buffer.getvalue()


def read_file(path: Path, what: str, sample_id: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{sample_id}: {what} {path} is missing (the id is listed in the split file)") from None


def make_example(sample_id: str, image_bytes: bytes, image_name: str, mask: np.ndarray | bytes,
                 mask_name: str) -> dict:
    """Validate one sample and return the row stored in the Arrow table.

    `mask` is either encoded PNG bytes (kept as they are when valid) or a decoded id array.
    """
    width, height = check_image(image_bytes, image_name)
    if isinstance(mask, bytes):
        mask_png, mask = mask, decode_mask(mask, mask_name)
    else:
        mask_png = None
    if mask.ndim != 2:
        raise DataError(f"mask {mask_name} has shape {mask.shape}: expected a single-channel class-id map")
    if mask.shape != (height, width):
        raise DataError(f"{sample_id}: image {image_name} is {width}x{height} but mask {mask_name} is "
                        f"{mask.shape[1]}x{mask.shape[0]}: they must be the same size")
    check_mask_values(mask, mask_name)
    return {
        "id": sample_id,
        "image": {"bytes": strip_exif(image_bytes), "path": Path(image_name).name},
        "label": {"bytes": mask_png if mask_png is not None else encode_mask_png(mask),
                  "path": Path(mask_name).with_suffix(".png").name},
    }
