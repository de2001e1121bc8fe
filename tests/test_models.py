"""Architectures and their taps: names, shapes, early stop, spec resolution, key layouts."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from tiny_setup import leaf_calls

from l2t_dist.errors import ConfigError
from l2t_dist.models import ARCH_NAMES, Tap, TappedModel, build_model

CLASSIFIER = {**dict.fromkeys(["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"], "linear"),
              **dict.fromkeys(["l2t_resnet20", "l2t_resnet32", "resnet18", "resnet34"], "fc"), "vgg9_bn": "classifier",
              "vgg9": "classifier"}


def cifar_resnet_taps(n):
    return [(f"layer{s}.{i}", c, h) for s, c, h in ((1, 16, 32), (2, 32, 16), (3, 64, 8)) for i in range(n)]


def l2t_taps(n):
    return [(f"block{k}", c, h) for k, (c, h) in enumerate(
        [(16, 32)] * (n + 1) + [(32, 16)] * (n + 1) + [(64, 8)] * (n + 1))]


# (name, channels, height) at a 32x32 input
EXPECTED_32 = {
    "resnet20": cifar_resnet_taps(3), "resnet32": cifar_resnet_taps(5), "resnet44": cifar_resnet_taps(7),
    "resnet56": cifar_resnet_taps(9), "resnet110": cifar_resnet_taps(18),
    "l2t_resnet20": l2t_taps(2), "l2t_resnet32": l2t_taps(4),
    "vgg9_bn": [("stage0", 64, 32), ("stage1", 128, 16), ("stage2", 256, 8), ("stage3", 512, 4), ("stage4", 512, 2)],
    "resnet18": [("stem", 64, 8), ("layer1", 64, 8), ("layer2", 128, 4), ("layer3", 256, 2), ("layer4", 512, 1)],
}
EXPECTED_32["resnet34"] = EXPECTED_32["resnet18"]
EXPECTED_32["vgg9"] = EXPECTED_32["vgg9_bn"]  # the same network without batch norm
TV_224 = [("stem", 64, 56), ("layer1", 64, 56), ("layer2", 128, 28), ("layer3", 256, 14), ("layer4", 512, 7)]

_cache: dict = {}


def model(arch, num_classes=7):
    """Models are built once per test session (resnet110/resnet34 are not free to build)."""
    if (arch, num_classes) not in _cache:
        torch.manual_seed(0)
        _cache[arch, num_classes] = build_model(arch, num_classes)
    return _cache[arch, num_classes]


def test_arch_names_cover_the_contract():
    assert set(ARCH_NAMES) == set(EXPECTED_32)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_taps_and_shapes_at_32(arch):
    m = model(arch)
    assert isinstance(m, TappedModel) and m.arch == arch and m.num_classes == 7
    expected = EXPECTED_32[arch]
    assert m.tap_names() == [name for name, _, _ in expected]
    assert m.tap_shapes(32) == [(name, c, h, h) for name, c, h in expected]
    assert all(isinstance(t, Tap) for t in m.taps)
    # Tap.stride is relative to the input; the CIFAR nets and VGG are stated at 32x32.
    ref = 224 if arch in ("resnet18", "resnet34") else 32
    assert [(t.channels, t.stride) for t in m.taps] == [(c, ref // h) for _, c, h in
                                                        (TV_224 if ref == 224 else expected)]
    x = torch.randn(2, 3, 32, 32)
    logits, feats = m.forward_taps(x, m.tap_names(), logits=True, embedding=True)
    assert logits.shape == (2, 7)
    assert {k: tuple(v.shape) for k, v in feats.items() if k != "embedding"} == \
        {name: (2, c, h, h) for name, c, h in expected}
    assert feats["embedding"].shape == (2, m.embedding_dim)
    assert m.embedding_dim == expected[-1][1]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_torchvision_taps_at_224(arch):
    m = model(arch)
    assert m.tap_shapes(224) == [(n, c, h, h) for n, c, h in TV_224]
    _, feats = m.eval().forward_taps(torch.randn(1, 3, 224, 224), ["stem", "layer4"], logits=False)
    m.train()
    assert feats["stem"].shape == (1, 64, 56, 56) and feats["layer4"].shape == (1, 512, 7, 7)




@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_forward_taps_stops_at_deepest_requested_tap(arch):
    m = model(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    names = m.tap_names()
    mid = names[len(names) // 2]
    full = leaf_calls(m, lambda: m(x))
    upto_first = leaf_calls(m, lambda: m.forward_taps(x, [names[0]], logits=False))
    upto_mid = leaf_calls(m, lambda: m.forward_taps(x, [names[0], mid], logits=False))
    upto_last = leaf_calls(m, lambda: m.forward_taps(x, [names[-1]], logits=False))
    assert len(upto_first) < len(upto_mid) < len(upto_last) < len(full)
    assert full[:len(upto_mid)] == upto_mid  # a prefix of the full run, nothing more
    classifier = CLASSIFIER[arch]
    assert classifier in full and classifier not in upto_last
    # nothing requested, nothing wanted: nothing runs
    assert leaf_calls(m, lambda: m.forward_taps(x, [], logits=False)) == []
    assert m.forward_taps(x, [], logits=False) == (None, {})
    m.train()


def test_early_stop_named_modules():
    """The concrete statement for the paper's source: asking for block4 never runs stage 2 or 3."""
    m = model("l2t_resnet32").eval()
    ran = set(leaf_calls(m, lambda: m.forward_taps(torch.randn(1, 3, 32, 32), ["block4"], logits=False)))
    assert any(n.startswith("blocks2.3.") for n in ran)
    assert not any(n.split(".")[0] in ("block3", "blocks4", "block5", "blocks6", "fc") for n in ran)
    r20 = model("resnet20").eval()
    ran = set(leaf_calls(r20, lambda: r20.forward_taps(torch.randn(1, 3, 32, 32), ["layer2.0"], logits=False)))
    assert "layer2.0.conv2" in ran and not any(n.startswith(("layer2.1", "layer2.2", "layer3", "linear")) for n in ran)
    m.train(), r20.train()


