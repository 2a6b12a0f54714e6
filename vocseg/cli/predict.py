"""`python -m vocseg predict --model PATH INPUT... --out DIR`: segment image files or folders.

For each image it writes DIR/<stem>.png, an 8-bit palette PNG (VOC colours) whose pixel values are the
class ids, and DIR/<stem>_overlay.jpg, the image beside the prediction blended over it. Files found in a
folder keep their sub-folder under DIR. A file that cannot be used is reported with the reason and
skipped; the exit code is 1 if any was.
"""

from __future__ import annotations

import io
import math
import sys
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from vocseg.cli.evaluate import add_inference_args, inference_options, protocol_overrides
from vocseg.constants import VOC_PALETTE, VOC_PALETTE_FLAT
from vocseg.data.transforms import decode_image, normalize_on_device, resize_to_protocol
from vocseg.inference import load_model_or_checkpoint, predict_logits
from vocseg.errors import OneLineArgumentParser
from vocseg.protocol import ScaleProtocol

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class BadInput(Exception):
    pass


def find_images(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """(file, output path without suffix relative to --out) for every input, and the inputs that do not exist.

    Folders are searched recursively for image extensions; files named on the command line are tried
    whatever their extension, so a wrong one is reported instead of silently skipped.
    """
    found, missing = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(f, f.relative_to(item).with_suffix("")) for f in sorted(item.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif item.is_file():
            found.append((item, Path(item.stem)))
        else:
            missing.append((item, "no such file or folder"))
    return found, missing


def check_large_enough(size: tuple[int, int], min_side: int, smallest_scale: float, model_name: str) -> None:
    """A side below the model's minimum fails deep inside the network; say so before, with the way out."""
    shortest = min(size) * smallest_scale
    if shortest < min_side:
        needed = min_side / min(size)
        raise BadInput(f"{size[1]}x{size[0]} px{f' at scale {smallest_scale:g}' if smallest_scale != 1 else ''} is "
                       f"smaller than the {min_side} px a side {model_name} needs: upscale it, e.g. --scales "
                       f"{math.ceil(needed * 10) / 10:g}")


def image_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """(height, width) from the header alone, so an oversized image is refused before it is decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        raise BadInput(f"too large to decode safely ({error})") from None
    except Exception as error:  # PIL raises UnidentifiedImageError (an OSError), SyntaxError, ...
        raise BadInput(f"not a readable image ({type(error).__name__}: {error})") from None
    if width * height > max_pixels:
        raise BadInput(f"{width}x{height} is {width * height / 1e6:.3g} megapixels, over the limit of "
                       f"{max_pixels / 1e6:g} (--max_megapixels)")
    return height, width


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels as stored (no EXIF rotation), decoded by cv2 like vocseg's training and evaluation."""
    data = path.read_bytes()
    try:  # a full PIL decode catches truncated files, which cv2 silently fills with grey
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return decode_image(data)
    except Exception as error:
        raise BadInput(f"cannot decode the image, truncated or corrupt? ({error})") from None


def save_prediction(image: np.ndarray, prediction: np.ndarray, out_stem: Path) -> None:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(prediction.astype(np.uint8))
    mask.putpalette(VOC_PALETTE_FLAT)  # an "L" image becomes "P": pixel values stay the class ids
    mask.save(out_stem.with_name(out_stem.name + ".png"))
    colours = np.asarray(VOC_PALETTE, np.uint8)[prediction]
    overlay = (0.5 * image + 0.5 * colours).astype(np.uint8)
    side_by_side = Image.fromarray(np.concatenate([image, overlay], axis=1))
    side_by_side.save(out_stem.with_name(out_stem.name + "_overlay.jpg"), quality=90)


def segment(model, images: list[np.ndarray], device, options: dict,
            protocol: ScaleProtocol | None = None) -> list[np.ndarray]:
    """Class ids at each image's own size; same-size images. The image is predicted at the size `protocol`
    says (default: the model's own), the logits are resized back to the image."""
    protocol = protocol or model.protocol
    resized = [resize_to_protocol(image, protocol) for image in images]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(device)
    logits = predict_logits(model, normalize_on_device(pixels, model.image_mean, model.image_std),
                            output_size=images[0].shape[:2], align=protocol.align, **options)
    return list(logits.argmax(1).cpu().numpy())


def size_batches(files, out: Path, model, options: dict, args, fail) -> list[list[tuple]]:
    """Batches of (size, path, output stem) of one size each, read from the headers: a batch needs no padding,
    which would change the predictions. Files that cannot run are failed here, by name."""
    sized, claimed = [], {}
    for path, out_stem in files:
        try:
            if out_stem in claimed:
                raise BadInput(f"its output {out / out_stem}.png would overwrite that of {claimed[out_stem]}")
            if (out / f"{out_stem}.png").resolve() == path.resolve():
                raise BadInput("its output would overwrite the input itself: choose another --out")
            claimed[out_stem] = path
            size = image_size(path, args.max_megapixels * 1e6)
            check_large_enough(size, model.min_input_size, min(options["scales"]), model.name)
            sized.append((size, path, out_stem))
        except BadInput as error:
            fail(path, error)
    sized.sort(key=lambda item: item[0])
    batches = []
    for _, same_size in groupby(sized, key=lambda item: item[0]):
        same_size = list(same_size)
        batches += [same_size[i:i + args.batch_size] for i in range(0, len(same_size), args.batch_size)]
    return batches


def segment_one_by_one(model, images, paths, device, options: dict, protocol, fail) -> list:
    """After a batch ran out of memory: one image at a time, failing only those that do not fit."""
    predictions = []
    for image, path in zip(images, paths):
        try:
            predictions += segment(model, [image], device, options, protocol)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            predictions.append(None)
            too_big = options["mode"] == "whole" and max(image.shape[:2]) > options["crop_size"]
            hint = "; try --mode slide" if too_big else ""
            fail(path, f"prediction failed ({str(error).splitlines()[0][:200]}){hint}")
    return predictions


def predict_batch(batch, model, device, options: dict, protocol, fail) -> list[tuple]:
    """(image, output stem, prediction or None) for the images of one same-size batch that could be read."""
    images, stems, paths = [], [], []
    for (height, width), path, out_stem in batch:
        try:
            image = read_image(path)
            if image.shape[:2] != (height, width):  # never seen; it would break the batch below
                raise BadInput(f"decoded size {image.shape[:2]} differs from the header's {(height, width)}")
            images.append(image)
            stems.append(out_stem)
            paths.append(path)
        except BadInput as error:
            fail(path, error)
    if not images:
        return []
    try:
        predictions = segment(model, images, device, options, protocol)
    except (torch.OutOfMemoryError, RuntimeError):
        predictions = segment_one_by_one(model, images, paths, device, options, protocol, fail)
    return list(zip(images, stems, predictions))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg predict", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="exported model folder or training checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch_size", type=int, default=4, help="images of the same size run together")
    parser.add_argument("--max_megapixels", type=float, default=50.0, help="refuse larger images")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    options = inference_options(args, parser)
    overrides = protocol_overrides(args, parser)

    device = Accelerator().device  # the GPU (or MPS) when there is one, else the CPU
    model = load_model_or_checkpoint(args.model).to(device)
    protocol = model.protocol.replace(**overrides)
    out = Path(args.out)
    files, missing = find_images(args.inputs)
    failed = []

    def fail(path: Path, reason) -> None:
        print(f"FAILED {path}: {reason}", file=sys.stderr)  # at once: a long run shows problems as they come
        failed.append((path, str(reason)))

    for path, reason in missing:
        fail(path, reason)
    done = 0
    for batch in tqdm(size_batches(files, out, model, options, args, fail), desc="predict", unit="batch"):
        for image, out_stem, prediction in predict_batch(batch, model, device, options, protocol, fail):
            if prediction is not None:
                save_prediction(image, prediction, out / out_stem)
                done += 1
    print(f"wrote {done} prediction(s) to {out}")
    if failed:
        print(f"{len(failed)} input(s) failed:\n" + "\n".join(f"  {path}: {reason}" for path, reason in failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
