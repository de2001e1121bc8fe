"""Memory-aware placement for `--backend ray` (distributed/memory.py, distributed/resources.py,
tune/plan.py): the estimate's parts and monotonicity, the estimate against the peak RSS of
real steps, the plan and its checks with memory (totals, single nodes, packing), Tune's trial
plans, and on a real local Ray: 64 workers on this machine fail in seconds without starting
Ray Train, while a small served job gets its memory from Ray and trains."""

import contextlib
import io
import json
import math
import threading
import time
from pathlib import Path

import pytest
import yaml

from l2t_dist.config import ClusterConfig, parse_job
from l2t_dist.distributed import memory as mem
from l2t_dist.distributed.resources import GIB, check_placement, plan_resources
from l2t_dist.errors import ConfigError

SYNTH = "task=c,classes=4,per_class=12,size=16,seed=0"


def tree(out_dir="runs", ckpt="src.pt", **sections) -> dict:
    t = {"data": {"kind": "synthetic", "path": SYNTH, "image_size": 16, "batch_size": 16, "eval_batch_size": 64},
         "sources": [{"name": "a", "arch": "resnet20", "checkpoint": ckpt, "taps": [5, 8]}],
         "target": {"arch": "resnet20"}, "method": {"name": "l2t_ww", "T": 1, "beta": 0.1},
         "optim": {"lr": 0.05, "epochs": 1},
         "run": {"name": "p", "out_dir": str(out_dir), "threads": 1, "max_iters_per_epoch": 2},
         "cluster": {"workers": 2}, "tracking": {"enabled": False}}
    for key, value in sections.items():
        t[key] = {**t.get(key, {}), **value} if isinstance(value, dict) else value
    return t


def job(**sections):
    return parse_job(tree(**sections))


@pytest.fixture(scope="module")
def profile():
    return mem.job_profile(job())


# ---- the estimate -----------------------------------------------------------------------------

def test_saved_bytes_counts_each_saved_tensor_once_and_no_parameters():
    import torch

    x = torch.ones(10, requires_grad=True)  # 40 bytes
    assert mem.saved_bytes(lambda: (x * x).exp().sum()) == (80, 40)  # mul saves x twice, exp its output
    p = torch.nn.Parameter(torch.ones(10))
    assert mem.saved_bytes(lambda: (p * p).sum()) == (0, 0)


def test_estimate_parts_are_the_jobs_own_numbers(profile, single_thread):
    from l2t_dist.validate import build_skeleton

    j = job()
    e = mem.estimate_memory(j, measured=profile)
    trainee = build_skeleton(j)
    theta = sum(p.numel() for p in trainee.objective.theta_params())
    phi = sum(p.numel() for p in trainee.objective.phi_params())
    assert (profile.theta, profile.phi) == (theta, phi) and phi > 0
    w = e.worker_parts
    assert w["state"] == (3 * theta + 4 * phi) * 4
    assert w["data"] == 2 * 4 * 12 * 3 * 16 * 16            # train and test splits, uint8
    assert w["process"] == mem.PROCESS_WORKER and w["runtime"] == mem.RUNTIME
    # the requested maps of resnet20 taps 5 and 8 at 16x16 (32@8x8, 64@4x4), float32, for 3 batches of 8
    assert profile.features == 4 * (32 * 8 * 8 + 64 * 4 * 4)
    assert w["features"] == 3 * 8 * profile.features
    b, T = 8, 1  # 16 images over 2 workers; L2T: the real step plus T look-ahead steps of 2F each
    step = mem.STEP_FACTOR * (b * profile.forward * (1 + 2 * T) + 2 * (T + 1) * theta * 4)
    assert w["step"] == int(max(step, 3 * profile.largest * 64, mem.PAIR_REPORT_IMAGES * profile.forward))
    assert e.worker == math.ceil(mem.SAFETY * sum(w.values()) / mem.MIB) * mem.MIB
    a = e.actor_parts
    assert a["parameters"] == 4 * profile.sources["a"][0] and a["outputs"] == 2 * b * profile.features
    assert e.actor == math.ceil(mem.SAFETY * sum(a.values()) / mem.MIB) * mem.MIB
    # colocated: no actors, the sources' weights and forward move into every worker
    colo = mem.estimate_memory(j, colocated=True, measured=profile)
    assert colo.actor == 0 and colo.worker_parts["sources"] == 4 * profile.sources["a"][0] + b * profile.sources["a"][1]