@pytest.mark.parametrize("arch", ["resnet20", "l2t_resnet20", "vgg9_bn"])
def test_taps_logits_and_embedding_agree(arch):
    m = model(arch).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, feats = m.forward_taps(x, ["0", 2], logits=True, embedding=True)
    names = m.tap_names()
    assert list(feats) == [names[0], names[2], "embedding"]
    torch.testing.assert_close(logits, m(x))
    torch.testing.assert_close(m.get_submodule(CLASSIFIER[arch])(
        feats["embedding"]), logits)
    none, only_emb = m.forward_taps(x, [names[1]], logits=False, embedding=True)
    assert none is None and set(only_emb) == {names[1], "embedding"}
    torch.testing.assert_close(only_emb["embedding"], feats["embedding"])
    _, early = m.forward_taps(x, [names[2]], logits=False)
    torch.testing.assert_close(early[names[2]], feats[names[2]])
    m.train()


def test_resolve_taps():
    m = model("l2t_resnet32")
    assert m.resolve_taps(["4", 9, "block14"]) == ["block4", "block9", "block14"]
    assert m.resolve_taps([" 3", "block3", 3]) == ["block3"]  # duplicates dropped, spaces ignored
    assert m.resolve_taps("block0") == ["block0"] and m.resolve_taps(14) == ["block14"]
    assert m.resolve_taps([]) == []
    for bad in ["block15", 15, "15", -1, "-1", "layer1.0", True, None, 2.0]:
        with pytest.raises(ConfigError) as err:
            m.resolve_taps([bad])
        msg = str(err.value)
        assert repr(bad) in msg and "block0" in msg and "block14" in msg and "0-14" in msg
    assert model("vgg9_bn").resolve_taps(["stage4", "0"]) == ["stage4", "stage0"]
    with pytest.raises(ConfigError, match="layer1.0.*layer3.2"):
        model("resnet20").resolve_taps(["block3"])


def test_forward_taps_resolves_specs_and_rejects_unknown():
    m = model("vgg9_bn").eval()
    _, feats = m.forward_taps(torch.randn(1, 3, 32, 32), [1], logits=False)
    assert list(feats) == ["stage1"]
    with pytest.raises(ConfigError, match="stage9"):
        m.forward_taps(torch.randn(1, 3, 32, 32), ["stage9"])
    m.train()


