"""Stanford Dogs from the official `images.tar` and `lists.tar`, read in place.

The L2T-ww script `dog.py` copies every image of `<split>_list.mat`'s `file_list` to
`<split>/<class>/` (names unchanged; every folder of `Images/` becomes a class folder in both
splits), and training reads that tree with torchvision's ImageFolder. This reader gives the
same images in the same order (see data/listed.py), so the official `dog-{train,val,test}`
index files apply as they are. Labels are the sorted class folders, as ImageFolder numbers
them; the 1-based `labels` of the .mat files are only checked to be one per folder.
"""

from __future__ import annotations

import numpy as np

from l2t_dist.data.listed import ListedImages, class_folders
from l2t_dist.errors import DataError

MAT_FMT = "a MATLAB file with file_list: an N x 1 cell of '<class>/<image>.jpg' strings, and labels: N x 1, 1-based"


def _mat_string(x) -> str | None:
    """The one string inside a loadmat cell entry (array(['n02085620-Chihuahua/x.jpg'])), else None."""
    while isinstance(x, np.ndarray) and x.size == 1:
        x = x.reshape(-1)[0]
    return str(x) if isinstance(x, str) else None


class StanfordDogs(ListedImages):
    kind = "stanford_dogs"
    IMAGES = "Images"
    LAYOUT = """PATH/                              (images.tar and lists.tar of Stanford Dogs, unpacked side by side)
    Images/<class>/<image>.jpg      e.g. Images/n02085620-Chihuahua/n02085620_10074.jpg
    train_list.mat                  split 'train': file_list, an N x 1 cell of '<class>/<image>.jpg'; labels, 1-based
    test_list.mat                   split 'test' (same structure; read with scipy)
    labels: sorted class folders; order: torchvision ImageFolder over the L2T-ww PATH/<split>/<class>/ copy"""

    def _read_classes(self) -> list[str]:
        return class_folders(self.images_dir)

    def _listed(self, split: str) -> tuple[list[tuple[str, str]], str]:
        name = f"{split}_list.mat"
        files, labels = self._read_mat(name)
        listed = []
        label_of: dict[str, int] = {}
        for k, rel in enumerate(files):
            where = f"entry {k} of file_list in {name}"
            if rel is None:
                raise self._error(f"{where} is not a string; expected {MAT_FMT}")
            cls = self._class_of(rel, where, "<class>/<image>.jpg")
            if labels is not None and label_of.setdefault(cls, labels[k]) != labels[k]:
                raise self._error(f"{name} gives class folder {cls} both label {label_of[cls]} and {labels[k]} "
                                  f"(entry {k}); the file is damaged, expected {MAT_FMT}")
            listed.append((rel, cls))
        return listed, name

    def _read_mat(self, name: str) -> tuple[list, list[int] | None]:
        path = self.root / name
        if not path.is_file():
            raise self._error(f"{name} is missing (expected at {path}: {MAT_FMT}; it comes in lists.tar)")
        try:
            from scipy.io import loadmat
        except ImportError as exc:
            raise DataError(f"reading {path} needs scipy (Stanford Dogs' lists are MATLAB files): "
                            "pip install scipy") from exc
        try:
            mat = loadmat(path)
        except Exception as exc:  # scipy raises ValueError, TypeError or its own MatReadError
            raise self._error(f"cannot read {name} as a MATLAB file ({exc}); expected {MAT_FMT}") from exc
        if "file_list" not in mat:
            held = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
            raise self._error(f"{name} has no file_list (it holds: {held}); expected {MAT_FMT}")
        files = [_mat_string(x) for x in np.asarray(mat["file_list"], dtype=object).reshape(-1)]
        if "labels" not in mat:
            return files, None
        labels = np.asarray(mat["labels"]).reshape(-1)
        if len(labels) != len(files) or not np.issubdtype(labels.dtype, np.number):
            raise self._error(f"{name} has {len(labels)} labels for {len(files)} files; expected {MAT_FMT}")
        return files, [int(v) for v in labels]
