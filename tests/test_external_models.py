"""torchvision and timm models as sources and targets (`tv:<name>`, `timm:<name>`).

They must keep the contract of the built-in models (models/taps.py), keep the library's
parameter names and forward (so the library's checkpoints load strictly and give the same
logits), stop at the deepest wanted tap, and work under torch.func.functional_call. Built
with no network at all: nothing is ever downloaded.
"""

import copy
import json
import math
import pickle
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torchvision.models as tvm
from safetensors.torch import save_file
from tiny_setup import leaf_calls
from torch import nn

from l2t_dist.cli import main
from l2t_dist.config import parse_job
from l2t_dist.errors import CheckpointError, ConfigError
from l2t_dist.method import FunctionalModule
from l2t_dist.models import Tap, TappedModel, build_model
from l2t_dist.models.tv_models import tap_torchvision
from l2t_dist.sources.colocated import default_taps
from l2t_dist.sources.zoo import load_source, save_model_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["tv:resnet18", "tv:mobilenet_v3_small", "tv:squeezenet1_1", "tv:regnet_x_400mf",
         "timm:resnet10t", "timm:mobilenetv3_small_050", "timm:efficientnet_b0"]
_cache: dict = {}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: building never downloads."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def model(arch, num_classes=7):
    if (arch, num_classes) not in _cache:
        torch.manual_seed(0)
        _cache[arch, num_classes] = build_model(arch, num_classes).eval()
    return _cache[arch, num_classes]


def library_twin(arch, num_classes=7):
    """The same network as the library itself builds it, with our model's weights."""
    lib, name = arch.split(":")
    net = tvm.get_model(name, weights=None, num_classes=num_classes) if lib == "tv" else \
        timm.create_model(name, pretrained=False, num_classes=num_classes)
    net.load_state_dict(model(arch, num_classes).state_dict(), strict=True)
    return net.eval()




# ----- the tap contract ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", SMALL)
def test_contract_and_library_equivalence(arch):
    m = model(arch)
    assert isinstance(m, TappedModel) and m.arch == arch and m.num_classes == 7
    assert all(isinstance(t, Tap) for t in m.taps) and len(set(m.tap_names())) == len(m.taps) >= 3
    strides = [t.stride for t in m.taps]
    assert strides == sorted(strides) and strides[-1] in (16, 32)  # shallow to deep (SqueezeNet: 1/16)
    shapes = m.tap_shapes(64)
    assert [s[0] for s in shapes] == m.tap_names()
    assert [c for _, c, _, _ in shapes] == [t.channels for t in m.taps]
    assert [round(math.log2(64 / h)) for _, _, h, _ in shapes] == [math.log2(t.stride) for t in m.taps]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = m.forward_taps(x, m.tap_names(), logits=True, embedding=True)
        torch.testing.assert_close(logits, library_twin(arch)(x))  # same names, same forward
        torch.testing.assert_close(m(x), logits)
    assert {k: tuple(v.shape) for k, v in feats.items() if k != "embedding"} == \
        {n: (2, c, h, w) for n, c, h, w in shapes}
    assert list(feats) == m.tap_names() + ["embedding"] and feats["embedding"].shape == (2, m.embedding_dim)


