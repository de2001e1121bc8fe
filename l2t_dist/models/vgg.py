"""VGG9-bn of the L2T-ww paper's CIFAR/STL targets: `64,M,128,M,256,256,M,512,512,M,512,512,M`;
`vgg9` is the same network without batch norm (a target whose samples do not interact: the
data-parallel equivalence tests need one).

Same keys as the official `VGG_small` (`features.<i>` conv with bias, BN, ReLU, max-pool;
`classifier` one linear layer after global average pooling). The five taps are the
activations just before each max-pool: 64@32, 128@16, 256@8, 512@4, 512@2 at 32x32.
The pools use ceil_mode: identical on even sizes, and small inputs (16x16) still run.
"""

from __future__ import annotations

from torch import nn

from l2t_dist.models.taps import TappedModel

CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(TappedModel):
    def __init__(self, arch: str = "vgg9_bn", num_classes: int = 10, cfg=CFG):
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        steps = []
        in_ch, stage = 3, 0
        for v in cfg:
            if v == "M":
                # The activation just before the pool is the tap: relabel the last step.
                steps[-1] = (steps[-1][0], f"stage{stage}")
                stage += 1
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                norm = [nn.BatchNorm2d(v)] if arch == "vgg9_bn" else []
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), *norm, nn.ReLU()]
                in_ch = v
            steps += [(f"features.{i}", None) for i in range(len(steps), len(layers))]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():  # the official initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._set_plan(steps, classifier="classifier")
