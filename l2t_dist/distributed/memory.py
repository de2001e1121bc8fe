"""How much memory a train worker and a source actor need, estimated before anything starts.

Ray places by logical resources only: without a `memory` request it packs 64 workers onto a
24 GB machine, and its OOM killer ends them minutes later. So every worker and source actor
asks Ray for the memory estimated here (resources.py puts it into the plan and checks that
it fits). The estimate errs on the high side (by 1.1-2x against the peaks measured below);
`cluster.memory_per_worker_gb` / `memory_per_source_actor_gb` replace it for a cluster where
it is wrong.

The model (b: images of a worker's shard; s: bytes per element of run.dtype). Its constants
were measured on the 2-core, 24 GB development machine (Python 3.11, torch 2.14.1, Ray 2.60),
as docs/distributed.md records:

train worker = process + runtime + data + state + features + max(step, eval) [+ sources]
- process: RSS of an idle Ray Train worker that has imported torch and l2t_dist (674 MiB);
- runtime: what torch's first training iterations add whatever the model (thread pools,
  oneDNN caches, allocator arenas): up to ~500 MiB beyond the saved tensors below;
- data, in-memory pipeline (train/data_pipeline.py): the whole target task as uint8 tensors,
  which every worker holds: images x 3 x size²; known datasets by their image counts, a
  folder dataset (parquet, imagefolder, ...) as CIFAR-sized; streaming pipeline
  (train/streaming.py): no images are held, but each of data.decode_workers DataLoader
  processes takes DECODE_WORKER (160 MiB unique memory measured, decoding 500x375 JPEGs to
  224x224 shards of 32) plus the shards it has ready, and the worker holds the shards in
  flight; which pipeline: data_pipeline.pipeline_kind, the trainer's own choice;
- state: θ (target, regressors, heads) as parameters, gradients and momentum; φ as
  parameters, gradients and Adam's two moments; both counted on the job's own student;
- step: the tensors that autograd saves in the real step's forward, F bytes per image,
  MEASURED on the job's own student (objective.prepare + real_loss on 2 random images, under
  `torch.autograd.graph.saved_tensors_hooks`), times b; for methods with meta-networks the
  look-ahead keeps T matching steps of a forward and a create_graph backward (about 2F per
  image each, measured with the same hooks over whole L2T iterations: 4.4, 9.4 and 19.6 MiB
  per image at T = 1, 2, 4 for VGG9-bn at 32x32, F = 2.5 MiB), so b·F·(1 + 2T), plus the
  θ-sized iterates 2(T+1)·|θ|; all times STEP_FACTOR for what autograd does not save
  (gradients of activations, backward temporaries);
- eval: a no-grad forward of data.eval_batch_size images (EVAL_LIVE_TENSORS of the largest
  saved tensor alive at once), or the λ report of meta methods on PAIR_REPORT_IMAGES images;
  it never runs at the same time as a step;
- features: the requested source maps of a shard, for the prefetched batches too;
- sources (colocated only): their parameters and their forward (the tensors a graph would
  save: an upper bound, since inference frees them as it goes).
source actor = process (RSS of an idle actor with torch: 570 MiB) + runtime + parameters +
the forward of one shard (upper bound as above) + its outputs twice (tensors and encoded
numpy); every actor asks for the largest source's estimate. Totals get SAFETY on top.

Against the peak RSS of real steps (fresh process, 2 threads) the step model gave 1.05x
(scratch, VGG9-bn, b=128) to 1.9x (L2T-ww T=2, b=32) of the measured growth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from l2t_dist.config import JobConfig

MIB = 2**20
GIB = 2**30
PROCESS_WORKER = 700 * MIB   # idle Ray Train worker with torch and l2t_dist imported: 674 MiB RSS (376 MiB unique)
PROCESS_ACTOR = 600 * MIB    # idle source actor: 570 MiB RSS (312 MiB unique)
RUNTIME = 512 * MIB          # torch's working memory in the first iterations, beyond the saved tensors
STEP_FACTOR = 1.5            # peak growth of a step / the tensors autograd saves in it
LOOKAHEAD_PER_T = 2.0        # saved tensors per image of one look-ahead matching step, in units of F
EVAL_LIVE_TENSORS = 3        # input, output and one temporary alive at once in a no-grad forward
PAIR_REPORT_IMAGES = 256     # train/loop.py: the λ report of meta methods runs on this many val images
SAFETY = 1.1
DECODE_WORKER = 256 * MIB    # one DataLoader decode process (160 MiB measured; larger originals decode larger)
FOLDER_IMAGES = 60_000       # parquet / imagefolder: the size is unknown without reading the data
DATASET_IMAGES = {"cifar10": 60_000, "cifar100": 60_000, "stl10": 13_000, "tinyimagenet": 110_000,
                  "cub200": 11_788, "stanford_dogs": 20_580, "mit67": 15_620, "stanford40": 9_532}
DTYPE_BYTES = {"float32": 4, "float64": 8}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass
class MemoryEstimate:
    """Bytes per train worker and per source actor (0: no actors), with their parts."""

    worker: int
    actor: int
    worker_parts: dict[str, int] = field(default_factory=dict)
    actor_parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        def one(what: str, total: int, parts: dict[str, int]) -> str:
            inner = " + ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
            return f"{what} {gib(total)}" + (f" ({inner}, x{SAFETY:g})" if inner else "")

        out = one("a worker", self.worker, self.worker_parts)
        return out + (", " + one("a source actor", self.actor, self.actor_parts) if self.actor else "")


@dataclass(frozen=True)
class Profile:
    """What the estimate measures on the job's own models (float32 bytes, per image)."""

    forward: int        # saved tensors of the real step's forward
    largest: int        # the largest of them
    features: int       # the requested source maps
    theta: int          # elements of θ and φ
    phi: int
    sources: dict       # name -> (parameter elements, forward bytes, output bytes)


