"""Source checkpoints: the three published formats, plain state_dicts, our own format, the
errors a user sees, and golden accuracies of the real sources (torch + PIL/pyarrow only)."""

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from l2t_dist.errors import CheckpointError, ConfigError
from l2t_dist.models import build_model
from l2t_dist.sources.zoo import (
    FORMAT,
    guess_arch,
    load_source,
    load_state_strict,
    read_checkpoint,
    save_model_checkpoint,
)

L2T = "l2tww_tinyimagenet200_resnet32_model_best.pth.tar"
AKA20 = "akamaster_cifar10_resnet20-12fca82f.th"
AKA32 = "akamaster_cifar10_resnet32-d509ac18.th"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def weights(shared_dir):
    return shared_dir / "weights"


def _frozen(model):
    return not model.training and not any(p.requires_grad for p in model.parameters())


# ----- the real checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("name, arch, classes, meta", [
    (L2T, "l2t_resnet32", 200, {"num_classes": 200, "epoch": 104, "best": 49.27, "test_prec": 49.15}),
    (AKA20, "resnet20", 10, {"best_prec1": pytest.approx(91.78, abs=0.01)}),
    (AKA32, "resnet32", 10, {"best_prec1": pytest.approx(92.78, abs=0.01)}),
])
def test_real_checkpoints_load_strictly(weights, name, arch, classes, meta):
    sd, got = read_checkpoint(weights / name)
    assert got == meta
    assert not any(k.startswith("module.") for k in sd) and guess_arch(sd) == arch
    model, got = load_source(str(weights / name), arch)
    assert model.num_classes == classes and got == meta and _frozen(model)
    for k, v in model.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k


def test_wrong_depth_lists_keys_and_suggests_arch(weights):
    with pytest.raises(CheckpointError) as err:
        load_source(weights / AKA20, "resnet32")
    msg = str(err.value)
    assert AKA20 in msg and "60 missing keys" in msg and "layer1.3.conv1.weight" in msg
    assert "unexpected" not in msg and "arch 'resnet20'" in msg


def test_wrong_family_lists_unexpected_keys(weights):
    with pytest.raises(CheckpointError) as err:
        load_source(weights / L2T, "resnet32")
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "block1.conv1.weight" in msg
    assert "'l2t_resnet32'" in msg


def test_wrong_num_classes_lists_shapes(weights):
    with pytest.raises(CheckpointError) as err:
        load_source(weights / AKA20, "resnet20", num_classes=100)
    msg = str(err.value)
    assert "linear.weight (10, 64) in checkpoint vs (100, 64) in model" in msg and "num_classes" in msg


def _tiny_imagenet(root, n):
    """The first n validation images, 64->32 bilinear, ImageNet-normalised; labels index the
    *sorted* wnids (the official code read the classes through torchvision's ImageFolder)."""
    wnids = sorted((root / "wnids.txt").read_text().split())
    rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines()][:n]
    images = [np.asarray(Image.open(root / "val" / "images" / r[0]).convert("RGB").resize((32, 32), Image.BILINEAR),
                         np.float32) for r in rows]
    x = torch.from_numpy((np.stack(images) / 255 - MEAN) / STD).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([wnids.index(r[1]) for r in rows])


def _top1(model, x, y):
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 250]) for i in range(0, len(x), 250)]).argmax(1)
    return 100.0 * (pred == y).float().mean().item()


def test_golden_tinyimagenet_accuracy(shared_dir, weights):
    """49.13% on all 10k (the checkpoint records 49.15%); the first 1000 measure 47.1%."""
    model, _ = load_source(weights / L2T, "l2t_resnet32")
    x, y = _tiny_imagenet(shared_dir / "data" / "tiny-imagenet-200", 1000)
    assert abs(_top1(model, x, y) - 47.1) <= 1.0


def test_golden_cifar10_accuracy(shared_dir, weights):
    """akamaster ResNet20 on the exact CIFAR-10 test subset: 91.64% (1017 images), published 91.7%.
    Read with pyarrow directly so the check does not depend on the project's data readers."""
    import pyarrow.parquet as pq

    table = pq.read_table(shared_dir / "data" / "cifar10-exact-subset" / "test.parquet").to_pydict()
    images = [np.asarray(Image.open(io.BytesIO(im["bytes"])).convert("RGB"), np.float32) for im in table["image"]]
    x = torch.from_numpy((np.stack(images) / 255 - MEAN) / STD).permute(0, 3, 1, 2).contiguous()
    model, _ = load_source(weights / AKA20, "resnet20")
    assert abs(_top1(model, x, torch.tensor(table["label"])) - 91.64) <= 0.5


# ----- our format and plain state_dicts -----------------------------------------------------

