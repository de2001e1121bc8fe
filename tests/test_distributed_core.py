"""The data-parallel pieces without Ray: flat-bucket averaging, sharding, the training loop
with the DataParallel strategy under plain torch.distributed (gloo, 2 processes), resource
planning, config, errors."""

import os
import subprocess
import sys
import time

import pytest
import torch

from l2t_dist.config import ClusterConfig, parse_job
from l2t_dist.distributed.resources import check_placement, plan_resources
from l2t_dist.errors import ConfigError
from l2t_dist.train.parallel import shard_bounds


def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one():
    for n in (2, 11, 16, 17):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


# ---- two processes on gloo -------------------------------------------------------------

def _job_tree(out_dir, ckpt):
    return {"data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=12,size=16,seed=0",
                     "image_size": 16, "batch_size": 15, "eval_batch_size": 64},
            "sources": [{"name": "s", "arch": "resnet20", "checkpoint": ckpt, "taps": [2, 8]}],
            "target": {"arch": "resnet20"}, "method": {"name": "l2t_ww", "T": 1, "beta": 0.1},
            "optim": {"lr": 0.05, "epochs": 1}, "meta": {"lr": 1e-2},
            "run": {"name": "dp", "out_dir": str(out_dir), "seed": 3, "threads": 1, "max_iters_per_epoch": 3,
                    "checkpoint_every": 1},
            "cluster": {"meta_sync": "per_shard"}}  # what simulate_data_parallel computes


