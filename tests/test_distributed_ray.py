"""`--backend ray` on a multi-raylet cluster on this machine (ray.cluster_utils.Cluster).

One cluster serves the whole module (starting Ray costs ~10 s, a Ray Train worker group
~25 s on 2 cores): a head node that holds the source actors (custom resource `src_node`)
and a second raylet that holds the train workers (`train_node`), so features cross the
object store between raylets. Two runs of the same two-source job are made:
- the reference run: end-to-end outputs, and the equivalence test (θ, φ after 3
  iterations equal a one-process simulation of the data-parallel algorithm);
- the fault run: a source actor and then a train worker are SIGKILLed mid-run; the run
  restarts from the last checkpoint and ends exactly where the reference run ended.
"""

import json
import os
import signal
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
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"src_node": 4},
                                                      "include_dashboard": True, "temp_dir": str(tmp)})
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
        "cluster": {"workers": 2, "cpus_per_worker": 0.4, "worker_resources": {"train_node": 1},
                    "cpus_per_source_actor": 0.2, "source_resources": {"src_node": 1}, "max_failures": 2,
                    "request_timeout_s": 120, "start_timeout_s": 60, **cluster},
    }


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("images_per_s")
    return rows


def _trainer_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["trainer"]


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
    # the check has teeth: one rank on the whole batch is a different trajectory
    one = simulate_data_parallel(job, world=1, iterations=3)
    assert max((one["phi"][k] - sim["phi"][k]).abs().max().item() for k in sim["phi"]) > 1e-5


def _our_processes(title: str) -> list:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_sigkill_of_a_source_actor_and_a_worker_is_survived_exactly(reference, cluster, ckpts, tmp_path):
    """Acceptance: SIGKILL a source actor, then a train worker, mid-run; the run resumes from
    the last checkpoint and ends with the reference run's metrics and parameters."""
    from l2t_dist.distributed.launcher import train_ray

    job = parse_job(job_tree(tmp_path, ckpts, "fault"))
    storage = tmp_path / "fault" / "ray"
    killed: dict = {}

    def killer():
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline and not list(storage.glob("*/checkpoint-e0001-*")):
            time.sleep(0.2)
        for p in _our_processes("ray::SourceServer")[:1]:  # mid epoch 2: a source actor
            killed["source"] = p.pid
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(4.0)
        for p in _our_processes("ray::RayTrainWorker")[:1]:  # ... then a train worker
            killed["worker"] = p.pid
            os.kill(p.pid, signal.SIGKILL)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    s = train_ray(job, quiet=True)
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

    t0 = time.perf_counter()
    job = parse_job(job_tree(tmp_path, ckpts, "big", workers=6, cpus_per_worker=0.5))
    with pytest.raises(ConfigError) as err:
        train_ray(job, quiet=True)
    msg = str(err.value)
    assert "6 workers x {CPU: 0.5, train_node: 1}" in msg and "CPU: 2 free of 2" in msg, msg
    job = parse_job(job_tree(tmp_path, ckpts, "gpu", gpus_per_worker=1))
    with pytest.raises(ConfigError, match="GPU: 0 free of 0"):
        train_ray(job, quiet=True)
    job = parse_job(job_tree(tmp_path, ckpts, "pin", worker_resources={"train_node": 1, "src_node": 1}))
    with pytest.raises(ConfigError, match="no single node can hold one of the workers"):
        train_ray(job, quiet=True)
    assert time.perf_counter() - t0 < 10


def test_source_that_fails_to_load_is_a_clear_error(cluster, ckpts, tmp_path):
    from l2t_dist.distributed.launcher import train_ray

    tree = job_tree(tmp_path, ckpts, "missing")
    tree["sources"][1]["checkpoint"] = str(tmp_path / "not-on-this-node.pt")
    with pytest.raises(CheckpointError, match="not-on-this-node.pt.*does not exist"):
        train_ray(parse_job(tree), quiet=True)
