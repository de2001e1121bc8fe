"""`build_model(arch, num_classes)`: one entry point for every architecture name."""

from __future__ import annotations

from l2t_dist.errors import ConfigError
from l2t_dist.models.names import CIFAR_RESNETS, L2T_RESNETS, check_arch, split_arch
from l2t_dist.models.taps import TappedModel


def build_model(arch: str, num_classes: int) -> TappedModel:
    """A freshly initialised model of architecture `arch` with a `num_classes`-way classifier.
    Library models are built without weights (nothing is ever downloaded)."""
    check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    prefix, name = split_arch(arch)
    if prefix == "tv":
        from l2t_dist.models.tv_models import build_torchvision

        return build_torchvision(name, num_classes)
    if prefix == "timm":
        from l2t_dist.models.timm_models import build_timm

        return build_timm(name, num_classes)
    if arch in CIFAR_RESNETS:
        from l2t_dist.models.resnet_cifar import CifarResNet as cls
    elif arch in L2T_RESNETS:
        from l2t_dist.models.l2t_resnet import L2TResNet as cls
    elif arch in ("vgg9_bn", "vgg9"):
        from l2t_dist.models.vgg import VGG as cls
    else:
        from l2t_dist.models.tv_resnet import TVResNet as cls
    return cls(arch, num_classes)
