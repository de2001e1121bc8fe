"""Named feature taps: the one interface every architecture offers to the transfer method.

An architecture registers its modules under the attribute names of its published checkpoints
(so state_dicts load strictly) and then lists, once, the order in which they run: a sequence of
(module path, tap name or None) steps, followed by global average pooling and a linear
classifier. Everything else lives here: running only up to the deepest requested tap,
resolving tap specs, and computing tap shapes. Steps are stored as paths, not module objects,
so that `.to()`, `convert_sync_batchnorm`, deepcopy, pickling and `torch.func.functional_call`
all see the modules that are registered at call time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from l2t_dist.errors import ConfigError

TapSpec = Union[int, str]


@dataclass(frozen=True)
class Tap:
    """A tap: its name, its number of channels, and its stride with respect to the input."""

    name: str
    channels: int
    stride: int


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, every module's own mode restored on exit (some may have been in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class TappedModel(nn.Module):
    """Base class: subclasses register modules, then call `_set_plan(steps, classifier)`."""

    arch: str = "model"
    taps: tuple[Tap, ...] = ()
    num_classes: int = 0
    embedding_dim: int = 0

    def _set_plan(self, steps: Sequence[tuple[str, Optional[str]]], classifier: str, ref_size: int = 32) -> None:
        """Record the run order and derive the taps (channels, stride) from `tap_shapes(ref_size)`,
        so an architecture never states a shape by hand."""
        self._steps = tuple((path, tap) for path, tap in steps)
        self._classifier = classifier
        head = self.get_submodule(classifier)
        self.num_classes, self.embedding_dim = head.out_features, head.in_features
        self._shape_cache: dict[tuple[int, int], list[tuple[str, int, int, int]]] = {}
        self.taps = tuple(Tap(name, c, ref_size // h) for name, c, h, _ in self.tap_shapes(ref_size))
        self._index = {t.name: i for i, t in enumerate(self.taps)}

    # ----- taps -----------------------------------------------------------------------------

    def tap_names(self) -> list[str]:
        return [t.name for t in self.taps]

    def resolve_taps(self, specs: Union[TapSpec, Iterable[TapSpec]]) -> list[str]:
        """Indices (ints or digit strings) or names -> names, in the order given, duplicates dropped."""
        if isinstance(specs, (str, int)):
            specs = [specs]
        names = self.tap_names()
        out: list[str] = []
        for spec in specs:
            name = self._resolve_one(spec, names)
            if name not in out:
                out.append(name)
        return out

    def _resolve_one(self, spec: TapSpec, names: list[str]) -> str:
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise ConfigError(self._tap_error(spec, names))
        if isinstance(spec, int) or spec.strip().isdigit():
            i = int(spec)
            if 0 <= i < len(names):
                return names[i]
        elif spec.strip() in self._index:
            return spec.strip()
        raise ConfigError(self._tap_error(spec, names))

    def _tap_error(self, spec, names: list[str]) -> str:
        return (f"unknown tap {spec!r} for {self.arch}: use an index 0-{len(names) - 1} "
                f"or one of {', '.join(names)}")

    def tap_shapes(self, image_size: Union[int, tuple[int, int]] = 32) -> list[tuple[str, int, int, int]]:
        """[(name, C, H, W)] for a square (or (H, W)) input, cached per size.

        Found by one forward of a zero image in eval mode: exact for any rounding of strided
        layers, and cheap at these sizes. (A meta-device pass would avoid the compute but costs
        seconds of lazy imports on the first batch norm.) Batch-norm statistics are untouched."""
        hw = (image_size, image_size) if isinstance(image_size, int) else image_size
        hw = tuple(hw) if isinstance(hw, (tuple, list)) else ()
        if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
            raise ConfigError(f"image size must be a positive integer or (height, width), got {image_size!r}")
        if hw not in self._shape_cache:
            ref = next(chain(self.parameters(), self.buffers()))
            x = torch.zeros(1, 3, *hw, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            with eval_mode(self), torch.no_grad():
                maps = self._tap_maps(x)
            self._shape_cache[hw] = [(name, t.shape[1], t.shape[2], t.shape[3]) for name, t in maps]
        return list(self._shape_cache[hw])

    def _tap_maps(self, x: Tensor) -> list[tuple[str, Tensor]]:
        """Every tap's map for the probe input `x` (eval mode, no grad), in tap order."""
        maps, (h, w) = [], x.shape[2:]
        try:
            for path, tap in self._steps:
                x = self.get_submodule(path)(x)
                if tap is not None:
                    maps.append((tap, x))
        except RuntimeError as exc:
            raise ConfigError(f"image size {h}x{w} is too small for {self.arch}: it fails at "
                              f"{path!r} ({exc}); use a larger data.image_size") from None
        return maps

    # ----- forward --------------------------------------------------------------------------

    def forward_taps(self, x: Tensor, taps: Iterable[TapSpec] = (), logits: bool = True,
                     embedding: bool = False) -> tuple[Optional[Tensor], dict[str, Tensor]]:
        """(logits or None, {tap: map} [+ "embedding": pooled feature before the classifier]).

        With logits=False and embedding=False nothing past the deepest requested tap runs:
        a frozen source only pays for the layers that the pairs use."""
        wanted = set(self.resolve_taps(taps))
        feats: dict[str, Tensor] = {}
        full = logits or embedding
        for path, tap in self._steps:
            if not full and len(feats) == len(wanted):
                break
            x = self.get_submodule(path)(x)
            if tap in wanted:
                feats[tap] = x
        if not full:
            return None, feats
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if embedding:
            feats["embedding"] = pooled
        return (self.get_submodule(self._classifier)(pooled) if logits else None), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x)[0]