@pytest.mark.parametrize("arch", ["tv:resnet18", "timm:resnet10t"])
def test_embedding_feeds_the_classifier(arch):
    m = model(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = m.forward_taps(x, [], logits=True, embedding=True)
        torch.testing.assert_close(m.fc(feats["embedding"]), logits)
        none, only = m.forward_taps(x, [1], logits=False, embedding=True)
    assert none is None and set(only) == {m.tap_names()[1], "embedding"}
    torch.testing.assert_close(only["embedding"], feats["embedding"])


@pytest.mark.parametrize("arch", ["tv:resnet18", "tv:mobilenet_v3_small", "timm:resnet10t", "timm:efficientnet_b0"])
def test_forward_taps_stops_at_the_deepest_requested_tap(arch):
    m = model(arch)
    x = torch.randn(2, 3, 32, 32)
    names = m.tap_names()
    full = leaf_calls(m, lambda: m(x))
    first = leaf_calls(m, lambda: m.forward_taps(x, [names[1]], logits=False))
    mid = leaf_calls(m, lambda: m.forward_taps(x, [names[1], names[len(names) // 2]], logits=False))
    last = leaf_calls(m, lambda: m.forward_taps(x, [names[-2]], logits=False))
    assert len(first) < len(mid) < len(last) < len(full)
    assert full[:len(mid)] == mid  # a prefix of the full run, nothing more
    head = {"tv:mobilenet_v3_small": "classifier.3", "timm:efficientnet_b0": "classifier"}.get(arch, "fc")
    assert head in full and head not in last
    assert leaf_calls(m, lambda: m.forward_taps(x, [], logits=False)) == [] and m.forward_taps(x, []) [0] is not None
    with torch.no_grad():
        _, early = m.forward_taps(x, [names[1]], logits=False)
        _, every = m.forward_taps(x, names, logits=False)
    torch.testing.assert_close(early[names[1]], every[names[1]])


@pytest.mark.parametrize("arch", ["tv:resnet18", "timm:resnet10t"])
def test_functional_call_pickle_and_deepcopy(arch):
    m = model(arch)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is type(m) and clone.tap_names() == m.tap_names()
        torch.testing.assert_close(clone(x), ref)
    scaled = copy.deepcopy(m)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(0.5)
    params = {k: v * 0.5 for k, v in m.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(m, params, (x,)), scaled(x))

    class Taps(nn.Module):  # forward_taps under functional_call: the hooks see the swapped weights
        def __init__(self, target):
            super().__init__()
            self.target = target

        def forward(self, x):
            return self.target.forward_taps(x, [1, 3], logits=False)[1]

    got = FunctionalModule(Taps(m), ["target." + k for k in params])(list(params.values()), x)
    want = Taps(scaled)(x)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)
    torch.testing.assert_close(m(x), ref)  # the real weights were never touched


@pytest.mark.parametrize("arch", ["tv:resnet18", "timm:resnet10t"])
def test_double_backward_and_forward_mode_through_taps(arch):
    m = build_model(arch, 4).double()
    for name, mod in list(m.named_modules()):  # smooth, so that finite differences hold (ENV.md)
        if isinstance(mod, nn.ReLU):
            m.set_submodule(name, nn.Softplus())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    names = m.tap_names()
    logits, feats = m.forward_taps(x, [names[2]], embedding=True)
    loss = logits.logsumexp(1).mean() + feats[names[2]].pow(2).mean()
    grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), next(m.parameters()))[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0
    # forward mode (the engine's first mixed product) through functional_call and the hooks
    params = dict(m.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    buffers = dict(m.named_buffers())

    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_taps(x, [names[2]], logits=False)[1][names[2]]

    wrapper = Tapped()

    def tap(*values):
        state = {**{"m." + k: b.clone() for k, b in buffers.items()}, **{"m." + k: v for k, v in zip(params, values)}}
        return torch.func.functional_call(wrapper, state, (x,))

    m.eval()  # a deterministic function for the finite difference
    jvp = torch.func.jvp(tap, tuple(params.values()), tuple(tangents.values()))[1].detach()
    eps = 1e-6
    with torch.no_grad():
        up = tap(*(p + eps * tangents[k] for k, p in params.items()))
        down = tap(*(p - eps * tangents[k] for k, p in params.items()))
    fd = (up - down) / (2 * eps)
    assert float((jvp - fd).norm() / fd.norm()) < 1e-8


def test_taps_of_token_and_channels_last_models():
    """ViT tokens (class token dropped) and Swin's NHWC maps become (B, C, H, W) maps."""
    torch.manual_seed(0)
    vit = tap_torchvision(tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5), "tv:vit_test", 5).eval()
    assert vit.tap_names() == ["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert vit.tap_shapes(32) == [(n, 16, 4, 4) for n in vit.tap_names()]
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    h = vit.encoder.layers[1].register_forward_hook(lambda _m, _a, out: seen.setdefault("t", out))
    with torch.no_grad():
        logits, feats = vit.forward_taps(x, [2], logits=True, embedding=True)
    h.remove()
    tokens = seen["t"]  # (B, 1 + 16, 16)
    torch.testing.assert_close(feats[vit.tap_names()[2]], tokens[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))
    torch.testing.assert_close(vit.heads.head(feats["embedding"]), logits)
    from torchvision.models.swin_transformer import SwinTransformer

    swin = tap_torchvision(SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                           window_size=[2, 2], num_classes=5), "tv:swin_test", 5).eval()
    assert [(t.channels, t.stride) for t in swin.taps] == [(8, 4), (8, 4), (16, 8), (16, 8)]
    with torch.no_grad():
        _, feats = swin.forward_taps(x, [3], logits=False)
        torch.testing.assert_close(feats["features.3"], swin.features(x).permute(0, 3, 1, 2))


def test_a_map_the_library_overwrites_in_place_is_kept_as_it_was():
    """DenseNet applies an in-place ReLU to features.norm5 after `features`: the tap keeps the norm's output."""
    m = model("tv:densenet121")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = m.forward_taps(x, ["features.norm5"], logits=True)
        ref = m.features(x)
    torch.testing.assert_close(feats["features.norm5"], ref)
    assert float(ref.min()) < 0  # what a ReLU would have removed


# ----- taps by index, name and module path ----------------------------------------------------

def test_module_path_taps():
    m = build_model("tv:resnet18", 7).eval()
    before = m.tap_names()
    assert m.resolve_taps([4, "layer2", "layer3.0.conv1", " layer2.1 "]) == \
        ["layer1", "layer2", "layer3.0.conv1", "layer2.1"]
    names = m.tap_names()
    assert names.index("layer2.1") < names.index("layer2") < names.index("layer3.0.conv1") < names.index("layer3")
    assert [n for n in names if n in before] == before  # added in run order, the others unchanged
    assert m.taps[names.index("layer3.0.conv1")] == Tap("layer3.0.conv1", 256, 16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = m.forward_taps(x, ["layer3.0.conv1"], logits=False)
        ran = leaf_calls(m, lambda: m.forward_taps(x, ["layer3.0.conv1"], logits=False))
        seen = {}
        h = m.layer3[0].conv1.register_forward_hook(lambda _m, _a, out: seen.setdefault("y", out))
        m(x)
        h.remove()
    torch.testing.assert_close(feats["layer3.0.conv1"], seen["y"])
    assert ran[-1] == "layer3.0.conv1" and "layer3.0.bn1" not in ran
    assert default_taps(m) == ["relu", "layer1", "layer2", "layer3", "layer4"]  # stage ends, not the extras
    m.extra = nn.Conv2d(3, 3, 1)
    for spec, match in [("layer2.1.relu", "runs 2 times"), ("fc", r"shape \[1, 7\], not a"),
                        ("extra", "does not run"), ("layer9", "unknown tap 'layer9'.*layer4.*module path"),
                        (99, "index 0-"), (True, "unknown tap True")]:
        with pytest.raises(ConfigError, match=match):
            m.resolve_taps([spec])


def test_a_served_source_skeleton_knows_its_module_taps():
    """In served mode a worker rebuilds each source from its arch and the taps its actor resolved."""
    from l2t_dist.sources.colocated import LoadedSource

    skeleton = LoadedSource("s", "tv:resnet18", build_model("tv:resnet18", 7).eval(), ["layer2.1", "layer3"])
    assert "layer2.1" in skeleton.model.tap_names()
    assert ("layer2.1", 128, 4, 4) in skeleton.model.tap_shapes(32)


def test_timm_module_path_taps_keep_the_early_stop():
    m = build_model("timm:efficientnet_b0", 7).eval()
    assert m.resolve_taps(["blocks.3", "conv_head", "blocks.1"]) == ["blocks.3", "conv_head", "blocks.1"]
    assert m.tap_names() == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.6", "conv_head"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, every = m.forward_taps(x, m.tap_names(), logits=True)
        for group in (["blocks.3"], ["blocks.1", "blocks.3"], ["blocks.0", "conv_head"]):
            _, some = m.forward_taps(x, group, logits=False)
            assert list(some) == group and all(torch.equal(some[n], every[n]) for n in group)
    ran = leaf_calls(m, lambda: m.forward_taps(x, ["blocks.1", "blocks.3"], logits=False))
    assert any(n.startswith("blocks.3.") for n in ran) and not any(n.startswith("blocks.5.") for n in ran)


def test_timm_taps_come_from_feature_info():
    m = model("timm:mobilenetv3_small_050")
    info = m.feature_info
    assert [(t.name, t.channels, t.stride) for t in m.taps] == \
        [(f["module"], f["num_chs"], f["reduction"]) for f in info]
    assert m.embedding_dim == m.head_hidden_size == 1024


# ----- names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, match", [
    ("tv:resnet5", "unknown torchvision model 'resnet5'.*close matches: tv:resnet50"),
    ("tv:mobilenet_v3_larg", "tv:mobilenet_v3_large"),
    ("timm:efficientnet_b", r"unknown timm model 'efficientnet_b'.*close matches: timm:efficientnet_b\d"),
    ("timm:resnet50.nope", "no configuration 'nope'.*a1_in1k"),
    ("torchvision:resnet50", "unknown architecture.*tv:NAME"),
    ("resnet21", "close matches:.*resnet20.*tv:NAME.*timm:NAME"),
])
def test_unknown_names_list_close_matches(arch, match):
    with pytest.raises(ConfigError, match=match):
        build_model(arch, 10)
    with pytest.raises(ConfigError, match=match):
        parse_job({"method": {"name": "scratch"}, "target": {"arch": arch}})


def test_config_accepts_library_names_and_stays_light():
    job = parse_job({"sources": [{"name": "s", "arch": "timm:resnet10t", "checkpoint": "x.safetensors"}],
                     "target": {"arch": "tv:resnet18", "taps": ["layer2", "layer3.0.conv1"]}})
    assert job.target.arch == "tv:resnet18" and job.sources[0].allow_unsafe_pickle is False
    code = ("import sys; import l2t_dist.config as c; import l2t_dist.models\n"
            "c.parse_job({'method': {'name': 'scratch'}, 'target': {'arch': 'resnet20'}})\n"
            "assert not {'torch', 'timm', 'torchvision'} & set(sys.modules), 'imported too early'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ----- checkpoints on disk ------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torchvision_state_dict_loads_strictly(tmp_path, legacy):
    """What `torch.save(resnet.state_dict(), 'resnet34-b627a593.pth')` wrote, at our class count."""
    torch.manual_seed(2)
    tv = tvm.resnet18(weights=None, num_classes=7).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    loaded, meta = load_source(path, "tv:resnet18")
    assert loaded.num_classes == 7 and meta == {} and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tv(x))
    with pytest.raises(CheckpointError, match="missing keys.*layer1.2.conv1.weight.*arch 'resnet18'"):
        load_source(path, "tv:resnet34")
    with pytest.raises(CheckpointError, match="unexpected keys.*layer1.0.conv1.weight"):
        load_source(path, "timm:mobilenetv3_small_050")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_weights_load_strictly(tmp_path, suffix):
    torch.manual_seed(3)
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=9).eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(net.state_dict(), str(path))
    else:
        torch.save(net.state_dict(), path)  # pytorch_model.bin
    loaded, _ = load_source(path, "timm:convnext_atto")  # num_classes from head.fc (timm's config)
    assert loaded.num_classes == 9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(CheckpointError, match=r"head.fc.weight \(9, 320\) in checkpoint vs \(4, 320\).*num_classes"):
        load_source(path, "timm:convnext_atto", num_classes=4)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.*cannot be read"):
        load_source(tmp_path / "cut.safetensors", "timm:convnext_atto")


def test_own_format_round_trip_and_other_arch(tmp_path):
    m = build_model("timm:resnet10t", 3).eval()
    save_model_checkpoint(tmp_path / "a.pt", m, "timm:resnet10t", meta={"note": "x"})
    loaded, meta = load_source(tmp_path / "a.pt", "timm:resnet10t")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert meta["arch"] == "timm:resnet10t"
    with pytest.raises(CheckpointError, match="saved from arch 'timm:resnet10t' but arch 'tv:resnet18'"):
        load_source(tmp_path / "a.pt", "tv:resnet18")


# ----- the CLI and a training run -------------------------------------------------------------

def test_sources_inspect_lists_timm_taps_at_224(capsys):
    assert main(["sources", "inspect", "--arch", "timm:efficientnet_b0", "--image-size", "224", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(t["name"], t["channels"], t["height"], t["width"], t["stride"]) for t in report["taps"]] == [
        ("blocks.0", 16, 112, 112, 2), ("blocks.1", 24, 56, 56, 4), ("blocks.2", 40, 28, 28, 8),
        ("blocks.4", 112, 14, 14, 16), ("blocks.6", 320, 7, 7, 32)]
    assert report["embedding_dim"] == 1280 and report["num_classes"] == 10
    assert main(["sources", "inspect", "--arch", "timm:efficientnet_b0", "--image-size", "224"]) == 0
    text = capsys.readouterr().out
    assert "taps at 224x224 input:" in text and "blocks.6" in text and "7x7" in text
    assert main(["sources", "inspect", "--arch", "tv:resnet5"]) == 2
    assert "tv:resnet50" in capsys.readouterr().err


def test_training_with_library_source_and_target(tmp_path):
    """A timm source from a safetensors file (one tap by module path) into a torchvision target."""
    from l2t_dist.train.local import train_local

    torch.manual_seed(4)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=6)
    save_file(src.state_dict(), str(tmp_path / "src.safetensors"))
    job = parse_job({
        "data": {"kind": "synthetic", "path": "task=c,classes=3,per_class=8,size=32,seed=0", "batch_size": 8,
                 "eval_batch_size": 32},
        "sources": [{"name": "s", "arch": "timm:resnet10t", "checkpoint": str(tmp_path / "src.safetensors"),
                     "taps": ["layer2", "layer3.0.conv2"]}],
        "target": {"arch": "tv:resnet18", "taps": ["layer2", "layer3"]},
        "method": {"name": "l2t_ww", "T": 1, "pairs": "all_to_all"},
        "optim": {"lr": 0.05, "epochs": 1},
        "run": {"name": "r", "out_dir": str(tmp_path), "seed": 0, "threads": 1, "max_iters_per_epoch": 2},
    })
    summary = train_local(job, quiet=True)
    assert set(summary.pairs) == {f"s:{s}->{t}" for s in ("layer2", "layer3.0.conv2") for t in ("layer2", "layer3")}
    trained, meta = load_source(tmp_path / "r" / "best.pt", "tv:resnet18")  # a trained target serves as a source
    assert trained.num_classes == 3 and meta["arch"] == "tv:resnet18"


def test_timm_model_without_forward_intermediates_is_tapped_by_hooks(monkeypatch):
    """Older timm families lack the intermediate-features API: their feature_info modules are hooked."""
    from timm.models.resnet import ResNet

    with_api = model("timm:resnet10t")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits, b = with_api.forward_taps(x, with_api.tap_names(), embedding=True)
    monkeypatch.delattr(ResNet, "forward_intermediates")
    hooked = build_model("timm:resnet10t", 7).eval()
    assert not hasattr(hooked, "forward_intermediates")
    assert hooked.taps == with_api.taps
    hooked.load_state_dict(with_api.state_dict())
    with torch.no_grad():
        logits, a = hooked.forward_taps(x, hooked.tap_names(), embedding=True)
    torch.testing.assert_close(logits, ref_logits)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ran = leaf_calls(hooked, lambda: hooked.forward_taps(x, ["layer2"], logits=False))
    assert any(n.startswith("layer2.") for n in ran) and not any(n.startswith(("layer3.", "fc")) for n in ran)
