"""Decode a dataset (or some of its items) once into a uint8 tensor for in-memory training.

Array-backed readers hand over their pixels directly and are resized in one vectorised call;
torch's antialiased bilinear on uint8 gives the same bytes as PIL's BILINEAR (what
torchvision's Resize does on PIL images), which the tests check. File-backed readers are
decoded with PIL in a few threads (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from l2t_dist.errors import ConfigError

_ARRAY_CHUNK = 4096
_FILE_CHUNK = 256


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n,3,h,w) uint8 -> (n,3,size,size) uint8, bilinear with antialias as PIL does."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.cat([F.interpolate(x[k:k + _ARRAY_CHUNK], size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)
                      for k in range(0, len(x), _ARRAY_CHUNK)]) if len(x) else x.new_empty(0, 3, size, size)


def decode_to_tensor(ds, indices: Optional[Sequence[int]] = None, size: int = 32,
                     workers: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N,3,size,size) and int64 labels; a corrupt image raises DataError naming it."""
    if int(size) < 1:
        raise ConfigError(f"image size {size} must be a positive number of pixels")
    check = getattr(ds, "_check_index", int)
    idx = list(range(len(ds))) if indices is None else [check(i) for i in indices]
    labels = torch.tensor([int(ds.targets[i]) for i in idx], dtype=torch.int64)
    pixels = ds.pixels(idx) if idx and hasattr(ds, "pixels") else None
    if pixels is not None:
        return resize_uint8(pixels.contiguous(), size).contiguous(), labels
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)

    def work(start: int) -> None:
        for k in range(start, min(start + _FILE_CHUNK, len(idx))):
            img = ds[idx[k]][0]
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out[k] = np.asarray(img.convert("RGB"))

    starts = range(0, len(idx), _FILE_CHUNK)
    workers = min(workers or os.cpu_count() or 1, 8, len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, starts))  # list() re-raises the first error (a DataError naming the file)
    else:
        for start in starts:
            work(start)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels
