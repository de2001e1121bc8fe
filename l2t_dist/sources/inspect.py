"""`l2t-dist sources inspect`: what a source offers for matching, before a job uses it."""

from __future__ import annotations

from typing import Optional


def inspect_source(checkpoint: Optional[str], arch: str, image_size: int = 32,
                   num_classes: Optional[int] = None, allow_unsafe_pickle: bool = False) -> dict:
    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import load_source

    if checkpoint:
        model, meta = load_source(checkpoint, arch, num_classes=num_classes, allow_unsafe_pickle=allow_unsafe_pickle)
    else:
        model, meta = build_model(arch, num_classes or 10), {}
    strides = {t.name: t.stride for t in model.taps}
    taps = [{"name": name, "channels": c, "height": h, "width": w, "stride": strides[name]}
            for name, c, h, w in model.tap_shapes(image_size)]
    return {
        "arch": arch,
        "checkpoint": checkpoint,
        "num_classes": model.num_classes,
        "embedding_dim": model.embedding_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "meta": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in meta.items()},
        "taps": taps,
    }
