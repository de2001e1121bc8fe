"""The streaming pipeline (data.pipeline: stream): batches decoded per batch from the original
images, a pure function of (seed, epoch, batch index), whatever process decodes them.

On an imagefolder tree of small JPEGs of mixed sizes written here (40-64 px, image_size 32),
plus one tiny 224 run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from l2t_dist.config import DataConfig, parse_job
from l2t_dist.data.official_transforms import eval_image, train_image
from l2t_dist.errors import ConfigError, DataError
from l2t_dist.train.data_pipeline import TaskData, image_seed, open_data, pipeline_kind
from l2t_dist.train.parallel import shard_bounds
from l2t_dist.train.streaming import StreamingData

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 7, 2  # 24 train, 4 val (10% per class), 8 test


def _write_tree(root, rng, sizes=(40, 65)):
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(*sizes, size=2))
                base = rng.integers(0, 256, size=3)  # a class-free colour, plus noise
                pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("jpegs"), np.random.default_rng(0))


def _cfg(tree, **over) -> DataConfig:
    args = {"kind": "imagefolder", "path": str(tree), "image_size": 32, "batch_size": 10, "pipeline": "stream",
            "decode_workers": 0}
    return DataConfig(**{**args, **over})


def _epoch(data, seed=5, epoch=1, start=0, shard=lambda n: (0, n)):
    return list(data.train_shards(seed, epoch, start, 99, shard))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(i == j and g == h and torch.equal(x, u) and torch.equal(y, v)
                                    for (i, x, y, g), (j, u, v, h) in zip(a, b))


def test_a_batch_is_a_pure_function_of_seed_epoch_index_whatever_the_workers(tree):
    data = open_data(_cfg(tree))
    assert isinstance(data, StreamingData) and data.sizes() == {"train": 24, "val": 4, "test": 8}
    rng = torch.get_rng_state()
    ref = _epoch(data)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is never drawn from
    assert [(b, tuple(x.shape), x.dtype, g) for b, x, _, g in ref] == [
        (0, (10, 3, 32, 32), torch.uint8, 10), (1, (10, 3, 32, 32), torch.uint8, 10),
        (2, (4, 3, 32, 32), torch.uint8, 4)]
    assert _same(_epoch(data), ref)  # again: the same bytes
    assert _same(_epoch(open_data(_cfg(tree, decode_workers=2))), ref)  # two decode processes
    assert _same(_epoch(data, start=1), ref[1:])  # resume from batch 1
    # the labels are the reader's, in the in-memory pipeline's order (same permutation)
    mem = open_data(_cfg(tree, pipeline="memory"))
    assert isinstance(mem, TaskData)
    assert [y.tolist() for _, _, y, _ in ref] == [y.tolist() for _, _, y, _ in _epoch(mem)]
    # and they have teeth: another epoch or seed is another batch
    assert not torch.equal(_epoch(data, epoch=2)[0][1], ref[0][1])
    assert not torch.equal(_epoch(data, seed=6)[0][1], ref[0][1])
    # each image is the official transform of its original, seeded by its global position
    b, x, y, _ = ref[1]
    reader, idx = data._splits["train"]
    from l2t_dist.train.data_pipeline import epoch_permutation

    j = idx[epoch_permutation(24, 5, 1)[10 + 3]]
    assert torch.equal(x[3], train_image(reader[j][0], 32, torch.Generator().manual_seed(image_seed(5, 1, 1, 3))))
    # augment: false gives the evaluation transform
    plain = _epoch(open_data(_cfg(tree, augment=False)))
    assert torch.equal(plain[1][1][3], eval_image(reader[j][0], 32))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_decoded_apart_concatenate_to_the_global_batch(tree, world):
    data = open_data(_cfg(tree))
    ref = _epoch(data)
    parts = [_epoch(data, shard=lambda n, r=r: shard_bounds(n, r, world)) for r in range(world)]
    for k, (b, x, y, g) in enumerate(ref):
        assert all(p[k][0] == b and p[k][3] == g for p in parts)
        assert torch.equal(torch.cat([p[k][1] for p in parts]), x)
        assert torch.equal(torch.cat([p[k][2] for p in parts]), y)
    # evaluation shards too (rank r counts images lo..hi of the split)
    full = list(data.split_batches("test", 0, 8, 3))
    mine = [xb for r in range(world) for xb, _ in data.split_batches("test", *shard_bounds(8, r, world), 3)]
    assert torch.equal(torch.cat(mine), torch.cat([xb for xb, _ in full]))
    assert [len(xb) for xb, _ in full] == [3, 3, 2]


def test_transforms_are_torchvisions_on_the_original_image():
    from torchvision import transforms as T

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
              for w, h in ((61, 47), (40, 64), (300, 260), (200, 20))]  # 200x20: RandomResizedCrop's fallback
    for img in images:
        for size in (32, 48, 224):
            ref = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])(img)
            assert torch.equal(eval_image(img, size), ref), (img.size, size)
    assert round(224 * 256 / 224) == 256
    # training: the same draws as torchvision's RandomResizedCrop + RandomHorizontalFlip from the
    # global RNG seeded alike (scale (0.08, 1), ratio (3/4, 4/3))
    official = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(), T.PILToTensor()])
    state = torch.get_rng_state()
    try:
        for img in images:
            for seed in range(12):
                torch.manual_seed(seed)
                assert torch.equal(train_image(img, 48, torch.Generator().manual_seed(seed)), official(img))
    finally:
        torch.set_rng_state(state)


def test_pipeline_choice_and_a_broken_image(tree, tmp_path):
    small, tiny = _cfg(tree, pipeline="auto"), 100
    assert pipeline_kind(small, tiny) == "memory"
    assert pipeline_kind(_cfg(tree, pipeline="auto", image_size=224), tiny) == "stream"
    assert pipeline_kind(small, 800_000) == "stream"  # 800k images of 32x32: 2.3 GiB decoded
    with pytest.raises(ConfigError, match="data.pipeline=memory with data.image_size=224.*data.pipeline=stream"):
        pipeline_kind(_cfg(tree, pipeline="memory", image_size=224), tiny)
    broken = _write_tree(tmp_path / "broken", np.random.default_rng(2))
    bad = broken / "train" / "class2" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated download
    for workers in (0, 2):
        with pytest.raises(DataError, match=f"cannot decode the image in file {bad}"):
            _epoch(open_data(_cfg(broken, decode_workers=workers)))


def _job(tmp_path, tree, source_ckpt, **over):
    t = {"data": {"kind": "imagefolder", "path": str(tree), "image_size": 32, "batch_size": 10,
                  "eval_batch_size": 3, "pipeline": "stream", "decode_workers": 2},
         "sources": [{"name": "s", "arch": "resnet20", "checkpoint": source_ckpt}],
         "target": {"arch": "resnet20"}, "method": {"name": "l2t_ww", "T": 1, "beta": 0.01},
         "optim": {"lr": 0.01, "epochs": 2}, "meta": {"lr": 1e-2},
         "run": {"name": "r", "out_dir": str(tmp_path), "seed": 3, "threads": 1, "checkpoint_every": 1}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        t[section][key] = value
    return parse_job(t)


class Stop(Exception):
    pass


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.mark.parametrize("stop_at", ["epoch", "mid-epoch"])
def test_a_streaming_run_resumed_ends_where_an_uninterrupted_one_does(tmp_path, tree, source_ckpt, monkeypatch,
                                                                      single_thread, stop_at):
    """Stopped after epoch 1 (or in epoch 2, after its first batch's checkpoint) with 2 decode
    workers, resumed: the weights and the log of a straight run with decoding in-process."""
    from l2t_dist.train.local import train_local
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.state import TrainingState

    straight = train_local(_job(tmp_path / "a", tree, source_ckpt, data__decode_workers=0))
    method = "_train_epoch" if stop_at == "epoch" else "_step"
    original, calls = getattr(TrainingLoop, method), []

    def interrupted(self, *args):
        calls.append(1)
        if (self.epoch == 1) if stop_at == "epoch" else len(calls) == 5:  # 3 batches per epoch
            raise Stop
        return original(self, *args)

    monkeypatch.setattr(TrainingLoop, method, interrupted)
    with pytest.raises(Stop):
        train_local(_job(tmp_path / "b", tree, source_ckpt))
    monkeypatch.undo()
    stopped = TrainingState.load(tmp_path / "b" / "r" / "last.pt")
    assert (stopped.epoch, stopped.batch) == ((1, 0) if stop_at == "epoch" else (1, 1))
    resumed = train_local(None, resume=str(tmp_path / "b" / "r"))
    a, b = (TrainingState.load(tmp_path / d / "r" / "last.pt") for d in ("a", "b"))
    assert a.global_step == b.global_step == 6 and a.student.keys() == b.student.keys()
    for k in a.student:
        assert torch.equal(a.student[k], b.student[k]), k
    for k in a.phi:
        assert torch.equal(a.phi[k], b.phi[k]), k
    assert _rows(tmp_path / "a" / "r") == _rows(tmp_path / "b" / "r")
    assert resumed.best_val_acc == straight.best_val_acc and resumed.pairs == straight.pairs


def test_a_224_job_streams_and_trains(tmp_path, tree, source_ckpt, single_thread):
    from l2t_dist.distributed.memory import estimate_memory
    from l2t_dist.train.local import train_local

    job = _job(tmp_path, tree, source_ckpt, data__image_size=224, data__pipeline="auto", data__batch_size=4,
               data__eval_batch_size=8, method__name="scratch", optim__epochs=1, run__max_iters_per_epoch=1)
    data = open_data(job.data)
    assert isinstance(data, StreamingData)
    [(_, x, _, _)] = list(data.train_shards(0, 0, 0, 1, lambda n: (0, n)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8
    summary = train_local(job)
    assert summary.epochs == 1 and summary.test_acc_at_best_val is not None
    # the memory estimate holds decode workers and batches in flight, not the dataset
    est = estimate_memory(job, workers=1, colocated=True)
    assert 0 < est.worker_parts["data"] < 2**30
