"""TinyImageNet-200 from the official tree (`wnids.txt`, `train/<wnid>/images`, `val/`).

Class order: the L2T-ww source was trained with torchvision's ImageFolder, which numbers
classes by *sorted* wnid. The shared checkpoint scores 49.13% on val with sorted order and
0.23% (chance) with the order of wnids.txt, so `class_order="sorted"` is the default;
`"wnids"` keeps the file's order for other checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image

from l2t_dist.data.base import ImageDataset, decode_image
from l2t_dist.data.imagefolder import is_image
from l2t_dist.errors import ConfigError, DataError

CLASS_ORDERS = ("sorted", "wnids")


class TinyImageNet(ImageDataset):
    kind = "tinyimagenet"
    FOLDER = "tiny-imagenet-200"
    LAYOUT = """PATH/tiny-imagenet-200/            (the official tree; PATH may be this folder itself)
    wnids.txt                       the 200 class ids (labels follow sorted wnids by default)
    words.txt                       wnid<TAB>readable name
    train/<wnid>/images/*.JPEG      split 'train'
    val/val_annotations.txt         split 'val': file<TAB>wnid<TAB>bbox per line
    val/images/val_N.JPEG"""

    @classmethod
    def locate(cls, path: Path) -> Optional[Path]:
        for root in (path / cls.FOLDER, path):
            if (root / "wnids.txt").is_file():
                return root
        return None

    @classmethod
    def available_splits(cls, root: Path) -> list[str]:
        found = []
        if (root / "train").is_dir():
            found.append("train")
        if (root / "val" / "val_annotations.txt").is_file():
            found.append("val")
        return found

    def __init__(self, root: Path, split: str, class_order: str = "sorted"):
        super().__init__(root, split)
        if class_order not in CLASS_ORDERS:
            raise ConfigError(f"class_order={class_order!r} for tinyimagenet; allowed: {', '.join(CLASS_ORDERS)} "
                              "(sorted matches torchvision ImageFolder and the L2T-ww checkpoint)")
        wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
        if len(set(wnids)) != len(wnids) or not wnids:
            raise DataError(f"{root / 'wnids.txt'} must list distinct class ids, one per line")
        self.class_order = class_order
        self.classes = sorted(wnids) if class_order == "sorted" else wnids
        label = {w: k for k, w in enumerate(self.classes)}
        self.files: list[Path] = []
        if split == "train":
            for wnid in sorted(wnids):  # sample order as ImageFolder gives it, whatever the labels
                folder = root / "train" / wnid
                folder = folder / "images" if (folder / "images").is_dir() else folder
                names = sorted(p.name for p in folder.iterdir() if is_image(p)) if folder.is_dir() else []
                self.files.extend(folder / n for n in names)
                self.targets.extend([label[wnid]] * len(names))
        else:
            ann = root / "val" / "val_annotations.txt"
            for n, line in enumerate(ann.read_text().splitlines(), 1):
                parts = line.split("\t")
                if not line.strip():
                    continue
                if len(parts) < 2 or parts[1] not in label:
                    raise DataError(f"line {n} of {ann} should be 'file<TAB>wnid<TAB>...' with a wnid from "
                                    f"wnids.txt, got {line!r}")
                self.files.append(root / "val" / "images" / parts[0])
                self.targets.append(label[parts[1]])
        if not self.files:
            raise DataError(f"tinyimagenet split {split!r} at {root} has no images; expected "
                            + ("train/<wnid>/images/*.JPEG" if split == "train" else "val/images/*.JPEG"))

    @property
    def class_words(self) -> list[str]:
        """Readable names from words.txt (the wnid itself where missing)."""
        words = {}
        path = self.root / "words.txt"
        if path.is_file():
            for line in path.read_text().splitlines():
                wnid, _, text = line.partition("\t")
                words[wnid] = text.strip()
        return [words.get(w, w) for w in self.classes]

    def describe(self, i: int) -> str:
        return f"file {self.files[i]}"

    def _load(self, i: int) -> Image.Image:
        return decode_image(self.files[i], self.describe(i))
