"""Every kind of bad input gives one clear error naming the file; `skip` leaves it out and reports it."""

import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from vocseg.__main__ import main as vocseg_main
from vocseg.data import DataError, bad_samples_of, load_split
from vocseg.data.synthetic import save_palette_png


def _voc(root):
    return root / "VOCdevkit" / "VOC2012"


def _first_train_id(root):
    return (_voc(root) / "ImageSets/Segmentation/train.txt").read_text().split()[0]


def _truncate_jpeg(root, sample_id):
    path = _voc(root) / "JPEGImages" / f"{sample_id}.jpg"
    path.write_bytes(path.read_bytes()[:600])
    return path


def _resize_mask(root, sample_id):
    path = _voc(root) / "SegmentationClass" / f"{sample_id}.png"
    mask = np.array(Image.open(path))
    save_palette_png(np.ascontiguousarray(mask[:-7]), path)
    return path


def _bad_values(root, sample_id):
    path = _voc(root) / "SegmentationClass" / f"{sample_id}.png"
    mask = np.array(Image.open(path))
    mask[:3, :3] = 42
    save_palette_png(mask, path)
    return path


def _rgb_mask(root, sample_id):
    path = _voc(root) / "SegmentationClass" / f"{sample_id}.png"
    Image.open(path).convert("RGB").save(path)  # what a careless "convert" produces: colours, not ids
    return path


def _missing_image(root, sample_id):
    path = _voc(root) / "JPEGImages" / f"{sample_id}.jpg"
    path.unlink()
    return path


def _missing_mask(root, sample_id):
    path = _voc(root) / "SegmentationClass" / f"{sample_id}.png"
    path.unlink()
    return path


BREAKERS = {
    "truncated jpeg": (_truncate_jpeg, "truncated or corrupt"),
    "size mismatch": (_resize_mask, "same size"),
    "values outside 0..20,255": (_bad_values, "[42]"),
    "rgb colour mask": (_rgb_mask, "mode RGB"),
    "missing image": (_missing_image, "missing"),
    "missing mask": (_missing_mask, "missing"),
}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_bad_sample_raises_error_naming_file(tree_copy, cache_dir, kind):
    breaker, expected_words = BREAKERS[kind]
    sample_id = _first_train_id(tree_copy)
    path = breaker(tree_copy, sample_id)
    with pytest.raises(DataError) as error:
        load_split("train", data_root=tree_copy, cache_dir=cache_dir)
    message = str(error.value)
    assert path.name in message and expected_words in message, message


def test_skip_policy_drops_and_reports_every_bad_sample(tree_copy, cache_dir, caplog):
    ids = (_voc(tree_copy) / "ImageSets/Segmentation/train.txt").read_text().split()
    broken = {}
    for sample_id, (breaker, _) in zip(ids, BREAKERS.values()):
        breaker(tree_copy, sample_id)
        broken[sample_id] = breaker.__name__
    dataset = load_split("train", data_root=tree_copy, cache_dir=cache_dir, bad_samples="skip")
    assert set(dataset["id"]) == set(ids) - set(broken)
    reported = bad_samples_of(dataset)
    assert {b["id"] for b in reported} == set(broken)
    assert all(b["reason"] for b in reported)
    assert f"skipped {len(broken)} bad sample(s)" in caplog.text
    # The report survives a cached reload.
    again = load_split("train", data_root=tree_copy, cache_dir=cache_dir, bad_samples="skip")
    assert {b["id"] for b in bad_samples_of(again)} == set(broken)


def test_bad_sbd_mat_is_named(tree_copy, cache_dir):
    sbd = tree_copy / "benchmark_RELEASE" / "dataset"
    sample_id = (sbd / "train.txt").read_text().split()[0]
    scipy.io.savemat(sbd / "cls" / f"{sample_id}.mat", {"something_else": np.zeros((2, 2))})
    with pytest.raises(DataError, match=rf"{sample_id}\.mat.*GTcls\.Segmentation"):
        load_split("sbd_train", sbd_root=tree_copy / "benchmark_RELEASE", cache_dir=cache_dir)


def test_missing_root_and_split_file(tree_copy, cache_dir, monkeypatch):
    monkeypatch.delenv("DATASET_PATH", raising=False)
    with pytest.raises(DataError, match="DATASET_PATH"):
        load_split("train", cache_dir=cache_dir)
    with pytest.raises(DataError, match="nowhere"):
        load_split("train", data_root=tree_copy / "nowhere", cache_dir=cache_dir)
    with pytest.raises(DataError, match="not a VOC 2012 tree"):
        load_split("train", data_root=tree_copy / "benchmark_RELEASE", cache_dir=cache_dir)
    (_voc(tree_copy) / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match=r"split file .*val\.txt is missing"):
        load_split("val", data_root=tree_copy, cache_dir=cache_dir)
    with pytest.raises(DataError, match="unknown split"):
        load_split("test", data_root=tree_copy, cache_dir=cache_dir)


def check_data_table(out: str) -> dict[str, dict]:
    """The split table of `check-data`'s report: {split: {"found": int, "official": str, "bad": str}}."""
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:4] == ["split", "found", "official", "bad"]))
    table = {}
    for line in lines[header + 1:]:
        cells = line.split()
        if len(cells) < 4 or not cells[1].isdigit():
            break
        table[cells[0]] = {"found": int(cells[1]), "official": cells[2], "bad": cells[3]}
    return table


def test_check_data_cli(tree_copy, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["vocseg", "check-data", "--data_root", str(tree_copy),
                                     "--sbd_root", str(tree_copy / "benchmark_RELEASE")])
    assert vocseg_main() == 0
    out = capsys.readouterr().out
    assert "result: OK" in out
    # Each count is read from its own column and recomputed from the tree's split files.
    manifest = json.loads((tree_copy / "synthetic_manifest.json").read_text())
    train_aug = (set(manifest["train"]) | set(manifest["sbd_train"]) | set(manifest["sbd_val"])) - set(manifest["val"])
    expected = {"train": len(manifest["train"]), "val": len(manifest["val"]),
                "trainval": len(manifest["train"]) + len(manifest["val"]), "sbd_train": len(manifest["sbd_train"]),
                "sbd_val": len(manifest["sbd_val"]), "train_aug": len(train_aug)}
    table = check_data_table(out)
    assert {split: row["found"] for split, row in table.items()} == expected
    assert table["train_aug"]["official"] == "10582" and table["train"]["official"] == "1464"
    assert all(row["bad"] == "0" for row in table.values())

    sample_id = _first_train_id(tree_copy)
    _bad_values(tree_copy, sample_id)
    assert vocseg_main() == 1
    out = capsys.readouterr().out
    assert sample_id in out and "[42]" in out and "PROBLEMS FOUND" in out


def test_duplicate_ids_in_a_split_file_are_named(tree_copy, capsys, monkeypatch):
    split_file = tree_copy / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"
    ids = split_file.read_text().split()
    split_file.write_text("\n".join(ids + ids[:2] + ids[:1]) + "\n")  # two ids repeated (one of them twice)
    with pytest.raises(DataError, match=rf"{split_file} lists 2 id\(s\) more than once: {ids[0]}, {ids[1]}"):
        load_split("train", tree_copy, cache_dir=tree_copy / "cache")
    monkeypatch.setattr("sys.argv", ["vocseg", "check-data", "--data_root", str(tree_copy)])
    assert vocseg_main() == 1
    out = capsys.readouterr().out
    assert "more than once" in out and "PROBLEMS FOUND" in out
