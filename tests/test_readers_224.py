"""The 224x224 target datasets in their official download layouts (CUB-200-2011, Stanford Dogs,
MIT-67, Stanford-40), on small trees written here: labels, order, lazy decoding, bad list
files; for CUB and Dogs the order equals torchvision's ImageFolder over the L2T-ww
pre-processed copy, and the real L2T-ww split files (../shared) fit those readers."""

import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from image_trees import COLOURS, CUB_CLASSES, write_cub, write_jpeg

from l2t_dist.data import load_l2tww_split, open_dataset
from l2t_dist.errors import DataError


def mean_colour(img):
    return np.asarray(img, dtype=np.float64).mean((0, 1))


def check_images(ds, indices=(0, -1)):
    """Decoded items are RGB and have the colour of their class (each class has its own colour)."""
    for i in indices:
        img, label = ds[i]
        assert img.mode == "RGB" and label == ds.targets[i]
        assert np.abs(mean_colour(img) - COLOURS[label]).max() < 4


def relative(ds, base):
    return [(os.path.relpath(f, base), t) for f, t in zip(ds.files, ds.targets)]


def imagefolder_samples(split_dir):
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(split_dir))
    return tv.classes, [(os.path.relpath(p, split_dir), t) for p, t in tv.samples]


# --- CUB-200-2011 ---------------------------------------------------------------------------

def preprocess_cub(folder, out):
    """What the official L2T-ww cub200.py does: copy each image to <split>/<class>/, names unchanged."""
    for split in ("train", "test"):
        for d in sorted(os.listdir(folder / "images")):
            (out / split / d).mkdir(parents=True)
    images = [ln.split() for ln in (folder / "images.txt").read_text().splitlines()]
    flags = [ln.split() for ln in (folder / "train_test_split.txt").read_text().splitlines()]
    for (i, rel), (j, flag) in zip(images, flags):
        assert i == j
        shutil.copy(folder / "images" / rel, out / ("train" if flag == "1" else "test") / rel)


def test_cub200_official_layout(tmp_path):
    folder, meta = write_cub(tmp_path)
    train = open_dataset("cub200", tmp_path, "train")  # the parent of CUB_200_2011/ or the folder itself
    test = open_dataset("cub200", folder, "test")
    assert train.classes == test.classes == CUB_CLASSES
    assert len(train) == sum(tr for _, tr, _ in meta.values()) == 12 and len(test) == 3
    assert sorted(relative(train, folder / "images")) == sorted(
        (rel, CUB_CLASSES.index(c)) for rel, tr, c in meta.values() if tr)
    assert train.targets == sorted(train.targets)  # class by class
    assert train.describe(0) == f"file {train.files[0]}"
    check_images(train, range(len(train)))
    check_images(test)


def test_cub200_order_is_imagefolder_over_the_preprocessed_tree(tmp_path):
    folder, _ = write_cub(tmp_path)
    preprocess_cub(folder, tmp_path / "pre")
    for split in ("train", "test"):
        ours = open_dataset("cub200", folder, split)
        classes, samples = imagefolder_samples(tmp_path / "pre" / split)
        assert ours.classes == classes and relative(ours, folder / "images") == samples


# --- Stanford Dogs --------------------------------------------------------------------------

DOG_CLASSES = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu", "n02086910-papillon"]


def mat_cells(strings):
    cells = np.empty((len(strings), 1), dtype=object)
    for k, s in enumerate(strings):
        cells[k, 0] = np.array([s])
    return cells


def write_dog_list(path, rels):
    """The structure of the real train_list.mat: N x 1 cells of strings, labels N x 1 (1-based, double)."""
    from scipy.io import savemat

    labels = np.array([[DOG_CLASSES.index(r.split("/")[0]) + 1.0 if r.split("/")[0] in DOG_CLASSES else 1.0]
                       for r in rels])
    savemat(path, {"file_list": mat_cells(rels), "annotation_list": mat_cells([r[:-4] for r in rels]),
                   "labels": labels})


def write_dogs(root):
    lists = {"train": [], "test": []}
    for k, cls in enumerate(DOG_CLASSES):
        wnid = cls.split("-")[0]
        for j, num in enumerate([1007, 113, 25, 4000, 3]):
            rel = f"{cls}/{wnid}_{num}.jpg"
            write_jpeg(root / "Images" / rel, COLOURS[k])
            lists["train" if j < 3 else "test"].append(rel)
    for split, rels in lists.items():
        random.Random(split).shuffle(rels)
        write_dog_list(root / f"{split}_list.mat", rels)
    return lists


