"""`--backend ray` on a multi-raylet cluster on this machine (ray.cluster_utils.Cluster).

One cluster serves the whole module (starting Ray costs ~10 s, a Ray Train worker group
~25 s on 2 cores): a head node that holds the source actors (custom resource `src_node`)
and a second raylet that holds the train workers (`train_node`), so features cross the
object store between raylets. Two runs of the same two-source job are made:
- the reference run: end-to-end outputs, and the equivalence test (θ, φ after 3
  iterations equal a one-process simulation of the data-parallel algorithm);
- the fault run: a source actor and then a train worker are SIGKILLed mid-run; the run
  restarts from the last checkpoint and ends exactly where the reference run ended.
User errors are not retried: a NaN run ends at once with the local backend's message, and a
bad checkpoint fails before any worker starts (colocated) or when the actors load (served).
"""

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from l2t_dist.config import parse_job  # noqa: E402
from l2t_dist.errors import CheckpointError, ConfigError  # noqa: E402

RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("ray")
    # cluster_utils writes the head's address to <system temp>/ray/ray_current_cluster even with
    # its own temp_dir, and fails when that folder does not exist yet (a fresh machine)
    Path(ray._private.utils.get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:  # not 8265: another Ray with a dashboard may run on this machine
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"src_node": 4},
                                                      "include_dashboard": True, "dashboard_port": dashboard_port,
                                                      "temp_dir": str(tmp)})
    c.add_node(num_cpus=1, resources={"train_node": 4})
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    d = tmp_path_factory.mktemp("sources")
    torch.manual_seed(1)
    save_model_checkpoint(str(d / "a.pt"), build_model("resnet20", 5), "resnet20")
    save_model_checkpoint(str(d / "b.pt"), build_model("vgg9_bn", 3), "vgg9_bn")
    return {"a": str(d / "a.pt"), "b": str(d / "b.pt")}


def job_tree(out_dir, ckpts, name, **cluster):
    return {
        "data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=12,size=16,seed=0",
                 "image_size": 16, "batch_size": 16, "eval_batch_size": 64},
        # Two sources of different architectures; 43 training images: batches of 16, 16, 11.
        "sources": [{"name": "a", "arch": "resnet20", "checkpoint": ckpts["a"], "taps": [5, 8]},
                    {"name": "b", "arch": "vgg9_bn", "checkpoint": ckpts["b"], "taps": [2]}],
        "target": {"arch": "resnet20"},
        "method": {"name": "l2t_ww", "T": 1, "beta": 0.1},
        "optim": {"lr": 0.05, "epochs": 2},
        "meta": {"lr": 1e-2},
        "run": {"name": name, "out_dir": str(out_dir), "seed": 3, "threads": 1, "max_iters_per_epoch": 3},
        # per_shard: the algorithm that simulate_data_parallel computes (global is tested on its own)
        "cluster": {"workers": 2, "cpus_per_worker": 0.4, "worker_resources": {"train_node": 1},
                    "cpus_per_source_actor": 0.2, "source_resources": {"src_node": 1}, "max_failures": 2,
                    "request_timeout_s": 120, "start_timeout_s": 60, "meta_sync": "per_shard", **cluster},
        "tracking": {"enabled": False},  # MLflow is tested in test_tracking.py; no mlflow.db in the cwd here
    }


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("images_per_s")
    return rows


def _trainer_state(path):
    from l2t_dist.train.state import TrainingState

    return vars(TrainingState.load(path))


@pytest.fixture(scope="module")
def reference(cluster, ckpts, tmp_path_factory):
    """The uninterrupted run, through the CLI entry point (in-process, joining the cluster)."""
    from l2t_dist.cli import main

    out = tmp_path_factory.mktemp("ref")
    job_file = out / "job.yaml"
    import yaml

    job_file.write_text(yaml.safe_dump(job_tree(out, ckpts, "ref")))
    t0 = time.perf_counter()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", str(job_file), "--backend", "ray", "--quiet", "--json"])
    assert code == 0, buf.getvalue()
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    summary["seconds"] = time.perf_counter() - t0
    return summary