def _worker(rank, world, tmp, ckpt):
    import torch.distributed as dist

    from l2t_dist.distributed.allreduce import broadcast_, flat_all_reduce_, replica_max_diff
    from l2t_dist.errors import AgreedFailure, CheckpointError
    from l2t_dist.train.loop import TrainingLoop, count_correct
    from l2t_dist.train.parallel import DataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    # flat buckets: mixed dtypes and shapes, a bucket cap that forces several buckets
    ts = [torch.full((3, 2), float(rank + 1)), torch.arange(5.0) * (rank + 1),
          torch.full((4,), rank + 1.0, dtype=torch.float64), torch.full((2, 2, 2), 10.0 * rank)]
    flat_all_reduce_(ts, bucket_bytes=24)
    assert torch.equal(ts[0], torch.full((3, 2), 1.5)) and torch.equal(ts[1], torch.arange(5.0) * 1.5)
    assert ts[2].dtype == torch.float64 and torch.equal(ts[2], torch.full((4,), 1.5, dtype=torch.float64))
    par = DataParallel(rank, world, meta_sync="per_shard")
    par.weigh([0.25, 0.75][rank])  # shards of 1 and 3 out of 4 images
    g = [torch.full((2,), float(rank + 1))]
    par.reduce_grads(g)  # the gradient of the global mean: Σ_r (n_r / N) g_r
    assert torch.allclose(g[0], torch.full((2,), 0.25 * 1 + 0.75 * 2))
    # global (the default): the loss carries the weight n_r·world/N, the reduction is a plain mean
    par_global = DataParallel(rank, world)
    par_global.weigh([0.25, 0.75][rank])
    assert par_global.meta_sync == "global" and par_global.loss_scale() == [0.5, 1.5][rank]
    g = [torch.full((2,), float(rank + 1)) * par_global.loss_scale()]
    par_global.reduce_grads(g)
    assert torch.allclose(g[0], torch.full((2,), 0.25 * 1 + 0.75 * 2))
    assert par.reduce_metrics({"loss": float(rank + 1)}, [0.25, 0.75][rank], torch.device("cpu")) == {"loss": 1.75}
    assert par.sum_count(rank + 2, torch.device("cpu")) == 5
    x = [torch.full((3,), float(rank))]
    assert replica_max_diff(x) == 1.0
    broadcast_(x, src=0)
    assert replica_max_diff(x) == 0.0 and torch.equal(x[0], torch.zeros(3))
    # an error on one rank only is raised by every rank (nobody is left in a collective)
    par.agree(None)
    try:
        par.agree(CheckpointError("missing on node 1") if rank == 1 else None)
        raise AssertionError("agree did not raise")
    except AgreedFailure as failure:
        assert isinstance(failure.error, CheckpointError) and str(failure.error) == "missing on node 1"
    # the loop: batches of 15 (shards 8 and 7), colocated source, checkpoints every iteration;
    # not quiet, with the output in files: rank 0 prints progress lines
    import sys

    sys.stdout = sys.stderr = open(f"{tmp}/out{rank}.txt", "w")
    job = parse_job(_job_tree(tmp, ckpt))
    par = DataParallel(rank, world, meta_sync=job.cluster.meta_sync)
    run = TrainingLoop(job, __import__("pathlib").Path(tmp) / "dp", parallel=par)
    summary = run.run().to_dict()
    sys.stdout.flush()
    d = run.data  # one process, the whole split: what the sharded evaluation must equal
    full = {k: 100.0 * count_correct(run.trainee.target, x, y, 7, run.device) / len(y)
            for k, x, y in (("val", d.val_x, d.val_y), ("test", d.test_x, d.test_y))}
    torch.save({"theta": {n: p.detach() for n, p in run.trainee.objective.student.named_parameters()},
                "phi": {n: p.detach() for n, p in run.trainee.objective.meta.named_parameters()},
                "buffers": {n: b.detach() for n, b in run.trainee.objective.student.named_buffers()},
                "full": full, "sizes": d.sizes(),
                "summary": summary, "reduces": par.reduces}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_loop_on_gloo_equals_the_simulation_with_unequal_shards(tmp_path, source_ckpt, single_thread):
    import torch.multiprocessing as mp

    from l2t_dist.distributed.reference import simulate_data_parallel

    mp.spawn(_worker, args=(2, str(tmp_path), source_ckpt), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["reduces"] == 6  # 3 iterations x (θ-grads + φ-grads)
    for k in ("theta", "phi"):
        for name in r0[k]:
            assert torch.equal(r0[k][name], r1[k][name]), name  # identical replicas
    assert r0["summary"]["replica_max_diff"] == 0.0
    sim = simulate_data_parallel(parse_job(_job_tree(tmp_path / "sim", source_ckpt)), world=2, iterations=3)
    for k in ("theta", "phi", "buffers"):  # buffers: BN running statistics averaged over the ranks
        assert sim[k]
        for name, ref in sim[k].items():
            torch.testing.assert_close(r0[k][name], ref, rtol=0, atol=1e-5, msg=name)
    # sharded evaluation (each rank counts its shard) equals one process on the whole split
    assert r0["sizes"]["val"] >= 3 and r0["sizes"]["test"] >= 3
    assert r0["summary"]["final_val_acc"] == r0["full"]["val"] == r1["full"]["val"]
    assert r0["summary"]["final_test_acc"] == r0["full"]["test"]
    # rank 0 alone wrote the run directory; the log has one row for the one epoch
    assert (tmp_path / "dp" / "last.pt").exists()
    assert len((tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()) == 1
    # progress: rank 0 prints a line every tenth of the epoch (here every batch but the last)
    lines = [line for line in (tmp_path / "out0.txt").read_text().splitlines() if line.startswith("[rank0]")]
    assert [line.split(" loss ")[0] for line in lines] == ["[rank0] epoch 1/1 batch 1/3", "[rank0] epoch 1/1 batch 2/3"]
    assert all(" acc " in line and line.endswith(" img/s") for line in lines), lines
    assert "[rank0]" not in (tmp_path / "out1.txt").read_text() and "epoch 1/1:" in (tmp_path / "out0.txt").read_text()


# ---- resource planning ------------------------------------------------------------------

def test_auto_plan_shares_free_cpus_between_workers_and_source_actors():
    plan = plan_resources(ClusterConfig(workers=2), n_sources=2, free={"CPU": 2.0})
    assert plan.workers.resources == {"CPU": 0.66} and plan.actors.resources == {"CPU": 0.33}
    assert plan.total()["CPU"] <= 2.0
    plan = plan_resources(ClusterConfig(workers=2, sources_mode="colocated"), n_sources=2, free={"CPU": 16.0})
    assert plan.actors is None and plan.workers.resources == {"CPU": 8.0} and plan.worker_threads == 8
    plan = plan_resources(ClusterConfig(workers=2, cpus_per_worker=0.5, gpus_per_worker=0.5, source_actors=2,
                                        source_resources={"src": 1}), n_sources=1, free={"CPU": 2.0})
    assert plan.workers.resources == {"CPU": 0.5, "GPU": 0.5}
    assert plan.actors.count == 2 and plan.actors.resources == {"CPU": 0.5, "src": 1}


def test_unplaceable_plans_fail_with_both_sides_named():
    with pytest.raises(ConfigError, match="cluster.cpus_per_worker=1.5: Ray takes fractions below 1"):
        plan_resources(ClusterConfig(cpus_per_worker=1.5), n_sources=0, free={"CPU": 4.0})
    plan = plan_resources(ClusterConfig(workers=4, cpus_per_worker=1), n_sources=1, free={"CPU": 2.0})
    with pytest.raises(ConfigError) as err:
        check_placement(plan, {"CPU": 2.0}, {"CPU": 2.0}, [{"CPU": 2.0}])
    msg = str(err.value)
    assert "4 workers x {CPU: 1} + 1 source actors x {CPU: 0.01}" in msg
    assert "CPU: 2 free of 2" in msg and "short of CPU" in msg
    plan = plan_resources(ClusterConfig(workers=1, cpus_per_worker=2), n_sources=0, free={"CPU": 4.0})
    with pytest.raises(ConfigError, match="no single node can hold one of the workers"):
        check_placement(plan, {"CPU": 4.0}, {"CPU": 4.0}, [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}])
    plan = plan_resources(ClusterConfig(workers=2), n_sources=1, free={"CPU": 0.0})
    with pytest.raises(ConfigError, match=r"requests 2 workers x \{CPU: 0.01\} .* \{CPU: 0 free of 2\}"):
        check_placement(plan, {"CPU": 0.0}, {"CPU": 2.0}, [{"CPU": 2.0}])


def test_cluster_section_defaults_and_errors():
    job = parse_job({"method": {"name": "scratch"}})
    assert job.cluster.workers == 2 and job.cluster.sources_mode == "served" and job.cluster.address is None
    assert job.cluster.meta_sync == "global" and job.cluster.sync_bn is None  # one process's answer, by default
    with pytest.raises(ConfigError, match="sync_bn=true needs cluster.meta_sync=global"):
        parse_job({"method": {"name": "scratch"}, "cluster": {"sync_bn": True, "meta_sync": "per_shard"}})
    synced = parse_job({"method": {"name": "scratch"}, "cluster": {"sync_bn": True}})
    assert synced.cluster.sync_bn and synced.cluster.meta_sync == "global"
    with pytest.raises(ConfigError, match="cluster.feature_dtype"):
        parse_job({"method": {"name": "scratch"}, "cluster": {"feature_dtype": "int8"}})



def test_the_per_shard_simulation_refuses_a_global_job(tmp_path):
    """simulate_data_parallel computes per_shard only; handed the default (global) job it says
    so before any work, instead of returning another algorithm's numbers."""
    from l2t_dist.distributed.reference import simulate_data_parallel

    tree = {k: v for k, v in _job_tree(tmp_path, "unused.pt").items() if k != "cluster"}
    with pytest.raises(ValueError, match="simulates cluster.meta_sync: per_shard, not 'global'"):
        simulate_data_parallel(parse_job(tree), world=2, iterations=1)


# ---- processes: imports and the CLI's fast failures ----------------------------------------

from test_imports import BLOCK  # noqa: E402 - blocks `import ray` / `import mlflow` in a subprocess


def test_data_parallel_modules_import_without_ray():
    mods = ["l2t_dist.distributed", "l2t_dist.distributed.allreduce", "l2t_dist.train.parallel",
            "l2t_dist.train.loop", "l2t_dist.distributed.resources", "l2t_dist.distributed.reference"]
    code = BLOCK + "".join(f"import {m}\n" for m in mods)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unreachable_address_fails_fast(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "l2t_dist.cli", "train", "method.name=scratch", "optim.epochs=1",
                          f"run.out_dir={tmp_path}", "--backend", "ray", "--address", "127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2, out.stderr
    assert "cannot reach the Ray cluster at cluster.address='127.0.0.1:9'" in out.stderr
    assert time.perf_counter() - t0 < 60