def dataset_images(job: JobConfig) -> int:
    """Images the target task holds in memory (train, val and test), from the data spec alone."""
    d = job.data
    if d.kind == "synthetic":
        from l2t_dist.data import parse_spec

        spec = parse_spec(d.path)
        return 2 * spec.classes * spec.per_class  # a train and a test split of classes x per_class
    return DATASET_IMAGES.get(d.kind, FOLDER_IMAGES)


def data_bytes(job: JobConfig, b: int) -> int:
    """The task's images in a worker of shards of b: the whole task in memory, or what the
    streaming pipeline's decode processes and batches in flight take."""
    from l2t_dist.train.data_pipeline import PREFETCH_PER_WORKER, decoded_bytes, pipeline_kind

    d = job.data
    images = dataset_images(job)
    if pipeline_kind(d, images) == "memory":
        return decoded_bytes(images, d.image_size)
    shard = decoded_bytes(b, d.image_size)
    return d.decode_workers * (DECODE_WORKER + PREFETCH_PER_WORKER * shard) + (job.cluster.prefetch + 2) * shard


def saved_bytes(fn) -> tuple[int, int]:
    """(total, largest) bytes of the distinct non-parameter tensors that autograd saves while
    fn runs; the storages are held until the end, so none is freed and counted twice."""
    import torch

    held: dict[int, object] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            held.setdefault(st.data_ptr(), st)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    sizes = [st.nbytes() for st in held.values()]
    del out
    return sum(sizes), max(sizes, default=0)


def profile(job: JobConfig, trainee=None) -> Profile:
    """Measure the job's student and sources, built without weights (l2t_dist/validate.py)."""
    import torch

    from l2t_dist.sources.feeder import source_features
    from l2t_dist.validate import build_skeleton, tiny_torch_work

    trainee = trainee or build_skeleton(job)
    obj, size, n = trainee.objective, job.data.image_size, 2
    with tiny_torch_work():
        x = torch.rand(n, 3, size, size, dtype=obj.dtype)
        y = torch.arange(n) % 2
        feats = source_features(trainee.sources, trainee.requests, x)
        obj.student.train()
        forward, largest = saved_bytes(lambda: obj.real_loss(obj.prepare(x, y, feats)))
        scale = 4 / obj.dtype.itemsize  # the skeleton has the process's default dtype
        sources = {src.name: _source_profile(src, trainee.requests.get(src.name), x[:1], size, scale)
                   for src in trainee.sources}
    return Profile(int(forward * scale / n), int(largest * scale / n), sum(v[2] for v in sources.values()),
                   sum(p.numel() for p in obj.theta_params()), sum(p.numel() for p in obj.phi_params()), sources)


