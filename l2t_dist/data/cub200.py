"""CUB-200-2011 from the official `CUB_200_2011.tgz`, read in place.

The L2T-ww script `cub200.py` copies each image of `images.txt` to `train/<class>/` or
`test/<class>/` by `train_test_split.txt` (names unchanged; every folder of `images/` becomes
a class folder in both splits), and training reads that tree with torchvision's ImageFolder.
This reader gives the same images in the same order (see data/listed.py), so the official
`cub200-{train,val,test}` index files apply as they are.
"""

from __future__ import annotations

from typing import Callable, Optional

from l2t_dist.data.listed import ListedImages, class_folders

IMAGES_FMT = "<image_id> <class>/<image>.jpg"
SPLIT_FMT = "<image_id> <is_training_image 1|0>"
CLASSES_FMT = "<class_id> <class folder name>"
LABELS_FMT = "<image_id> <class_id>"


class CUB200(ListedImages):
    kind = "cub200"
    FOLDER = "CUB_200_2011"
    IMAGES = "images"
    LAYOUT = """PATH/CUB_200_2011/                 (CUB_200_2011.tgz unpacked as is; PATH may be this folder itself)
    images/<class>/<image>.jpg      e.g. images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg
    images.txt                      '<image_id> <class>/<image>.jpg' per line
    train_test_split.txt            '<image_id> <is_training_image 1|0>' per line: split 'train' (1), 'test' (0)
    classes.txt                     '<class_id> <class folder name>' per line, naming the folders of images/
    image_class_labels.txt          optional: '<image_id> <class_id>' per line, checked against the folders
    labels: sorted class folders; order: torchvision ImageFolder over the L2T-ww PATH/<split>/<class>/ copy"""

    def _read_classes(self) -> list[str]:
        folders = class_folders(self.images_dir)
        self._class_ids = {k: name for k, (_, name) in self._table("classes.txt", CLASSES_FMT).items()}
        listed = set(self._class_ids.values())
        if listed != set(folders):
            odd = sorted(listed ^ set(folders))
            raise self._error(f"classes.txt names {len(listed)} classes and images/ holds {len(folders)} class "
                              f"folders; they differ in {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}")
        return folders

    def _listed(self, split: str) -> tuple[list[tuple[str, str]], str]:
        images = self._table("images.txt", IMAGES_FMT)
        flags = self._table("train_test_split.txt", SPLIT_FMT, lambda v: v in ("0", "1"))
        lost = sorted(set(images) - set(flags))
        if lost:
            raise self._error(f"train_test_split.txt has no line for image id {lost[0]} of images.txt "
                              f"({len(lost)} ids without a split); each line should be '{SPLIT_FMT}'")
        folder = {i: self._class_of(rel, f"line {n} of images.txt", IMAGES_FMT) for i, (n, rel) in images.items()}
        self._check_labels(folder)
        want = "1" if split == "train" else "0"
        return [(images[i][1], folder[i]) for i in images if flags[i][1] == want], "images.txt"

    def _check_labels(self, folder: dict[int, str]) -> None:
        """image_class_labels.txt, when present, must agree with the folders images.txt gives."""
        if not (self.root / "image_class_labels.txt").is_file():
            return
        table = self._table("image_class_labels.txt", LABELS_FMT, lambda v: v.isdigit())
        for i, cls in folder.items():
            n, cid = table.get(i, (None, None))
            if n is None or self._class_ids.get(int(cid)) != cls:
                where = f"line {n} of image_class_labels.txt" if n else f"image id {i} in image_class_labels.txt"
                raise self._error(f"{where} disagrees with images.txt, which puts image {i} in {cls}; "
                                  f"each line should be '{LABELS_FMT}' with the class ids of classes.txt")

    def _table(self, name: str, fmt: str, valid: Optional[Callable[[str], bool]] = None) -> dict[int, tuple[int, str]]:
        """{id: (line number, value)} of a '<id> <value>' file, ids distinct."""
        table: dict[int, tuple[int, str]] = {}
        for n, line in self._lines(name, fmt):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit() or (valid is not None and not valid(parts[1])):
                raise self._line_error(f"line {n} of {name}", line, fmt)
            if int(parts[0]) in table:
                raise self._line_error(f"line {n} of {name}", line, fmt, " with each id once")
            table[int(parts[0])] = (n, parts[1])
        return table
