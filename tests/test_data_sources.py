"""load_split against torchvision's own VOC/SBD readers, train_aug composition, roots, parquet, cache."""

import io
import os

import datasets
import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import SBDataset, VOCSegmentation

from vocseg.data import load_split
from vocseg.data.dataset import FEATURES
from vocseg.data.transforms import decode_image, decode_mask


def _by_id(dataset):
    return {row["id"]: row for row in dataset}


@pytest.mark.parametrize("split", ["train", "val", "trainval"])
def test_voc_split_equals_torchvision(synthetic_tree, cache_dir, split):
    root, _ = synthetic_tree
    ours = load_split(split, data_root=root, cache_dir=cache_dir)
    reference = VOCSegmentation(str(root), year="2012", image_set=split)
    assert len(ours) == len(reference)
    for row, image_file in zip(ours, reference.images):
        assert row["id"] == os.path.splitext(os.path.basename(image_file))[0]
    for index in range(len(reference)):
        image, mask = reference[index]
        row = ours[index]
        assert row["label"].mode in ("P", "L")
        assert np.array_equal(np.array(row["image"]), np.array(image))
        assert np.array_equal(np.array(row["label"]), np.array(mask))
        # The training path decodes with cv2, not PIL: it must see the same pixels.
        raw = ours.cast_column("image", datasets.Image(decode=False))[index]["image"]
        assert np.array_equal(decode_image(raw), np.array(image))


@pytest.mark.parametrize("split", ["train", "val"])
def test_sbd_split_equals_torchvision(synthetic_tree, cache_dir, split):
    root, _ = synthetic_tree
    ours = load_split(f"sbd_{split}", sbd_root=root / "benchmark_RELEASE", cache_dir=cache_dir)
    reference = SBDataset(str(root / "benchmark_RELEASE" / "dataset"), image_set=split, mode="segmentation")
    assert len(ours) == len(reference)
    for index in range(len(reference)):
        image, mask = reference[index]
        row = ours[index]
        assert row["id"] == os.path.splitext(os.path.basename(reference.images[index]))[0]
        assert np.array_equal(np.array(row["image"]), np.array(image))
        assert np.array_equal(np.array(row["label"]), np.array(mask))


def test_train_aug_ids_and_mask_sources(synthetic_tree, cache_dir):
    root, _ = synthetic_tree
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"

    def ids(path):
        return path.read_text().split()

    voc_train, voc_val = ids(voc / "ImageSets/Segmentation/train.txt"), ids(voc / "ImageSets/Segmentation/val.txt")
    sbd_train, sbd_val = ids(sbd / "train.txt"), ids(sbd / "val.txt")
    # The planted tree must actually exercise every rule.
    assert set(sbd_train + sbd_val) & set(voc_val), "no SBD id overlaps VOC val"
    assert set(sbd_train + sbd_val) & set(voc_train), "no SBD id overlaps VOC train"
    assert set(sbd_train + sbd_val) - set(voc_train) - set(voc_val), "no SBD-only id"
    expected = (set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val)

    ours = load_split("train_aug", data_root=root, sbd_root=root / "benchmark_RELEASE", cache_dir=cache_dir)
    got = [row["id"] for row in ours]
    assert len(got) == len(set(got)), "duplicate ids in train_aug"
    assert set(got) == expected

    for row in ours:
        if row["id"] in voc_train:
            expected_mask = np.array(Image.open(voc / "SegmentationClass" / f"{row['id']}.png"))
            expected_image = (voc / "JPEGImages" / f"{row['id']}.jpg").read_bytes()
            assert (expected_mask == 255).any(), "VOC masks carry the 255 border"
        else:
            expected_mask = scipy.io.loadmat(sbd / "cls" / f"{row['id']}.mat")["GTcls"][0]["Segmentation"][0]
            expected_image = (sbd / "img" / f"{row['id']}.jpg").read_bytes()
        assert np.array_equal(np.array(row["label"]), expected_mask)
        assert np.array_equal(np.array(row["image"]), np.array(Image.open(io.BytesIO(expected_image)).convert("RGB")))


def test_roots_accept_every_documented_level(synthetic_tree, cache_dir, monkeypatch):
    root, manifest = synthetic_tree
    for data_root in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):
        assert load_split("val", data_root=data_root, cache_dir=cache_dir)["id"] == manifest["val"]
    for sbd_root in (root / "benchmark_RELEASE", root / "benchmark_RELEASE" / "dataset"):
        assert load_split("sbd_val", sbd_root=sbd_root, cache_dir=cache_dir)["id"] == manifest["sbd_val"]
    monkeypatch.setenv("DATASET_PATH", str(root))
    monkeypatch.setenv("SBD_DATASET_PATH", str(root / "benchmark_RELEASE"))
    assert len(load_split("train_aug", cache_dir=cache_dir)) == len(
        load_split("train_aug", data_root=root, sbd_root=root / "benchmark_RELEASE", cache_dir=cache_dir))