def test_multi_source_job_runs_end_to_end_across_raylets(reference, cluster):
    s = reference
    run_dir = Path(s["run_dir"])
    assert {"job.yaml", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in run_dir.iterdir()}
    assert [r["epoch"] for r in _rows(run_dir)] == [1, 2]
    assert s["epochs"] == 2 and s["workers"] == 2 and s["backend"] == "ray"
    assert s["sync_bn"] is False  # meta_sync per_shard: per-worker batch norm statistics
    assert s["replica_max_diff"] == 0.0  # checked at every checkpoint, on every rank
    # placement: the sources on the head raylet, both workers on the other one
    head = cluster.head_node.node_id
    assert set(s["source_nodes"].values()) == {head}
    assert len(set(s["worker_nodes"])) == 1 and s["worker_nodes"][0] != head
    # each source answered every shard request; only the needed taps crossed (fp32)
    assert all(st[0]["requests"] > 0 for st in s["source_actors"].values())
    a = 4 * (32 * 8 * 8 + 64 * 4 * 4)  # resnet20 taps 5 and 8 at 16x16 input, fp32
    b = 4 * (256 * 4 * 4)              # vgg9_bn tap 2
    assert s["feature_bytes_per_image"] == {"a": a, "b": b}
    # a trained target is a loadable source checkpoint
    from l2t_dist.sources.zoo import load_source

    load_source(run_dir / "best.pt", "resnet20")


def test_two_ray_workers_equal_one_process_simulation(reference, ckpts):
    """Acceptance: θ and φ after 3 iterations (shards 8/8, 8/8, 6/5) equal the one-process
    simulation of the data-parallel algorithm to 1e-5."""
    from l2t_dist.distributed.reference import simulate_data_parallel

    storage = Path(reference["ray_storage"])
    [ckpt] = list(storage.glob("checkpoint-e0001-s00000003"))
    state = _trainer_state(ckpt / "last.pt")
    job = parse_job(state["job"])
    torch.set_num_threads(1)
    sim = simulate_data_parallel(job, world=2, iterations=3)
    assert sim["theta"] and sim["phi"]
    print("equivalence: max |Ray - simulation| over θ, φ:", max(
        (state[k][n] - v).abs().max().item() for k, key in (("student", "theta"), ("phi", "phi"))
        for n, v in sim[key].items()))
    for name, ref in sim["theta"].items():
        torch.testing.assert_close(state["student"][name], ref, rtol=0, atol=1e-5, msg=name)
    for name, ref in sim["phi"].items():
        torch.testing.assert_close(state["phi"][name], ref, rtol=0, atol=1e-5, msg=name)
    # BN running statistics: each worker's own, averaged over the workers before evaluation
    assert sim["buffers"]
    for name, ref in sim["buffers"].items():
        torch.testing.assert_close(state["student"][name], ref, rtol=0, atol=1e-5, msg=name)
    # evaluation is sharded over the workers; the accuracy is one process's on the whole split
    from l2t_dist.models import build_model
    from l2t_dist.train.data_pipeline import prepare_data
    from l2t_dist.train.loop import count_correct

    data = prepare_data(job.data)
    model = build_model(job.target.arch, data.num_classes)
    model.load_state_dict(state["target"])
    [epoch1] = [h for h in state["history"] if h["epoch"] == 1]
    assert len(data.val_y) >= 2 and len(data.test_y) >= 2
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
        assert epoch1[f"{split}_acc"] == 100.0 * count_correct(model, x, y, 1000, torch.device("cpu")) / len(y)
    # the check has teeth: one rank on the whole batch is a different trajectory
    one = simulate_data_parallel(job, world=1, iterations=3)
    assert max((one["phi"][k] - sim["phi"][k]).abs().max().item() for k in sim["phi"]) > 1e-5


