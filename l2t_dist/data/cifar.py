"""CIFAR-10 and CIFAR-100 from torchvision's on-disk folders, read with pickle.

Why our own reader: torchvision's classes want to verify or download archives; here the
folders are given and must never trigger network access. The pixels stay as one uint8 array,
which `decode_to_tensor` slices directly.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from l2t_dist.data.base import ImageDataset, array_to_pil
from l2t_dist.errors import DataError


class _CifarBase(ImageDataset):
    FOLDER = ""
    SPLIT_FILES: dict[str, list[str]] = {}
    META_FILE = ""
    META_KEY = ""
    LABEL_KEY = ""

    @classmethod
    def locate(cls, path: Path) -> Optional[Path]:
        for root in (path / cls.FOLDER, path):
            if root.is_dir() and (root / cls.META_FILE).is_file():
                return root
        return None

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        return [s for s, files in cls.SPLIT_FILES.items() if all((root / f).is_file() for f in files)]

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        self.classes = [str(c) for c in _unpickle(root / self.META_FILE)[self.META_KEY]]
        chunks, self._where = [], []  # _where[i] = (file, row) for describe()
        for name in self.SPLIT_FILES[split]:
            batch = _unpickle(root / name)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = [int(v) for v in batch[self.LABEL_KEY]]
            except (KeyError, ValueError) as exc:
                raise DataError(f"{root / name} is not a {self.kind} batch file ({exc}); re-extract the official "
                                f"python archive into {root}") from exc
            if len(labels) != len(data):
                raise DataError(f"{root / name} holds {len(data)} images but {len(labels)} labels; re-extract it")
            chunks.append(data)
            self.targets.extend(labels)
            self._where.extend((name, r) for r in range(len(labels)))
        self._data = np.concatenate(chunks)  # (N,3,32,32) as stored on disk

    def describe(self, i: int) -> str:
        name, row = self._where[i]
        return f"row {row} of {self.root / name}"

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self._data[np.asarray(indices, dtype=np.int64)])

    def _load(self, i: int) -> Image.Image:
        return array_to_pil(self._data[i].transpose(1, 2, 0))


class CIFAR10(_CifarBase):
    kind = "cifar10"
    FOLDER = "cifar-10-batches-py"
    SPLIT_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
    META_FILE, META_KEY, LABEL_KEY = "batches.meta", "label_names", "labels"
    LAYOUT = """PATH/cifar-10-batches-py/          (torchvision's CIFAR10 folder; PATH may be this folder itself)
    batches.meta                    class names
    data_batch_1 ... data_batch_5   split 'train' (pickled dicts: data uint8 (N,3072), labels)
    test_batch                      split 'test'"""


class CIFAR100(_CifarBase):
    kind = "cifar100"
    FOLDER = "cifar-100-python"
    SPLIT_FILES = {"train": ["train"], "test": ["test"]}
    META_FILE, META_KEY, LABEL_KEY = "meta", "fine_label_names", "fine_labels"
    LAYOUT = """PATH/cifar-100-python/             (torchvision's CIFAR100 folder; PATH may be this folder itself)
    meta                            class names (fine_label_names)
    train                           split 'train' (pickled dict: data uint8 (N,3072), fine_labels)
    test                            split 'test'"""


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; re-extract the official CIFAR python archive") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a pickled dict as the CIFAR python format does")
    return obj
