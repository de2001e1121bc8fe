"""A generic `<root>/<split>/<class>/*.ext` tree, numbered like torchvision's ImageFolder.

Classes are the sorted sub-folders of the split and files are walked in sorted order, so
indices and labels match what ImageFolder would give on the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from l2t_dist.data.base import ImageDataset, decode_image
from l2t_dist.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


class ImageFolder(ImageDataset):
    kind = "imagefolder"
    LAYOUT = f"""PATH/<split>/<class>/<image>        e.g. PATH/train/cat/001.jpg, PATH/test/dog/7.png
    one sub-folder per split (train, val, test, ...); inside it one folder per class,
    sorted by name to give the labels; images in any depth below the class folder
    extensions: {' '.join(IMG_EXTENSIONS)}"""

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        base = root / split
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.files: list[Path] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, filenames in sorted(os.walk(base / name, followlinks=True)):  # as ImageFolder does
                for f in sorted(filenames):
                    if is_image(Path(f)):
                        self.files.append(Path(dirpath) / f)
                        self.targets.append(label)
        if not self.files:
            raise DataError(f"imagefolder split {split!r} at {base} holds no images in class sub-folders "
                            f"(found classes: {', '.join(self.classes) or 'none'}); expected {base}/<class>/<image> "
                            f"with extensions {' '.join(IMG_EXTENSIONS)}")

    def describe(self, i: int) -> str:
        return f"file {self.files[i]}"

    def _load(self, i: int) -> Image.Image:
        return decode_image(self.files[i], self.describe(i))