def test_a_local_ray_is_new_even_when_a_cluster_runs_on_this_machine(cluster):
    """cluster.address null starts a local Ray; a bare ray.init() would join the cluster that
    this module started (the latest on this machine) and then refuse num_cpus."""
    import subprocess
    import sys

    code = ("import json, ray\n"
            "from l2t_dist.config import ClusterConfig\n"
            "from l2t_dist.distributed.launcher import connect\n"
            "assert connect(ClusterConfig(num_cpus=1), quiet=True)\n"
            "print(json.dumps(ray.cluster_resources()))\n"
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert resources["CPU"] == 1.0 and "src_node" not in resources and "train_node" not in resources


def _train_json(tree: dict, backend: str) -> dict:
    import contextlib
    import io

    import yaml

    from l2t_dist.cli import main

    job_file = Path(tree["run"]["out_dir"]) / f"{tree['run']['name']}.yaml"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(yaml.safe_dump(tree))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", str(job_file), "--backend", backend, "--quiet", "--json"])
    assert code == 0, buf.getvalue()
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("target,sync_bn", [("resnet20", True), ("vgg9", False)])
def test_global_meta_sync_two_ray_workers_equal_one_process(cluster, ckpts, tmp_path, target, sync_bn):
    """Acceptance (issue 15): with cluster.meta_sync=global, 2 Ray workers on shards 8/8, 8/8,
    6/5 end 3 iterations on the θ and φ of one process on the global batch, to 1e-6 in float64:
    with synchronised batch norm on a BN network, and on a network without batch norm."""
    tree = job_tree(tmp_path, ckpts, f"global-{target}", meta_sync="global", sync_bn=sync_bn,
                    sources_mode="colocated")
    tree["sources"] = tree["sources"][:1]
    tree["target"] = {"arch": target, "taps": [1, 2]}  # 4 pairs: the cost is the float64 look-ahead
    tree["optim"]["epochs"] = 1
    tree["run"]["dtype"] = "float64"
    ray_run = _trainer_state(Path(_train_json(tree, "ray")["run_dir"]) / "last.pt")
    tree["run"]["name"] += "-local"
    one = _trainer_state(Path(_train_json(tree, "local")["run_dir"]) / "last.pt")
    assert ray_run["global_step"] == one["global_step"] == 3
    worst = 0.0
    for key in ("student", "phi"):
        for name, ref in one[key].items():
            if ref.is_floating_point():
                torch.testing.assert_close(ray_run[key][name], ref, rtol=1e-6, atol=1e-6, msg=f"{key}.{name}")
                worst = max(worst, (ray_run[key][name] - ref).abs().max().item())
    print(f"meta_sync=global, {target}, sync_bn={sync_bn}: max |2 Ray workers - 1 process| = {worst:.3g}")


def test_cub_paper_job_on_ray(cluster, tmp_path):
    """Issue 14's acceptance with --backend ray: jobs/cub200_paper.yaml on a small CUB-200-2011
    tree and a torchvision ResNet34 state_dict (tests/test_cub_job.py runs it locally), streamed
    with the default 2 decode workers per train worker, the ResNet34 served from the head
    raylet: one epoch trains, evaluates and checkpoints, with the defaults meta_sync global and
    sync_bn null (the target's torch batch norms synchronised)."""
    import contextlib
    import io
    import math

    from image_trees import CUB_JOB, tiny_cub_run, write_cub_job_inputs

    from l2t_dist.cli import main

    root = write_cub_job_inputs(tmp_path)
    placement = {"optim.epochs": 1, "cluster.workers": 2, "cluster.cpus_per_worker": 0.4,
                 "cluster.worker_resources": "{train_node: 1}", "cluster.cpus_per_source_actor": 0.2,
                 "cluster.source_resources": "{src_node: 1}", "cluster.max_failures": 0,
                 "cluster.request_timeout_s": 120, "cluster.start_timeout_s": 60}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", CUB_JOB, *tiny_cub_run(root, tmp_path / "runs", "cub-ray", **placement),
                     "--backend", "ray", "--quiet", "--json"])
    assert code == 0, buf.getvalue()
    s = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert s["backend"] == "ray" and s["workers"] == 2 and s["epochs"] == 1 and len(s["pairs"]) == 16
    assert s["sync_bn"] is True  # the defaults: meta_sync global, and ResNet18's torch BN synchronised
    assert all(math.isfinite(s[k]) for k in ("best_val_acc", "test_acc_at_best_val", "final_val_acc"))
    assert s["replica_max_diff"] == 0.0
    assert set(s["source_nodes"].values()) == {cluster.head_node.node_id}
    # the 4 ResNet34 taps at 32x32 (layer1 64@8x8 ... layer4 512@1x1), fp32: 1/49 of the 224 case
    assert s["feature_bytes_per_image"] == {"imagenet": 4 * (64 * 8 * 8 + 128 * 4 * 4 + 256 * 2 * 2 + 512)}
    run_dir = Path(s["run_dir"])
    state = _trainer_state(run_dir / "last.pt")
    assert state["global_step"] == 2 and state["epoch"] == 1 and state["phi"]
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(run_dir)] == [1] and (run_dir / "best.pt").is_file()


def _our_processes(title: str, since: float = 0.0) -> list:
    """This test process's Ray processes with `title`, started at `since` (time.time()) or later."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in p.cmdline()) and p.create_time() >= since:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _wait_until_idle(timeout_s: float = 60.0) -> None:
    """Ray frees the actors of a finished run asynchronously: wait until everything is free."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.5)