def _source_profile(src, req, x, size: int, scale: float) -> tuple[int, int, int]:
    """(parameter elements, forward bytes, output bytes) of one source for one image `x`."""
    params = sum(p.numel() for p in src.model.parameters())
    if req is None:  # no pair uses it: it is loaded, never run
        return params, 0, 0
    out = 4 * sum(c * h * w for tap, c, h, w in src.model.tap_shapes(size) if tap in req.taps)  # float32 maps
    xg = x.clone().requires_grad_(True)  # a graph is built only so that its tensors can be counted
    fwd = saved_bytes(lambda: src.model.forward_taps(xg, list(req.taps), logits=req.logits))[0]
    return params, int(scale * fwd), out


_PROFILES: dict[str, Profile] = {}
_KEEP_PROFILES = 32


def job_profile(job: JobConfig) -> Profile:
    """The job's checked (validate.check_job: train's errors) and measured models. Neither
    depends on the cluster (but sync_bn, which the check reads), optimiser, run or checkpoint
    paths, so a sweep's trials and a retried command measure once per process."""
    import json

    from l2t_dist.validate import check_job

    d = job.model_dump(mode="json")
    key = json.dumps({"data": d["data"], "target": d["target"], "method": d["method"], "dtype": d["run"]["dtype"],
                      "sync_bn": d["cluster"]["sync_bn"],  # check_job refuses some networks with it
                      "sources": [{k: v for k, v in src.items() if k != "checkpoint"} for src in d["sources"]]},
                     sort_keys=True)
    if key not in _PROFILES:
        if len(_PROFILES) >= _KEEP_PROFILES:
            _PROFILES.pop(next(iter(_PROFILES)))
        _PROFILES[key] = profile(job, check_job(job))
    return _PROFILES[key]


def estimate_memory(job: JobConfig, workers: Optional[int] = None, colocated: Optional[bool] = None,
                    measured: Optional[Profile] = None) -> MemoryEstimate:
    """Memory of one train worker (one of `workers`, default cluster.workers; `colocated`: the
    sources run in the workers, default from cluster.sources_mode) and of one source actor.
    Raises train's ConfigError when the job's models or pairs cannot be built."""
    cc = job.cluster
    workers = workers or cc.workers
    colocated = cc.sources_mode == "colocated" if colocated is None else colocated
    p = measured or job_profile(job)
    s = DTYPE_BYTES[job.run.dtype]
    f = s / 4  # the profile counts float32 bytes
    b = math.ceil(job.data.batch_size / workers)
    T = job.method.T
    meta = p.phi > 0
    step = STEP_FACTOR * (b * p.forward * f * (1 + LOOKAHEAD_PER_T * T if meta else 1)
                          + (2 * (T + 1) * p.theta * s if meta else 0))
    evaluation = EVAL_LIVE_TENSORS * p.largest * f * job.data.eval_batch_size
    report = PAIR_REPORT_IMAGES * p.forward * f if meta else 0
    parts = {"process": PROCESS_WORKER, "runtime": RUNTIME, "data": data_bytes(job, b),
             "state": (3 * p.theta + 4 * p.phi) * s, "features": (cc.prefetch + 2) * b * p.features * f,
             "step": max(step, evaluation, report)}
    if colocated:
        parts["sources"] = sum(4 * n + b * fwd for n, fwd, _ in p.sources.values())
    actor: dict[str, float] = {}
    if p.sources and not colocated:
        n, fwd, out = max(p.sources.values(), key=lambda v: 4 * v[0] + b * (v[1] + 2 * v[2]))
        actor = {"process": PROCESS_ACTOR, "runtime": RUNTIME, "parameters": 4 * n, "forward": b * fwd,
                 "outputs": 2 * b * out}
    parts, actor = {k: int(v) for k, v in parts.items()}, {k: int(v) for k, v in actor.items()}
    return MemoryEstimate(_total(parts), _total(actor), parts, actor)


def _total(parts: dict[str, int]) -> int:
    """The sum with SAFETY, rounded up to a MiB; 0 for no parts."""
    return math.ceil(SAFETY * sum(parts.values()) / MIB) * MIB if parts else 0
