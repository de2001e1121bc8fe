"""Golden trajectories: the first 6 iterations of four tiny runs, pinned to rtol 1e-10.

Why it exists: the training loop (LocalRun, DataParallelRun, the Ray worker loop) was about
to be restructured. A refactor must not change what is computed, and the other tests pin
only end states at loose tolerances. So these trajectories were RECORDED FROM THE UNCHANGED
CODE (commit 9e2cfc7, before the refactor) and are ASSERTED AFTER it: every iteration's
numbers must come out the same to a relative 1e-10 (float64 on the CPU, one thread
everywhere, so an unchanged algorithm reproduces them bit for bit, run after run).

What it pins, for each of four runs (tests/golden/{l2t_ww,fm}_{local,ray}.json):
- the job: L2T-ww on two sources of different architectures (resnet20 taps 5, 8 and
  vgg9_bn tap 2, seeded random weights with calibrated batch norm; target resnet20,
  all_to_all pairs, T=2, beta 0.1, meta.lr 3e-3: φ moves every iteration and most λ stay
  above 0, where 1e-2 drives several pairs to λ=0 within 3 iterations, which then pin
  nothing), and FM on the same two sources (single pairs); synthetic 4-class 16x16 data,
  44 training images in batches of 17, 17 and 10 (Ray shards 9/8, 9/8, 5/5: the weighting of
  unequal shards is pinned, and a short last batch), 3 iterations per epoch for 2 epochs,
  so that the epoch boundary (cosine lr, BN averaging, evaluation, checkpoints) is crossed;
  run.dtype=float64, run.threads=1, run.trace=true, run.device=cpu, tracking off;
- each job on the one-process backend (`l2t-dist train --backend local`) and on 2 Ray
  workers (`--backend ray`, one shared local Ray of 2 CPUs): fm with served source actors
  (float32 features, cast to float64 in the workers), l2t_ww with colocated sources (see
  SOURCES_MODE: served float64 l2t_ww runs fail at 9e2cfc7);
- per iteration (run.trace's trace.jsonl): epoch, batch, step; every metric (loss, ce,
  transfer, acc, and meta_loss for l2t_ww); the mean λ of every pair (names included); the
  sum and sum of squares of θ, φ and the momentum buffers.
The one-process and the Ray trajectories are different algorithms (the Ray workers run the
look-ahead per shard, with per-worker batch norm, and fm gets float32 served features), so
they are different golden files, and the test checks that they do differ. The job names
cluster.meta_sync: per_shard, the default when the files were recorded (global since
2026-12-07, which tests/test_meta_sync.py and tests/test_distributed_ray.py pin against one
process instead); the files' "job_edited" says so.

Re-recording: `L2T_RECORD_GOLDEN=1 python -m pytest tests/test_golden_trajectory.py` writes
the files and then FAILS on purpose ("recorded, re-run without L2T_RECORD_GOLDEN"), so that a
recording can never pass for a comparison. It is legitimate only from code whose algorithm
is known to be right, never to make a failing refactor pass: after an intended change of
the algorithm (say it in the commit), or when the environment changes the float64 numbers
(another torch version, CPU kernels, Python). Record from the commit before the change, or
check the new numbers against it at a looser tolerance, and then run the comparison twice
in fresh processes: both must pass. The files say how and from which commit they came.
"""

import contextlib
import io
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("L2T_RECORD_GOLDEN") == "1"
ITERS = 6
RTOL = 1e-10
ZERO_ATOL = 1e-300  # only for values recorded as exactly 0.0 (φ of fm, which has none)
METHODS = ("l2t_ww", "fm")
BACKENDS = ("local", "ray")
RUNS = [(m, b) for m in METHODS for b in BACKENDS]
# The Ray runs' source mode. Served (the default) for fm. Colocated for l2t_ww: at 9e2cfc7,
# served sources with run.dtype=float64 fail for the meta methods at the first epoch end
# (pair_report sends the float64 normalised val images to the float32 actors: "expected
# scalar type Double but found Float"); fm has no pair report, so it runs served.
SOURCES_MODE = {"l2t_ww": "colocated", "fm": "served"}