def test_sigkill_of_a_source_actor_and_a_worker_is_survived_exactly(reference, cluster, ckpts, tmp_path):
    """Acceptance: SIGKILL a source actor, then a train worker, mid-run; the run resumes from
    the last checkpoint and ends with the reference run's metrics and parameters."""
    from l2t_dist.distributed.launcher import train_ray

    job = parse_job(job_tree(tmp_path, ckpts, "fault"))
    storage = tmp_path / "fault" / "ray"
    killed: dict = {}

    started = time.time() - 1.0  # only this run's workers and actors are killed

    def killer():
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline and not list(storage.glob("*/checkpoint-e0001-*")):
            time.sleep(0.2)
        # mid epoch 2: a source actor (epoch 2 then waits while Ray restarts it) ...
        for p in _our_processes("ray::SourceServer", started)[:1]:
            killed["source"] = p.pid
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(2.0)  # ... by then the epoch-1 checkpoint is registered with Ray Train
        for p in _our_processes("ray::RayTrainWorker", started)[:1]:  # ... then a train worker
            killed["worker"] = p.pid
            os.kill(p.pid, signal.SIGKILL)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    s = train_ray(job, quiet=True).to_dict()
    th.join(timeout=5)
    assert "source" in killed and "worker" in killed, killed
    # the worker group was restarted by Ray Train from the epoch-1 checkpoint ...
    assert s["restored_by"] == "ray-failover" and s["restored_at_step"] == 3, s
    # ... and the killed source actor was restarted by Ray (a new process served the rest)
    pids = {st[0].get("pid") for st in s["source_actors"].values()}
    assert killed["source"] not in pids and None not in pids, (killed, pids)
    run_dir = Path(s["run_dir"])
    # nothing lost or duplicated: each epoch once in the log, two epochs done
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2] and s["epochs"] == 2
    ref_rows = _rows(reference["run_dir"])
    for r, ref in zip(rows, ref_rows):
        for k in ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "step"):
            assert r[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), (k, r, ref)
    ours, theirs = _trainer_state(run_dir / "last.pt"), _trainer_state(Path(reference["run_dir"]) / "last.pt")
    print("fault: max |interrupted - uninterrupted| over θ, φ:", max(
        (ours[k][n] - t).abs().max().item() for k in ("student", "phi") for n, t in theirs[k].items()
        if t.is_floating_point()))
    for name, t in theirs["student"].items():
        torch.testing.assert_close(ours["student"][name], t, rtol=0, atol=1e-6, msg=name)
    for name, t in theirs["phi"].items():
        torch.testing.assert_close(ours["phi"][name], t, rtol=0, atol=1e-6, msg=name)


def test_unplaceable_job_fails_fast_with_what_was_asked_and_what_exists(cluster, ckpts, tmp_path):
    from l2t_dist.distributed.launcher import train_ray

    _wait_until_idle()
    t0 = time.perf_counter()
    job = parse_job(job_tree(tmp_path, ckpts, "big", workers=6, cpus_per_worker=0.5))
    with pytest.raises(ConfigError) as err:
        train_ray(job, quiet=True)
    msg = str(err.value)
    # (what is free depends on what Ray is still tearing down from the runs before)
    assert "6 workers x {CPU: 0.5, train_node: 1}" in msg and re.search(r"CPU: [\d.]+ free of 2", msg), msg
    job = parse_job(job_tree(tmp_path, ckpts, "gpu", gpus_per_worker=1))
    with pytest.raises(ConfigError, match="GPU: 0 free of 0"):
        train_ray(job, quiet=True)
    job = parse_job(job_tree(tmp_path, ckpts, "pin", worker_resources={"train_node": 1, "src_node": 1}))
    with pytest.raises(ConfigError, match="no single node can hold one of the workers"):
        train_ray(job, quiet=True)
    assert time.perf_counter() - t0 < 10


def _local_error(tree, tmp_path):
    """What --backend local says about the same job."""
    from l2t_dist.errors import L2TError
    from l2t_dist.train.local import train_local

    tree = {**tree, "run": {**tree["run"], "out_dir": str(tmp_path / "local")}}
    with pytest.raises(L2TError) as err:
        train_local(parse_job(tree), quiet=True)
    return err.value


