"""Any timm model as a TappedModel: `arch: timm:<name>` (optionally `timm:<name>.<tag>`).

Built with pretrained=False: nothing is ever downloaded, and the parameters keep timm's
names, so timm's `.safetensors` / `.bin` weights on disk load strictly. The taps are timm's
own `feature_info` (channels, reduction, module), computed by timm's intermediate-features
API `forward_intermediates`, which stops after the deepest wanted stage and returns ViT-style
tokens as (B, C, H, W) maps. A model without that API is tapped by forward hooks on the
feature_info modules, like torchvision models. A tap is named by its feature_info module path
(`feature<i>` where that path is empty or repeated), by its index, or by any module path.
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor

from l2t_dist.errors import ConfigError
from l2t_dist.models.external import ExternalTaps, Site, _Capture, adopt, no_inplace
from l2t_dist.models.names import import_timm


class TimmTaps(ExternalTaps):
    """Feature taps by `forward_intermediates`; module-path taps by hooks during the same call."""

    def _run(self, x: Tensor, sites: list[Site], logits: bool, embedding: bool):
        full = logits or embedding
        idx = sorted(s.feature for s in sites if s.feature is not None)
        hooked = [s for s in sites if s.feature is None]
        if not idx and not full:  # only module taps: the hooks stop the plain forward
            return super()._run(x, sites, False, False)
        out = emb = None
        beyond = any(s.until is None for s in hooked)  # a module after the last feature stage (a head conv)
        with _Capture(self, x, hooked, stop=False, head=None) as cap:
            if full or beyond:
                if idx:
                    final, inter = self.forward_intermediates(x, indices=idx, intermediates_only=False)
                else:  # no feature taps: timm's own forward_features
                    final, inter = self.forward_features(x), []
                out = self.forward_head(final) if logits else None
                emb = self.forward_head(final, pre_logits=True) if embedding else None
                taken = idx
            else:  # run as far as the deepest wanted feature, or the first one after a wanted module
                stop = max(idx + [s.until for s in hooked])
                taken = sorted(set(idx) | {stop})
                inter = self.forward_intermediates(x, indices=taken, stop_early=True, intermediates_only=True)
        maps = dict(cap.maps)
        by_index = dict(zip(taken, inter))
        maps.update({s.name: by_index[s.feature] for s in sites if s.feature is not None})
        return out, maps, emb


def build_timm(name: str, num_classes: int) -> ExternalTaps:
    timm = import_timm()
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    no_inplace(net)
    info = list(getattr(net, "feature_info", None) or [])
    if not info:
        raise ConfigError(f"timm:{name} declares no feature_info, so it has no taps to offer")
    paths = [str(f.get("module", "")) for f in info]
    counts = Counter(paths)
    names = [p if p and counts[p] == 1 else f"feature{i}" for i, p in enumerate(paths)]
    size = int((getattr(net, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    emb = getattr(net, "head_hidden_size", None) or net.num_features
    if hasattr(net, "forward_intermediates"):
        sites = [Site(n, p, int(f["num_chs"]), int(f["reduction"]), feature=i)
                 for i, (n, p, f) in enumerate(zip(names, paths, info))]
        return adopt(net, TimmTaps, f"timm:{name}", num_classes, emb, sites, size)
    head = _classifier_path(net)
    model = adopt(net, ExternalTaps, f"timm:{name}", num_classes, emb, [], size, head=head)
    bad = [p for p, n in zip(paths, names) if n != p or not model._hookable(p)]
    if bad:
        raise ConfigError(f"timm:{name} has no forward_intermediates and its feature module {bad[0]!r} cannot be "
                          "hooked; name its taps by module path")
    model._set_sites([Site(p, p, int(f["num_chs"]), int(f["reduction"])) for p, f in zip(paths, info)])
    return model


def _classifier_path(net) -> str:
    head = net.get_classifier()
    head = head[0] if isinstance(head, tuple) else head
    return next(n for n, m in net.named_modules() if m is head)


def classifier_names(name: str) -> tuple[str, ...]:
    """The classifier module(s) of timm model `name`, from its config (no model is built)."""
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    head = getattr(cfg, "classifier", None) if cfg is not None else None
    return (head,) if isinstance(head, str) else tuple(head or ())
