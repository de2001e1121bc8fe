"""`open_dataset(kind, path, split)`: one entry point for every on-disk format.

Readers are imported on demand, so asking for CIFAR never imports pyarrow.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Union

from l2t_dist.errors import ConfigError

_READERS = {
    "cifar10": ("l2t_dist.data.cifar", "CIFAR10"),
    "cifar100": ("l2t_dist.data.cifar", "CIFAR100"),
    "stl10": ("l2t_dist.data.stl10", "STL10"),
    "tinyimagenet": ("l2t_dist.data.tinyimagenet", "TinyImageNet"),
    "imagefolder": ("l2t_dist.data.imagefolder", "ImageFolder"),
    "cub200": ("l2t_dist.data.cub200", "CUB200"),
    "stanford_dogs": ("l2t_dist.data.stanford_dogs", "StanfordDogs"),
    "mit67": ("l2t_dist.data.mit67", "MIT67"),
    "stanford40": ("l2t_dist.data.stanford40", "Stanford40"),
    "parquet": ("l2t_dist.data.parquet", "ParquetImages"),
    "synthetic": ("l2t_dist.data.synthetic", "SyntheticImages"),
}
DATA_KINDS = tuple(_READERS)


def reader_class(kind: str):
    if kind not in _READERS:
        raise ConfigError(f"unknown data kind {kind!r}; choose one of: {', '.join(DATA_KINDS)}")
    module, name = _READERS[kind]
    return getattr(importlib.import_module(module), name)


def open_dataset(kind: str, path: Union[str, Path], split: str, **options):
    """A reader for `split` of the dataset at `path` (for synthetic, `path` is the spec string).

    Options go to the reader, e.g. `class_order="wnids"` for tinyimagenet. A missing folder or
    split raises DataError with the expected layout and the splits that do exist.
    """
    return reader_class(kind).open(path, split, **options)


def expected_layout(kind: str) -> str:
    return reader_class(kind).LAYOUT
