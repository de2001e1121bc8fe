"""Every reader on small files written here in the exact official on-disk formats, and every
kind of bad input: the message must name the problem and show the expected layout."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from l2t_dist.data import DATA_KINDS, decode_to_tensor, open_dataset
from l2t_dist.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def rand_images(n, side):
    return RNG.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def flat_colour(k):
    """A flat colour survives JPEG almost exactly, so labels can be checked from pixels."""
    return (40 + 50 * (k % 4), 200 - 60 * (k % 3), 30 + 70 * (k // 3 % 3))


def as_array(img):
    assert img.mode == "RGB"
    return np.asarray(img)


# --- writers of the official formats -------------------------------------------------------

def write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, f, protocol=2)
    out = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        imgs = rand_images(per_batch, 32)
        labels = RNG.integers(0, 10, per_batch).tolist()
        # The official rows are the R plane, then G, then B, each row-major: (N, 3*32*32).
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f, protocol=2)
        out[name] = (imgs, labels)
    return folder, names, out


def write_cifar100(root, n=6):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine{k}" for k in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": [f"c{k}" for k in range(20)]}, f, protocol=2)
    out = {}
    for split in ("train", "test"):
        imgs = rand_images(n, 32)
        labels = RNG.integers(0, 100, n).tolist()
        with open(folder / split, "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                         "fine_labels": labels, "coarse_labels": [v // 5 for v in labels],
                         "data": imgs.transpose(0, 3, 1, 2).reshape(n, -1)}, f, protocol=2)
        out[split] = (imgs, labels)
    return folder, fine, out


def write_stl10(root, n=3):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    out = {}
    for split in ("train", "test"):
        imgs = rand_images(n, 96)
        labels = RNG.integers(0, 10, n)
        # Column-major, one channel at a time: channel c holds x = 0..95, each a column y = 0..95.
        with open(folder / f"{split}_X.bin", "wb") as f:
            for img in imgs:
                for c in range(3):
                    f.write(np.ascontiguousarray(img[:, :, c].T).tobytes())
        (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        out[split] = (imgs, labels.tolist())
    return folder, names, out


WNIDS = ["n03000003", "n01000001", "n02000002"]  # deliberately not sorted


def write_jpeg(path, colour, side=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), colour).save(path, quality=95)


def write_tinyimagenet(root, per_class=2):
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("n01000001\tone\nn02000002\ttwo\nn03000003\tthree\nn09\tother\n")
    for k, w in enumerate(WNIDS):
        (folder / "train" / w / "images").mkdir(parents=True)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        for j in range(per_class):
            write_jpeg(folder / "train" / w / "images" / f"{w}_{j}.JPEG", flat_colour(k))
    lines = []
    for j in range(5):
        w = WNIDS[j % 3]
        write_jpeg(folder / "val" / "images" / f"val_{j}.JPEG", flat_colour(WNIDS.index(w)))
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, imgs, labels, names=None, raw=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = raw if raw is not None else [png_bytes(a) for a in imgs]
    image = pa.array([{"bytes": b, "path": None} for b in data],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array(labels, type=pa.int64())})
    if names is not None:
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# --- readers ------------------------------------------------------------------------------

def test_kinds():
    assert DATA_KINDS == ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "cub200", "stanford_dogs",
                          "mit67", "stanford40", "parquet", "synthetic")


def test_cifar10_reads_official_batches(tmp_path):
    folder, names, out = write_cifar10(tmp_path)
    for path in (tmp_path, folder):  # the parent or the folder itself
        train = open_dataset("cifar10", path, "train")
        assert train.classes == names and len(train) == 20
        imgs = np.concatenate([out[f"data_batch_{k}"][0] for k in range(1, 6)])
        labels = sum((out[f"data_batch_{k}"][1] for k in range(1, 6)), [])
        assert train.targets == labels
        img, label = train[9]
        assert np.array_equal(as_array(img), imgs[9]) and label == labels[9]
        assert train.describe(9) == f"row 1 of {folder / 'data_batch_3'}"
        x, y = decode_to_tensor(train)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2)) and y.tolist() == labels
    test = open_dataset("cifar10", tmp_path, "test")
    assert test.targets == out["test_batch"][1]
    assert np.array_equal(as_array(test[3][0]), out["test_batch"][0][3])


def test_cifar100_uses_fine_labels(tmp_path):
    folder, fine, out = write_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = open_dataset("cifar100", tmp_path, split)
        assert ds.classes == fine and ds.targets == out[split][1]
        x, _ = decode_to_tensor(ds, indices=[4, 1])
        assert torch.equal(x, torch.from_numpy(out[split][0][[4, 1]]).permute(0, 3, 1, 2))
        assert ds.describe(2) == f"row 2 of {folder / split}"
    assert len(open_dataset("cifar100", folder, "train")) == 6


def test_stl10_column_major_and_one_based_labels(tmp_path):
    folder, names, out = write_stl10(tmp_path)
    for split in ("train", "test"):
        ds = open_dataset("stl10", tmp_path, split)
        imgs, labels = out[split]
        assert ds.classes == names and ds.targets == labels
        assert np.array_equal(as_array(ds[2][0]), imgs[2])
        x, _ = decode_to_tensor(ds, size=96)
        assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2))
        # The array fast path resizes exactly as PIL's bilinear (torchvision Resize on PIL images).
        small, _ = decode_to_tensor(ds, size=32)
        expect = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in imgs])
        assert torch.equal(small, torch.from_numpy(expect).permute(0, 3, 1, 2))
    assert open_dataset("stl10", folder, "test").describe(1) == f"image 1 of {folder / 'test_X.bin'}"


def test_tinyimagenet_tree_sorted_class_order_by_default(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    train = open_dataset("tinyimagenet", tmp_path, "train")
    assert train.classes == sorted(WNIDS) and len(train) == 6
    assert train.class_words == ["one", "two", "three"]
    # Samples come in ImageFolder order (sorted wnid, then file name).
    assert [p.name for p in train.files][:2] == ["n01000001_0.JPEG", "n01000001_1.JPEG"]
    assert train.targets == [0, 0, 1, 1, 2, 2]
    assert train.describe(0) == f"file {folder / 'train/n01000001/images/n01000001_0.JPEG'}"
    val = open_dataset("tinyimagenet", folder, "val")
    assert [p.name for p in val.files] == [f"val_{j}.JPEG" for j in range(5)]
    assert val.targets == [sorted(WNIDS).index(WNIDS[j % 3]) for j in range(5)]
    x, y = decode_to_tensor(val, size=32)
    assert x.shape == (5, 3, 32, 32)
    for img, j in zip(x, range(5)):  # the pixels are the colour of the annotated class
        colour = torch.tensor(flat_colour(WNIDS.index(WNIDS[j % 3])))
        assert (img.float().mean((1, 2)) - colour).abs().max() < 3
    in_file_order = open_dataset("tinyimagenet", folder, "train", class_order="wnids")
    assert in_file_order.classes == WNIDS
    assert in_file_order.targets == [1, 1, 2, 2, 0, 0]


def test_imagefolder(tmp_path):
    for split, count in (("train", 2), ("test", 1)):
        for k, cls in enumerate(["zebra", "ant", "cat"]):
            for j in range(count):
                path = tmp_path / split / cls / ("sub" if j else "") / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 20), flat_colour(k)).save(path)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = open_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["ant", "cat", "zebra"] and ds.targets == [0, 0, 1, 1, 2, 2]
    assert ds.describe(1) == f"file {tmp_path / 'train/ant/sub/1.png'}"
    assert ds[0][0].size == (40, 20)
    x, y = decode_to_tensor(ds, size=16)  # non-square images are resized to size x size
    assert x.shape == (6, 3, 16, 16) and y.tolist() == ds.targets
    assert torch.equal(x[4, :, 3, 3], torch.tensor(flat_colour(0), dtype=torch.uint8))
    assert len(open_dataset("imagefolder", tmp_path, "test")) == 3


def test_parquet_shards_and_class_names(tmp_path):
    imgs = rand_images(7, 32)
    labels = [3, 1, 4, 1, 5, 9, 2]
    names = [f"c{k}" for k in range(10)]
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", imgs[:4], labels[:4], names)
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", imgs[4:], labels[4:], names)
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", imgs[:2], [0, 7])
    ds = open_dataset("parquet", tmp_path, "train")
    assert ds.classes == names and ds.targets == labels
    assert np.array_equal(as_array(ds[5][0]), imgs[5])
    assert ds.describe(5) == f"row 1 of {tmp_path / 'data' / 'train-00001-of-00002.parquet'}"
    x, y = decode_to_tensor(ds)
    assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2)) and y.tolist() == labels
    test = open_dataset("parquet", tmp_path, "test")
    assert test.classes == [str(k) for k in range(8)]  # no metadata: 0..max label


def test_pil_and_array_paths_agree(tmp_path):
    """decode_to_tensor's array fast path equals decoding every item through PIL."""
    write_cifar10(tmp_path)
    ds = open_dataset("cifar10", tmp_path, "train")
    fast, _ = decode_to_tensor(ds, indices=[0, 5, 19], size=24)
    slow = [np.asarray(ds[i][0].resize((24, 24), Image.BILINEAR)) for i in (0, 5, 19)]
    assert torch.equal(fast, torch.from_numpy(np.stack(slow)).permute(0, 3, 1, 2))


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,marker", [("cifar10", "data_batch_1"), ("cifar100", "fine_label_names"),
                                         ("stl10", "train_X.bin"), ("tinyimagenet", "val_annotations.txt"),
                                         ("imagefolder", "<split>/<class>"), ("parquet", "<split>.parquet")])
