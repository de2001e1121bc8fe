"""Model zoo: every architecture is a `TappedModel` with named feature taps (see `taps.py`).

Architecture modules are imported on first use so that `import l2t_dist.models` stays cheap.
"""

from __future__ import annotations

from l2t_dist.errors import ConfigError
from l2t_dist.models.taps import Tap, TappedModel

CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
L2T_RESNETS = ("l2t_resnet20", "l2t_resnet32")
TV_RESNETS = ("resnet18", "resnet34")
ARCH_NAMES = CIFAR_RESNETS + L2T_RESNETS + ("vgg9_bn",) + TV_RESNETS


def build_model(arch: str, num_classes: int) -> TappedModel:
    """A freshly initialised model of architecture `arch` with a `num_classes`-way classifier."""
    if arch not in ARCH_NAMES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if arch in CIFAR_RESNETS:
        from l2t_dist.models.resnet_cifar import CifarResNet as cls
    elif arch in L2T_RESNETS:
        from l2t_dist.models.l2t_resnet import L2TResNet as cls
    elif arch == "vgg9_bn":
        from l2t_dist.models.vgg import VGG as cls
    else:
        from l2t_dist.models.tv_resnet import TVResNet as cls
    return cls(arch, num_classes)


__all__ = ["ARCH_NAMES", "Tap", "TappedModel", "build_model"]
