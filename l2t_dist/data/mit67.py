"""MIT-67 Indoor Scenes from the official `indoorCVPR_09.tar` and its `TrainImages.txt` /
`TestImages.txt` (80 + 20 images per class), read in place.

There is no L2T-ww split file for it; the images still come in ImageFolder order (sorted class
folders, then file names, see data/listed.py), as a `PATH/<split>/<class>/` copy would give.
"""

from __future__ import annotations

from l2t_dist.data.listed import ListedImages, class_folders

LINE_FMT = "<class>/<image>.jpg"
LISTS = {"train": "TrainImages.txt", "test": "TestImages.txt"}


class MIT67(ListedImages):
    kind = "mit67"
    IMAGES = "Images"
    LAYOUT = """PATH/                              (indoorCVPR_09.tar unpacked; TrainImages.txt, TestImages.txt beside)
    Images/<class>/<image>.jpg      e.g. Images/kitchen/int474.jpg (67 class folders)
    TrainImages.txt                 split 'train': '<class>/<image>.jpg' per line
    TestImages.txt                  split 'test': the same
    labels: sorted class folders; order: torchvision ImageFolder over a PATH/<split>/<class>/ copy"""

    def _read_classes(self) -> list[str]:
        return class_folders(self.images_dir)

    def _listed(self, split: str) -> tuple[list[tuple[str, str]], str]:
        name = LISTS[split]
        return [(rel, self._class_of(rel, f"line {n} of {name}", LINE_FMT))
                for n, rel in self._lines(name, LINE_FMT)], name
