"""Reading and writing source checkpoints: the published formats and our own.

Recognised: the official L2T-ww `.pth.tar` (`{state_dict, num_classes, epoch, best,
test_prec}`), akamaster's CIFAR ResNets (`{state_dict, best_prec1}`, keys prefixed `module.`
by DataParallel), a plain state_dict (torchvision's ImageNet files, timm's `.bin`), a
`.safetensors` file (timm, Hugging Face), and our `l2t-dist/v1` dict (which training
checkpoints extend with more keys). Loading is always strict: a source that silently
half-loads would transfer noise, so every mismatch is reported key by key.

Reading is safe by default: torch files are read with `weights_only=True` (tensors, plain
values and numpy data only) and safetensors files by safetensors; a file that needs full
unpickling, which can run any code, is refused unless the caller opts in for that file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from l2t_dist.errors import CheckpointError

FORMAT = "l2t-dist/v1"  # training checkpoints (train/state.py) carry it too: they load as sources
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
CLASSIFIER_KEYS = ("linear.weight", "fc.weight", "classifier.weight")
_SHOW = 12  # keys listed per kind of mismatch

PathLike = Union[str, os.PathLike]


UNSAFE_OPT_IN = ("only if you trust the file's origin, set allow_unsafe_pickle: true on that source in the job "
                 "(sources[].allow_unsafe_pickle), or pass --allow-unsafe-pickle to `l2t-dist sources inspect|eval`; "
                 "better, re-save it once as a plain state_dict: torch.save(model.state_dict(), path)")


def _load(path: PathLike, allow_unsafe_pickle: bool = False) -> Any:
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}; check the checkpoint path")
    if _is_safetensors(p):
        return _load_safetensors(p)
    try:
        with _data_globals_allowed():
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # what the weights-only unpickler refused to import
        if found is None:  # not a refusal: the bytes are no (known) pickle at all
            tail = str(exc).partition("WeightsUnpickler error:")[2] or str(exc)
            raise _unreadable(path, next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")) from None
        if not allow_unsafe_pickle:
            raise CheckpointError(f"checkpoint {str(path)!r} holds Python objects beyond tensors and plain values "
                                  f"(it needs {found.group(1)}); unpickling it in full could run any code from the "
                                  f"file, so it is refused. To load it anyway, {UNSAFE_OPT_IN}") from None
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreadable" to the user
        raise _unreadable(path, exc) from None
    try:  # the caller opted in for this file: full unpickling, which runs whatever code the file holds
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None


def _unreadable(path: PathLike, exc) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); it may be truncated or not a file "
                           "written by torch.save or safetensors")


def _is_safetensors(p: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < p.stat().st_size


def _load_safetensors(p: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {str(p)!r} is a safetensors file; install the safetensors package "
                              "to read it (pip install safetensors)") from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(p, exc) from None


def _data_globals_allowed():
    """weights_only loading that also accepts numpy scalars and arrays (training scripts often
    store `best_acc` that way) and argparse.Namespace (their saved `args`): they rebuild data,
    and call no code."""
    import argparse

    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # torch < 2.5
        return contextlib.nullcontext()
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return safe(allowed)
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    allowed += [np.ndarray, np.dtype] + [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]  # as numpy 1.x pickled them
    return safe(allowed)


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
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # a numpy scalar
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _DROP


def read_checkpoint(path: PathLike, allow_unsafe_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict without wrapper prefixes, meta) from any recognised checkpoint format.
    `allow_unsafe_pickle`: the caller trusts this file enough to unpickle it in full."""
    obj = _load(path, allow_unsafe_pickle)
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
        return "vgg9_bn" if "features.1.running_mean" in sd else "vgg9"
    if "layer4.0.conv1.weight" in sd and "fc.weight" in sd:
        depth = tuple(count(rf"layer{i}\.(\d+)\.") for i in range(1, 5))
        if "layer1.0.conv3.weight" not in sd:
            return {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}.get(depth)
        conv2 = sd["layer1.0.conv2.weight"]  # (width, width / groups, 3, 3)
        return TV_BOTTLENECKS.get((depth, conv2.shape[0], conv2.shape[0] // max(1, conv2.shape[1])))
    return None


TV_BOTTLENECKS = {  # torchvision's (and timm's) bottleneck ResNets: (blocks per stage, width, groups)
    ((3, 4, 6, 3), 64, 1): "tv:resnet50", ((3, 4, 23, 3), 64, 1): "tv:resnet101",
    ((3, 8, 36, 3), 64, 1): "tv:resnet152", ((3, 4, 6, 3), 128, 1): "tv:wide_resnet50_2",
    ((3, 4, 23, 3), 128, 1): "tv:wide_resnet101_2", ((3, 4, 6, 3), 128, 32): "tv:resnext50_32x4d",
    ((3, 4, 23, 3), 256, 32): "tv:resnext101_32x8d", ((3, 4, 23, 3), 256, 64): "tv:resnext101_64x4d",
}


def _listing(title: str, items: list[str]) -> str:
    more = f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{len(items)} {title}: {', '.join(items[:_SHOW])}{more}"


def load_state_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      arch_setting: str = "the source's arch") -> None:
    """Load every tensor or fail listing missing, unexpected and wrongly shaped keys.
    `arch_setting`: what the hint tells the user to change when the keys look like another arch."""
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
            hint = f"the checkpoint looks like arch {guess!r}; set {arch_setting} to {guess!r}"
        elif shapes and not missing and not unexpected:
            hint = "only shapes differ: check num_classes (or the architecture's width)"
        else:
            hint = "check that the checkpoint was trained with this architecture"
        raise CheckpointError(f"checkpoint does not fit {arch}: " + "; ".join(parts) + f". Hint: {hint}")
    full = dict(sd)
    for k, v in expected.items():
        full.setdefault(k, v)  # only the tolerated num_batches_tracked counters
    model.load_state_dict(full, strict=True)


# torchvision/timm classifier layers: fc, classifier[.i] (the highest i), head, heads.head, head.fc
_HEAD_KEY = re.compile(r"^(fc|classifier|head|heads\.head|head\.fc)(?:\.(\d+))?\.weight$")


def infer_num_classes(sd: Mapping[str, torch.Tensor], meta: Mapping, arch: Optional[str] = None) -> Optional[int]:
    """From the checkpoint's num_classes, else the output width of its classifier layer."""
    if isinstance(meta.get("num_classes"), int):
        return meta["num_classes"]
    for key in CLASSIFIER_KEYS + _timm_classifier_keys(arch):
        if key in sd and sd[key].dim() == 2:
            return int(sd[key].shape[0])
    heads = [(int(m.group(2) or -1), k) for k in sd for m in [_HEAD_KEY.match(k)] if m and sd[k].dim() in (2, 4)]
    return int(sd[max(heads)[1]].shape[0]) if heads else None


def _timm_classifier_keys(arch: Optional[str]) -> tuple[str, ...]:
    from l2t_dist.models.names import split_arch

    prefix, name = split_arch(arch or "")
    if prefix != "timm":
        return ()
    from l2t_dist.models.timm_models import classifier_names

    return tuple(f"{c}.weight" for c in classifier_names(name))


def load_source(path: PathLike, arch: str, num_classes: Optional[int] = None,
                allow_unsafe_pickle: bool = False) -> tuple[nn.Module, dict]:
    """A frozen, eval-mode model of `arch` with the checkpoint's weights, and the checkpoint's meta.
    `allow_unsafe_pickle`: unpickle this file in full if it needs it (it can run code)."""
    from l2t_dist.models import build_model, check_arch

    check_arch(arch)  # a ConfigError naming close matches, before the file is read
    sd, meta = read_checkpoint(path, allow_unsafe_pickle)
    saved_arch = meta.get("arch") if meta.get("format") == FORMAT else None
    if saved_arch and saved_arch != arch:
        raise CheckpointError(f"checkpoint {str(path)!r} was saved from arch {saved_arch!r} but arch {arch!r} was "
                              f"requested; set the source's arch to {saved_arch!r}")
    n = num_classes if num_classes is not None else infer_num_classes(sd, meta, arch)
    if n is None:
        raise CheckpointError(f"cannot tell the number of classes of {str(path)!r}: it has no num_classes entry "
                              f"and no classifier key ({' / '.join(CLASSIFIER_KEYS)}, head.weight, ...); "
                              "pass num_classes explicitly")
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
