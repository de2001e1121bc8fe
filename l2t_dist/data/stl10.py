"""STL-10 from the official binary folder (`stl10_binary/`, as torchvision's STL10 uses it).

Images are 96x96, stored column-major per channel; labels on disk are 1-based. The X files
are memory-mapped, so opening the 8,000-image test split costs nothing until pixels are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from l2t_dist.data.base import ImageDataset, array_to_pil
from l2t_dist.errors import DataError

SIDE = 96


class STL10(ImageDataset):
    kind = "stl10"
    FOLDER = "stl10_binary"
    LAYOUT = """PATH/stl10_binary/                 (the official binary folder; PATH may be this folder itself)
    class_names.txt                 one class name per line
    train_X.bin, train_y.bin        split 'train' (uint8 images 3x96x96 column-major; uint8 labels 1..10)
    test_X.bin, test_y.bin          split 'test'"""

    @classmethod
    def locate(cls, path: Path) -> Optional[Path]:
        for root in (path / cls.FOLDER, path):
            if root.is_dir() and (root / "class_names.txt").is_file():
                return root
        return None

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        return [s for s in ("train", "test") if (root / f"{s}_X.bin").is_file() and (root / f"{s}_y.bin").is_file()]

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        self.classes = [ln.strip() for ln in (root / "class_names.txt").read_text().splitlines() if ln.strip()]
        self._xfile, yfile = root / f"{split}_X.bin", root / f"{split}_y.bin"
        labels = np.fromfile(yfile, dtype=np.uint8).astype(np.int64) - 1
        per_image = 3 * SIDE * SIDE
        size = self._xfile.stat().st_size
        if size % per_image or size // per_image != len(labels):
            raise DataError(f"{self._xfile} holds {size / per_image:g} images of 3x96x96 bytes but {yfile} has "
                            f"{len(labels)} labels; re-extract the official stl10_binary.tar.gz")
        if len(labels) == 0:
            raise DataError(f"{yfile} is empty; re-extract the official stl10_binary.tar.gz")
        if (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"{yfile} has labels outside 1..{len(self.classes)}; re-extract the official archive")
        self.targets = labels.tolist()
        # (N, C, W, H) on disk: the image is stored column by column.
        self._raw = np.memmap(self._xfile, dtype=np.uint8, mode="r", shape=(len(labels), 3, SIDE, SIDE))

    def describe(self, i: int) -> str:
        return f"image {i} of {self._xfile}"

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        chunk = np.ascontiguousarray(self._raw[idx].transpose(0, 1, 3, 2))  # -> (n, C, H, W)
        return torch.from_numpy(chunk)

    def _load(self, i: int) -> Image.Image:
        return array_to_pil(self._raw[i].transpose(2, 1, 0))  # (C,W,H) -> (H,W,C)
