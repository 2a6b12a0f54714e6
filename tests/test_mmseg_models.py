"""mmseg's DeepLabV3 heads, the ResNetV1c deep stem and its checkpoint loader, weight-decay policies, and the
scale protocol travelling with exports and checkpoints."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vocseg.mmseg_heads import ASPPHead, FCNHead
from vocseg.models import build_model, export_model, load_model, parameter_counts
from vocseg.optim import decayed, parameter_groups
from vocseg.protocol import ScaleProtocol


def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c  # weight and bias; running statistics are buffers


# Counted from mmseg's layer shapes (configs/_base_/models/deeplabv3_r50-d8.py), independently of the code:
ASPP_2048_512 = (conv(2048, 512, 1) + bn(512)                      # image pool: 1x1 ConvModule
                 + conv(2048, 512, 1) + bn(512)                    # dilation 1: 1x1
                 + 3 * (conv(2048, 512, 3) + bn(512))              # dilations 12, 24, 36: 3x3
                 + conv(5 * 512, 512, 3) + bn(512)                 # bottleneck over the 5 concatenated branches
                 + conv(512, 21, 1, bias=True))                    # conv_seg
FCN_1024_256 = conv(1024, 256, 3) + bn(256) + conv(256, 21, 1, bias=True)
PLAIN_STEM = conv(3, 64, 7) + bn(64)
DEEP_STEM = conv(3, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64)


def test_mmseg_head_parameter_counts_match_the_layer_shapes():
    assert ASPP_2048_512 == 42_222_101 and FCN_1024_256 == 2_365_205
    assert sum(p.numel() for p in ASPPHead(2048).parameters()) == ASPP_2048_512
    assert sum(p.numel() for p in FCNHead(1024).parameters()) == FCN_1024_256


def test_deeplab_r101_mmseg_head_and_deep_stem_counts(caplog, monkeypatch):
    import logging

    plain = build_model(SimpleNamespace(model="deeplabv3_resnet101"))
    monkeypatch.setattr(logging.getLogger("vocseg"), "propagate", True)  # setup_logging turns it off
    with caplog.at_level(logging.INFO, logger="vocseg"):
        mmseg = build_model(SimpleNamespace(model="deeplabv3_resnet101", decode_head="mmseg", resnet_stem="deep"))
    plain_counts, counts = parameter_counts(plain), parameter_counts(mmseg)
    assert counts["decode_head"] == ASPP_2048_512 and counts["aux_head"] == FCN_1024_256
    assert counts["backbone"] == plain_counts["backbone"] - PLAIN_STEM + DEEP_STEM
    assert counts["total"] == sum(p.numel() for p in mmseg.parameters())
    assert f"decode head {ASPP_2048_512 / 1e6:.2f}M" in caplog.text  # printed when the model is built
    # torchvision's head for comparison: ASPP at 256 channels + a 3x3 conv.
    assert plain_counts["decode_head"] == (conv(2048, 256, 1) + bn(256) + 3 * (conv(2048, 256, 3) + bn(256))
                                           + conv(2048, 256, 1) + bn(256) + conv(5 * 256, 256, 1) + bn(256)
                                           + conv(256, 256, 3) + bn(256) + conv(256, 21, 1, bias=True))


def test_mmseg_head_structure_and_initialisation():
    torch.manual_seed(0)
    head = ASPPHead(64, channels=32, num_classes=21)
    branches = [m.conv for m in head.aspp_modules]
    assert [(c.kernel_size, c.dilation, c.padding) for c in branches] == [
        ((1, 1), (1, 1), (0, 0)), ((3, 3), (12, 12), (12, 12)),
        ((3, 3), (24, 24), (24, 24)), ((3, 3), (36, 36), (36, 36))]
    assert all(c.bias is None for c in branches) and head.bottleneck.conv.kernel_size == (3, 3)
    for module in (head, FCNHead(64, channels=32)):
        assert isinstance(module.dropout, nn.Dropout2d) and module.dropout.p == 0.1
        assert torch.all(module.conv_seg.bias == 0)
    big = ASPPHead(2048)  # conv_seg N(0, 0.01) over 512 x 21 weights: sample std within a few percent
    assert abs(big.conv_seg.weight.std().item() - 0.01) < 0.0005
    # kaiming normal, fan_out, relu: std sqrt(2 / (out * k * k)) for the 3x3 bottleneck.
    expected = (2 / (512 * 9)) ** 0.5
    assert abs(big.bottleneck.conv.weight.std().item() - expected) / expected < 0.02
    x = torch.randn(2, 64, 9, 11)
    head.eval()
    assert head(x).shape == (2, 21, 9, 11)


def test_resnet_d8_dilations_match_mmseg_contract_dilation():
    model = build_model(SimpleNamespace(model="deeplabv3_resnet101", resnet_stem="deep"))
    body = model.inner.backbone

    def block_dilations(layer):
        return [block.conv2.dilation[0] for block in layer]

    # mmseg ResNetV1c d8: dilations (1, 1, 2, 4), strides (1, 2, 1, 1), contract_dilation: the first block
    # of a dilated stage runs at half the dilation; no multi-grid.
    assert block_dilations(body.layer1) == [1] * 3 and block_dilations(body.layer2) == [1] * 4
    assert block_dilations(body.layer3) == [1] + [2] * 22 and block_dilations(body.layer4) == [2, 4, 4]
    assert [body[name][0].conv2.stride[0] for name in ("layer1", "layer2", "layer3", "layer4")] == [1, 2, 1, 1]
    stem = body.stem
    assert [(stem[i].in_channels, stem[i].out_channels, stem[i].stride[0]) for i in (0, 3, 6)] == [
        (3, 32, 2), (32, 32, 1), (32, 64, 1)]
    model.eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out["logits"].shape == (1, 21, 64, 64) and out["aux_logits"].shape == (1, 21, 64, 64)


def mmseg_resnet_v1c_state_dict(depth=101, with_num_batches_tracked=True) -> dict:
    """Key names and shapes of open-mmlab's resnet{50,101}_v1c checkpoints, written from mmseg's ResNet code
    (deep stem as nn.Sequential conv/BN/ReLU x3, Bottleneck conv1..3 / bn1..3 / downsample.0-1, fc)."""
    g = torch.Generator().manual_seed(depth)
    state = {}

    def add_bn(prefix, c):
        state[f"{prefix}.weight"] = torch.rand(c, generator=g)
        state[f"{prefix}.bias"] = torch.randn(c, generator=g)
        state[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
        state[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        if with_num_batches_tracked:
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    for index, (cin, cout) in zip((0, 3, 6), ((3, 32), (32, 32), (32, 64))):
        state[f"stem.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        add_bn(f"stem.{index + 1}", cout)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            state[f"{prefix}.conv1.weight"] = torch.randn(planes, inplanes, 1, 1, generator=g)
            add_bn(f"{prefix}.bn1", planes)
            state[f"{prefix}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g)
            add_bn(f"{prefix}.bn2", planes)
            state[f"{prefix}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1, generator=g)
            add_bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                state[f"{prefix}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1, generator=g)
                add_bn(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_resnet101_v1c_checkpoint_round_trip(tmp_path):
    original = mmseg_resnet_v1c_state_dict(101)
    path = tmp_path / "resnet101_v1c.pth"
    torch.save({"state_dict": original, "meta": {"note": "mmcv checkpoints wrap the weights"}}, path)
    model = build_model(SimpleNamespace(model="deeplabv3_resnet101", decode_head="mmseg", resnet_stem="deep",
                                        backbone_weights=str(path)))
    loaded = model.inner.backbone.state_dict()
    expected = {k: v for k, v in original.items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_v1c_backbone_of_a_whole_mmseg_checkpoint_and_without_bn_counters(tmp_path):
    backbone = mmseg_resnet_v1c_state_dict(50, with_num_batches_tracked=False)
    whole = {f"backbone.{k}": v for k, v in backbone.items() if not k.startswith("fc.")}
    whole["decode_head.conv_seg.weight"] = torch.randn(21, 512, 1, 1)
    whole["auxiliary_head.conv_seg.weight"] = torch.randn(21, 256, 1, 1)
    path = tmp_path / "deeplabv3_r50-d8.pth"
    torch.save({"state_dict": whole}, path)
    model = build_model(SimpleNamespace(model="deeplabv3_resnet50", resnet_stem="deep", backbone_weights=str(path)))
    loaded = model.inner.backbone.state_dict()
    assert torch.equal(loaded["stem.0.weight"], backbone["stem.0.weight"])
    assert torch.equal(loaded["layer4.2.bn3.running_var"], backbone["layer4.2.bn3.running_var"])


def test_stem_and_weights_must_agree(tmp_path):
    v1c = tmp_path / "v1c.pth"
    torch.save(mmseg_resnet_v1c_state_dict(50), v1c)
    with pytest.raises(ValueError, match=r"v1c.pth.*deep-stem.*resnet_stem deep"):
        build_model(SimpleNamespace(model="deeplabv3_resnet50", backbone_weights=str(v1c)))
    from torchvision.models import resnet50

    torchvision_file = tmp_path / "resnet50-0676ba61.pth"
    # torchvision's V1 files predate BatchNorm's num_batches_tracked: they must load all the same.
    state = {k: v for k, v in resnet50().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, torchvision_file)
    with pytest.raises(ValueError, match="plain-stem.*resnet_stem plain"):
        build_model(SimpleNamespace(model="deeplabv3_resnet50", resnet_stem="deep",
                                    backbone_weights=str(torchvision_file)))
    plain = build_model(SimpleNamespace(model="deeplabv3_resnet50", backbone_weights=str(torchvision_file)))
    assert torch.equal(plain.inner.backbone.state_dict()["conv1.weight"], state["conv1.weight"])


def mmcv_custom_keys_decay(names, custom_keys):
    """mmcv DefaultOptimizerConstructor.add_params' custom_keys rule: the longest key that is a substring of the
    parameter's name wins (ties alphabetical); its decay_mult applies (1 when not given)."""
    ordered = sorted(sorted(custom_keys), key=len, reverse=True)
    out = {}
    for name in names:
        key = next((k for k in ordered if k in name), None)
        out[name] = (custom_keys[key].get("decay_mult", 1.0) if key else 1.0) > 0
    return out