def preprocess_dogs(root, out):
    """What the official L2T-ww dog.py does (file_list entries copied to <split>/<class>/)."""
    from scipy.io import loadmat

    for split in ("train", "test"):
        for c in os.listdir(root / "Images"):
            (out / split / c).mkdir(parents=True)
        for f in loadmat(root / f"{split}_list.mat")["file_list"]:
            shutil.copy(root / "Images" / f[0][0], out / split / f[0][0])


def test_stanford_dogs_official_layout_and_imagefolder_order(tmp_path):
    lists = write_dogs(tmp_path)
    preprocess_dogs(tmp_path, tmp_path / "pre")
    for split, n in (("train", 12), ("test", 8)):
        ds = open_dataset("stanford_dogs", tmp_path, split)
        assert ds.classes == DOG_CLASSES and len(ds) == n
        assert sorted(relative(ds, tmp_path / "Images")) == sorted(
            (r, DOG_CLASSES.index(r.split("/")[0])) for r in lists[split])
        classes, samples = imagefolder_samples(tmp_path / "pre" / split)
        assert ds.classes == classes and relative(ds, tmp_path / "Images") == samples
        check_images(ds, range(len(ds)))
    # "n02085620_1007" < "n02085620_113" < "n02085620_25" as strings
    assert [f.name for f in open_dataset("stanford_dogs", tmp_path, "train").files[:3]] == [
        "n02085620_1007.jpg", "n02085620_113.jpg", "n02085620_25.jpg"]


# --- MIT-67 and Stanford-40 -----------------------------------------------------------------

MIT_CLASSES = ["airport_inside", "bar", "kitchen"]


def write_mit67(root):
    lists = {"TrainImages.txt": [], "TestImages.txt": []}
    for k, cls in enumerate(MIT_CLASSES):
        for j, name in enumerate(["int474.jpg", "b_12.jpg", "Int_9.jpg", "zz.jpg"]):
            rel = f"{cls}/{name}"
            write_jpeg(root / "Images" / rel, COLOURS[k])
            lists["TestImages.txt" if j == 3 else "TrainImages.txt"].append(rel)
    write_jpeg(root / "Images" / "bar" / "unlisted.jpg", COLOURS[4])  # not in any list: not read
    for name, rels in lists.items():
        (root / name).write_text("\r\n".join(reversed(rels)) + "\r\n")  # the official files end lines with CRLF
    return lists


def test_mit67_official_layout(tmp_path):
    write_mit67(tmp_path)
    train = open_dataset("mit67", tmp_path, "train")
    assert train.classes == MIT_CLASSES and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [f.name for f in train.files[:3]] == ["Int_9.jpg", "b_12.jpg", "int474.jpg"]
    check_images(train, range(len(train)))
    test = open_dataset("mit67", tmp_path, "test")
    assert [str(f.relative_to(tmp_path / "Images")) for f in test.files] == [f"{c}/zz.jpg" for c in MIT_CLASSES]
    assert test.targets == [0, 1, 2]


ACTIONS = ["applauding", "blowing_bubbles", "brushing_teeth"]


def write_stanford40(root):
    splits = root / "ImageSplits"
    splits.mkdir(parents=True)
    (splits / "actions.txt").write_text("action_name\tnumber_of_images\n"
                                        + "".join(f"{a}\t\t{4}\n" for a in reversed(ACTIONS)))
    everything = []
    for k, action in enumerate(ACTIONS):
        names = [f"{action}_{n:03d}.jpg" for n in (4, 1, 3, 2)]
        for name in names:
            write_jpeg(root / "JPEGImages" / name, COLOURS[k])
        (splits / f"{action}_train.txt").write_text("\n".join(names[:3]) + "\n")
        (splits / f"{action}_test.txt").write_text(names[3] + "\n")
        everything += names
    (splits / "train.txt").write_text("\n".join(everything) + "\n")  # also in the download; not needed
    return root


