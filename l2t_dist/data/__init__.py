"""Datasets, splits and transforms (core: torch, numpy, PIL; pyarrow only for Parquet).

Names are resolved on first use, so `import l2t_dist.data` costs almost nothing and a
reader's dependencies load only when that reader is asked for.
"""

from l2t_dist.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "registry": ("open_dataset", "DATA_KINDS", "expected_layout"),
    "decode": ("decode_to_tensor",),
    "splits": ("class_balanced_split", "limit_per_class", "load_l2tww_split"),
    "transforms": ("RandomCropFlip", "normalize", "model_input", "train_224_transform", "eval_224_transform",
                   "IMAGENET_MEAN", "IMAGENET_STD"),
    "base": ("ImageDataset",),
    "synthetic": ("parse_spec",),
})
