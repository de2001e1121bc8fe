"""Augmentation and normalisation.

The 32x32 setting augments whole uint8 batches at once: pad 4 with zeros, a random 32x32
crop and a random horizontal flip per sample, all drawn from the generator passed in, so a
batch is a pure function of its seed (exact resume, identical shards across workers). The
224x224 setting keeps torchvision's per-sample PIL transforms, as the paper used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from l2t_dist.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomCropFlip:
    """Zero-pad, random crop back to the input size, random horizontal flip; per sample.

    Equal in distribution to torchvision's Pad(pad) + RandomCrop(H) + RandomHorizontalFlip();
    draws, in order: the row offsets, the column offsets, the flip coins (B values each).
    """

    def __init__(self, pad: int = 4, flip: bool = True):
        if int(pad) < 0:
            raise ConfigError(f"pad={pad} must be >= 0")
        self.pad, self.flip = int(pad), bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip wants a (B,C,H,W) batch, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        p, dev = self.pad, generator.device
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev).to(x.device)
        flip = (torch.rand(b, generator=generator, device=dev) < 0.5).to(x.device)
        if not self.flip:
            flip = torch.zeros_like(flip)
        padded = F.pad(x, (p, p, p, p)) if p else x
        rows = oy[:, None] + torch.arange(h, device=x.device)           # (B, H)
        cols = torch.arange(w, device=x.device).expand(b, w)
        cols = ox[:, None] + torch.where(flip[:, None], cols.flip(1), cols)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0..255 -> floats (torch's default dtype) standardised with the
    ImageNet mean and std."""
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images in 0..255, got {x.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x.to(mean.dtype).div_(255.0) - mean) / std


def model_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 batch as every network sees it (target, colocated or served source): images
    travel as uint8 (a quarter of the bytes) and are normalised here, and only here."""
    return normalize(x).to(device)


def train_224_transform():
    """PIL -> float tensor for training at 224: RandomResizedCrop, flip, ImageNet normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_224_transform():
    """PIL -> float tensor for evaluation at 224: Resize 256, center crop 224, normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