def test_missing_folder_shows_expected_layout(tmp_path, kind, marker):
    with pytest.raises(DataError) as err:
        open_dataset(kind, tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert f"Expected layout for data.kind={kind}" in msg and marker in msg


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "stl10", "tinyimagenet"])
def test_wrong_folder_shows_expected_layout(tmp_path, kind):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DataError, match="expected files are not there(.|\n)*Expected layout"):
        open_dataset(kind, tmp_path, "train")


def test_unknown_split_lists_the_splits_on_disk(tmp_path):
    write_cifar10(tmp_path / "c10")
    with pytest.raises(DataError, match=r"no split 'val'(.|\n)*Splits found there: train, test"):
        open_dataset("cifar10", tmp_path / "c10", "val")
    write_tinyimagenet(tmp_path / "tin")
    with pytest.raises(DataError, match=r"no split 'test'(.|\n)*Splits found there: train, val"):
        open_dataset("tinyimagenet", tmp_path / "tin", "test")
    write_parquet(tmp_path / "pq" / "validation-00000-of-00001.parquet", rand_images(1, 8), [0])
    write_parquet(tmp_path / "pq" / "train.parquet", rand_images(1, 8), [0])
    with pytest.raises(DataError, match=r"no split 'test'(.|\n)*Splits found there: train, validation"):
        open_dataset("parquet", tmp_path / "pq", "test")
    (tmp_path / "if" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no split 'eval'(.|\n)*Splits found there: train"):
        open_dataset("imagefolder", tmp_path / "if", "eval")
    with pytest.raises(DataError, match="holds no images"):
        open_dataset("imagefolder", tmp_path / "if", "train")


def test_stl10_missing_labels_file_hides_the_split(tmp_path):
    folder, _, _ = write_stl10(tmp_path)
    (folder / "test_y.bin").unlink()
    with pytest.raises(DataError, match="Splits found there: train$|Splits found there: train\\."):
        open_dataset("stl10", tmp_path, "test")


def test_corrupt_jpeg_names_the_file(tmp_path):
    folder = write_tinyimagenet(tmp_path)
    bad = folder / "val" / "images" / "val_3.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated download
    ds = open_dataset("tinyimagenet", folder, "val")
    with pytest.raises(DataError, match=f"cannot decode the image in file {bad}"):
        decode_to_tensor(ds)
    with pytest.raises(DataError, match="val_3.JPEG"):
        ds[3]
    x, _ = decode_to_tensor(ds, indices=[0, 1, 2, 4])  # the rest still decode
    assert len(x) == 4


def test_corrupt_parquet_row_names_row_and_file(tmp_path):
    imgs = rand_images(3, 8)
    raw = [png_bytes(imgs[0]), b"\x89PNG\r\n\x1a\n garbage", png_bytes(imgs[2])]
    write_parquet(tmp_path / "train.parquet", imgs, [0, 1, 0], raw=raw)
    ds = open_dataset("parquet", tmp_path, "train")
    with pytest.raises(DataError, match=f"row 1 of {tmp_path / 'train.parquet'}"):
        decode_to_tensor(ds)


def test_parquet_without_label_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "target": [1]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match="expected 'image'"):
        open_dataset("parquet", tmp_path, "train")


def test_damaged_cifar_batch(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2"):
        open_dataset("cifar10", tmp_path, "train")


def test_unknown_kind_lists_kinds():
    with pytest.raises(ConfigError, match="unknown data kind 'cifar'.*cifar10, cifar100, stl10, tinyimagenet"):
        open_dataset("cifar", "/x", "train")


def test_unknown_option_and_bad_class_order(tmp_path):
    write_tinyimagenet(tmp_path)
    with pytest.raises(ConfigError, match="unknown option.*colour.*allowed: class_order"):
        open_dataset("tinyimagenet", tmp_path, "val", colour=1)
    with pytest.raises(ConfigError, match="class_order='alpha'.*sorted, wnids"):
        open_dataset("tinyimagenet", tmp_path, "val", class_order="alpha")


def test_index_out_of_range(tmp_path):
    write_cifar100(tmp_path)
    ds = open_dataset("cifar100", tmp_path, "test")
    with pytest.raises(DataError, match="index 6 is out of range.*6 images"):
        decode_to_tensor(ds, indices=[0, 6])
