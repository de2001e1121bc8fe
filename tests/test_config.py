"""The job schema: defaults, overrides, and clear errors for every kind of bad input."""

from pathlib import Path

import pytest

from l2t_dist.config import apply_overrides, dump_job, flatten, load_job, parse_job
from l2t_dist.errors import ConfigError

SOURCE = {"name": "tin", "arch": "l2t_resnet32", "checkpoint": "x.pth"}


def test_defaults_are_the_paper_settings():
    job = parse_job({"sources": [SOURCE]})
    assert (job.method.name, job.method.beta, job.method.T, job.method.where) == ("l2t_ww", 0.5, 2, "relu6")
    assert (job.optim.lr, job.optim.momentum, job.optim.weight_decay, job.optim.epochs) == (0.1, 0.9, 1e-4, 200)
    assert (job.meta.lr, job.meta.weight_decay) == (1e-4, 1e-4)
    assert job.method.meta_interval == 1 and job.data.val_fraction == 0.1
    assert job.method.resolved_pairs() == "all_to_all"


# The paper's pairing, as golden facts: TinyImageNet ResNet32 (taps 4, 9, 14, the end of each
# stage: 16@32, 32@16, 64@8) into VGG9-bn (stage0-4: 64@32, 128@16, 256@8, 512@4, 512@2).
STAGE_ENDS = ("block4", "block9", "block14")
PAPER_PAIRS = {
    "scratch": [],
    "lwf": [],
    "fm": ["tin:block14->stage2"],                                                   # single: the deepest
    "at": ["tin:block4->stage0", "tin:block9->stage1", "tin:block14->stage2"],       # one-to-one, by size
    "l2t_w": ["tin:block4->stage0", "tin:block9->stage1", "tin:block14->stage2"],
    "l2t_ww": [f"tin:{s}->stage{t}" for s in STAGE_ENDS for t in range(5)],          # all-to-all: 15
}


@pytest.mark.parametrize("method", sorted(PAPER_PAIRS))
def test_each_method_gets_the_papers_pairs(method):
    import torch

    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource
    from l2t_dist.train.build import build_trainee

    tree = {"target": {"arch": "vgg9_bn"}, "method": {"name": method}}
    sources = []
    if method != "scratch":
        tree["sources"] = [dict(SOURCE, num_classes=200)]
        model = build_model("l2t_resnet32", 200).eval().requires_grad_(False)
        sources = [LoadedSource("tin", "l2t_resnet32", model, list(STAGE_ENDS))]
    trainee = build_trainee(parse_job(tree), 10, torch.device("cpu"), sources=sources)
    assert [p.name for p in trainee.pairs] == PAPER_PAIRS[method]
    # The source computes exactly the taps the pairs use, and its logits only for LwF.
    want = {"tin": (tuple(dict.fromkeys(p.source_tap for p in trainee.pairs)), method == "lwf")}
    assert {n: (r.taps, r.logits) for n, r in trainee.requests.items()} == (want if method != "scratch" else {})


def test_explicit_pairs_win_over_the_methods_preset():
    job = parse_job({"sources": [SOURCE], "method": {"name": "fm", "pairs": [["tin:4", "0"]]}})
    assert job.method.resolved_pairs() == [["tin:4", "0"]]
    assert parse_job({"sources": [SOURCE], "method": {"name": "at", "pairs": "all_to_all"}}
                     ).method.resolved_pairs() == "all_to_all"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("sources:\n  - {name: tin, arch: l2t_resnet32, checkpoint: x.pth}\n")
    job = load_job(path, ["method.beta=1.5", "method.T=3", "sources.0.taps=[4, 9, 14]"])
    assert job.method.beta == 1.5 and job.method.T == 3 and job.sources[0].taps == [4, 9, 14]


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        parse_job({"method": {"bta": 0.5}})
    msg = str(err.value)
    assert "method.bta" in msg and "beta" in msg and "meta_interval" in msg


def test_wrong_type_and_range():
    with pytest.raises(ConfigError, match=r"method\.T"):
        parse_job({"method": {"name": "scratch", "T": 0}})
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        parse_job({"method": {"name": "scratch"}, "optim": {"lr": "fast"}})


def test_unknown_arch_lists_allowed():
    with pytest.raises(ConfigError) as err:
        parse_job({"sources": [dict(SOURCE, arch="resnet33")]})
    assert "resnet33" in str(err.value) and "l2t_resnet32" in str(err.value)