def test_build_model_errors():
    with pytest.raises(ConfigError) as err:
        build_model("resnet21", 10)
    assert "resnet21" in str(err.value) and all(a in str(err.value) for a in ARCH_NAMES)
    for bad in (0, -3, "10", 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            build_model("resnet20", bad)


def test_tap_shapes_other_sizes_and_too_small():
    assert model("resnet20").tap_shapes(16)[-1] == ("layer3.2", 64, 4, 4)
    assert model("l2t_resnet32").tap_shapes((64, 48))[-1] == ("block14", 64, 16, 12)
    assert model("vgg9_bn").tap_shapes(16)[-1] == ("stage4", 512, 1, 1)  # ceil-mode pools
    assert model("vgg9_bn").tap_shapes(4)[-1] == ("stage4", 512, 1, 1)
    for bad in (0, -32, (32,), "32", 3.5):
        with pytest.raises(ConfigError, match="image size"):
            model("resnet20").tap_shapes(bad)


def test_tap_shapes_leaves_state_and_mode_alone():
    m = build_model("resnet20", 3)
    m.train()
    m.layer2.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.tap_shapes(40)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.training and m.layer1.training and not m.layer2.training and not m.layer2[0].bn1.training


@pytest.mark.parametrize("arch", ["resnet32", "l2t_resnet20", "vgg9_bn"])
def test_pickle_deepcopy_and_functional_call(arch):
    m = model(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x), ref)
        assert clone.tap_names() == m.tap_names()
    params = {k: v * 0.5 for k, v in m.named_parameters()}
    scaled = copy.deepcopy(m)
    with torch.no_grad():
        for _, p in scaled.named_parameters():
            p.mul_(0.5)
    out = torch.func.functional_call(m, params, (x,))
    torch.testing.assert_close(out, scaled(x))
    m.train()


def test_double_backward_through_taps():
    """The hyper-gradient differentiates through a gradient step of the target."""
    m = build_model("l2t_resnet20", 4)
    x = torch.randn(4, 3, 16, 16)
    logits, feats = m.forward_taps(x, ["block2"], embedding=True)
    loss = logits.logsumexp(1).mean() + feats["block2"].pow(2).mean()
    grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), m.conv1.weight)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_cifar_resnet_shortcuts_are_option_a():
    m = model("resnet56")
    assert not any("shortcut" in k for k in m.state_dict())
    assert m.layer2[0].shortcut.pad == 8 and m.layer3[0].shortcut.pad == 16


def test_l2t_resnet_layout():
    m = model("l2t_resnet32", 200)
    sd = m.state_dict()
    assert {k.split(".")[0] for k in sd} == {"conv1", "bn1", "block1", "blocks2", "block3", "blocks4", "block5",
                                             "blocks6", "fc"}
    assert sd["conv1.bias"].shape == (16,)  # the stem conv has a bias in the official code
    assert sd["block3.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["block5.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert sum(k.endswith("conv1.weight") for k in sd) == 16 and "blocks2.3.bn2.weight" in sd
    assert sum(p.numel() for p in m.parameters()) == 479_272  # as in the released checkpoint
    assert {k.split(".")[0] for k in model("l2t_resnet20").state_dict()} >= {"blocks2", "blocks6"}
    assert "blocks2.2.conv1.weight" not in model("l2t_resnet20").state_dict()


def test_vgg_layout():
    sd = model("vgg9_bn").state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3) and "features.0.bias" in sd
    assert sd["classifier.weight"].shape == (7, 512)
    assert sum(k.endswith("running_mean") for k in sd) == 8


def test_torchvision_state_dicts_load_strictly():
    from torchvision.models import resnet18

    tv = resnet18(weights=None, num_classes=7).eval()
    ours = build_model("resnet18", 7).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), tv(x))


def test_models_import_is_light():
    code = ("import sys; import l2t_dist.models as m; assert 'torchvision' not in sys.modules, 'torchvision'; "
            "m.build_model('resnet20', 10); assert 'torchvision' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
