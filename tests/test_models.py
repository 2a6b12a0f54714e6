"""vocseg.models: every architecture builds, the forward contract holds, weights load from local files, exports reload.

Offline and CPU-only: all models are randomly initialised; "pretrained" files are written by the tests themselves.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from vocseg.constants import IMAGENET_MEAN, IMAGENET_STD, LABEL2ID, NUM_CLASSES, VOC_CLASSES
from vocseg.models import (
    MODEL_NAMES, SegmentationModel, build_model, export_model, head_parameter_names, load_model,
)

SEGFORMERS = [n for n in MODEL_NAMES if n.startswith("segformer")]
DEEPLABS = [n for n in MODEL_NAMES if n.startswith("deeplab")]
# Published parameter counts (millions) of the 21-class models: SegFormer paper Table 1 sizes for the encoders
# plus the All-MLP decoder; torchvision's DeepLabV3 docs (COCO-VOC weights, which include the aux head).
PUBLISHED_MPARAMS = {
    "segformer-b0": 3.7, "segformer-b1": 13.7, "segformer-b2": 27.4, "segformer-b3": 47.3,
    "segformer-b4": 64.1, "segformer-b5": 84.7,
    "deeplabv3_resnet50": 42.0, "deeplabv3_resnet101": 61.0, "deeplabv3_mobilenet_v3_large": 11.0,
}


def cfg(model, **kw):
    return SimpleNamespace(model=model, **kw)


def normalise(images_uint8: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> 1x3xHxW ImageNet-normalised, as vocseg's eval transform does."""
    x = torch.from_numpy(images_uint8).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model(cfg("segformer-b9"))
    for name in MODEL_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_published_size_and_forward_contract(name):
    torch.manual_seed(0)
    model = build_model(cfg(name)).eval()
    assert isinstance(model, SegmentationModel)
    assert model.name == name and model.num_classes == NUM_CLASSES
    assert tuple(model.image_mean) == IMAGENET_MEAN and tuple(model.image_std) == IMAGENET_STD
    mparams = sum(p.numel() for p in model.parameters()) / 1e6
    assert mparams == pytest.approx(PUBLISHED_MPARAMS[name], rel=0.02)

    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), output_size=(40, 24))
    assert out["logits"].shape == (1, NUM_CLASSES, 40, 24)
    if name.startswith("deeplab"):  # aux head on by default
        assert model.has_aux and out["aux_logits"].shape == (1, NUM_CLASSES, 40, 24)
    else:
        assert not model.has_aux and "aux_logits" not in out


@pytest.mark.parametrize("name", SEGFORMERS)
def test_segformer_config_matches_mit_sizes_and_voc_labels(name):
    expected = {  # hidden_sizes, depths, decoder_hidden_size of nvidia/mit-bX / segformer-bX
        "segformer-b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
        "segformer-b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
        "segformer-b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
        "segformer-b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
        "segformer-b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
        "segformer-b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
    }[name]
    config = build_model(cfg(name, aux_loss=True)).inner.config  # aux_loss is ignored for SegFormer
    assert (list(config.hidden_sizes), list(config.depths), config.decoder_hidden_size) == expected
    assert config.num_labels == NUM_CLASSES and config.semantic_loss_ignore_index == 255
    assert [config.id2label[i] for i in range(NUM_CLASSES)] == list(VOC_CLASSES)
    assert config.label2id == LABEL2ID