def test_weight_decay_policies():
    segformer = build_model(SimpleNamespace(model="segformer-b0"))
    names = [name for name, _ in segformer.named_parameters()]
    # SegFormer's config: custom_keys pos_block / norm decay_mult 0, head lr_mult 10.
    reference = mmcv_custom_keys_decay(names, {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0},
                                               "head": {"lr_mult": 10.0}})
    ours = decayed(segformer, "no_norm_pos")
    assert ours == reference
    assert ours["inner.decode_head.batch_norm.weight"]  # "head" matches before "norm": decayed, as in SegFormer
    assert not all(ours.values()) and all(decayed(segformer, "all").values())
    assert {n for n, d in decayed(segformer, "no_norm_bias").items() if not d} == {
        n for n, p in segformer.named_parameters() if p.ndim <= 1}

    deeplab = build_model(SimpleNamespace(model="deeplabv3_mobilenet_v3_large", decode_head="mmseg"))
    groups = {g["name"]: g for g in parameter_groups(deeplab, 0.01, 5e-4, 1.0, "all")}
    assert set(groups) == {"backbone_decay", "head_decay"}  # mmseg's DeepLab: every parameter decayed
    assert sum(len(g["params"]) for g in groups.values()) == len(list(deeplab.parameters()))
    groups = {g["name"]: g for g in parameter_groups(deeplab, 0.01, 5e-4, 1.0, "no_norm_bias")}
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["head_decay"]["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="weight_decay_policy"):
        decayed(deeplab, "some")


def test_protocol_and_architecture_travel_with_exports_and_checkpoints(tmp_path):
    cfg = SimpleNamespace(model="deeplabv3_mobilenet_v3_large", decode_head="mmseg", scale_convention="fit",
                          resize_base=[1024, 256], align=8, aux_loss=True)
    model = build_model(cfg).eval()
    assert model.protocol == ScaleProtocol("fit", (1024, 256), 8)
    export_model(model, tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "vocseg_model.json").read_text())
    assert meta["eval_protocol"] == {"scale_convention": "fit", "resize_base": [1024, 256], "align": 8}
    assert meta["decode_head"] == "mmseg" and meta["resnet_stem"] == "plain"
    reloaded = load_model(tmp_path / "export").eval()
    assert reloaded.protocol == model.protocol and reloaded.decode_head == "mmseg"
    x = torch.randn(1, 3, 48, 40)
    assert torch.equal(reloaded(x)["logits"], model(x)["logits"])
    # An export written before the protocol was recorded falls back to its run config, then to native.
    del meta["eval_protocol"]
    meta["train_config"] = {"scale_convention": "fit", "resize_base": [2048, 512], "align": 1}
    (tmp_path / "export" / "vocseg_model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "export").protocol == ScaleProtocol("fit")