def test_own_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("vgg9_bn", 5).eval()
    path = tmp_path / "sub" / "src.pt"
    save_model_checkpoint(path, model, "vgg9_bn", meta={"best_val_acc": 71.5, "note": "x"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["arch"] == "vgg9_bn" and raw["num_classes"] == 5
    assert set(raw) == {"format", "arch", "num_classes", "state_dict", "meta"}
    sd, meta = read_checkpoint(path)
    assert meta == {"best_val_acc": 71.5, "note": "x", "format": FORMAT, "arch": "vgg9_bn", "num_classes": 5}
    loaded, _ = load_source(str(path), "vgg9_bn")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert _frozen(loaded) and not list(tmp_path.glob("sub/*.tmp"))


def test_training_checkpoint_serves_as_source(tmp_path):
    model = build_model("resnet20", 3)
    trainer = {"job": {"name": "r"}, "rng": {"torch": torch.get_rng_state()}, "history": [{"epoch": 1}]}
    torch.save({"format": FORMAT, "arch": "resnet20", "num_classes": 3, "state_dict": model.state_dict(),
                "meta": {"epoch": 1}, "trainer": trainer}, tmp_path / "last.pt")
    loaded, meta = load_source(tmp_path / "last.pt", "resnet20")
    assert loaded.num_classes == 3 and meta["epoch"] == 1 and "trainer" not in meta


def test_own_format_refuses_other_arch(tmp_path):
    save_model_checkpoint(tmp_path / "a.pt", build_model("resnet20", 3), "resnet20")
    with pytest.raises(CheckpointError, match="saved from arch 'resnet20' but arch 'resnet32'"):
        load_source(tmp_path / "a.pt", "resnet32")


def test_unknown_format_version(tmp_path):
    torch.save({"format": "l2t-dist/v9", "state_dict": {}}, tmp_path / "v9.pt")
    with pytest.raises(CheckpointError, match="l2t-dist/v9"):
        read_checkpoint(tmp_path / "v9.pt")


@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_plain_state_dict_infers_num_classes(tmp_path, prefix):
    torch.manual_seed(1)
    model = build_model("l2t_resnet20", 6).eval()
    torch.save(OrderedDict((prefix + k, v) for k, v in model.state_dict().items()), tmp_path / "plain.pt")
    sd, meta = read_checkpoint(tmp_path / "plain.pt")
    assert meta == {} and set(sd) == set(model.state_dict())
    loaded, _ = load_source(tmp_path / "plain.pt", "l2t_resnet20")
    assert loaded.num_classes == 6
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_pickled_module_needs_the_unsafe_opt_in(tmp_path):
    """A whole pickled model can only be read by full unpickling: refused by default, naming
    the opt-in; accepted with it."""
    model = build_model("resnet20", 4)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="CifarResNet.*allow_unsafe_pickle.*--allow-unsafe-pickle"):
        load_source(tmp_path / "whole.pt", "resnet20")
    loaded, _ = load_source(tmp_path / "whole.pt", "resnet20", allow_unsafe_pickle=True)
    assert loaded.num_classes == 4
    torch.testing.assert_close(loaded.linear.weight, model.linear.weight)


def test_missing_bn_counters_are_tolerated():
    """akamaster's checkpoints predate BN's num_batches_tracked."""
    model = build_model("resnet20", 10)
    sd = {k: v for k, v in build_model("resnet20", 10).state_dict().items() if not k.endswith("num_batches_tracked")}
    load_state_strict(model, sd)
    torch.testing.assert_close(model.linear.weight, sd["linear.weight"])


def test_load_state_strict_message_truncates_long_lists():
    with pytest.raises(CheckpointError) as err:
        load_state_strict(build_model("resnet110", 10), build_model("resnet20", 10).state_dict())
    msg = str(err.value)
    assert "missing keys" in msg and "more" in msg and "'resnet20'" in msg and len(msg) < 2000


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"not a checkpoint at all", "cannot be read"),
    ({"epoch": 3, "lr": 0.1}, "not a recognised format"),
    ({"fc.bias": torch.zeros(2)}, "missing keys"),
    ({"foo.weight": torch.zeros(2, 2)}, "number of classes"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as err:
        load_source(path, "l2t_resnet20", num_classes=2 if isinstance(content, dict) and "fc.bias" in content else None)
    assert str(path) in str(err.value)


def test_directory_and_truncated_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    save_model_checkpoint(tmp_path / "ok.pt", build_model("resnet20", 3), "resnet20")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*cannot be read"):
        read_checkpoint(tmp_path / "cut.pt")


def test_unknown_arch_is_a_config_error(tmp_path):
    save_model_checkpoint(tmp_path / "a.pt", build_model("resnet20", 3), "resnet20")
    with pytest.raises(ConfigError, match="resnet21"):
        load_source(tmp_path / "a.pt", "resnet21")


@pytest.mark.parametrize("builder, arch", [("resnet50", "tv:resnet50"), ("resnext50_32x4d", "tv:resnext50_32x4d"),
                                           ("wide_resnet50_2", "tv:wide_resnet50_2"), ("resnet34", "resnet34")])
def test_guess_arch_names_torchvision_resnets(builder, arch):
    """From the key layout and shapes alone (built on the meta device: no memory, no time)."""
    import torchvision.models as tvm

    with torch.device("meta"):
        sd = getattr(tvm, builder)(weights=None).state_dict()
    assert guess_arch(sd) == arch


def test_num_classes_from_library_classifier_names():
    from l2t_dist.sources.zoo import infer_num_classes

    def sd(*keys):
        return {k: torch.zeros(5, 8) for k in keys}

    assert infer_num_classes(sd("classifier.0.weight", "classifier.3.weight"), {}) == 5  # the last Linear
    assert infer_num_classes({"classifier.0.weight": torch.zeros(9, 8), "classifier.6.weight": torch.zeros(3, 9)},
                             {}) == 3
    assert infer_num_classes(sd("heads.head.weight"), {}) == 5 and infer_num_classes(sd("head.fc.weight"), {}) == 5
    odd = {"classif.weight": torch.zeros(4, 2)}  # timm's inception_resnet_v2 names its classifier so
    assert infer_num_classes(odd, {}) is None and infer_num_classes(odd, {}, "timm:inception_resnet_v2") == 4
    assert infer_num_classes({"x.weight": torch.zeros(4, 2)}, {"num_classes": 12}) == 12