def test_stanford40_official_layout(tmp_path):
    write_stanford40(tmp_path / "Stanford40")
    train = open_dataset("stanford40", tmp_path, "train")  # PATH/Stanford40/ is found too
    assert train.classes == ACTIONS and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [f.name for f in train.files[:3]] == ["applauding_001.jpg", "applauding_003.jpg", "applauding_004.jpg"]
    check_images(train, range(len(train)))
    test = open_dataset("stanford40", tmp_path / "Stanford40", "test")
    assert [f.name for f in test.files] == [f"{a}_002.jpg" for a in ACTIONS] and test.targets == [0, 1, 2]


# --- what every reader shares ---------------------------------------------------------------

WRITERS = {"cub200": lambda p: write_cub(p)[0], "stanford_dogs": lambda p: write_dogs(p) and p,
           "mit67": lambda p: write_mit67(p) and p, "stanford40": write_stanford40}


@pytest.mark.parametrize("kind", WRITERS)
def test_lazy_decoding_and_picklable(tmp_path, kind):
    """Opening decodes nothing (a broken image fails only when its item is read), and the reader
    survives pickling, as DataLoader worker processes need."""
    root = WRITERS[kind](tmp_path)
    ds = open_dataset(kind, root, "train")
    ds.files[1].write_bytes(ds.files[1].read_bytes()[:60])  # a truncated image
    again = open_dataset(kind, root, "train")
    assert again.files == ds.files
    with pytest.raises(DataError, match=f"cannot decode the image in file {ds.files[1]}"):
        again[1]
    copy = pickle.loads(pickle.dumps(again))
    assert copy.files == ds.files and copy.targets == ds.targets
    check_images(copy, [0, 2])
    with pytest.raises(DataError, match=r"no split 'val'(.|\n)*Splits found there: train, test"):
        open_dataset(kind, root, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"expected files are not there(.|\n)*Expected layout for data.kind={kind}"):
        open_dataset(kind, tmp_path / "empty", "train")


def test_official_splits_apply_through_prepare_data(tmp_path):
    """data.official_splits indexes our reader's train/test order directly (no copy)."""
    from l2t_dist.config import DataConfig
    from l2t_dist.train.data_pipeline import prepare_data

    folder, _ = write_cub(tmp_path)
    prefix = tmp_path / "cubmini"
    classes = list(range(3))
    torch.save((classes, [0, 2, 3, 5, 6, 8, 9]), f"{prefix}-train")
    torch.save((classes, [1, 4, 7]), f"{prefix}-val")
    torch.save((classes, [2, 0, 1]), f"{prefix}-test")
    cfg = DataConfig(kind="cub200", path=str(folder), official_splits=str(prefix), image_size=8)
    data = prepare_data(cfg)
    train, test = open_dataset("cub200", folder, "train"), open_dataset("cub200", folder, "test")
    assert data.train_y.tolist() == [train.targets[i] for i in (0, 2, 3, 5, 6, 8, 9)]
    assert data.val_y.tolist() == [train.targets[i] for i in (1, 4, 7)]
    assert data.test_y.tolist() == [test.targets[i] for i in (2, 0, 1)] and data.num_classes == 3
    colours = torch.tensor(COLOURS, dtype=torch.float32)[data.val_y]
    assert (data.val_x.float().mean((2, 3)) - colours).abs().max() < 4


# --- the real L2T-ww split files ------------------------------------------------------------

@pytest.mark.parametrize("name,kind,n_train,n_val,n_test,n_classes", [
    ("cub200", "cub200", 4994, 1000, 5794, 200), ("dog", "stanford_dogs", 10800, 1200, 8580, 120)])
