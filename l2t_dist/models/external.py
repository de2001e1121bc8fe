"""Library models (torchvision, timm) as TappedModels, without copying or renaming a module.

The library's model object itself becomes the TappedModel: its class is swapped for a
subclass of (ExternalTaps, the library class). Every parameter keeps its library name (so the
library's state_dicts load strictly), the library's own forward runs, and `.to()`, deepcopy,
pickling and `torch.func.functional_call` all see one module tree.

Taps are module outputs, captured by forward hooks that live for one call only: nothing
persistent that a copy, a pickle or a functional call could trip over. When neither logits
nor the embedding are wanted, the hook of the last wanted tap ends the forward by raising,
so nothing past the deepest tap runs. timm models take their taps from timm's own
intermediate-features API instead (`timm_models.py`).
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from l2t_dist.errors import ConfigError
from l2t_dist.models.taps import Tap, TappedModel, eval_mode


@dataclass(frozen=True)
class Site:
    """Where a tap comes from: a module's output (`path`), or timm feature `feature`."""

    name: str
    path: str
    channels: int
    stride: int
    layout: str = "nchw"            # "nhwc" (Swin), "tokens" (ViT: (B, extra + H*W, C))
    feature: Optional[int] = None   # index into timm's forward_intermediates
    until: Optional[int] = None     # timm: the first feature after this module (None: run them all)
    clone: bool = False             # the library writes this output in place later: keep a copy


@dataclass
class Seen:
    """What a probe saw of one module: how often it ran, when first, its map's shape."""

    calls: int = 0
    order: int = -1
    shape: tuple = ()
    modified: bool = False


class _StopForward(Exception):
    """Raised by the hook of the last wanted tap; never leaves `forward_taps`."""


def as_map(out, layout: str, grid: Optional[tuple[int, int]]) -> Optional[Tensor]:
    """A module output as a (B, C, H, W) map, or None when it is not one."""
    if not isinstance(out, Tensor):
        return None
    if layout == "nhwc" and out.dim() == 4:
        return out.permute(0, 3, 1, 2)
    if layout == "tokens" and out.dim() == 3 and grid is not None:
        b, n, c = out.shape
        extra = n - grid[0] * grid[1]  # class (and distillation) tokens come first
        return out[:, extra:].transpose(1, 2).reshape(b, c, *grid)
    return out if out.dim() == 4 else None


def stride_of(ref: int, height: int) -> int:
    """The power of two nearest to ref/height: exact for even sizes, sane for 299 or 7x7."""
    return 2 ** max(0, round(math.log2(ref / max(1, height))))


class _Capture:
    """Forward hooks for one call: keep the wanted maps (and the classifier's input), stop after the last."""

    def __init__(self, model: "ExternalTaps", x: Tensor, sites: Sequence[Site], stop: bool, head: Optional[str]):
        self.model, self.sites, self.stop, self.head = model, list(sites), stop, head
        self.grid = model._grid(x)
        self.thread = threading.get_ident()
        self.maps: dict[str, Tensor] = {}
        self.embedding: Optional[Tensor] = None
        self.handles: list = []

    def __enter__(self) -> "_Capture":
        for site in self.sites:
            module = self.model.get_submodule(site.path)
            self.handles.append(module.register_forward_hook(
                lambda _m, _args, out, site=site: self._keep(site, out)))
        if self.head is not None:
            self.handles.append(self.model.get_submodule(self.head).register_forward_pre_hook(self._keep_head))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        return exc[0] is _StopForward  # the early stop is the normal way out

    def _keep(self, site: Site, out) -> None:
        if threading.get_ident() != self.thread or site.name in self.maps:
            return  # another thread's call on the same model; or a second call of the module
        t = as_map(out, site.layout, self.grid)
        self.maps[site.name] = t.clone() if site.clone else t
        if self.stop and len(self.maps) == len(self.sites):
            raise _StopForward

    def _keep_head(self, _module, args) -> None:
        if threading.get_ident() == self.thread and self.embedding is None:
            x = args[0]
            self.embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1) if x.dim() == 4 else x


