"""Synthetic tasks: deterministic, share one primitive bank across tasks, and learnable."""


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2t_dist.data import decode_to_tensor, normalize, open_dataset, parse_spec
from l2t_dist.data.synthetic import primitive_bank, task_classes
from l2t_dist.errors import ConfigError, DataError


def images(spec, split="train"):
    return decode_to_tensor(open_dataset("synthetic", spec, split), size=parse_spec(spec).size)


def test_defaults_and_spec_parsing():
    assert str(parse_spec("")) == "task=a,classes=10,per_class=100,size=32,seed=0,noise=0.08"
    spec = parse_spec(" task=b , classes=3,size=16,noise=0")
    assert (spec.task, spec.classes, spec.per_class, spec.size, spec.noise) == ("b", 3, 100, 16, 0.0)


def test_deterministic_and_seeded():
    x1, y1 = images("task=a,classes=4,per_class=5,size=16")
    x2, y2 = images("task=a,classes=4,per_class=5,size=16")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert y1.tolist() == [0, 1, 2, 3] * 5  # balanced, interleaved
    other_seed, _ = images("task=a,classes=4,per_class=5,size=16,seed=1")
    test, _ = images("task=a,classes=4,per_class=5,size=16", "test")
    assert not torch.equal(x1, other_seed) and not torch.equal(x1, test)
    assert x1.shape == (20, 3, 16, 16) and x1.dtype == torch.uint8


def test_pinned_bytes():
    """Catches an accidental change of the generator (datasets must stay the same over time)."""
    x, _ = images("task=a,classes=2,per_class=1,size=8")
    assert int(x.long().sum()) == PINNED_SUM


PINNED_SUM = 44582


def test_reader_interface():
    ds = open_dataset("synthetic", "task=c,classes=3,per_class=2,size=16", "test")
    assert len(ds) == 6 and len(ds.classes) == 3 and ds.classes[0].startswith("c0:")
    img, label = ds[4]
    assert img.mode == "RGB" and img.size == (16, 16) and label == 1
    assert np.array_equal(np.asarray(img), ds.pixels([4])[0].permute(1, 2, 0).numpy())
    assert "synthetic image 4" in ds.describe(4)
    x, _ = decode_to_tensor(ds, size=32)  # resized like any other dataset
    assert x.shape == (6, 3, 32, 32)


def test_tasks_share_the_primitive_bank():
    a, b = task_classes("a", 10), task_classes("b", 10)
    assert len(set(a)) == 10 and a != b
    used_a = {p for pair in a for p in pair}
    used_b = {p for pair in b for p in pair}
    assert len(used_a & used_b) >= 5  # b's classes are new combinations of primitives a also uses
    assert len(primitive_bank().names) == 24


def test_bad_specs():
    with pytest.raises(ConfigError, match="unknown item 'colour=red'.*allowed keys: task, classes, per_class"):
        open_dataset("synthetic", "task=a,colour=red", "train")
    with pytest.raises(ConfigError, match="classes=1 must be in 2..276"):
        parse_spec("classes=1")
    with pytest.raises(ConfigError, match="size='big' is not a number"):
        parse_spec("size=big")
    with pytest.raises(DataError, match="no split 'val'.*train, test"):
        open_dataset("synthetic", "task=a", "val")


def test_learnable_by_a_tiny_cnn(single_thread):
    torch.manual_seed(0)
    x, y = images("task=a,classes=10,per_class=30,size=16")
    xt, yt = images("task=a,classes=10,per_class=20,size=16", "test")
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    xs = normalize(x)
    for _ in range(5):
        for idx in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(net(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(normalize(xt)).argmax(1) == yt).float().mean().item()
    assert acc > 0.3, f"test accuracy {acc:.2f} after 5 epochs on 300 images (chance 0.10)"
