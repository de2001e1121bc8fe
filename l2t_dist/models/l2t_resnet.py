"""The CIFAR-style ResNet of the official L2T-ww code (`CResNet`), the paper's source network.

Layout, read off the released TinyImageNet checkpoint: a 3x3 stem conv *with bias* + BN +
ReLU; then per stage one standalone block (`block1`, `block3`, `block5`) followed by n blocks
(`blocks2`, `blocks4`, `blocks6`). Blocks are torchvision-style post-activation BasicBlocks;
the two downsampling blocks (`block3`, `block5`) use a 1x1 conv + BN shortcut (option B), not
zero padding. No final BN; global average pool (AvgPool2d(8) at 32x32) and `fc`.
ResNet32 has n=4 (15 blocks), ResNet20 n=2 (9 blocks). Every block output is a tap,
`block0` ... `block{3n+2}`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from l2t_dist.models.taps import TappedModel

BLOCKS_PER_STAGE = {"l2t_resnet20": 2, "l2t_resnet32": 4}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same keys), without in-place ops so taps stay untouched."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _down(in_planes: int, planes: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))


class L2TResNet(TappedModel):
    def __init__(self, arch: str, num_classes: int = 200):
        super().__init__()
        self.arch = arch
        n = BLOCKS_PER_STAGE[arch]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)  # bias=True, as in the official code
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block1 = BasicBlock(16, 16)
        self.blocks2 = nn.Sequential(*(BasicBlock(16, 16) for _ in range(n)))
        self.block3 = BasicBlock(16, 32, 2, _down(16, 32))
        self.blocks4 = nn.Sequential(*(BasicBlock(32, 32) for _ in range(n)))
        self.block5 = BasicBlock(32, 64, 2, _down(32, 64))
        self.blocks6 = nn.Sequential(*(BasicBlock(64, 64) for _ in range(n)))
        self.fc = nn.Linear(64, num_classes)
        order = []
        for single, group in (("block1", "blocks2"), ("block3", "blocks4"), ("block5", "blocks6")):
            order += [single] + [f"{group}.{i}" for i in range(n)]
        steps = [("conv1", None), ("bn1", None), ("relu", None)]
        steps += [(path, f"block{i}") for i, path in enumerate(order)]
        for m in self.modules():  # the official initialisation
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                if m.bias is not None:
                    m.bias.data.zero_()
        self._set_plan(steps, classifier="fc")