class ExternalTaps(TappedModel):
    """Put in front of a library class (see `adopt`). Instance state: `_sites` in run order,
    `_head` (path of the classifier layer, whose input is the embedding), `_ref_size` (the
    input side at which strides and new module taps are probed), `_patch` (ViT)."""

    _sites: list[Site]
    _head: Optional[str] = None
    _ref_size: int = 224
    _patch: Optional[int] = None

    # ----- set-up ---------------------------------------------------------------------------

    def _set_sites(self, sites: Sequence[Site]) -> None:
        self._sites = list(sites)
        self._by_name = {s.name: s for s in self._sites}
        self.taps = tuple(Tap(s.name, s.channels, s.stride) for s in self._sites)
        self._index = {s.name: i for i, s in enumerate(self._sites)}
        self._shape_cache = {}

    def _grid(self, x: Tensor) -> Optional[tuple[int, int]]:
        return (x.shape[-2] // self._patch, x.shape[-1] // self._patch) if self._patch else None

    def _library_forward(self, x: Tensor):
        out = super(TappedModel, self).forward(x)  # the library class's own forward
        return out if isinstance(out, Tensor) else out[0]  # GoogLeNet/Inception in training: (logits, aux...)

    def __reduce_ex__(self, protocol):
        """Pickle and deepcopy by the library class: the swapped class is rebuilt, not looked up."""
        mixin, base = type(self).__bases__
        return _new_tapped, (mixin, base), self.__dict__

    # ----- taps -----------------------------------------------------------------------------

    def _resolve_one(self, spec, names):
        try:
            return super()._resolve_one(spec, names)
        except ConfigError:
            path = spec.strip() if isinstance(spec, str) else ""
            if path and not path.isdigit() and self._is_module(path):
                return self._add_module_tap(path)
            raise

    def _tap_error(self, spec, names) -> str:
        return super()._tap_error(spec, names) + " (or a module path of the model, e.g. " \
            f"{self._example_path()!r}; `l2t-dist sources inspect --arch {self.arch}` lists the taps)"

    def _example_path(self) -> str:
        paths = [n for n, m in self.named_modules() if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
        return paths[len(paths) // 2] if paths else "?"

    def _is_module(self, path: str) -> bool:
        try:
            self.get_submodule(path)
        except AttributeError:
            return False
        return True

    def _hookable(self, path: str) -> bool:
        return bool(path) and self._is_module(path) and \
            not isinstance(self.get_submodule(path), (nn.ModuleList, nn.ModuleDict))

    def _add_module_tap(self, path: str) -> str:
        """A module path becomes a tap (kept, with its place in the run order), after checking
        that it runs once and gives a feature map."""
        known = {s.path: s.layout for s in self._sites if self._hookable(s.path) and s.path != path}
        seen = probe(self, {**known, path: "nchw"}, self._ref_size)
        me = seen[path]
        where = f"module {path!r} of {self.arch}"
        if me.calls == 0:
            raise ConfigError(f"{where} does not run in the model's forward pass (eval mode); tap a module "
                              f"that does, e.g. one of {', '.join(self.tap_names())}")
        if me.calls > 1:
            raise ConfigError(f"{where} runs {me.calls} times per forward pass, so it has no one feature map; "
                              "tap its parent module or one of its children")
        if len(me.shape) != 4:
            raise ConfigError(f"{where} gives a tensor of shape {list(me.shape) or 'none'}, not a (batch, channels, "
                              "height, width) feature map; tap a convolutional stage")
        order = {s.name: seen[s.path].order for s in self._sites if s.path in known and seen[s.path].calls}
        later = [i for i, s in enumerate(self._sites) if order.get(s.name, -1) > me.order]
        until = min((self._sites[i].feature for i in later if self._sites[i].feature is not None), default=None)
        site = Site(path, path, me.shape[1], stride_of(self._ref_size, me.shape[2]), until=until,
                    clone=me.modified)
        pos = later[0] if later else len(self._sites)
        self._set_sites(self._sites[:pos] + [site] + self._sites[pos:])
        return path

    def _tap_maps(self, x: Tensor) -> list[tuple[str, Tensor]]:
        try:
            _, feats = self.forward_taps(x, self.tap_names(), logits=False)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"image size {x.shape[2]}x{x.shape[3]} does not fit {self.arch} ({exc}); use another "
                              f"data.image_size (the model's own size is {self._ref_size})") from None
        return list(feats.items())

    # ----- forward --------------------------------------------------------------------------

    def forward_taps(self, x: Tensor, taps=(), logits: bool = True, embedding: bool = False):
        wanted = sorted(self.resolve_taps(taps), key=self._index.__getitem__)
        if not wanted and not (logits or embedding):
            return None, {}
        out, maps, emb = self._run(x, [self._by_name[n] for n in wanted], logits, embedding)
        feats = {n: maps[n] for n in wanted}
        if embedding:
            feats["embedding"] = emb
        return out, feats

    def forward(self, x: Tensor) -> Tensor:
        return self._library_forward(x)

    def _run(self, x: Tensor, sites: list[Site], logits: bool, embedding: bool):
        """(logits or None, {tap: map}, embedding or None) by the library's forward and hooks."""
        full = logits or embedding
        out = None
        with _Capture(self, x, sites, stop=not full, head=self._head if embedding else None) as cap:
            out = self._library_forward(x)
        return (out if logits else None), cap.maps, cap.embedding


def probe(model: ExternalTaps, layouts: dict[str, str], size: int) -> dict[str, Seen]:
    """Run the library's forward once on a zero image (eval mode, no grad, modes restored) with
    a hook on every path: how often each module runs, in which order, its map's shape, and
    whether the library later writes that output in place (then a tap must keep a copy)."""
    seen = {p: Seen() for p in layouts}
    counter = itertools.count()
    outputs: dict[str, tuple[Tensor, int]] = {}
    ref = next(itertools.chain(model.parameters(), model.buffers()))
    x = torch.zeros(1, 3, size, size, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    grid = model._grid(x)

    def hook(path, out):
        s = seen[path]
        s.calls += 1
        if s.calls == 1:
            s.order = next(counter)
            t = as_map(out, layouts[path], grid)
            s.shape = tuple(t.shape) if t is not None else (tuple(out.shape) if isinstance(out, Tensor) else ())
            if isinstance(out, Tensor):
                outputs[path] = (out, out._version)

    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _a, out, p=p: hook(p, out)) for p in layouts]
    try:
        with eval_mode(model), torch.no_grad():
            model._library_forward(x)
    finally:
        for h in handles:
            h.remove()
    for path, (out, version) in outputs.items():
        seen[path].modified = out._version != version
    return seen


_CLASSES: dict = {}


def _new_tapped(mixin: type, base: type) -> ExternalTaps:
    cls = tapped_class(mixin, base)
    return cls.__new__(cls)


def tapped_class(mixin: type, base: type) -> type:
    """The class (mixin, base), made once per pair; named like the library class."""
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(base.__name__, (mixin, base), {"__module__": mixin.__module__})
    return _CLASSES[mixin, base]


def no_inplace(net: nn.Module) -> None:
    """In-place activations would overwrite a tapped map after it was taken: turn them off
    (same numbers, a little more memory)."""
    for m in net.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def adopt(net: nn.Module, mixin: type, arch: str, num_classes: int, embedding_dim: int, sites: Sequence[Site],
          ref_size: int, head: Optional[str] = None, patch: Optional[int] = None) -> ExternalTaps:
    """Turn the library model `net` into a TappedModel in place, and return it."""
    net.__class__ = tapped_class(mixin, type(net))
    net.arch, net.num_classes, net.embedding_dim = arch, int(num_classes), int(embedding_dim)
    net._head, net._ref_size, net._patch = head, int(ref_size), patch
    net._set_sites(sites)
    return net


__all__ = ["ExternalTaps", "Seen", "Site", "adopt", "as_map", "no_inplace", "probe", "stride_of"]