@pytest.mark.parametrize("mask_column", ["label", "mask"])
def test_parquet_hub_layout(synthetic_tree, cache_dir, tmp_path, mask_column):
    root, _ = synthetic_tree
    voc = root / "VOCdevkit" / "VOC2012"
    reference = load_split("val", data_root=root, cache_dir=cache_dir)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": (voc / "JPEGImages" / f"{i}.jpg").read_bytes(), "path": f"{i}.jpg"}
                   for i in reference["id"]],
         mask_column: [{"bytes": (voc / "SegmentationClass" / f"{i}.png").read_bytes(), "path": f"{i}.png"}
                       for i in reference["id"]],
         "id": reference["id"]},
        features=datasets.Features({"image": datasets.Image(), mask_column: datasets.Image(),
                                    "id": datasets.Value("string")}))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    ours = load_split("validation", data_root=tmp_path / "hub", cache_dir=cache_dir)
    assert ours.features == FEATURES
    assert ours["id"] == reference["id"]
    for a, b in zip(ours, reference):
        assert np.array_equal(np.array(a["image"]), np.array(b["image"]))
        assert np.array_equal(np.array(a["label"]), np.array(b["label"]))


def test_cache_is_reused_and_never_stale(tree_copy, cache_dir, monkeypatch):
    from vocseg.data import dataset as dataset_module

    first = load_split("train", data_root=tree_copy, cache_dir=cache_dir)
    built = []
    original = dataset_module._sample_example
    monkeypatch.setattr(dataset_module, "_sample_example", lambda s: built.append(s.id) or original(s))

    second = load_split("train", data_root=tree_copy, cache_dir=cache_dir)
    assert built == [], "an unchanged split was rebuilt instead of read from the cache"
    assert second.cache_files == first.cache_files

    # Overwrite one mask with a different valid one (same size, so only content and mtime change).
    edited_id = first[3]["id"]
    mask_path = tree_copy / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{edited_id}.png"
    old = np.array(Image.open(mask_path))
    new = np.where(old == 255, 255, (old + 1) % 21).astype(np.uint8)
    edited = Image.fromarray(new, mode="P")
    edited.putpalette(Image.open(mask_path).getpalette())
    edited.save(mask_path)

    third = load_split("train", data_root=tree_copy, cache_dir=cache_dir)
    assert built, "an edited split was served from the stale cache"
    assert third.cache_files != first.cache_files
    assert np.array_equal(np.array(third[3]["label"]), new)
    assert np.array_equal(decode_mask(third.cast_column("label", datasets.Image(decode=False))[3]["label"]), new)


def test_exif_orientation_is_ignored(tree_copy, cache_dir):
    """A JPEG tagged 'rotate 90' must stay as stored: its mask is not rotated."""
    voc = tree_copy / "VOCdevkit" / "VOC2012"
    sample_id = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    jpeg = voc / "JPEGImages" / f"{sample_id}.jpg"
    stored = Image.open(jpeg)
    pixels = np.array(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    stored.save(jpeg, quality=95, exif=exif.tobytes())
    assert Image.open(jpeg).getexif().get(0x0112) == 6
    expected = np.array(VOCSegmentation(str(tree_copy), year="2012", image_set="val")[0][0])

    ours = load_split("val", data_root=tree_copy, cache_dir=cache_dir)
    assert np.array(ours[0]["image"]).shape == pixels.shape  # not rotated by datasets.Image decoding
    assert np.array_equal(np.array(ours[0]["image"]), expected)
    raw = ours.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert np.array_equal(decode_image(raw), expected)


def test_unrelated_parquet_beside_vocdevkit_is_ignored(tree_copy, cache_dir):
    """The folder holding VOCdevkit often holds other data sets; their parquet files must not take over."""
    other = tree_copy / "other_dataset" / "data"
    other.mkdir(parents=True)
    datasets.Dataset.from_dict({"x": [1, 2]}).to_parquet(str(other / "train-00000-of-00001.parquet"))
    ours = load_split("train", data_root=tree_copy, cache_dir=cache_dir)
    assert ours["id"] == (tree_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
