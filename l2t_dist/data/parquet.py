"""Hugging Face style Parquet shards: `<split>.parquet` or `<split>-00000-of-00003.parquet`.

Columns: `image` (struct of encoded `bytes` and an optional `path`) and `label` (int).
Only the encoded bytes are held in memory (JPEG/PNG: a few hundred bytes per CIFAR image);
decoding happens per item. pyarrow is imported here, lazily, so the core imports without it.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path
from typing import Optional

from PIL import Image

from l2t_dist.data.base import ImageDataset, decode_image
from l2t_dist.errors import DataError

_SHARD = re.compile(r"^(?P<split>.+?)(?:[-_](?P<num>\d+)(?:-of-\d+)?)?\.parquet$")


def _shards(root: Path) -> dict[str, list[Path]]:
    """Split name -> its shard files in shard order, from `root` or, failing that, `root/data`."""
    for folder in (root, root / "data"):
        found: dict[str, list[tuple[int, str, Path]]] = {}
        if folder.is_dir():
            for p in folder.iterdir():
                m = _SHARD.match(p.name)
                if m and p.is_file():
                    found.setdefault(m["split"], []).append((int(m["num"] or 0), p.name, p))
        if found:
            return {s: [p for *_, p in sorted(v)] for s, v in found.items()}
    return {}


def _class_names(schema) -> Optional[list[str]]:
    """ClassLabel names from the `huggingface` schema metadata, when the writer stored them."""
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        names = info["info"]["features"]["label"]["names"]
        return [str(n) for n in names]
    except (KeyError, TypeError, ValueError):
        return None


class ParquetImages(ImageDataset):
    kind = "parquet"
    LAYOUT = """PATH/<split>.parquet  or  PATH/<split>-00000-of-00002.parquet ...  (also PATH/data/...)
    column image: struct<bytes: binary (PNG/JPEG), path: string>  (Hugging Face Image feature)
    column label: int64, 0..C-1; class names from the Hugging Face ClassLabel metadata if present"""

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        return sorted(_shards(root))

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        import pyarrow.parquet as pq

        self.files = _shards(root)[split]
        self._bytes: list[Optional[bytes]] = []
        self._paths: list[Optional[str]] = []
        self._starts: list[int] = []  # first global index of each file, for describe()
        names = None
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                cols = pf.schema_arrow.names
                if "image" not in cols or "label" not in cols:
                    raise DataError(f"{f} has columns {cols}; expected 'image' (struct bytes, path) and 'label' "
                                    "(int). Re-export it with datasets.Dataset.to_parquet")
                table = pf.read(columns=["image", "label"])
            except DataError:
                raise
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise DataError(f"cannot read {f}: {exc}; the Parquet file is damaged or not Parquet") from exc
            names = names or _class_names(pf.schema_arrow)
            self._starts.append(len(self.targets))
            self._add(f, table)
        top = max(self.targets, default=-1)
        self.classes = names if names and len(names) > top else [str(k) for k in range(top + 1)]

    def _add(self, f: Path, table) -> None:
        import pyarrow as pa

        labels = table.column("label")
        if labels.null_count or not pa.types.is_integer(labels.type):
            raise DataError(f"column 'label' of {f} must be integers without nulls (found {labels.type}, "
                            f"{labels.null_count} nulls)")
        values = labels.to_pylist()
        if values and min(values) < 0:
            raise DataError(f"{f} has a negative label (row {values.index(min(values))}); unlabeled rows cannot be "
                            "used for training, drop them first")
        image = table.column("image").combine_chunks()
        if pa.types.is_struct(image.type):
            fields = [image.type.field(k).name for k in range(image.type.num_fields)]
            data = image.field("bytes").to_pylist() if "bytes" in fields else [None] * len(image)
            paths = image.field("path").to_pylist() if "path" in fields else [None] * len(image)
        elif pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type):
            data, paths = image.to_pylist(), [None] * len(image)
        else:
            raise DataError(f"column 'image' of {f} has type {image.type}; expected struct<bytes, path> or binary")
        self.targets.extend(values)
        self._bytes.extend(data)
        self._paths.extend(paths)

    def _locate(self, i: int) -> tuple[Path, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return self.files[k], i - self._starts[k]

    def describe(self, i: int) -> str:
        f, row = self._locate(i)
        return f"row {row} of {f}"

    def _load(self, i: int) -> Image.Image:
        data = self._bytes[i]
        if data is not None:
            return decode_image(data, self.describe(i))
        if self._paths[i]:
            path = Path(self._paths[i])
            return decode_image(path if path.is_absolute() else self.root / path, self.describe(i))
        raise DataError(f"{self.describe(i)} has neither image bytes nor a path; re-export the dataset with "
                        "embedded images")
