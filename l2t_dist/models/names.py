"""Architecture names: the built-in ones and `tv:<name>` / `timm:<name>` for any torchvision
classification model or timm model.

The library lists are read only when a prefixed name is checked (torchvision and timm import
torch, and `l2t-dist --help` must stay fast). An unknown name is a ConfigError that lists the
closest names of the library it was meant for.
"""

from __future__ import annotations

import difflib
from typing import Optional

from l2t_dist.errors import ConfigError

CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
L2T_RESNETS = ("l2t_resnet20", "l2t_resnet32")
TV_RESNETS = ("resnet18", "resnet34")
ARCH_NAMES = CIFAR_RESNETS + L2T_RESNETS + ("vgg9_bn", "vgg9") + TV_RESNETS
PREFIXES = {"tv": "torchvision", "timm": "timm"}
TIMM_REQUIREMENT = "timm>=1.0.20"
ALLOWED = f"one of {', '.join(ARCH_NAMES)}, or tv:NAME (a torchvision classification model) or timm:NAME (a timm model)"


def split_arch(arch: str) -> tuple[Optional[str], str]:
    """'tv:resnet50' -> ('tv', 'resnet50'); a built-in name -> (None, name)."""
    prefix, sep, name = arch.partition(":")
    return (prefix, name) if sep and prefix in PREFIXES else (None, arch)


def _close(word: str, names, prefix: str = "") -> str:
    matches = difflib.get_close_matches(word, list(names), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(prefix + m for m in matches)}" if matches else ""


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))  # classification models only


def import_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm: architectures need the timm package; install it with "
                          f"pip install '{TIMM_REQUIREMENT}'") from None
    return timm


def check_arch(arch) -> str:
    """`arch` if it names a model we can build, else a ConfigError saying what would."""
    if not isinstance(arch, str) or not arch.strip():
        raise ConfigError(f"architecture must be a non-empty string, got {arch!r}; choose {ALLOWED}")
    if arch in ARCH_NAMES:
        return arch
    prefix, name = split_arch(arch)
    if prefix == "tv":
        names = torchvision_names()
        if name not in names:
            raise ConfigError(f"unknown torchvision model {name!r} in arch {arch!r}{_close(name, names, 'tv:')} "
                              "(all: torchvision.models.list_models(module=torchvision.models))")
    elif prefix == "timm":
        _check_timm(arch, name)
    else:
        guess = _close(arch, ARCH_NAMES) or _close(arch.partition(":")[2] or arch, ARCH_NAMES)
        raise ConfigError(f"unknown architecture {arch!r}{guess}; choose {ALLOWED}")
    return arch


def _check_timm(arch: str, name: str) -> None:
    timm = import_timm()
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        raise ConfigError(f"unknown timm model {base!r} in arch {arch!r}{_close(base, timm.list_models(), 'timm:')} "
                          "(all: timm.list_models())")
    if tag and name not in timm.list_pretrained(name):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        raise ConfigError(f"timm model {base!r} has no configuration {tag!r} (arch {arch!r}); "
                          f"known: {', '.join(tags) or 'none'}, or drop the '.{tag}'")
