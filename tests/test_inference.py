"""vocseg.inference (whole / sliding window / multi-scale / flip), checkpoint loading, `vocseg evaluate` with
those modes, and the `evaluate`-library metric module. Random tiny models, a few seconds in all."""

import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vocseg.constants import IMAGENET_MEAN, IMAGENET_STD
from vocseg.inference import load_checkpoint, load_model_or_checkpoint, predict_logits, sliding_windows
from vocseg.metrics import ConfusionMatrix
from vocseg.models import build_model, export_model
from tests.test_metrics import EVALUATE_ACTUAL, EVALUATE_PREDICTED


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and OpenMP's spinning threads slow them down 100x when
    # another process holds the other core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PixelModel(nn.Module):
    """SegmentationModel-compatible 1x1 convolution: each pixel's logits depend on that pixel only, so the
    model is exactly translation- and flip-equivariant."""

    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 21, 1)

    def forward(self, pixel_values, output_size=None):
        logits = self.conv(pixel_values)
        if output_size is not None:
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return {"logits": logits}


def tiny(name):
    torch.manual_seed(0)
    return build_model(SimpleNamespace(model=name, aux_loss=False)).eval()


@pytest.fixture(scope="module")
def segformer():
    return tiny("segformer-b0")


@pytest.fixture(scope="module")
def deeplab():
    return tiny("deeplabv3_mobilenet_v3_large")


def test_windows_are_placed_like_mmseg():
    # A VOC image under the default 512/341 window: one window, the image itself (never padded).
    assert sliding_windows(375, 500, 512, 341) == [(0, 375, 0, 500)]
    # 1.75x of VOC's 500x375 (875x656): rows start 0, 341, then the last is moved back to end at 875.
    rows = [(0, 512), (341, 853), (363, 875)]
    cols = [(0, 512), (144, 656)]
    assert sliding_windows(875, 656, 512, 341) == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    for height, width, crop, stride in [(45, 61, 17, 5), (100, 37, 32, 32), (64, 64, 64, 1)]:
        count = np.zeros((height, width), int)
        for y1, y2, x1, x2 in sliding_windows(height, width, crop, stride):
            assert (y2 - y1, x2 - x1) == (min(crop, height), min(crop, width))
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1  # every pixel seen
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 100, 32, 33)  # would leave gaps


@pytest.mark.parametrize("crop, stride", [(17, 5), (20, 20), (32, 21), (45, 30), (64, 1), (100, 50)])
def test_slide_equals_whole_on_a_translation_equivariant_model(crop, stride):
    torch.manual_seed(1)
    model, image = PixelModel(), torch.randn(2, 3, 45, 61)  # sizes no window/stride divides
    whole = predict_logits(model, image)
    slide = predict_logits(model, image, mode="slide", crop_size=crop, stride=stride)
    assert slide.shape == whole.shape == (2, 21, 45, 61)
    torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["segformer", "deeplab"])
def test_a_window_covering_the_image_is_whole_image_inference(family, request):
    model = request.getfixturevalue(family)
    image = torch.randn(2, 3, 40, 56)
    whole = predict_logits(model, image)
    assert torch.equal(whole, model(image)["logits"])  # one scale, no flip: the model's own logits
    for crop in (56, 64, 512):  # equal to the long side, or larger: the window shrinks to the image
        assert torch.equal(predict_logits(model, image, mode="slide", crop_size=crop, stride=crop), whole)
    # ... at every scale, since each view is predicted at its own size and resized afterwards
    assert torch.equal(predict_logits(model, image, mode="slide", crop_size=512, scales=(0.75, 1.5), flip=True),
                       predict_logits(model, image, scales=(0.75, 1.5), flip=True))


