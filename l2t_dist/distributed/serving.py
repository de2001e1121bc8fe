"""Frozen sources served by Ray actors, and the client that the train workers use.

One actor per source (and per replica, `cluster.source_actors`) loads its checkpoint once
and computes only the taps that the pairs use, under `inference_mode` (its outputs leave the
process, so they need no autograd). Workers send their shard of the augmented uint8 batch
(1 byte per pixel; normalising happens in the actor) and get numpy maps back in fp32, or
bf16/fp16 when asked, which halves the bytes that cross the object store. The client
submits a batch ahead (prefetch), so the actor computes batch b+1 while the worker steps on b.

Actors restart when they die (`max_restarts`), and Ray re-runs their pending requests
(`max_task_retries`); a request that still gets no answer within `request_timeout_s` fails
the step with a `RetryableError` (one rank sees it), and Ray Train restarts the worker group
from the last checkpoint.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from l2t_dist.errors import CheckpointError, ConfigError, RetryableError, last_line, unwrap_ray_error
from l2t_dist.sources.feeder import Features, TapRequest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _encode(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().to("cpu", DTYPES[dtype]).contiguous()
    return t.view(torch.int16).numpy() if dtype == "bf16" else t.numpy()  # numpy has no bfloat16


def _decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))  # object-store arrays are read-only
    return t.view(torch.bfloat16) if dtype == "bf16" else t


class SourceServer:
    """The actor: one frozen source. Construct through `start_source_actors`."""

    def __init__(self, source: dict, threads: int = 1, device: str = "cpu"):
        from l2t_dist.config import SourceConfig
        from l2t_dist.sources.colocated import load_sources

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        [self.src] = load_sources([SourceConfig.model_validate(source)], self.device)
        self.requests, self.images, self.compute_s = 0, 0, 0.0

    def info(self) -> dict:
        m = self.src.model
        return {"name": self.src.name, "arch": self.src.arch, "num_classes": m.num_classes, "taps": list(self.src.taps),
                "meta": self.src.meta, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def features(self, x: np.ndarray, taps: list[str], logits: bool, dtype: str = "fp32") -> dict[str, np.ndarray]:
        """Maps of the requested taps for a batch of uint8 images."""
        from l2t_dist.data import model_input

        started = time.perf_counter()
        xt = model_input(torch.from_numpy(np.array(x, copy=True)), self.device)
        with torch.inference_mode():
            out, feats = self.src.model.forward_taps(xt, taps, logits=logits)
            if logits:
                feats["logits"] = out
            result = {k: _encode(v, dtype) for k, v in feats.items()}
        self.requests += 1
        self.images += len(xt)
        self.compute_s += time.perf_counter() - started
        return result

    def stats(self) -> dict:
        return {"requests": self.requests, "images": self.images, "compute_s": self.compute_s, "pid": os.getpid()}


def start_source_actors(sources: list[dict], replicas: int, resources: dict[str, float], threads: int,
                        max_restarts: int, timeout_s: float) -> tuple[dict[str, list], dict[str, dict]]:
    """Start and wait for the actors; returns (name -> handles, name -> info). Never waits
    longer than timeout_s; a source that fails to load (missing checkpoint on its node, bad
    file) raises its own error, and every actor started so far is killed."""
    res = dict(resources)
    options = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0), "memory": res.pop("memory", None),
               "resources": res or None,
               "max_restarts": max_restarts, "max_task_retries": max_restarts if max_restarts else 0,
               "max_concurrency": 1}
    device = "cuda" if options["num_gpus"] else "cpu"
    actor_cls = ray.remote(SourceServer)
    handles: dict[str, list] = {}
    for src in sources:
        handles[src["name"]] = [actor_cls.options(**options).remote(src, threads, device) for _ in range(replicas)]
    infos: dict[str, dict] = {}
    try:
        refs = [(name, i, h.info.remote()) for name, hs in handles.items() for i, h in enumerate(hs)]
        _, pending = ray.wait([r for _, _, r in refs], num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise ConfigError(f"source actors did not start within cluster.start_timeout_s={timeout_s:g}s "
                              f"(requested {replicas} per source, each {resources}); the cluster may lack the "
                              f"resources, or loading is slow: raise the timeout")
        for name, _, ref in refs:
            info = _get(ref, f"source {name!r}", timeout_s, failure=CheckpointError)
            infos.setdefault(name, info)
    except BaseException:
        stop_source_actors(handles)
        raise
    return handles, infos


def stop_source_actors(handles: dict[str, list]) -> None:
    for hs in handles.values():
        for h in hs:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass


def _get(ref, what: str, timeout_s: float, failure=RetryableError):
    """ray.get with our errors: the remote side's own error keeps its type and message; a
    timeout or a dead actor becomes `failure` (retryable while training; a CheckpointError
    while the actors load, since a source that cannot load will not load on a retry)."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise failure(f"{what} gave no answer within cluster.request_timeout_s={timeout_s:g}s") from None
    except RayTaskError as err:
        ours = unwrap_ray_error(err)
        if ours is not None and failure is not RetryableError:
            raise type(ours)(f"{what}: {ours}") from None
        raise failure(f"{what} failed: {ours if ours is not None else last_line(err)}") from None
    except RayActorError as err:
        raise failure(f"{what} died and could not be restarted: {last_line(err)}") from None


class ServedFeeder:
    """A worker's client of the served sources (the feeder protocol of sources/feeder.py):
    submit(uint8 shard) sends it to the actors at once, result(refs) waits for the maps."""

    def __init__(self, handles: dict[str, list], requests: dict[str, TapRequest], rank: int,
                 dtype: str, device: torch.device, timeout_s: float, prefetch: int = 1):
        self.actors = {name: hs[rank % len(hs)] for name, hs in handles.items() if name in requests}
        self.requests, self.dtype, self.device = requests, dtype, device
        self.timeout_s, self.prefetch = timeout_s, prefetch
        self.bytes = {name: 0 for name in self.actors}
        self.images = {name: 0 for name in self.actors}

    def submit(self, x_uint8: torch.Tensor) -> dict:
        if not self.actors:
            return {}
        arr = ray.put(x_uint8.detach().cpu().contiguous().numpy())  # once, shared by every source
        return {name: actor.features.remote(arr, list(self.requests[name].taps), self.requests[name].logits,
                                            self.dtype)
                for name, actor in self.actors.items()}

    def result(self, refs: dict) -> Features:
        out: Features = {}
        for name, ref in refs.items():
            maps = _get(ref, f"source actor {name!r}", self.timeout_s)
            out[name] = {}
            for tap, arr in maps.items():
                self.bytes[name] += arr.nbytes
                out[name][tap] = _decode(arr, self.dtype).to(self.device)
            self.images[name] += len(next(iter(maps.values()))) if maps else 0
        return out

    def bytes_per_image(self) -> dict[str, float]:
        """Feature bytes received per image, per source (what crossed the object store)."""
        return {name: self.bytes[name] / max(1, self.images[name]) for name in self.actors}


def actor_stats(handles: dict[str, list], timeout_s: float = 10.0) -> dict[str, list[dict]]:
    """Requests, images and compute seconds per actor (empty entries for actors that do not answer)."""
    out: dict[str, list[dict]] = {}
    for name, hs in handles.items():
        out[name] = []
        for h in hs:
            try:
                out[name].append(ray.get(h.stats.remote(), timeout=timeout_s))
            except Exception:  # noqa: BLE001 - stats are best effort
                out[name].append({})
    return out
