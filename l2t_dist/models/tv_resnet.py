"""torchvision ResNet18/34 for the 224x224 setting, with taps `stem` (after the max-pool) and
`layer1` ... `layer4`.

The modules are torchvision's own (built with weights=None: nothing is ever downloaded), kept
under their torchvision names, so torchvision state_dicts (ImageNet weights a user has on
disk) load strictly.
"""

from __future__ import annotations

from l2t_dist.models.taps import TappedModel


class TVResNet(TappedModel):
    def __init__(self, arch: str = "resnet18", num_classes: int = 1000):
        super().__init__()
        from torchvision.models import resnet  # lazy: keeps `import l2t_dist.models` light

        net = getattr(resnet, arch)(weights=None, num_classes=num_classes)
        self.arch = arch
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
            setattr(self, name, getattr(net, name))
        steps = [("conv1", None), ("bn1", None), ("relu", None), ("maxpool", "stem")]
        steps += [(f"layer{i}", f"layer{i}") for i in range(1, 5)]
        self._set_plan(steps, classifier="fc", ref_size=224)