def test_unknown_method_lists_allowed():
    with pytest.raises(ConfigError) as err:
        parse_job({"method": {"name": "l2t"}})
    assert "method.name" in str(err.value)
    assert all(f"'{m}'" in str(err.value) for m in ("scratch", "lwf", "at", "fm", "l2t_w", "l2t_ww"))


@pytest.mark.parametrize("method", ["lwf", "at", "fm", "l2t_w", "l2t_ww"])
def test_transfer_method_needs_a_source(method):
    with pytest.raises(ConfigError, match="needs at least one entry under 'sources'"):
        parse_job({"method": {"name": method}})


def test_scratch_needs_no_source_and_lwf_exactly_one():
    assert parse_job({"method": {"name": "scratch"}}).sources == []
    two = [SOURCE, dict(SOURCE, name="c10")]
    with pytest.raises(ConfigError, match="method 'lwf' takes exactly one source"):
        parse_job({"sources": two, "method": {"name": "lwf"}})
    assert len(parse_job({"sources": two, "method": {"name": "l2t_ww"}}).sources) == 2


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["method.beta"])
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")


def test_dump_roundtrip_and_flatten():
    job = parse_job({"sources": [SOURCE], "method": {"beta": 0.25}})
    import yaml
    again = parse_job(yaml.safe_load(dump_job(job)))
    assert again == job
    flat = flatten(job)
    assert flat["method.beta"] == 0.25 and flat["sources.0.arch"] == "l2t_resnet32"


def test_schema_names_match_the_registries():
    """config.py keeps its own copies (to stay import-light); they must not drift."""
    from l2t_dist import config, data, models

    assert config.ARCH_NAMES == models.ARCH_NAMES
    assert config.DATA_KINDS == data.DATA_KINDS


def test_cli_accepts_overrides_after_options():
    """`l2t-dist train JOB --quiet key=value` is how people type it; argparse alone rejects it."""
    from l2t_dist.cli import _parse, build_parser

    args = _parse(build_parser(), ["train", "jobs/cifar10_limited.yaml", "--quiet", "--json",
                                   "method.name=fm", "optim.epochs=3"])
    assert args.job == "jobs/cifar10_limited.yaml" and args.quiet and args.json
    assert args.overrides == ["method.name=fm", "optim.epochs=3"]
    with pytest.raises(SystemExit):
        _parse(build_parser(), ["train", "jobs/cifar10_limited.yaml", "--quiet", "--bogus"])


READY_JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
# the pairs each ready job's taps give: the paper's 224 jobs and the timm -> torchvision one pair
# four source stages with the target's layer1-4 (16); the 32x32 ones, three taps with VGG9's five
PAIR_COUNTS = {"cifar10_limited": 15, "multi_source": 30, "stl10_paper": 15, "cub200_paper": 16, "dogs_paper": 16,
               "mit67_paper": 16, "stanford40_paper": 16, "timm_to_torchvision": 16}


@pytest.mark.parametrize("path", READY_JOBS, ids=[p.stem for p in READY_JOBS])
def test_every_ready_job_validates(path, single_thread):
    """What `l2t-dist job jobs/X.yaml` checks: the schema, then the taps and pairs on weightless
    models at data.image_size (no data, no checkpoint needed)."""
    from l2t_dist.validate import check_job

    job = load_job(path)
    trainee = check_job(job)
    assert len(trainee.pairs) == PAIR_COUNTS[path.stem], [p.name for p in trainee.pairs]
    if job.data.image_size == 224:  # the paper's 224 settings: batch 64, layer1-4 of a tv:resnet18 target
        assert job.target.arch == "tv:resnet18" and job.data.batch_size == 64 and job.data.val_fraction == 0.1
        assert {p.target_tap for p in trainee.pairs} == {"layer1", "layer2", "layer3", "layer4"}
        assert (job.optim.lr, job.optim.epochs, job.method.beta, job.method.T) == (0.1, 200, 0.5, 2)
        assert job.meta.lr == (1e-3 if job.data.kind == "stanford40" else 1e-4)
        # the fine-tuning baseline of the same job, as its comments write it
        ft = load_job(path, ["method.name=finetune", "sources=[]", "target.checkpoint=resnet18-f37072fd.pth"])
        assert check_job(ft).pairs == [] and ft.target.checkpoint == "resnet18-f37072fd.pth"
