"""Which source taps are matched to which target taps: the presets of the paper, or a list.

A pair is (source name, source tap, target tap). With several sources the candidate pairs
are the union over sources; each pair gets its own regressor and meta-networks. Presets
work on the taps *offered* (a source's configured taps, by default the end of each stage);
an explicit list may name any tap present in the lists passed in. Tap indices ("4") are the
model's business: resolve them with `model.resolve_taps` before calling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from l2t_dist.errors import ConfigError

PRESETS = ("single", "one_to_one", "all_to_all")


@dataclass(frozen=True)
class TapInfo:
    """A tap's shape at the job's input size."""

    name: str
    channels: int
    size: tuple[int, int]


def tap_infos(shapes: Sequence[tuple]) -> list[TapInfo]:
    """From `model.tap_shapes(image_size)`: [(name, C, H, W), ...]."""
    return [TapInfo(str(n), int(c), (int(h), int(w))) for n, c, h, w in shapes]


@dataclass(frozen=True)
class PairSpec:
    source: str
    source_tap: str
    target_tap: str
    source_channels: int
    target_channels: int
    source_size: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.source}:{self.source_tap}->{self.target_tap}"

    @property
    def resized(self) -> bool:
        return self.source_size != self.target_size


def _pair(source: str, s: TapInfo, t: TapInfo) -> PairSpec:
    return PairSpec(source, s.name, t.name, s.channels, t.channels, s.size, t.size)


def _sizes(taps: Sequence[TapInfo]) -> str:
    return ", ".join(f"{t.name} {t.channels}@{t.size[0]}x{t.size[1]}" for t in taps)


def _deepest_of_size(size, target: Sequence[TapInfo], what: str) -> TapInfo:
    same = [t for t in target if t.size == size]
    if not same:
        raise ConfigError(f"pair preset: no target tap has the spatial size {size[0]}x{size[1]} of {what}; "
                          f"target taps offered: {_sizes(target)}. Choose other taps, all_to_all, or an explicit list")
    return same[-1]


def resolve_pairs(spec: Union[str, Sequence, None], sources: Mapping[str, Sequence[TapInfo]],
                  target: Sequence[TapInfo]) -> list[PairSpec]:
    """Pairs for a preset name or an explicit list of [\"SOURCE:TAP\", \"TARGET_TAP\"] entries."""
    if not sources:
        raise ConfigError("pairs need at least one source (sources: [{name, arch, checkpoint}])")
    if not target:
        raise ConfigError("pairs need at least one target tap (target.taps)")
    for name, taps in sources.items():
        if not taps:
            raise ConfigError(f"source {name!r} offers no taps; set its 'taps'")
    if spec is None or isinstance(spec, str):
        return _preset(spec or "all_to_all", sources, target)
    return _explicit(spec, sources, target)


def _preset(preset: str, sources, target) -> list[PairSpec]:
    if preset not in PRESETS:
        raise ConfigError(f"unknown pair preset {preset!r}; allowed: {', '.join(PRESETS)}, "
                          "or a list of [SOURCE:TAP, TARGET_TAP]")
    pairs = []
    for name, taps in sources.items():
        if preset == "single":
            s = taps[-1]
            pairs.append(_pair(name, s, _deepest_of_size(s.size, target, f"{name}:{s.name}")))
        elif preset == "one_to_one":
            for s in taps:
                pairs.append(_pair(name, s, _deepest_of_size(s.size, target, f"{name}:{s.name}")))
        else:
            pairs.extend(_pair(name, s, t) for s in taps for t in target)
    return pairs


def _split_source(entry) -> tuple[str, str]:
    text = str(entry)
    if ":" not in text:
        raise ConfigError(f"explicit pair source {text!r} must look like SOURCE:TAP")
    name, tap = text.split(":", 1)
    return name, tap


def _explicit(spec, sources, target) -> list[PairSpec]:
    by_target = {t.name: t for t in target}
    pairs, seen = [], set()
    for entry in spec:
        if len(entry) == 3:
            name, stap, ttap = (str(e) for e in entry)
        elif len(entry) == 2:
            (name, stap), ttap = _split_source(entry[0]), str(entry[1])
        else:
            raise ConfigError(f"explicit pair {entry!r} must be [SOURCE:TAP, TARGET_TAP]")
        if name not in sources:
            raise ConfigError(f"explicit pair {entry!r}: unknown source {name!r}; sources: {', '.join(sources)}")
        by_source = {t.name: t for t in sources[name]}
        if stap not in by_source:
            raise ConfigError(f"explicit pair {entry!r}: source {name!r} has no tap {stap!r}; "
                              f"allowed: {', '.join(by_source)}")
        if ttap not in by_target:
            raise ConfigError(f"explicit pair {entry!r}: no target tap {ttap!r}; allowed: {', '.join(by_target)}")
        key = (name, stap, ttap)
        if key in seen:
            raise ConfigError(f"explicit pair {name}:{stap}->{ttap} is listed twice")
        seen.add(key)
        pairs.append(_pair(name, by_source[stap], by_target[ttap]))
    if not pairs:
        raise ConfigError("the explicit pair list is empty")
    return pairs