def golden_path(method: str, backend: str) -> Path:
    return GOLDEN / f"{method}_{backend}.json"


# ---- the fixed job


def _calibrated(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Batch-norm statistics from a few seeded random batches (cumulative averages), as a
    trained source would have: uncalibrated random sources give transfer losses in the
    hundreds and where-networks that saturate (λ at 0 or 6 from the first iteration)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 16, 16, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Seeded random sources, the same every time (float32, one thread): resnet20 (5 classes)
    and vgg9_bn (3 classes), with calibrated batch-norm statistics."""
    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    d = tmp_path_factory.mktemp("golden-sources")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)  # the calibration's sums in a fixed order
    try:
        torch.manual_seed(1)
        save_model_checkpoint(str(d / "a.pt"), _calibrated(build_model("resnet20", 5), 1), "resnet20")
        torch.manual_seed(2)
        save_model_checkpoint(str(d / "b.pt"), _calibrated(build_model("vgg9_bn", 3), 2), "vgg9_bn")
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    return {"a": str(d / "a.pt"), "b": str(d / "b.pt")}


def source_sums(ckpts: dict) -> dict:
    """Sum and sum of squares of each source checkpoint's floating-point tensors (float64)."""
    out = {}
    for name, path in sorted(ckpts.items()):
        sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        v = torch.cat([t.double().reshape(-1) for t in sd.values() if t.is_floating_point()])
        out[name] = [float(v.sum()), float(v.pow(2).sum())]
    return out


def job_tree(method: str, out_dir="OUT_DIR", ckpts=None) -> dict:
    """The job of one run; with the defaults, the form stored in the golden file."""
    ckpts = ckpts or {"a": "SOURCE_A", "b": "SOURCE_B"}
    return {
        "data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=12,size=16,seed=0",
                 "image_size": 16, "batch_size": 17, "eval_batch_size": 64},  # 44 train images: 17, 17, 10
        "sources": [{"name": "a", "arch": "resnet20", "checkpoint": ckpts["a"], "taps": [5, 8]},
                    {"name": "b", "arch": "vgg9_bn", "checkpoint": ckpts["b"], "taps": [2]}],
        "target": {"arch": "resnet20"},
        "method": {"name": method, "T": 2, "beta": 0.1},
        "optim": {"lr": 0.05, "epochs": 2},
        "meta": {"lr": 3e-3},  # see the module docstring
        "run": {"name": method, "out_dir": str(out_dir), "seed": 3, "device": "cpu", "threads": 1,
                "max_iters_per_epoch": 3, "dtype": "float64", "trace": True},
        # max_failures 0: a crash fails the test instead of being retried out of sight
        "cluster": {"workers": 2, "sources_mode": SOURCES_MODE[method], "cpus_per_worker": 0.4,
                    "cpus_per_source_actor": 0.2, "max_failures": 0, "request_timeout_s": 120,
                    "start_timeout_s": 60, "meta_sync": "per_shard"},
        "tracking": {"enabled": False},
    }


# ---- fixtures: the process state that a run changes, one Ray for the module


