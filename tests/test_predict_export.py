"""`vocseg predict` (palette PNGs equal to the model's argmax, batching, bad inputs) and `vocseg export`
(checkpoint -> best_model/ that transformers' pipeline runs with the same masks as `vocseg predict`)."""

import json
import socket

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_inference import make_checkpoint
from vocseg.cli import export as export_cli
from vocseg.cli import predict as predict_cli
from vocseg.constants import LABEL2ID, VOC_PALETTE_FLAT
from vocseg.data.transforms import decode_image, normalize_on_device
from vocseg.inference import load_model_or_checkpoint, predict_logits
from vocseg.models import load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # see tests/test_inference.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A SegFormer-B0 training checkpoint and its export made by `vocseg export`."""
    root = tmp_path_factory.mktemp("run")
    checkpoint, trained = make_checkpoint(root / "run", "segformer-b0")
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(root / "export")]) == 0
    return checkpoint, trained, root / "export"


def image(height, width, seed):
    """Blocky colours (so JPEG keeps them) over noise: something for a random model to separate."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    return np.clip(blocks + rng.normal(0, 8, blocks.shape), 0, 255).astype(np.uint8)


def save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def assert_same_classes(predicted: np.ndarray, logits: torch.Tensor, margin=1e-5):
    """Class maps equal, except where the two best logits are within `margin` (float rounding may flip those)."""
    top2 = logits.topk(2, dim=0).values
    sure = (top2[0] - top2[1] > margin).numpy()
    assert sure.mean() > 0.99
    np.testing.assert_array_equal(predicted[sure], logits.argmax(0).numpy()[sure])


def model_logits(model, path, **options):
    pixels = torch.from_numpy(decode_image(path.read_bytes())).permute(2, 0, 1)[None]
    return predict_logits(model, normalize_on_device(pixels, model.image_mean, model.image_std), **options)[0]


def test_predict_writes_class_id_pngs_and_reports_bad_inputs(run, tmp_path, capsys):
    _, _, export = run
    folder = tmp_path / "in"
    good = [save(folder / "a.png", image(48, 64, 0)), save(folder / "b.png", image(48, 64, 1)),  # one batch
            save(folder / "sub" / "c.jpg", image(70, 50, 2)), save(folder / "d.webp", image(40, 40, 3))]
    (folder / "notes.txt").write_text("not an image, and not an image extension: skipped silently")
    (folder / "fake.jpg").write_text("not an image at all")
    jpeg = cv2.imencode(".jpg", image(64, 64, 4))[1].tobytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    save(folder / "huge.png", image(200, 200, 5))  # 0.04 megapixels, over the limit below
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    code = predict_cli.main(["--model", str(export), str(folder), str(missing), "--out", str(out), "--batch_size",
                             "4", "--max_megapixels", "0.03"])
    err = capsys.readouterr().err
    assert code == 1
    for name, reason in [("fake.jpg", "not a readable image"), ("truncated.jpg", "truncated"),
                         ("huge.png", "0.04 megapixels, over the limit of 0.03"), ("missing.png", "no such file")]:
        assert any(name in line and reason in line for line in err.splitlines()), (name, err)
    assert "4 input(s) failed" in err

    model = load_model_or_checkpoint(export)
    for path in good:
        stem = path.relative_to(folder).with_suffix("")
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.getpalette()[:63] == VOC_PALETTE_FLAT[:63]
        pixels = decode_image(path.read_bytes())
        assert mask.size == (pixels.shape[1], pixels.shape[0])
        assert_same_classes(np.array(mask), model_logits(model, path))
        overlay = Image.open(out / f"{stem}_overlay.jpg")
        assert overlay.size == (2 * pixels.shape[1], pixels.shape[0])
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png", "b.png", "c.png", "d.png"]


def test_predict_with_sliding_window_scales_and_flip(run, tmp_path):
    _, _, export = run
    path = save(tmp_path / "x.png", image(48, 64, 6))
    options = ["--mode", "slide", "--crop", "32", "--stride", "21", "--scales", "1.0", "1.5", "--flip"]
    assert predict_cli.main(["--model", str(export), str(path), "--out", str(tmp_path / "out"), *options]) == 0
    expected = model_logits(load_model_or_checkpoint(export), path, mode="slide", crop_size=32, stride=21,
                            scales=(1.0, 1.5), flip=True)
    assert_same_classes(np.array(Image.open(tmp_path / "out" / "x.png")), expected)


def test_export_is_a_transformers_model_whose_pipeline_matches_predict(run, tmp_path):
    from transformers import SegformerForSemanticSegmentation, pipeline

    checkpoint, trained, export = run
    meta = json.loads((export / "vocseg_model.json").read_text())
    assert meta["model"] == "segformer-b0" and meta["source_checkpoint"] == str(checkpoint.resolve())
    assert meta["train_config"]["model"] == "segformer-b0"
    inner = SegformerForSemanticSegmentation.from_pretrained(export)
    assert all(torch.equal(v, trained.inner.state_dict()[k]) for k, v in inner.state_dict().items())

    path = save(tmp_path / "x.png", image(56, 72, 7))  # PNG: both sides decode the very same pixels
    assert predict_cli.main(["--model", str(export), str(path), "--out", str(tmp_path / "out")]) == 0
    ours = np.array(Image.open(tmp_path / "out" / "x.png"))
    segments = pipeline("image-segmentation", model=str(export))(Image.open(path))
    theirs = np.full(ours.shape, 255, np.uint8)
    for segment in segments:
        theirs[np.array(segment["mask"]) == 255] = LABEL2ID[segment["label"]]
    assert (theirs != 255).all()
    # The processor computes (x / 255 - mean) / std in numpy, vocseg (x - 255 mean) / (255 std) in torch:
    # the same masks up to pixels whose two best logits are float-rounding close.
    logits = model_logits(load_model(export), path)
    assert_same_classes(theirs, logits)
    assert_same_classes(ours, logits)


def test_export_of_a_deeplab_checkpoint_reloads(tmp_path):
    checkpoint, trained = make_checkpoint(tmp_path / "run", "deeplabv3_mobilenet_v3_large", aux_loss=False)
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    loaded = load_model(tmp_path / "export")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_export_errors_are_explained(run, tmp_path, monkeypatch, capsys):
    assert export_cli.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not a training checkpoint folder" in capsys.readouterr().err
    exported = tmp_path / "exported"
    checkpoint, _, _ = run
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(exported)]) == 0
    assert export_cli.main(["--checkpoint", str(exported), "--out", str(tmp_path / "again")]) == 2  # an export
    assert "is already an exported model" in capsys.readouterr().err

    # Offline: the local export is written, the push fails with a message (and never touches the network).
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    checkpoint, _, _ = run
    code = export_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), "--push_to_hub",
                            "someone/vocseg-test"])
    assert code == 1
    err = capsys.readouterr().err
    assert "someone/vocseg-test" in err and "HF_HUB_OFFLINE" in err
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_predict_applies_the_models_fit_protocol(run, tmp_path):
    """A model trained with `fit`: predict resizes the image as mmseg's test does, writes masks at the image's size."""
    from vocseg.data.transforms import resize_to_protocol
    from vocseg.models import export_model
    from vocseg.protocol import ScaleProtocol

    _, trained, _ = run
    trained.protocol = ScaleProtocol("fit", (200, 50), align=32)
    export_model(trained, tmp_path / "fit_model")
    trained.protocol = ScaleProtocol()
    path = save(tmp_path / "in" / "a.png", image(60, 90, 3))
    assert predict_cli.main([str(path), "--model", str(tmp_path / "fit_model"), "--out", str(tmp_path / "out")]) == 0
    written = np.array(Image.open(tmp_path / "out" / "a.png"))
    assert written.shape == (60, 90)  # the image's own size, whatever size it was predicted at
    fitted = resize_to_protocol(decode_image(path.read_bytes()), ScaleProtocol("fit", (200, 50), align=32))
    assert fitted.shape[:2] == (64, 96)  # 60x90 fitted into 200x50 -> 50x75, aligned up to 32
    pixels = torch.from_numpy(fitted).permute(2, 0, 1)[None]
    logits = predict_logits(trained.eval(), normalize_on_device(pixels), output_size=(60, 90))[0]
    assert_same_classes(written, logits)
    # --scale_convention native overrides the model's protocol: then it predicts at the stored size.
    assert predict_cli.main([str(path), "--model", str(tmp_path / "fit_model"), "--out", str(tmp_path / "native"),
                             "--scale_convention", "native", "--align", "1"]) == 0
    assert_same_classes(np.array(Image.open(tmp_path / "native" / "a.png")), model_logits(trained, path))


def test_a_batch_out_of_memory_retries_one_by_one_and_fails_only_the_image_that_does_not_fit(run, tmp_path,
                                                                                              monkeypatch, capsys):
    _, _, export = run
    paths = [save(tmp_path / "in" / f"{name}.png", image(64, 64, seed)) for seed, name in enumerate("abc")]
    real_segment = predict_cli.segment
    calls = []

    def segment(model, images, device, options, protocol):
        calls.append(len(images))
        if len(images) > 1 or images[0].sum() == np.asarray(Image.open(paths[1])).sum():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_segment(model, images, device, options, protocol)

    monkeypatch.setattr(predict_cli, "segment", segment)
    code = predict_cli.main(["--model", str(export), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                             "--batch_size", "3"])
    assert code == 1 and calls == [3, 1, 1, 1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "c.png"]
    err = capsys.readouterr().err
    assert f"FAILED {paths[1]}: prediction failed (CUDA out of memory. Tried to allocate 9.00 GiB)" in err