@pytest.mark.parametrize("name", ["segformer-b0", "deeplabv3_mobilenet_v3_large"])
def test_output_size_defaults_to_input_and_batches(name):
    model = build_model(cfg(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x)["logits"].shape == (2, NUM_CLASSES, 64, 64)
        out = model(x, output_size=(70, 90))
    assert out["logits"].shape == (2, NUM_CLASSES, 70, 90)


def test_deeplab_forward_matches_torchvision_and_aux_can_be_disabled():
    torch.manual_seed(0)
    model = build_model(cfg("deeplabv3_mobilenet_v3_large")).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ours, theirs = model(x), model.inner(x)
    assert torch.equal(ours["logits"], theirs["out"]) and torch.equal(ours["aux_logits"], theirs["aux"])

    no_aux = build_model(cfg("deeplabv3_mobilenet_v3_large", aux_loss=False)).eval()
    assert not no_aux.has_aux and no_aux.inner.aux_classifier is None
    with torch.no_grad():
        assert set(no_aux(x)) == {"logits"}


def test_head_parameters_are_exactly_the_decoder_or_classifiers():
    segformer = build_model(cfg("segformer-b0"))
    names = {n for n, _ in segformer.named_parameters()}
    assert head_parameter_names(segformer) == {n for n in names if n.startswith("inner.decode_head.")}
    assert segformer.is_head_parameter("module.inner.decode_head.classifier.weight")  # DDP-wrapped name
    assert not segformer.is_head_parameter("inner.segformer.encoder.block.0.0.attention.self.query.weight")

    deeplab = build_model(cfg("deeplabv3_mobilenet_v3_large"))
    heads = head_parameter_names(deeplab)
    names = {n for n, _ in deeplab.named_parameters()}
    assert heads == {n for n in names if n.startswith(("inner.classifier.", "inner.aux_classifier."))}
    assert heads and names - heads  # both groups non-empty: the backbone is not mistaken for a head


def test_segformer_export_runs_in_transformers_pipeline_like_our_eval(tmp_path):
    from transformers import pipeline

    torch.manual_seed(0)
    model = build_model(cfg("segformer-b0")).eval()
    with torch.no_grad():  # sharpen the random classifier so many classes win somewhere (not one flat class)
        model.inner.decode_head.classifier.weight.mul_(50)
    export_model(model, tmp_path / "export")

    # Odd size, not a multiple of the 32x total stride, and not square: checks "no resize" and H/W order.
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    with torch.no_grad():
        ours = model(normalise(image))["logits"][0].argmax(0).numpy()
    assert len(np.unique(ours)) >= 5

    segments = pipeline("image-segmentation", model=str(tmp_path / "export"))(Image.fromarray(image))
    theirs = np.full(ours.shape, -1)
    for segment in segments:
        mask = np.array(segment["mask"]) > 0
        assert mask.shape == ours.shape
        assert (theirs[mask] == -1).all(), "pipeline masks overlap"
        theirs[mask] = LABEL2ID[segment["label"]]
    assert (theirs >= 0).all(), "pipeline masks do not cover the image"
    assert (theirs == ours).mean() >= 0.999  # exact in practice; the slack only allows for float ties


def test_segformer_export_reloads_identically_with_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg("segformer-b0")).eval()
    export_model(model, tmp_path / "export", extra={"epoch": 7, "miou": 0.5})
    meta = json.loads((tmp_path / "export" / "vocseg_model.json").read_text())
    assert meta["model"] == "segformer-b0" and meta["epoch"] == 7 and meta["num_classes"] == NUM_CLASSES

    reloaded = load_model(tmp_path / "export").eval()
    assert reloaded.name == "segformer-b0"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], reloaded(x)["logits"])