def test_estimate_grows_with_the_work_and_shrinks_with_more_workers(profile, single_thread):
    def worker(**sections):
        return mem.estimate_memory(job(**sections), measured=profile).worker

    big_batch = {"batch_size": 256, "eval_batch_size": 64}
    by_workers = [mem.estimate_memory(job(data=big_batch, cluster={"workers": n}), measured=profile).worker
                  for n in (1, 2, 4, 8)]
    assert by_workers == sorted(by_workers, reverse=True) and len(set(by_workers)) == 4
    by_batch = [worker(data={"batch_size": n}) for n in (64, 128, 256)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 3
    by_T = [worker(data=big_batch, method={"name": "l2t_ww", "T": t}) for t in (1, 2, 4)]
    assert by_T == sorted(by_T) and len(set(by_T)) == 3
    assert worker(data=big_batch, cluster={"prefetch": 4}) > worker(data=big_batch, cluster={"prefetch": 0})
    f64 = mem.estimate_memory(job(run={"dtype": "float64"}), measured=profile)
    f32 = mem.estimate_memory(job(), measured=profile)
    assert f64.worker_parts["state"] == 2 * f32.worker_parts["state"]
    assert f64.worker_parts["step"] == pytest.approx(2 * f32.worker_parts["step"], abs=1)
    # measured on the job's models: a larger image and a plain method change the profile itself
    at32 = mem.job_profile(job(data={"image_size": 32}))
    assert at32.forward > 3 * profile.forward and at32.features == 4 * profile.features
    scratch = mem.job_profile(job(method={"name": "scratch"}, sources=[]))
    assert scratch.phi == 0 and scratch.forward < profile.forward and not scratch.sources


def test_64_workers_of_the_default_job_cannot_fit_this_machine_but_2_can(single_thread):
    default = parse_job({"sources": [{"name": "tin", "arch": "l2t_resnet32", "checkpoint": "x.pth"}]})
    two = mem.estimate_memory(default)
    many = mem.estimate_memory(default, workers=64)
    assert many.worker < two.worker  # a shard of 2 images instead of 64 ...
    assert 64 * many.worker > 24 * GIB  # ... but 64 processes: more than the machine has
    assert 2 * two.worker + two.actor < 12 * GIB




# ---- the plan and its checks --------------------------------------------------------------------

EST = mem.MemoryEstimate(worker=3 * GIB, actor=1 * GIB)


def test_memory_requests_come_from_the_estimate_or_the_cluster_section():
    free = {"CPU": 4.0, "memory": 16.0 * GIB}
    plan = plan_resources(ClusterConfig(workers=2), 1, free, EST)
    assert plan.workers.resources["memory"] == 3 * GIB and plan.actors.resources["memory"] == 1 * GIB
    assert plan.total()["memory"] == 7 * GIB
    assert plan.describe() == ("2 workers x {CPU: 1} and 3.00 GiB memory each + 1 source actors x {CPU: 0.8} and "
                               "1.00 GiB memory each = {CPU: 2.8, memory: 7.00 GiB}")
    assert plan.memory_note == "memory estimated per process: a worker 3.00 GiB, a source actor 1.00 GiB"
    # explicit GiB win (and apply without an estimate, as in a Tune trial); 0 reserves nothing
    plan = plan_resources(ClusterConfig(workers=2, memory_per_worker_gb=1.5, memory_per_source_actor_gb=0), 1,
                          {"CPU": 4.0}, None)
    assert plan.workers.resources["memory"] == 1.5 * GIB and "memory" not in plan.actors.resources
    # a resources dict without memory (a CPU-only plan) asks for none
    assert "memory" not in plan_resources(ClusterConfig(), 1, {"CPU": 4.0}, EST).workers.resources


def test_short_of_memory_names_both_sides_per_node_and_the_way_out():
    free = total = {"CPU": 2.0, "memory": 14.5 * GIB}
    plan = plan_resources(ClusterConfig(workers=64), 0, free, EST)
    with pytest.raises(ConfigError) as err:
        check_placement(plan, free, total, [dict(total)])
    msg = str(err.value)
    assert msg.startswith("cannot place the job: it requests 64 workers x {CPU: 0.03} and 3.00 GiB memory each = "
                          "{CPU: 1.92, memory: 192.00 GiB}, but the cluster has {CPU: 2 free of 2, memory: "
                          "14.50 GiB free of 14.50 GiB} (short of memory)"), msg
    assert "set cluster.memory_per_worker_gb" in msg and "memory estimated per process: a worker 3.00 GiB" in msg
    # several nodes: each is named; one worker larger than every node cannot be placed at all
    nodes = [{"CPU": 2.0, "memory": 8.0 * GIB}, {"CPU": 2.0, "memory": 8.0 * GIB}]
    total = {"CPU": 4.0, "memory": 16.0 * GIB}
    plan = plan_resources(ClusterConfig(workers=6), 0, total, EST)
    with pytest.raises(ConfigError, match=r"short of memory\); .* per node: \{CPU: 2, memory: 8.00 GiB\}; "):
        check_placement(plan, total, total, nodes)
    plan = plan_resources(ClusterConfig(workers=1, memory_per_worker_gb=9), 0, total, None)
    with pytest.raises(ConfigError, match=r"no single node can hold one of the workers .*; for memory, lower"):
        check_placement(plan, total, total, nodes)
    plan = plan_resources(ClusterConfig(workers=1, cpus_per_worker=3, memory_per_worker_gb=1), 0, total, None)
    with pytest.raises(ConfigError, match="no single node can hold one of the workers") as err:
        check_placement(plan, total, total, nodes)
    assert "for memory" not in str(err.value)  # CPUs are what no node has


def test_totals_that_fit_must_also_pack_onto_the_nodes():
    nodes = [{"CPU": 4.0, "memory": 10.0 * GIB}, {"CPU": 4.0, "memory": 10.0 * GIB}]
    total = {"CPU": 8.0, "memory": 20.0 * GIB}
    fits = plan_resources(ClusterConfig(workers=2, memory_per_worker_gb=6), 0, total, None)
    check_placement(fits, total, total, nodes)  # one per node
    three = plan_resources(ClusterConfig(workers=3, memory_per_worker_gb=6), 0, total, None)  # 18 of 20 GiB ...
    with pytest.raises(ConfigError, match="fit the cluster's totals but not onto its nodes together.*for memory"):
        check_placement(three, total, total, nodes)  # ... but two 6 GiB workers never share a 10 GiB node


def test_tune_plans_hold_memory_for_each_trial(profile):
    from l2t_dist.tune.plan import plan_trials

    j = job(cluster={"workers": 2})
    e = mem.estimate_memory(j)
    total = {"CPU": 8.0, "memory": 2 * (2 * e.worker + e.actor) + 1.0}
    plan = plan_trials(j, "ray", 2, total, [total])
    assert plan.per_trial["memory"] == 2 * e.worker + e.actor
    # the trial re-plans from its job alone (tune/trial.py): the sizes travel in the overrides
    assert plan.job_overrides["cluster.memory_per_worker_gb"] * GIB == e.worker
    assert plan.job_overrides["cluster.memory_per_source_actor_gb"] * GIB == e.actor
    with pytest.raises(ConfigError, match=r"cannot place the sweep: 3 .*short of memory"):
        plan_trials(j, "ray", 3, total, [total])
    # a local trial is one process with the whole batch and its sources: memory can cap concurrency
    local = mem.estimate_memory(j, workers=1, colocated=True).worker
    plan = plan_trials(j, "local", 4, {"CPU": 8.0, "memory": 2.5 * local}, [{"CPU": 8.0, "memory": 2.5 * local}])
    assert plan.concurrency == 2 and plan.trial_resources == {"cpu": 1.0, "memory": float(local)}


# ---- a real local Ray ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _train(argv) -> tuple[int, str, str]:
    from l2t_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_64_workers_fail_in_seconds_before_ray_train_starts(local_ray, tmp_path):
    """The report of issue 16: cluster.workers=64 on this machine used to start 64 workers and
    end in Ray's OOM killer after minutes. Now: exit 2 in seconds, both sides named."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree(tmp_path, method={"name": "scratch"}, sources=[],
                                        data={"batch_size": 128}, cluster={"workers": 64})))
    t0 = time.perf_counter()
    code, _, err = _train(["train", str(path), "--backend", "ray", "--quiet"])
    took = time.perf_counter() - t0
    assert code == 2, err
    free = local_ray.available_resources()["memory"] / GIB
    assert "error: cannot place the job: it requests 64 workers x {CPU: 0.03} and " in err, err
    assert f"memory: {free:.2f} GiB free of " in err and "(short of memory)" in err, err
    assert took < 30, took
    assert not (tmp_path / "p" / "ray").exists()  # Ray Train's storage: never created, no worker started


def test_a_small_served_job_gets_its_memory_from_ray_and_trains(local_ray, tmp_path, source_ckpt):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree(tmp_path, ckpt=source_ckpt, method={"name": "fm"},
                                        cluster={"workers": 2, "cpus_per_worker": 0.4, "cpus_per_source_actor": 0.2,
                                                 "request_timeout_s": 120, "start_timeout_s": 60})))
    total = local_ray.cluster_resources()["memory"]
    lowest, done = [total], threading.Event()

    def watch():  # the memory that Ray had left while the job ran
        while not done.is_set():
            lowest[0] = min(lowest[0], local_ray.available_resources().get("memory", total))
            time.sleep(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        code, out, err = _train(["train", str(path), "--backend", "ray", "--json"])
    finally:
        done.set()
        th.join(timeout=5)
    assert code == 0, err + out
    plan = next(line for line in out.splitlines() if line.startswith("[ray] plan: "))
    e = mem.estimate_memory(parse_job(tree(tmp_path, ckpt=source_ckpt, method={"name": "fm"})))
    assert f"2 workers x {{CPU: 0.4}} and {e.worker / GIB:.2f} GiB memory each" in plan, plan
    assert f"1 source actors x {{CPU: 0.2}} and {e.actor / GIB:.2f} GiB memory each" in plan, plan
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and Path(summary["run_dir"], "last.pt").exists()
    # Ray held the planned memory while the workers and the actor ran, and gets it all back
    assert total - lowest[0] >= 2 * e.worker + e.actor - 1e6, (total - lowest[0]) / GIB
    deadline = time.time() + 30
    while local_ray.available_resources().get("memory", 0) < total and time.time() < deadline:
        time.sleep(0.5)
    assert local_ray.available_resources().get("memory", 0) == total
