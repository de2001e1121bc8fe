"""Any torchvision classification model as a TappedModel: `arch: tv:<name>`.

Built with weights=None: nothing is ever downloaded, and the parameters keep torchvision's
names, so a torchvision state_dict on disk loads strictly. The taps are the stage outputs of
the family, found by one probe forward: the children of `features` (MobileNet, EfficientNet,
ConvNeXt, VGG, DenseNet, AlexNet, SqueezeNet, Swin), of `layers` (MNASNet), `trunk_output`
(RegNet), `blocks` (MaxViT) and `encoder.layers` (ViT), else the top-level modules (ResNet,
ResNeXt, Wide ResNet, ShuffleNet, GoogLeNet, Inception); of those, the ones that run once in
eval mode and give a feature map, in run order. Swin's NHWC maps and ViT's tokens become
(B, C, H, W) maps. Any other module can be tapped by its path (`ExternalTaps`).
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from l2t_dist.errors import ConfigError
from l2t_dist.models.external import ExternalTaps, Site, adopt, no_inplace, probe, stride_of

EXPAND = ("features", "layers", "trunk_output", "blocks")
NOT_A_STAGE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Flatten, nn.Linear, nn.Identity)
PROBE_SIZES = (64, 224, 299)  # the first that the model accepts; strides are exact at 64 for most


def build_torchvision(name: str, num_classes: int) -> ExternalTaps:
    import torchvision.models as tvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet/Inception warn about their default initialisation
        net = tvm.get_model(name, weights=None, num_classes=num_classes)
    return tap_torchvision(net, f"tv:{name}", num_classes)


def tap_torchvision(net: nn.Module, arch: str, num_classes: int) -> ExternalTaps:
    """Make the torchvision model `net` a TappedModel in place (taps found by a probe forward)."""
    import torchvision.models as tvm

    no_inplace(net)
    head = _classifier(net, num_classes, arch)
    head_module = net.get_submodule(head)
    emb = head_module.in_features if isinstance(head_module, nn.Linear) else head_module.in_channels
    tokens = isinstance(net, tvm.VisionTransformer)
    nhwc = isinstance(net, tvm.SwinTransformer)
    model = adopt(net, ExternalTaps, arch, num_classes, emb, [], PROBE_SIZES[0], head=head,
                  patch=net.patch_size if tokens else None)
    layouts = {p: ("tokens" if tokens and p.startswith("encoder.layers.") else "nhwc" if nhwc else "nchw")
               for p in _candidates(model, head)}
    sizes = (net.image_size,) if tokens else PROBE_SIZES
    for size in sizes:
        try:
            seen = probe(model, layouts, size)
            break
        except (RuntimeError, AssertionError, ValueError):
            continue
    else:
        raise ConfigError(f"{arch} does not run on a {'/'.join(map(str, sizes))} probe image; it cannot be tapped")
    stages = sorted((p for p, s in seen.items() if s.calls == 1 and len(s.shape) == 4), key=lambda p: seen[p].order)
    model._ref_size = size
    model._set_sites([Site(p, p, seen[p].shape[1], stride_of(size, seen[p].shape[2]), layout=layouts[p],
                           clone=seen[p].modified) for p in stages])
    return model


def _classifier(net: nn.Module, num_classes: int, arch: str) -> str:
    """Path of the layer that makes the logits: the last Linear (SqueezeNet: 1x1 conv) with
    num_classes outputs. Its input is the embedding."""
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    conv = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if not linear and not conv:
        raise ConfigError(f"{arch} has no classifier layer with {num_classes} outputs; it cannot be used here")
    return (linear or conv)[-1]


def _candidates(net: nn.Module, head: str) -> list[str]:
    out: list[str] = []
    children = dict(net.named_children())
    if "features" in children:  # what follows `features` is pooling and the classifier (Swin: norm, permute)
        children = {"features": children["features"]}
    for name, child in children.items():
        if name in EXPAND or isinstance(child, nn.ModuleList):
            out += [f"{name}.{n}" for n, _ in child.named_children()]
        elif name == "encoder" and isinstance(getattr(child, "layers", None), nn.Module):
            out += [f"encoder.layers.{n}" for n, _ in child.layers.named_children()]
        else:
            out.append(name)
    return [p for p in out if not _holds(p, head) and not isinstance(net.get_submodule(p), NOT_A_STAGE)]


def _holds(path: str, head: Optional[str]) -> bool:
    return head is not None and (head == path or head.startswith(path + "."))
