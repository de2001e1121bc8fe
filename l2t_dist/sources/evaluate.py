"""`l2t-dist sources eval`: top-1 accuracy of a checkpoint, to check a source before transfer."""

from __future__ import annotations

from typing import Optional

import torch

from l2t_dist.errors import ConfigError


def _images(ds, indices, image_size: int) -> torch.Tensor:
    """Normalised float images; the 224 setting uses the paper's Resize(256)+CenterCrop(224)."""
    from l2t_dist.data import decode_to_tensor, eval_224_transform, normalize

    if image_size >= 224:
        tf = eval_224_transform()
        return torch.stack([tf(ds[i][0]) for i in indices])
    images, _ = decode_to_tensor(ds, indices=indices, size=image_size)
    return normalize(images)


@torch.inference_mode()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(labels))


def evaluate_checkpoint(checkpoint: str, arch: str, kind: str, path: str, split: str, *,
                        image_size: int = 32, batch_size: int = 500, holdout: str = "all",
                        limit: Optional[int] = None, split_seed: int = 0, allow_unsafe_pickle: bool = False) -> dict:
    from l2t_dist.data import class_balanced_split, open_dataset
    from l2t_dist.sources.zoo import load_source

    model, _ = load_source(checkpoint, arch, allow_unsafe_pickle=allow_unsafe_pickle)
    ds = open_dataset(kind, path, split)
    indices = list(range(len(ds)))
    if holdout != "all":
        train_idx, val_idx = class_balanced_split(ds.targets, val_fraction=0.1, seed=split_seed)
        indices = list(train_idx if holdout == "train" else val_idx)
    if limit is not None:
        indices = indices[:limit]
    labels = torch.tensor([ds.targets[i] for i in indices], dtype=torch.long)
    if len(labels) and int(labels.max()) >= model.num_classes:
        raise ConfigError(f"dataset {kind}:{path} has labels up to {int(labels.max())} but the {arch} checkpoint "
                          f"has {model.num_classes} classes; evaluate it on the task it was trained on")
    images = _images(ds, indices, image_size)
    return {"top1": round(top1(model, images, labels, batch_size), 4), "n": len(labels)}