@pytest.fixture(autouse=True)
def restore_torch_state():
    """A local run sets torch's default dtype (run.dtype) and thread count (run.threads) in
    this process; put both back so that the other tests see float32 and their threads."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def _package_file() -> str:
    import l2t_dist

    return str(Path(l2t_dist.__file__).resolve())


def test_the_checkout_under_test_is_the_one_imported():
    """The golden pins this checkout's code: importing another copy (an installed one, or an
    editable install pointing elsewhere) would compare the wrong code."""
    here = _package_file()
    print("l2t_dist imported from", here)
    assert Path(here).is_relative_to(REPO / "l2t_dist"), (here, str(REPO))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             log_to_driver=False)
    try:
        @ray.remote(num_cpus=0.01)
        def where() -> str:  # self-contained: the workers cannot import this test module
            from pathlib import Path

            import l2t_dist

            return str(Path(l2t_dist.__file__).resolve())

        # the workers must run the same code as this process (PYTHONPATH reaches them)
        assert ray.get(where.remote()) == _package_file()
        yield ray
    finally:
        ray.shutdown()


# ---- one run, its trace


def run_job(method: str, backend: str, ckpts: dict, out_dir: Path) -> list[dict]:
    from l2t_dist.cli import main

    job_file = out_dir / f"{method}-{backend}.yaml"
    job_file.write_text(yaml.safe_dump(job_tree(method, out_dir, ckpts)))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", str(job_file), "--backend", backend, "--quiet", "--json"])
    assert code == 0, buf.getvalue()
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert summary["epochs"] == 2, summary
    lines = (Path(summary["run_dir"]) / "trace.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def digest(trace: list[dict]) -> list[dict]:
    """What is pinned of each iteration."""
    return [{"epoch": r["epoch"], "batch": r["batch"], "step": r["step"], "metrics": r["metrics"],
             "lambda": r["lambda"], "theta": r["theta"], "phi": r["phi"], "momentum": r["momentum"]}
            for r in trace[:ITERS]]


def check_fixture(method: str, rows: list[dict]) -> None:
    """The fixture exercises what it claims to: 6 iterations over 2 epochs, and for L2T-ww a
    φ that moves (so the λ of the pairs change from one iteration to the next)."""
    assert len(rows) == ITERS, f"expected {ITERS} trace lines, got {len(rows)}"
    assert [(r["epoch"], r["batch"], r["step"]) for r in rows] == [
        (0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6)]
    for r in rows:
        assert all(math.isfinite(v) for v in r["metrics"].values()), r
    if method == "l2t_ww":
        assert len(rows[0]["lambda"]) == 9  # all_to_all: 3 source taps x 3 target taps
        assert all("meta_loss" in r["metrics"] for r in rows)
        phis = [tuple(r["phi"]) for r in rows]
        assert len(set(phis)) == ITERS, phis  # Adam moves φ every iteration ...
        for a, b in zip(rows, rows[1:]):      # ... and with it the λ of every live pair
            live = [p for p in a["lambda"] if a["lambda"][p] > 0 or b["lambda"][p] > 0]
            assert len(live) >= 5, (a["step"], a["lambda"])  # most pairs transfer
            for pair in live:
                assert a["lambda"][pair] != b["lambda"][pair], (pair, a["step"])
    else:
        assert len(rows[0]["lambda"]) == 0 and rows[0]["phi"] == [0.0, 0.0]  # fm has no φ
        assert "meta_loss" not in rows[0]["metrics"]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def record(method: str, backend: str, rows: list[dict], sources: dict) -> Path:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    path = golden_path(method, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "note": (f"Golden trajectory of tests/test_golden_trajectory.py ({method}, --backend {backend}): "
                 f"the first {ITERS} lines of run.trace's trace.jsonl, recorded with L2T_RECORD_GOLDEN=1 "
                 "from the unchanged training loop, before its refactor; the source checkpoints are made by "
                 "the test (seeded); compared at rtol 1e-10. "
                 "Re-record only as the test module's docstring says."),
        "recorded_with": {"commit": _git("rev-parse", "HEAD") or None,
                          # uncommitted changes of the package at recording time (none: the commit's code)
                          "l2t_dist_changes": _git("status", "--porcelain", "--", "l2t_dist"),
                          "torch": torch.__version__, "ray": version("ray"),
                          "python": platform.python_version(), "machine": platform.machine()},
        "method": method, "backend": backend, "job": job_tree(method), "sources": sources,
        "trace": rows,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# ---- comparison


def _close(actual, expected, where: str, errors: list, worst: list) -> None:
    """Same structure and keys; ints equal; floats within RTOL (exact zeros: ZERO_ATOL)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or sorted(actual) != sorted(expected):
            errors.append(f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} "
                          f"!= recorded {sorted(expected)}")
            return
        for k in expected:
            _close(actual[k], expected[k], f"{where}.{k}", errors, worst)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            errors.append(f"{where}: {actual!r} != recorded {expected!r}")
            return
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{where}[{i}]", errors, worst)
    elif isinstance(expected, bool) or isinstance(expected, int) and isinstance(actual, int):
        if actual != expected:
            errors.append(f"{where}: {actual!r} != recorded {expected!r}")
    elif not isinstance(actual, (int, float)) or isinstance(actual, bool):
        errors.append(f"{where}: {actual!r} is not a number (recorded {expected!r})")
    else:
        rel = abs(actual - expected) / abs(expected) if expected else abs(actual)
        worst[0] = max(worst[0], rel)
        if not math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ZERO_ATOL if expected == 0 else 0.0):
            errors.append(f"{where}: {actual!r} != recorded {expected!r} (relative difference {rel:.3g})")