def test_flip_on_a_flip_equivariant_model_changes_nothing():
    torch.manual_seed(2)
    model, image = PixelModel(), torch.randn(1, 3, 33, 47)
    plain = predict_logits(model, image)
    flipped = predict_logits(model, image, flip=True)
    # Two views are merged as log(mean softmax): here both views are the same probabilities.
    torch.testing.assert_close(flipped, plain.log_softmax(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_flip_and_scales_average_softmax_like_mmseg(segformer):
    torch.manual_seed(3)
    half = torch.randn(1, 3, 64, 48)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # flip-symmetric input, 64x96 (SegFormer needs >= 32 px)
    scales = (0.5, 1.25)
    merged = predict_logits(segformer, image, scales=scales, flip=True)
    # Reference written out: resize by each scale (mmcv rounds half up), predict, flip back, resize back,
    # average the probabilities.
    probs = []
    for scale in scales:
        size = (int(64 * scale + 0.5), int(96 * scale + 0.5))
        scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = segformer(scaled.flip(-1) if flip else scaled)["logits"]
            logits = logits.flip(-1) if flip else logits
            probs.append(F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False).softmax(1))
    expected = torch.stack(probs).mean(0)
    torch.testing.assert_close(merged.softmax(1), expected, rtol=1e-5, atol=1e-6)
    # A flip-symmetric image gets a flip-symmetric prediction once both orientations are averaged.
    torch.testing.assert_close(merged, merged.flip(-1), rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    model, image = PixelModel(), torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, image, mode="sliding")
    with pytest.raises(ValueError, match="stride"):
        predict_logits(model, image, mode="slide", crop_size=4, stride=5)
    with pytest.raises(ValueError, match="scales"):
        predict_logits(model, image, scales=(0.0,))


def make_checkpoint(run_dir, name, **config):
    """A training run folder as train.py leaves it: config.yaml + checkpoints/step_N from accelerator.save_state."""
    from accelerate import Accelerator

    from vocseg.config import TrainConfig

    # pretrained points nowhere: loading a checkpoint must build the architecture only, never fetch weights.
    TrainConfig(model=name, pretrained=str(run_dir / "missing-weights"), **config).save(
        _mkdir(run_dir) / "config.yaml")
    model = tiny(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights a fresh build cannot have
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    accelerator.save_state(str(run_dir / "checkpoints" / "step_0000003"))
    return run_dir / "checkpoints" / "step_0000003", accelerator.unwrap_model(prepared)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("name, config", [("segformer-b0", {}), ("deeplabv3_mobilenet_v3_large", {"aux_loss": False})])
def test_checkpoint_folders_load_with_their_weights(tmp_path, name, config):
    checkpoint, trained = make_checkpoint(tmp_path / "run", name, **config)
    loaded = load_model_or_checkpoint(checkpoint)
    assert loaded.name == name and not loaded.training
    expected = trained.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert load_checkpoint(checkpoint)[1]["model"] == name
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        load_model_or_checkpoint(tmp_path)


def test_checkpoint_without_its_run_config_is_explained(tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "run", "deeplabv3_mobilenet_v3_large", aux_loss=False)
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_model_or_checkpoint(checkpoint)


def run_evaluate(tmp_path, model, tree, name, *options):
    from vocseg.cli.evaluate import main

    output = tmp_path / f"{name}.json"
    assert main(["--model", str(model), "--data_root", str(tree), "--cache_dir", str(tmp_path / "cache"),
                 "--num_workers", "0", "--output", str(output), *options]) == 0
    return json.loads(output.read_text())


def test_evaluate_cli_modes_on_a_real_model(tmp_path, synthetic_tree):
    tree, _ = synthetic_tree  # val: 5 images of at most 150 px a side
    checkpoint, trained = make_checkpoint(tmp_path / "run", "segformer-b0")
    export = export_model(trained, tmp_path / "best_model")

    whole = run_evaluate(tmp_path, export, tree, "whole")
    slide = run_evaluate(tmp_path, export, tree, "slide", "--mode", "slide", "--crop", "160", "--stride", "100")
    assert slide["inference"] == {"mode": "slide", "crop_size": 160, "stride": 100, "scales": [1.0], "flip": False}
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "confusion_matrix"):
        assert slide[key] == whole[key], key
    assert whole["num_samples"] == 5 and sum(map(sum, whole["confusion_matrix"])) > 0

    # The checkpoint folder scores exactly like its export.
    from_checkpoint = run_evaluate(tmp_path, checkpoint, tree, "checkpoint")
    assert from_checkpoint["confusion_matrix"] == whole["confusion_matrix"]

    # Real windows + multi-scale + flip: other predictions, the very same pixels scored.
    tta = run_evaluate(tmp_path, export, tree, "tta", "--mode", "slide", "--crop", "64", "--stride", "43",
                       "--scales", "0.75", "1.25", "--flip")
    assert np.sum(tta["confusion_matrix"], axis=1).tolist() == np.sum(whole["confusion_matrix"], axis=1).tolist()
    assert tta["confusion_matrix"] != whole["confusion_matrix"]


# ------------------------------------------------------------------------------- evaluate-library metric


@pytest.fixture
def mean_iou_metric(monkeypatch, tmp_path):
    """The metric loaded with the Hub switched off and every network connection refused."""
    import evaluate

    from vocseg.evaluate_metric import MEAN_IOU_PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return evaluate.load(MEAN_IOU_PATH, cache_dir=str(tmp_path))


@pytest.mark.filterwarnings("ignore:Downcasting array dtype")
def test_evaluate_metric_module_reproduces_the_documented_example(mean_iou_metric):
    results = mean_iou_metric.compute(predictions=EVALUATE_PREDICTED, references=EVALUATE_ACTUAL, num_labels=10,
                                      ignore_index=255, reduce_labels=False)
    assert set(results) == {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou",
                            "per_category_accuracy"}
    assert results["mean_iou"] == pytest.approx(0.47750000000000004, abs=1e-15)
    assert results["mean_accuracy"] == pytest.approx(0.5916666666666666, abs=1e-15)
    assert results["overall_accuracy"] == pytest.approx(0.5263157894736842, abs=1e-15)
    np.testing.assert_allclose(results["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])


@pytest.mark.filterwarnings("ignore:Downcasting array dtype")
def test_evaluate_metric_module_equals_confusion_matrix(mean_iou_metric):
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 21, size) for size in [(37, 50), (50, 37), (20, 20)]]
    preds = [np.where(rng.random(label.shape) < 0.3, rng.integers(0, 21, label.shape), label) for label in labels]
    for label in labels:
        label[rng.random(label.shape) < 0.05] = 255
    for p, label in zip(preds, labels):  # fed in batches, as add_batch users do
        mean_iou_metric.add_batch(predictions=[p], references=[label])
    results = mean_iou_metric.compute(num_labels=21, ignore_index=255)
    matrix = ConfusionMatrix()
    for p, label in zip(preds, labels):
        matrix.update(p, label)
    expected = matrix.compute()
    for key in expected:
        np.testing.assert_array_equal(results[key], expected[key])

    # reduce_labels / label_map / nan_to_num behave like the Hub metric's.
    reduced = mean_iou_metric.compute(predictions=[np.array([[0, 1], [2, 0]])], references=[np.array([[1, 2], [0, 3]])],
                                      num_labels=4, ignore_index=255, reduce_labels=True, nan_to_num=-1)
    # labels become [[0, 1], [255, 2]]; predicted 0, 1, -, 0: IoU 1/2, 1, 0, and class 3 never seen -> -1
    np.testing.assert_array_equal(reduced["per_category_iou"], [0.5, 1, 0, -1])
    mapped = mean_iou_metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[1, 0]])],
                                     num_labels=2, ignore_index=255, label_map={0: 1, 1: 0})  # a swap
    assert mapped["mean_iou"] == 1.0
