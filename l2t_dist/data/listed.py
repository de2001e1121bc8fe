"""What the readers of list-file datasets share (CUB-200-2011, Stanford Dogs, MIT-67, Stanford-40):
the official download is an image folder plus files that list each split's images.

Why the ImageFolder order: the official L2T-ww split files index torchvision's `ImageFolder`
over a tree that the L2T-ww pre-processing scripts copy out of the download
(`PATH/<split>/<class>/<image>`, file and folder names unchanged). ImageFolder numbers the
class folders in sorted order and walks each class's files in sorted order, so a reader that
sorts its listed images by (class, folder, file name) the same way yields the same indices,
and those split files apply to it without any copying. Images are decoded only per item.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from PIL import Image

from l2t_dist.data.base import ImageDataset, decode_image, layout_error
from l2t_dist.data.imagefolder import IMG_EXTENSIONS
from l2t_dist.errors import DataError


def class_folders(folder: Path) -> list[str]:
    """The class names torchvision's ImageFolder finds in `folder`: its sub-folders, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


class ListedImages(ImageDataset):
    """Base of the list-file readers: subclasses set IMAGES (the image folder under the root),
    optionally FOLDER (the archive's top folder, so PATH may be its parent) and implement
    `_read_classes()` and `_listed(split)`."""

    FOLDER = ""
    IMAGES = "images"
    SPLITS = ("train", "test")

    @classmethod
    def locate(cls, path: Path) -> Optional[Path]:
        for root in ([path / cls.FOLDER] if cls.FOLDER else []) + [path]:
            if (root / cls.IMAGES).is_dir():
                return root
        return None

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        return list(cls.SPLITS)

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        self.images_dir = root / self.IMAGES
        self.classes = self._read_classes()
        self._class_set = set(self.classes)
        label = {c: k for k, c in enumerate(self.classes)}
        listed, source = self._listed(split)
        pairs = {(rel, label[c]) for rel, c in listed if rel.lower().endswith(IMG_EXTENSIONS)}
        if not pairs:
            raise self._error(f"{source} lists no images for split {split!r}")
        # ImageFolder's order on the pre-processed tree: class, then sorted os.walk, then file name.
        ordered = sorted(pairs, key=lambda p: (p[1], os.path.dirname(p[0]), os.path.basename(p[0])))
        self._check_present([rel for rel, _ in ordered], source)
        self.files = [self.images_dir / rel for rel, _ in ordered]
        self.targets = [t for _, t in ordered]

    def _read_classes(self) -> list[str]:
        raise NotImplementedError

    def _listed(self, split: str) -> tuple[list[tuple[str, str]], str]:
        """([(path relative to IMAGES, class name)], where they were listed, for messages)."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"file {self.files[i]}"

    def _load(self, i: int) -> Image.Image:
        return decode_image(self.files[i], self.describe(i))

    # --- helpers for the subclasses -------------------------------------------------------

    def _error(self, problem: str) -> DataError:
        return layout_error(self.kind, self.root, problem, self.LAYOUT)

    def _lines(self, name: str, fmt: str) -> list[tuple[int, str]]:
        """(line number, stripped line) for each non-blank line of ROOT/name; a missing file
        raises DataError naming it and its line format."""
        path = self.root / name
        if not path.is_file():
            raise self._error(f"{name} is missing (expected at {path}, one '{fmt}' per line)")
        text = path.read_text(encoding="utf-8", errors="replace")
        return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def _line_error(self, where: str, line: str, fmt: str, why: str = "") -> DataError:
        return self._error(f"{where} should be '{fmt}'{why}, got {line!r}")

    def _class_of(self, rel: str, where: str, fmt: str) -> str:
        """The class folder of an image listed as `<class>/<file>`; anything else is a line error."""
        folder = rel.split("/", 1)[0]
        if "/" not in rel or folder not in self._class_set:
            raise self._line_error(where, rel, fmt, f" with <class> one of the folders in {self.IMAGES}/")
        return folder

    def _check_present(self, rels: list[str], source: str) -> None:
        """Every listed image is on disk: one directory listing per folder, not one stat per file."""
        seen: dict[str, set[str]] = {}
        missing = []
        for rel in rels:
            folder, base = os.path.split(rel)
            if folder not in seen:
                d = self.images_dir / folder
                seen[folder] = set(os.listdir(d)) if d.is_dir() else set()
            if base not in seen[folder]:
                missing.append(rel)
        if missing:
            raise self._error(f"{len(missing)} image(s) listed in {source} are not in {self.images_dir}, e.g. "
                              f"{missing[0]!r}; the download is incomplete or the list belongs to another copy")
