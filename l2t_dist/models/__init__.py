"""Model zoo: every architecture is a `TappedModel` with named feature taps (see `taps.py`):
the built-in ones, and any torchvision classification model (`tv:<name>`) or timm model
(`timm:<name>`), see `external.py`.

Names are imported on first use, so that the job schema can read the architecture names
(`names.py`) without importing torch, and architecture modules load only when built.
"""

from l2t_dist.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "build": ("build_model",),
    "names": ("ARCH_NAMES", "check_arch"),
    "taps": ("Tap", "TappedModel"),
})