def _bad_sources(tmp_path, ckpts):
    """A checkpoint that is missing, and one saved from another architecture."""
    missing = {"name": "b", "arch": "vgg9_bn", "checkpoint": str(tmp_path / "not-on-this-node.pt"), "taps": [2]}
    wrong = {"name": "b", "arch": "vgg9_bn", "checkpoint": ckpts["a"], "taps": [2]}
    return {"missing": missing, "wrong arch": wrong}


def test_source_that_fails_to_load_is_a_clear_error(cluster, ckpts, tmp_path):
    """Served: the actors load the checkpoints; their loader's error reaches the user."""
    from l2t_dist.distributed.launcher import train_ray

    for what, bad in _bad_sources(tmp_path, ckpts).items():
        tree = job_tree(tmp_path, ckpts, "served-bad")
        tree["sources"][1] = bad
        local = _local_error(tree, tmp_path)
        assert type(local) is CheckpointError, local
        with pytest.raises(CheckpointError) as err:
            train_ray(parse_job(tree), quiet=True)
        assert str(local) in str(err.value), (what, str(err.value))  # prefixed with the source's name


def test_colocated_bad_checkpoint_fails_on_the_driver_before_any_worker(cluster, ckpts, tmp_path):
    """Colocated: the driver loads the sources first (zoo's strict loader), so the error is the
    local backend's, in seconds, and no Ray Train run is started."""
    from l2t_dist.distributed.launcher import train_ray

    for what, bad in _bad_sources(tmp_path, ckpts).items():
        tree = job_tree(tmp_path, ckpts, "colo-bad", sources_mode="colocated")
        tree["sources"][1] = bad
        local = _local_error(tree, tmp_path)
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError) as err:
            train_ray(parse_job(tree), quiet=True)
        assert str(err.value) == str(local), what
        assert time.perf_counter() - t0 < 15, what
        assert not (tmp_path / "colo-bad" / "ray").exists()  # Ray Train never ran


def test_nan_loss_is_not_retried_and_reports_like_the_local_backend(cluster, tmp_path):
    """A non-finite loss is deterministic: with cluster.max_failures=2 the run still ends at
    once (one worker group, no restart), with the local backend's message and exit code, and
    the last good checkpoint kept."""
    import contextlib
    import io
    import re

    import yaml

    from l2t_dist.cli import main

    tree = job_tree(tmp_path, {"a": "", "b": ""}, "nan")
    tree.update(sources=[], method={"name": "scratch"}, optim={"lr": 1e12, "epochs": 2})
    tree["run"]["checkpoint_every"] = 1
    messages, codes = {}, {}
    for backend in ("local", "ray"):
        job_file = tmp_path / f"{backend}.yaml"
        job_file.write_text(yaml.safe_dump({**tree, "run": {**tree["run"], "out_dir": str(tmp_path / backend)}}))
        seen: set = set()
        done = threading.Event()
        t0 = time.time()

        def watch(done=done, seen=seen, t0=t0):  # every Ray Train worker process that runs during the call
            while not done.is_set():
                for p in _our_processes("ray::RayTrainWorker"):
                    with contextlib.suppress(psutil.Error):
                        if p.create_time() >= t0 - 1:
                            seen.add(p.pid)
                time.sleep(0.1)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            codes[backend] = main(["train", str(job_file), "--backend", backend, "--quiet"])
        done.set()
        th.join(timeout=5)
        print(backend, f"{time.time() - t0:.1f}s", "worker pids:", sorted(seen))
        run_dir = str((tmp_path / backend / "nan").resolve() if backend == "ray" else tmp_path / backend / "nan")
        messages[backend] = err.getvalue().replace(run_dir, "RUN_DIR")
        if backend == "ray":
            assert len(seen) == 2, seen  # one group of 2 workers: no restart
        # the last good checkpoint: written before the failing iteration, kept as it was
        state = _trainer_state(tmp_path / backend / "nan" / "last.pt")
        stopped = int(re.search(r"stopped in epoch 1, batch (\d+)", messages[backend]).group(1))
        assert state["global_step"] == stopped - 1, (state["global_step"], messages[backend])
    assert codes == {"local": 3, "ray": 3}
    assert "error: non-finite loss" in messages["ray"] and "RUN_DIR/last.pt" in messages["ray"], messages
    # the values in parentheses are the shard's on Ray, the whole batch's locally
    same = [re.sub(r"\(loss [^)]*\)", "(...)", m) for m in (messages["local"], messages["ray"])]
    assert same[0] == same[1], messages
