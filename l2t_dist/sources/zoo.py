"""Reading and writing source checkpoints: the published formats and our own.

Recognised: the official L2T-ww `.pth.tar` (`{state_dict, num_classes, epoch, best,
test_prec}`), akamaster's CIFAR ResNets (`{state_dict, best_prec1}`, keys prefixed `module.`
by DataParallel), a plain state_dict, and our `l2t-dist/v1` dict (which training checkpoints
extend with more keys). Loading is always strict: a source that silently half-loads would
transfer noise, so every mismatch is reported key by key.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from l2t_dist.errors import CheckpointError, ConfigError

FORMAT = "l2t-dist/v1"  # same string as l2t_dist.train.checkpoint.FORMAT
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
CLASSIFIER_KEYS = ("linear.weight", "fc.weight", "classifier.weight")
_SHOW = 12  # keys listed per kind of mismatch

PathLike = Union[str, os.PathLike]


def _load(path: PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}; check the checkpoint path")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # holds Python objects beyond tensors and plain values; the user chose this file
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreadable" to the user
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); it may be truncated or "
                              "not a file written by torch.save") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); it may be truncated or "
                              "not a file written by torch.save") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


_DROP = object()


def _plain(value: Any) -> Any:
    """Scalars worth keeping in meta (0-d tensors become numbers); anything else is dropped."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _DROP


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict without wrapper prefixes, meta) from any recognised checkpoint format."""
    obj = _load(path)
    if isinstance(obj, nn.Module):  # a whole pickled model
        return _strip_prefixes(obj.state_dict()), {}
    if isinstance(obj, Mapping) and "format" in obj:
        if obj["format"] != FORMAT:
            raise CheckpointError(f"checkpoint {str(path)!r} has format {obj['format']!r}; this version reads "
                                  f"{FORMAT!r}")
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError(f"checkpoint {str(path)!r} ({FORMAT}) has no state_dict of tensors")
        meta = dict(obj.get("meta") or {})
        meta.update(format=FORMAT, arch=obj.get("arch"), num_classes=obj.get("num_classes"))
        return _strip_prefixes(obj["state_dict"]), meta
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                meta = {k: _plain(v) for k, v in obj.items() if k != key and isinstance(k, str)}
                return _strip_prefixes(obj[key]), {k: v for k, v in meta.items() if v is not _DROP}
        if _is_state_dict(obj):
            return _strip_prefixes(obj), {}
    keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"checkpoint {str(path)!r} is not a recognised format (found: {keys}); expected a "
                          "state_dict, a dict with 'state_dict' (L2T-ww, akamaster), or an l2t-dist checkpoint")


def guess_arch(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which of our architectures a state_dict's keys look like, or None."""
    def count(pattern: str) -> int:
        return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})

    if "blocks2.0.conv1.weight" in sd:
        return "l2t_resnet%d" % (6 * count(r"blocks2\.(\d+)\.") + 8)
    if "linear.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet%d" % (6 * count(r"layer1\.(\d+)\.") + 2)
    if "features.0.weight" in sd and "classifier.weight" in sd:
        return "vgg9_bn"
    if "layer4.0.conv1.weight" in sd and "fc.weight" in sd:
        return {2: "resnet18", 6: "resnet34"}.get(count(r"layer3\.(\d+)\."))
    return None


def _listing(title: str, items: list[str]) -> str:
    more = f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{len(items)} {title}: {', '.join(items[:_SHOW])}{more}"


def load_state_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load every tensor or fail listing missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    sd = _strip_prefixes(state_dict)
    # Checkpoints from before PyTorch 0.4.1 (akamaster's) lack BN's step counters: not an error.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} in checkpoint vs {tuple(v.shape)} in model"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    arch = getattr(model, "arch", type(model).__name__)
    if missing or unexpected or shapes:
        parts = [_listing(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                     ("wrongly shaped keys", shapes)) if items]
        guess = guess_arch(sd)
        if guess and guess != arch:
            hint = f"the checkpoint looks like arch {guess!r}; set the source's arch to {guess!r}"
        elif shapes and not missing and not unexpected:
            hint = "only shapes differ: check num_classes (or the architecture's width)"
        else:
            hint = "check that the checkpoint was trained with this architecture"
        raise CheckpointError(f"checkpoint does not fit {arch}: " + "; ".join(parts) + f". Hint: {hint}")
    full = dict(sd)
    for k, v in expected.items():
        full.setdefault(k, v)  # only the tolerated num_batches_tracked counters
    model.load_state_dict(full, strict=True)


def infer_num_classes(sd: Mapping[str, torch.Tensor], meta: Mapping) -> Optional[int]:
    if isinstance(meta.get("num_classes"), int):
        return meta["num_classes"]
    for key in CLASSIFIER_KEYS:
        if key in sd and sd[key].dim() == 2:
            return int(sd[key].shape[0])
    return None


def load_source(path: PathLike, arch: str, num_classes: Optional[int] = None) -> tuple[nn.Module, dict]:
    """A frozen, eval-mode model of `arch` with the checkpoint's weights, and the checkpoint's meta."""
    from l2t_dist.models import ARCH_NAMES, build_model

    if arch not in ARCH_NAMES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    sd, meta = read_checkpoint(path)
    saved_arch = meta.get("arch") if meta.get("format") == FORMAT else None
    if saved_arch and saved_arch != arch:
        raise CheckpointError(f"checkpoint {str(path)!r} was saved from arch {saved_arch!r} but arch {arch!r} was "
                              f"requested; set the source's arch to {saved_arch!r}")
    n = num_classes if num_classes is not None else infer_num_classes(sd, meta)
    if n is None:
        raise CheckpointError(f"cannot tell the number of classes of {str(path)!r}: it has no num_classes entry "
                              f"and no {' / '.join(CLASSIFIER_KEYS)} key; pass num_classes explicitly")
    model = build_model(arch, n)
    try:
        load_state_strict(model, sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{str(path)!r}: {exc}") from None
    model.eval().requires_grad_(False)
    return model, meta


def save_model_checkpoint(path: PathLike, model: nn.Module, arch: str, meta: Optional[dict] = None) -> None:
    """Our format, written atomically, tensors on the CPU so any machine can read it."""
    obj = {"format": FORMAT, "arch": arch, "num_classes": int(model.num_classes),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, p)
