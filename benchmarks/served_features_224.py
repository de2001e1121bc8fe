"""Served against colocated sources at 224x224: the feature bytes per image and what moving them
costs per batch, measured directly (JSON output). A full `--backend ray` L2T-ww run at 224 is
minutes per iteration on 2 cores; this times the part that differs between the two modes.

The source is the paper's: a torchvision ResNet34 (random weights, a plain state_dict), taps
layer1-4, random uint8 batches of 224x224 images. Two raylets on this machine
(ray.cluster_utils.Cluster): the source actor (distributed/serving.py SourceServer) on the
head; a client actor that plays the train worker on the head too ("same node": the object
store is shared memory) or on the second raylet ("other raylet": the maps are copied between
object stores over loopback TCP, as between two machines but without a wire). Per batch:
- colocated: ColocatedFeeder.result, the ResNet34 forward in the client's process;
- served: ServedFeeder.submit + result (send the uint8 batch, the actor's forward, the maps
  back, decoded to tensors), with fp32 or bf16 transport; `transport_s` = that round trip
  minus the actor's own compute time (its `compute_s`), i.e. serialisation, object-store
  copies and the decode on the client.

    python benchmarks/served_features_224.py --json benchmarks/results/distributed/served_224.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

TAPS = ["layer1", "layer2", "layer3", "layer4"]


class Client:
    """Plays a train worker: times colocated features or served round trips for one batch size."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.threads = threads

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def colocated(self, source: dict, batch: int, size: int, rounds: int) -> list[float]:
        import torch

        from l2t_dist.config import SourceConfig
        from l2t_dist.sources.colocated import load_sources
        from l2t_dist.sources.feeder import ColocatedFeeder, TapRequest

        srcs = load_sources([SourceConfig.model_validate(source)], torch.device("cpu"))
        feeder = ColocatedFeeder(srcs, {source["name"]: TapRequest(tuple(TAPS))}, torch.device("cpu"))
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        out = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            feeder.result(feeder.submit(x))
            out.append(time.perf_counter() - t0)
        return out

    def served(self, handles: dict, name: str, batch: int, size: int, dtype: str, rounds: int) -> dict:
        import ray
        import torch

        from l2t_dist.distributed.serving import ServedFeeder
        from l2t_dist.sources.feeder import TapRequest

        feeder = ServedFeeder(handles, {name: TapRequest(tuple(TAPS))}, 0, dtype, torch.device("cpu"), 600.0,
                              prefetch=0)
        actor = handles[name][0]
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        rts, computes = [], []
        for _ in range(rounds):
            before = ray.get(actor.stats.remote())["compute_s"]
            t0 = time.perf_counter()
            feats = feeder.result(feeder.submit(x))
            rts.append(time.perf_counter() - t0)
            computes.append(ray.get(actor.stats.remote())["compute_s"] - before)
        assert feats[name][TAPS[-1]].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        return {"round_trip_s": rts, "actor_compute_s": computes,
                "transport_s": [r - c for r, c in zip(rts, computes)],
                "bytes_per_image": feeder.bytes_per_image()[name]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batches", default="32", help="batch sizes, comma-separated")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3, help="batches per configuration; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the source (actor or colocated)")
    args = ap.parse_args()

    import ray
    import torch
    import torchvision
    from ray.cluster_utils import Cluster

    from l2t_dist.distributed.serving import start_source_actors, stop_source_actors

    work = Path(tempfile.mkdtemp(prefix="l2t-served-"))
    torch.manual_seed(0)
    ckpt = work / "resnet34-b627a593.pth"
    torch.save(torchvision.models.resnet34().state_dict(), ckpt)
    source = {"name": "imagenet", "arch": "tv:resnet34", "checkpoint": str(ckpt), "taps": TAPS}
    load = [os.getloadavg()]
    Path(ray._private.utils.get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:  # not 8265: another Ray may run on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"src_node": 4},
                                                            "include_dashboard": False, "dashboard_port": port})
    cluster.add_node(num_cpus=2, resources={"train_node": 4})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    results: dict = {"colocated": {}, "same_node": {}, "other_raylet": {}}
    try:
        handles, _ = start_source_actors([source], 1, {"CPU": 1, "src_node": 1}, args.threads, 0, 300)
        client_cls = ray.remote(Client)
        clients = {"same_node": client_cls.options(num_cpus=0.5, resources={"src_node": 1}).remote(args.threads),
                   "other_raylet": client_cls.options(num_cpus=0.5, resources={"train_node": 1}).remote(args.threads)}
        nodes = {k: ray.get(c.node_id.remote()) for k, c in clients.items()}
        assert nodes["same_node"] == cluster.head_node.node_id != nodes["other_raylet"], nodes
        for batch in (int(b) for b in args.batches.split(",")):
            times = ray.get(clients["same_node"].colocated.remote(source, batch, args.image_size, args.rounds))
            results["colocated"][str(batch)] = {"s": times, "median_s": statistics.median(times[1:])}
            print(f"batch {batch} colocated: {statistics.median(times[1:]):.3f} s", flush=True)
            for where in ("same_node", "other_raylet"):
                for dtype in ("fp32", "bf16"):
                    r = ray.get(clients[where].served.remote(handles, "imagenet", batch, args.image_size, dtype,
                                                             args.rounds))
                    for k in ("round_trip_s", "actor_compute_s", "transport_s"):
                        r[f"median_{k}"] = statistics.median(r[k][1:])
                    results[where].setdefault(str(batch), {})[dtype] = r
                    print(f"batch {batch} served {where} {dtype}: round trip {r['median_round_trip_s']:.3f} s, "
                          f"actor {r['median_actor_compute_s']:.3f} s, transport {r['median_transport_s']:.3f} s, "
                          f"{r['bytes_per_image']:,.0f} B/image", flush=True)
        stop_source_actors(handles)
    finally:
        ray.shutdown()
        cluster.shutdown()
    load.append(os.getloadavg())
    ratios = {}
    for batch, colo in results["colocated"].items():
        for where in ("same_node", "other_raylet"):
            for dtype, r in results[where][batch].items():
                for k in ("round_trip", "transport"):
                    ratios[f"b{batch}_{where}_{dtype}_{k}_over_colocated"] = r[f"median_{k}_s"] / colo["median_s"]
    report = {"benchmark": "served_features_224", "source": "tv:resnet34 taps layer1-4 (random, state_dict)",
              "image_size": args.image_size, "rounds": args.rounds, "threads": args.threads, "results": results,
              "ratios": ratios,
              "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_before_after": load},
              "command": "python " + " ".join(sys.argv)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