def compare(actual, recorded, where: str) -> tuple[list[str], float]:
    """The differences from the recorded values, and the largest relative difference seen."""
    errors: list[str] = []
    worst = [0.0]
    _close(actual, recorded, where, errors, worst)
    return errors, worst[0]


@pytest.mark.parametrize("method,backend", RUNS, ids=[f"{m}-{b}" for m, b in RUNS])
def test_trajectory_matches_the_recorded_one(method, backend, ckpts, tmp_path, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    rows = digest(run_job(method, backend, ckpts, tmp_path))
    check_fixture(method, rows)
    if RECORD:
        path = record(method, backend, rows, source_sums(ckpts))
        pytest.fail(f"recorded {path.relative_to(REPO)}, re-run without L2T_RECORD_GOLDEN", pytrace=False)
    path = golden_path(method, backend)
    assert path.is_file(), f"{path} is missing; record it with L2T_RECORD_GOLDEN=1 (see the module docstring)"
    golden = json.loads(path.read_text())
    assert golden["job"] == job_tree(method), "the test's job differs from the recorded one"
    errors, _ = compare(source_sums(ckpts), golden["sources"], "sources")
    assert not errors, ("the source checkpoints differ from the recorded ones (the ckpts fixture, or the "
                        "models' construction or init, changed):\n" + "\n".join(errors))
    errors, worst = compare(rows, golden["trace"], "trace")
    print(f"{method}-{backend}: largest relative difference from {path.name}: {worst:.3g}")
    assert not errors, f"{len(errors)} values differ from {path.name}:\n" + "\n".join(errors[:40])


@pytest.mark.parametrize("method", METHODS)
def test_one_process_and_ray_goldens_are_different_trajectories(method):
    """Different algorithms today (per-shard look-ahead, per-worker BN; fm: float32 served
    features): two files, whose trajectories differ well beyond the tolerance."""
    local, ray_ = golden_path(method, "local"), golden_path(method, "ray")
    assert local != ray_ and local.is_file() and ray_.is_file()
    a, b = (json.loads(p.read_text())["trace"] for p in (local, ray_))
    assert [(r["epoch"], r["batch"], r["step"]) for r in a] == [(r["epoch"], r["batch"], r["step"]) for r in b]
    assert sorted(a[0]["lambda"]) == sorted(b[0]["lambda"])
    for ra, rb in zip(a, b):
        assert not math.isclose(ra["metrics"]["loss"], rb["metrics"]["loss"], rel_tol=1e-6), ra["step"]
        assert not math.isclose(ra["theta"][1], rb["theta"][1], rel_tol=1e-9), ra["step"]