@pytest.mark.parametrize("aux_loss", [True, False])
def test_deeplab_export_reloads_identically(tmp_path, aux_loss):
    torch.manual_seed(0)
    model = build_model(cfg("deeplabv3_mobilenet_v3_large", aux_loss=aux_loss))
    model.train()(torch.randn(2, 3, 64, 64))  # move BatchNorm running stats off their defaults
    model.eval()
    export_model(model, tmp_path / "export", extra={"step": 100})
    meta = json.loads((tmp_path / "export" / "vocseg_model.json").read_text())
    assert meta["model"] == "deeplabv3_mobilenet_v3_large" and meta["aux_loss"] is aux_loss and meta["step"] == 100

    reloaded = load_model(tmp_path / "export").eval()
    assert reloaded.has_aux is aux_loss
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), reloaded(x)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_replaces_old_export_and_refuses_foreign_dirs(tmp_path):
    model = build_model(cfg("deeplabv3_mobilenet_v3_large", aux_loss=False))
    export_model(model, tmp_path / "export", extra={"epoch": 1})
    export_model(model, tmp_path / "export", extra={"epoch": 2})
    assert json.loads((tmp_path / "export" / "vocseg_model.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or backup dirs left behind

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        export_model(model, tmp_path / "results")
    assert (tmp_path / "results" / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="model"):
        export_model(model, tmp_path / "other", extra={"model": "segformer-b5"})


def test_deeplab_pretrained_from_state_dict_file_or_export_dir(tmp_path):
    torch.manual_seed(1)
    source = build_model(cfg("deeplabv3_mobilenet_v3_large"))  # with aux head, like torchvision's COCO-VOC weights
    torch.save(source.inner.state_dict(), tmp_path / "full.pth")
    export_model(source, tmp_path / "export")

    for pretrained, aux_loss in [(tmp_path / "full.pth", True), (tmp_path / "export", True),
                                 (tmp_path / "full.pth", False)]:
        torch.manual_seed(2)
        model = build_model(cfg("deeplabv3_mobilenet_v3_large", pretrained=str(pretrained), aux_loss=aux_loss))
        loaded = model.inner.state_dict()
        assert all(torch.equal(v, source.inner.state_dict()[k]) for k, v in loaded.items()), pretrained


def test_deeplab_backbone_weights_from_torchvision_classifier_files(tmp_path):
    torch.manual_seed(3)
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(mobilenet.state_dict(), tmp_path / "mobilenet.pth")
    model = build_model(cfg("deeplabv3_mobilenet_v3_large", backbone_weights=str(tmp_path / "mobilenet.pth")))
    saved = mobilenet.state_dict()
    backbone = model.inner.backbone.state_dict()
    assert torch.equal(backbone["0.0.weight"], saved["features.0.0.weight"])
    assert all(torch.equal(v, saved["features." + k]) for k, v in backbone.items())

    torch.manual_seed(4)
    resnet = torchvision.models.resnet50(weights=None)
    save_file(resnet.state_dict(), str(tmp_path / "resnet50.safetensors"))
    model = build_model(cfg("deeplabv3_resnet50", backbone_weights=str(tmp_path / "resnet50.safetensors")))
    key = "layer4.2.conv3.weight"
    assert torch.equal(model.inner.backbone.state_dict()[key], resnet.state_dict()[key])


def test_backbone_weights_with_wrong_keys_name_the_file(tmp_path):
    # A resnet file given for the mobilenet backbone: nothing matches.
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError) as err:
        build_model(cfg("deeplabv3_mobilenet_v3_large", backbone_weights=str(tmp_path / "wrong.safetensors")))
    assert "wrong.safetensors" in str(err.value) and "missing" in str(err.value) and "conv1.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(cfg("deeplabv3_resnet50", backbone_weights=str(tmp_path / "nope.pth")))


def test_segformer_pretrained_from_local_dir_reinitialises_classifier(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(5)  # an "ADE20k" b0 checkpoint: 150 classes, so the classifier must be re-initialised
    ade = SegformerForSemanticSegmentation(SegformerConfig(num_labels=150))
    ade.save_pretrained(tmp_path / "ade")
    model = build_model(cfg("segformer-b0", pretrained=str(tmp_path / "ade")))
    ours, theirs = model.inner.state_dict(), ade.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if not k.startswith("decode_head.classifier."))
    assert ours["decode_head.classifier.weight"].shape[0] == NUM_CLASSES
    assert model.inner.config.id2label[15] == "person"

    with pytest.raises(ValueError, match="not a segformer-b1"):
        build_model(cfg("segformer-b1", pretrained=str(tmp_path / "ade")))


def test_segformer_backbone_weights_from_mit_dir(tmp_path):
    from transformers import SegformerConfig, SegformerForImageClassification

    torch.manual_seed(6)  # an nvidia/mit-b0 style ImageNet classifier, saved locally
    mit = SegformerForImageClassification(SegformerConfig(num_labels=10))
    mit.save_pretrained(tmp_path / "mit-b0")
    model = build_model(cfg("segformer-b0", backbone_weights=str(tmp_path / "mit-b0")))
    encoder = model.inner.segformer.state_dict()
    assert all(torch.equal(v, mit.state_dict()["segformer." + k]) for k, v in encoder.items())

    with pytest.raises(ValueError, match="mit-b0"):  # b0 weights do not fit a b2
        build_model(cfg("segformer-b2", backbone_weights=str(tmp_path / "mit-b0")))


def test_an_unreachable_hub_id_for_pretrained_is_a_quick_one_line_error(monkeypatch, tmp_path):
    import socket
    import time
    from types import SimpleNamespace

    from huggingface_hub import constants

    from vocseg.errors import UsageError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set: download it .* --pretrained DIR"):
        build_model(SimpleNamespace(model="segformer-b2", pretrained="nvidia/mit-b2"))

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.monotonic()
    with pytest.raises(UsageError, match="huggingface.co is unreachable .*Network is unreachable.*--pretrained DIR"):
        build_model(SimpleNamespace(model="segformer-b2", pretrained="nvidia/mit-b2"))
    assert time.monotonic() - started < 5
    with pytest.raises(UsageError, match="no such folder"):
        build_model(SimpleNamespace(model="segformer-b2", pretrained=str(tmp_path / "missing")))
