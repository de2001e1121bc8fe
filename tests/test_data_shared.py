"""Readers and split files on the real data in ../shared (skipped only where it is absent)."""

from collections import Counter

import pytest
import torch

from l2t_dist.data import class_balanced_split, decode_to_tensor, load_l2tww_split, open_dataset
from l2t_dist.errors import DataError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_exact_subset(shared_dir):
    root = shared_dir / "data" / "cifar10-exact-subset"
    train, test = open_dataset("parquet", root, "train"), open_dataset("parquet", root, "test")
    assert (len(train), len(test)) == (5085, 1017)
    assert train.classes == CIFAR10 and set(train.targets) == set(range(10)) == set(test.targets)
    x, y = decode_to_tensor(test, size=32)
    assert x.shape == (1017, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == test.targets
    assert 100 < x.float().mean() < 150  # real photos, not blank
    assert test.describe(7) == f"row 7 of {root / 'test.parquet'}"
    tr, va = class_balanced_split(train.targets, 0.1, seed=0)
    assert len(va) == sum(int(n * 0.1 + 0.5) for n in Counter(train.targets).values()) and len(tr) + len(va) == 5085


def test_cifar10_jpeg_counts(shared_dir):
    root = shared_dir / "data" / "cifar10-jpeg"
    assert len(open_dataset("parquet", root, "train")) == 50000
    test = open_dataset("parquet", root, "test")
    assert len(test) == 10000 and Counter(test.targets) == {k: 1000 for k in range(10)}
    x, _ = decode_to_tensor(test, indices=range(0, 10000, 100))
    assert x.shape == (100, 3, 32, 32)


def test_tinyimagenet_val(shared_dir):
    ds = open_dataset("tinyimagenet", shared_dir / "data" / "tiny-imagenet-200", "val")
    assert len(ds) == 10000 and len(ds.classes) == 200 and ds.classes == sorted(ds.classes)
    assert Counter(ds.targets) == {k: 50 for k in range(200)}
    assert ds.describe(0).endswith("val/images/val_0.JPEG")
    x, y = decode_to_tensor(ds, indices=range(0, 10000, 50), size=32)  # 64x64 -> 32x32 bilinear
    assert x.shape == (200, 3, 32, 32) and y.tolist() == ds.targets[::50]
    with pytest.raises(DataError, match="Splits found there: val"):
        open_dataset("tinyimagenet", shared_dir / "data" / "tiny-imagenet-200", "train")


@pytest.mark.parametrize("name,n_train,n_test,classes", [("stl10", 5000, 8000, 10), ("cifar100", 50000, 10000, 100)])
def test_official_l2tww_splits(shared_dir, name, n_train, n_test, classes):
    prefix = shared_dir / "data" / "l2tww-splits" / name
    c_tr, train = load_l2tww_split(f"{prefix}-train")
    c_va, val = load_l2tww_split(f"{prefix}-val")
    c_te, test = load_l2tww_split(f"{prefix}-test")
    assert c_tr == c_va == c_te == list(range(classes))
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(n_train))
    assert len(val) == n_train // 10 and sorted(test) == list(range(n_test))
