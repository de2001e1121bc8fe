"""What every reader shares: labels, class names, a per-item description for error messages,
and one place that turns a broken image file into a DataError that names it.

Readers whose pixels already sit in memory as arrays (CIFAR, STL-10, synthetic) also expose
`pixels(indices)`, so `decode_to_tensor` can skip the PIL round trip entirely.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from l2t_dist.errors import ConfigError, DataError


class ImageDataset(torch.utils.data.Dataset):
    """Base reader: subclasses fill `targets`, `classes` and implement `_load` and `describe`."""

    kind = "?"
    LAYOUT = ""

    @classmethod
    def locate(cls, path: Path) -> Optional[Path]:
        """The dataset root under `path` (which may be the root or its parent), or None."""
        return path if path.is_dir() else None

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        raise NotImplementedError

    @classmethod
    def open(cls, path: Union[str, Path], split: str, **options) -> "ImageDataset":
        """Check the path and the split first, so a typo gives the layout rather than a traceback."""
        given = Path(path).expanduser()
        if not given.exists():
            raise layout_error(cls.kind, path, "the path does not exist", cls.LAYOUT)
        root = cls.locate(given)
        if root is None:
            raise layout_error(cls.kind, path, "the expected files are not there", cls.LAYOUT)
        splits = cls.available_splits(root)
        if split not in splits:
            raise layout_error(cls.kind, path, f"there is no split {split!r}", cls.LAYOUT, splits)
        allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "root", "split")]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for data.kind={cls.kind}; "
                              f"allowed: {', '.join(allowed) or 'none'}")
        return cls(root, split, **options)

    def __init__(self, root: Path, split: str):
        self.root = Path(root)
        self.split = split
        self.targets: list[int] = []
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        return self._load(i), self.targets[i]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)}, classes={len(self.classes)})")

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def pixels(self, indices: Sequence[int]) -> Optional[torch.Tensor]:
        """uint8 (n,3,H,W) straight from memory, or None when images must be decoded one by one."""
        return None

    def _load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self.targets)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise DataError(f"index {i} is out of range for {self.kind} split {self.split!r} at {self.root} "
                            f"({n} images); check the split indices you passed")
        return j


def decode_image(source: Union[str, Path, bytes], what: str) -> Image.Image:
    """Open and fully decode to RGB; any failure becomes a DataError naming `what`."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode the image in {what}: {exc}. Re-create or remove this file "
                        "(a truncated download is the usual cause)") from exc


def array_to_pil(hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(hwc, dtype=np.uint8))


def layout_error(kind: str, path: Union[str, Path], problem: str, layout: str,
                 splits: Optional[Sequence[str]] = None) -> DataError:
    """The one message shape for a missing or malformed dataset: what is wrong, then the layout."""
    msg = f"{kind} dataset at {path}: {problem}."
    if splits is not None:
        msg += f" Splits found there: {', '.join(splits) if splits else 'none'}."
    return DataError(msg + f"\nExpected layout for data.kind={kind}:\n{layout.rstrip()}")
