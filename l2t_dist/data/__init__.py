"""Datasets, splits and transforms (core: torch, numpy, PIL; pyarrow only for Parquet).

Names are resolved on first use, so `import l2t_dist.data` costs almost nothing and a
reader's dependencies load only when that reader is asked for.
"""

from importlib import import_module

_EXPORTS = {
    "open_dataset": "registry", "DATA_KINDS": "registry", "expected_layout": "registry",
    "decode_to_tensor": "decode",
    "class_balanced_split": "splits", "limit_per_class": "splits", "load_l2tww_split": "splits",
    "RandomCropFlip": "transforms", "normalize": "transforms", "train_224_transform": "transforms",
    "eval_224_transform": "transforms", "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "ImageDataset": "base",
    "parse_spec": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'l2t_dist.data' has no attribute {name!r}")
    value = getattr(import_module(f"l2t_dist.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
