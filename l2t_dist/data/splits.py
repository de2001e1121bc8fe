"""Index splits: the paper's class-balanced validation hold-out, per-class limits for the
limited-data regime, and the official L2T-ww split files.

Why numpy's Generator per class: PCG64 streams are specified bit for bit, so the same seed
gives the same split on every platform and numpy version, and seeding each class from
(seed, label) keeps one class's draw independent of which other classes are present.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from l2t_dist.errors import ConfigError, DataError


def _class_rng(seed: int, label: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, int(label) % 2**63, stream])


def _by_class(targets: Sequence[int], indices: Iterable[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i in indices:
        groups[int(targets[i])].append(int(i))
    return groups


def class_balanced_split(targets: Sequence[int], val_fraction: float = 0.1,
                         seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) sorted index lists; each class gives round(n * val_fraction) of its images
    to val, at least one when it has two or more, and always keeps one for training."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    targets = [int(t) for t in np.asarray(targets).reshape(-1).tolist()]
    train, val = [], []
    for label, idx in sorted(_by_class(targets, range(len(targets))).items()):
        n = len(idx)
        k = 0 if n < 2 else min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
        perm = _class_rng(seed, label, 0).permutation(n)
        val.extend(idx[j] for j in perm[:k])
        train.extend(idx[j] for j in perm[k:])
    return sorted(train), sorted(val)


def limit_per_class(targets: Sequence[int], indices: Iterable[int], per_class: int,
                    seed: int = 0) -> list[int]:
    """At most `per_class` of `indices` per class, chosen at random; sorted. Nested: the subset
    for a smaller `per_class` (same seed) is contained in the one for a larger."""
    if int(per_class) < 1:
        raise ConfigError(f"per_class={per_class} must be at least 1")
    targets = np.asarray(targets).reshape(-1).tolist()
    keep = []
    for label, idx in sorted(_by_class(targets, indices).items()):
        perm = _class_rng(seed, label, 1).permutation(len(idx))
        keep.extend(idx[j] for j in perm[:per_class])
    return sorted(keep)


def load_l2tww_split(path: Union[str, Path]) -> tuple[list, list[int]]:
    """(classes, indices) from an official L2T-ww split file (`torch.save`d tuple).

    `classes` lists the original class ids kept by the split (the identity for the STL-10
    and CIFAR-100 files); `indices` index the official train or test set.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise DataError(f"L2T-ww split file {path} not found. The official files are named <dataset>-train, "
                        f"<dataset>-val and <dataset>-test (e.g. split/stl10-train in the L2T-ww repository)"
                        + (f"; files in {path.parent}: {', '.join(near)}" if near else ""))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safety errors all mean the same thing here
        raise DataError(f"cannot read L2T-ww split file {path}: {exc}. It should be a torch.save'd "
                        "(classes, indices) tuple") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"L2T-ww split file {path} holds {type(obj).__name__}; expected a (classes, indices) tuple")
    classes, indices = (x.tolist() if hasattr(x, "tolist") else list(x) for x in obj)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise DataError(f"L2T-ww split file {path}: indices must be non-negative integers")
    if len(set(indices)) != len(indices):
        raise DataError(f"L2T-ww split file {path}: indices repeat; the file is damaged")
    return list(classes), [int(i) for i in indices]
