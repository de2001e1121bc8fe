"""CIFAR ResNet20/32/44/56/110 with option-A shortcuts (He et al. 2016), akamaster layout.

Attribute names follow github.com/akamaster/pytorch_resnet_cifar10 so its published weights
load strictly once the DataParallel `module.` prefix is stripped. The zero-padding shortcut
has no weights; it is a named module (not a lambda) so the model pickles for Ray.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from l2t_dist.models.taps import TappedModel

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(TappedModel):
    """Stem conv 3x3/16, three stages of n blocks (16, 32, 64 wide); one tap per block."""

    def __init__(self, arch: str, num_classes: int = 10):
        super().__init__()
        self.arch = arch
        n = DEPTHS[arch]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        steps = [("conv1", None), ("bn1", None), ("relu", None)]
        in_planes = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if s > 1 and i == 0 else 1))
                in_planes = planes
                steps.append((f"layer{s}.{i}", f"layer{s}.{i}"))
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # akamaster's _weights_init
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)
        self._set_plan(steps, classifier="linear")
