"""Package namespaces whose names load on first use (PEP 562).

Why: `import l2t_dist.data` (or `.models`, `.method`) must cost nothing, so that the job schema
and `l2t-dist --help` never pay for torch, and a module's own dependencies (pyarrow, timm)
load only when one of its names is asked for.
"""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_namespace(package: str, exports: dict[str, tuple[str, ...]]):
    """(__getattr__, __dir__, __all__) for `package`, from {submodule: names it exports}."""
    where = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__, sorted(where)
