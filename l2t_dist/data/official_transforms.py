"""The L2T-ww (ImageNet-style) transforms on the original image, one image at a time.

Used by the streaming pipeline (train/streaming.py), which decodes every batch afresh.
Training: RandomResizedCrop(size) with scale (0.08, 1) and ratio (3/4, 4/3), then a random
horizontal flip, as torchvision's; but every draw comes from the generator passed in, not the
global RNG, so an image's crop is a pure function of its seed, whichever process decodes it.
The draws are torchvision's, in its order and its dtype (float32, whatever the default dtype),
so `torch.manual_seed(s)` before torchvision's transforms and `Generator().manual_seed(s)`
here give the same pixels (tested). Evaluation: Resize(round(size * 256 / 224)) of the shorter
side, then CenterCrop(size): Resize(256) + CenterCrop(224) at 224. The output is uint8
(3, size, size); the ImageNet normalisation stays in `data.model_input`.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import functional as TF  # here, not per call: forked decode workers inherit it

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def resized_crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO, dtype=torch.float32))
    for _ in range(10):
        target_area = area * torch.empty(1, dtype=torch.float32).uniform_(*SCALE, generator=generator).item()
        aspect = torch.exp(torch.empty(1, dtype=torch.float32).uniform_(
            float(log_ratio[0]), float(log_ratio[1]), generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    ratio = width / height  # ten misses: the central crop of the nearest allowed aspect ratio
    if ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_image(img: Image.Image, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip() of one RGB image -> uint8 (3, size, size)."""
    i, j, h, w = resized_crop_box(img.width, img.height, generator)
    out = TF.resized_crop(img, i, j, h, w, [size, size], antialias=True)
    if torch.rand(1, generator=generator) < 0.5:
        out = TF.hflip(out)
    return TF.pil_to_tensor(out)


def eval_resize(size: int) -> int:
    """The shorter side before the center crop: 256 for 224 (size * 8/7 is never a tie)."""
    return round(size * 256 / 224)


def eval_image(img: Image.Image, size: int) -> torch.Tensor:
    """Resize(round(size * 256/224)) + CenterCrop(size) of one RGB image -> uint8 (3, size, size)."""
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, [eval_resize(size)], antialias=True), [size, size]))
