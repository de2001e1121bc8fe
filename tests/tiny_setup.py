"""A stand-in target network and a tiny pair setup shared by the method and hyper-gradient tests."""

from collections import namedtuple

from torch import nn

from l2t_dist.method import TapInfo

Tap = namedtuple("Tap", "name channels stride")


class TinyTapped(nn.Module):
    """Stand-in target following the models contract: taps t0 (4@8x8) and t1 (6@4x4)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stage0 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus())
        self.stage1 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU())
        self.fc = nn.Linear(6, classes)
        self.taps = (Tap("t0", 4, 1), Tap("t1", 6, 2))
        self.num_classes, self.embedding_dim = classes, 6

    def forward_taps(self, x, taps, logits=True, embedding=False):
        feats, want = {}, set(taps)
        h = self.stage0(x)
        if "t0" in want:
            feats["t0"] = h
        if not (logits or embedding or "t1" in want):
            return None, feats
        h = self.stage1(h)
        if "t1" in want:
            feats["t1"] = h
        emb = h.mean((2, 3))
        if embedding:
            feats["embedding"] = emb
        return (self.fc(emb) if logits else None), feats


SOURCES = {"a": [TapInfo("a1", 3, (8, 8)), TapInfo("a2", 5, (4, 4))], "b": [TapInfo("b1", 4, (8, 8))]}
TARGET = [TapInfo("t0", 4, (8, 8)), TapInfo("t1", 6, (4, 4))]
PAIRS = [["a:a1", "t0"], ["a:a1", "t1"], ["a:a2", "t1"], ["b:b1", "t0"]]


def leaf_calls(m, fn):
    """Names of the leaf modules of m that ran during fn(), in order."""
    called, handles = [], []
    for name, mod in m.named_modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(lambda *_, n=name: called.append(n)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return called