def test_real_l2tww_split_files_fit_the_readers(shared_dir, name, kind, n_train, n_val, n_test, n_classes):
    prefix = shared_dir / "data" / "l2tww-splits" / name
    (c_train, train), (c_val, val), (c_test, test) = (load_l2tww_split(f"{prefix}-{part}")
                                                      for part in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (n_train, n_val, n_test)
    assert not set(train) & set(val) and sorted(train + val) == list(range(n_train + n_val))
    assert test == list(range(n_test))  # the whole test folder, in ImageFolder order
    # The files store the kept classes as ImageFolder label numbers, not names: label k is the k-th
    # sorted class folder, which is how the readers number their classes.
    assert c_train == c_val == c_test == list(range(n_classes))
    if kind == "stanford_dogs":
        # Dogs' train split has exactly 100 images per class, so in ImageFolder order class k is
        # the block [100k, 100k+100); the class-balanced val must take 10 from every block.
        per_block = np.bincount(np.asarray(val) // 100, minlength=n_classes)
        assert per_block.tolist() == [10] * n_classes


# --- bad list files -------------------------------------------------------------------------

def _break(kind, root, how):
    if kind == "cub200":
        if how == "missing":
            (root / "images.txt").unlink()
            return "images.txt is missing.*'<image_id> <class>/<image>.jpg'"
        (root / "train_test_split.txt").write_text("1 1\n2 yes\n")
        return r"line 2 of train_test_split.txt should be '<image_id> <is_training_image 1\|0>', got '2 yes'"
    if kind == "stanford_dogs":
        if how == "missing":
            (root / "test_list.mat").unlink()
            return "test_list.mat is missing.*file_list: an N x 1 cell of '<class>/<image>.jpg'"
        (root / "test_list.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really")
        return "cannot read test_list.mat as a MATLAB file.*expected a MATLAB file with file_list"
    if kind == "mit67":
        if how == "missing":
            (root / "TestImages.txt").unlink()
            return "TestImages.txt is missing.*'<class>/<image>.jpg'"
        (root / "TestImages.txt").write_text("kitchen/zz.jpg\nkitchen_zz.jpg\n")
        return "line 2 of TestImages.txt should be '<class>/<image>.jpg'.*got 'kitchen_zz.jpg'"
    if how == "missing":
        (root / "ImageSplits" / "blowing_bubbles_test.txt").unlink()
        return r"ImageSplits/blowing_bubbles_test.txt is missing.*'<action>_<nnn>.jpg'"
    (root / "ImageSplits" / "actions.txt").write_text("action_name\tnumber_of_images\napplauding\t4\n"
                                                      "brushing teeth 4\n")
    return "line 3 of ImageSplits/actions.txt should be '<action> <number_of_images>'.*got 'brushing teeth 4'"


@pytest.mark.parametrize("how", ["missing", "malformed"])
@pytest.mark.parametrize("kind", WRITERS)
def test_bad_list_file_names_file_and_format(tmp_path, kind, how):
    root = WRITERS[kind](tmp_path)
    expected = _break(kind, root, how)
    with pytest.raises(DataError, match=expected) as err:
        open_dataset(kind, root, "test")
    assert f"Expected layout for data.kind={kind}" in str(err.value)


def test_cub200_inconsistent_files(tmp_path):
    folder, meta = write_cub(tmp_path)
    (folder / "classes.txt").write_text(f"1 {CUB_CLASSES[0]}\n2 {CUB_CLASSES[1]}\n3 011.Rusty_Blackbird\n")
    with pytest.raises(DataError, match="classes.txt names 3 classes.*differ in 010.Red_winged_Blackbird, 011.Rusty"):
        open_dataset("cub200", folder, "train")
    write_cub(tmp_path / "b")
    folder = tmp_path / "b" / "CUB_200_2011"
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    i, cid = lines[4].split()
    lines[4] = f"{i} {int(cid) % 3 + 1}"
    (folder / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 5 of image_class_labels.txt disagrees with images.txt"):
        open_dataset("cub200", folder, "test")
    (folder / "image_class_labels.txt").unlink()  # optional: without it the folders decide
    assert len(open_dataset("cub200", folder, "test")) == 3
    gone = next(rel for rel, is_train, _ in meta.values() if not is_train)
    (folder / "images" / gone).unlink()
    with pytest.raises(DataError, match=f"1 image\\(s\\) listed in images.txt are not in .*'{gone}'"):
        open_dataset("cub200", folder, "test")


def test_list_entry_outside_the_class_folders(tmp_path):
    write_mit67(tmp_path)
    (tmp_path / "TrainImages.txt").write_text("kitchen/int474.jpg\nlibrary/a.jpg\n")
    with pytest.raises(DataError, match="line 2 of TrainImages.txt should be '<class>/<image>.jpg' with <class> one "
                                        "of the folders in Images/, got 'library/a.jpg'"):
        open_dataset("mit67", tmp_path, "train")
    write_dogs(tmp_path / "dogs")
    write_dog_list(tmp_path / "dogs" / "train_list.mat", [f"{DOG_CLASSES[0]}/n02085620_25.jpg", "nowhere/x.jpg"])
    with pytest.raises(DataError, match="entry 1 of file_list in train_list.mat should be"):
        open_dataset("stanford_dogs", tmp_path / "dogs", "train")
