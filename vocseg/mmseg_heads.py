"""mmsegmentation's DeepLabV3 decode heads and the ResNetV1c deep stem, in plain PyTorch.

Written from mmseg 0.x (the code behind its published VOC numbers) and mmcv 1.x:
- `ConvModule`: mmcv/cnn/bricks/conv_module.py with norm_cfg BN and act_cfg ReLU: conv without bias
  (bias='auto' drops it before a norm), BN, ReLU; conv initialised by `kaiming_init` (kaiming normal,
  mode fan_out, nonlinearity relu, bias 0), BN weight 1 / bias 0 (`constant_init`). The children are named
  conv / bn / activate like mmcv's, so the state-dict keys read like mmseg's.
- `ASPPHead`: mmseg/models/decode_heads/aspp_head.py: image pooling (AdaptiveAvgPool2d(1) + 1x1
  ConvModule, upsampled bilinear, align_corners False), one ConvModule per dilation (1x1 for dilation 1,
  else 3x3 with padding = dilation), concatenated, a 3x3 `bottleneck` ConvModule, then BaseDecodeHead's
  `cls_seg`: Dropout2d(0.1) and the 1x1 `conv_seg` (with bias) initialised N(0, 0.01), bias 0
  (mmseg/models/decode_heads/decode_head.py, init_weights: normal_init(self.conv_seg, mean=0, std=0.01)).
  mmseg's DeepLabV3 config (configs/_base_/models/deeplabv3_r50-d8.py): channels 512, dilations (1, 12, 24, 36).
- `FCNHead`: mmseg/models/decode_heads/fcn_head.py as the auxiliary head of that config: num_convs 1
  (3x3 ConvModule to 256 channels), concat_input False, then the same `cls_seg`.
- `deep_stem`: ResNetV1c's stem (mmseg/models/backbones/resnet.py, ResNet._make_stem_layer with
  deep_stem=True): three 3x3 convs 3->32 (stride 2), 32->32, 32->64, each + BN + ReLU, then the usual
  3x3/2 max pool. Conv init as torchvision's ResNet (kaiming normal fan_out), same as mmseg's.
These heads are trained from scratch (mmseg's ImageNet checkpoints hold only the backbone).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU with mmcv's initialisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        padding = 0 if kernel_size == 1 else dilation * (kernel_size // 2)
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            activate=nn.ReLU(inplace=True)))
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)


class _ClassifierMixin:
    """BaseDecodeHead.cls_seg: Dropout2d, then the 1x1 conv_seg initialised N(0, 0.01)."""

    def _init_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(features))


class ASPPHead(_ClassifierMixin, nn.Module):
    """mmseg's ASPPHead (DeepLabV3): features [B, in_channels, h, w] -> logits [B, num_classes, h, w]."""

    def __init__(self, in_channels: int = 2048, channels: int = 512, dilations=(1, 12, 24, 36), num_classes: int = 21,
                 dropout: float = 0.1):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(ConvModule(in_channels, channels, 1 if d == 1 else 3, dilation=d)
                                          for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3)
        self._init_classifier(channels, num_classes, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(features), size=features.shape[-2:], mode="bilinear",
                               align_corners=False)
        branches = torch.cat([pooled] + [module(features) for module in self.aspp_modules], dim=1)
        return self.cls_seg(self.bottleneck(branches))


class FCNHead(_ClassifierMixin, nn.Module):
    """mmseg's FCNHead as DeepLabV3's auxiliary head: num_convs 1, kernel 3, concat_input False."""

    def __init__(self, in_channels: int = 1024, channels: int = 256, num_classes: int = 21, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self._init_classifier(channels, num_classes, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(features))


def deep_stem(stem_channels: int = 64) -> nn.Sequential:
    """ResNetV1c's stem; indices 0/1, 3/4, 6/7 are the conv/BN pairs, as in mmseg's checkpoints."""
    def conv(in_channels, out_channels, stride):
        layer = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        return layer

    half = stem_channels // 2
    return nn.Sequential(conv(3, half, 2), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                         conv(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                         conv(half, stem_channels, 1), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))


def deep_stem_backbone(backbone: nn.Module) -> nn.Module:
    """torchvision's DeepLab ResNet backbone (an IntermediateLayerGetter) with the 7x7 conv1/bn1/relu replaced
    by the deep stem; max pool and layer1..4 (with their strides and dilations) are kept."""
    from torchvision.models._utils import IntermediateLayerGetter

    body = nn.Sequential(OrderedDict([("stem", deep_stem()), ("maxpool", backbone.maxpool), ("layer1", backbone.layer1),
                                      ("layer2", backbone.layer2), ("layer3", backbone.layer3),
                                      ("layer4", backbone.layer4)]))
    return IntermediateLayerGetter(body, return_layers=dict(backbone.return_layers))
