"""The job schema: one YAML file per experiment, `key=value` overrides on the command line.

Validation happens here, before any data or model is touched, so a typo costs seconds, not
an hour of training. Every error names the key, what was wrong and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from l2t_dist.errors import ConfigError
from l2t_dist.method.methods import get_method, method_names
from l2t_dist.models.names import ARCH_NAMES, check_arch  # torch-free; tv:/timm: names import their library

DATA_KINDS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "cub200", "stanford_dogs", "mit67",
              "stanford40", "parquet", "synthetic")
PAIR_PRESETS = ("single", "one_to_one", "all_to_all")
# The method names come from the registry (l2t_dist/method/methods.py, torch-free), so that a
# new method is one class there; a Literal keeps the schema's enum and its error message.
MethodName = Literal[method_names()]

TapSpec = Union[int, str]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ARCH_DESCRIPTION = ("architecture: " + ", ".join(ARCH_NAMES) + ", or tv:NAME (any torchvision classification "
                    "model, e.g. tv:resnet50) or timm:NAME (any timm model, e.g. timm:efficientnet_b0), built "
                    "without weights")
TAPS_DESCRIPTION = ("taps to offer for matching: indices, tap names (`l2t-dist sources inspect` lists them) or, for "
                    "tv:/timm: models, any module path; default: the end of each stage")


def _check_arch(value: str) -> str:
    """Built-in names are checked here; tv:/timm: names against the library's own list (imported
    only then), with close matches on a typo."""
    try:
        return check_arch(value)
    except ConfigError as err:
        raise ValueError(str(err)) from None


class DataConfig(_Section):
    """Where the target task's images come from and how they are split."""

    kind: Literal[DATA_KINDS] = "synthetic"
    path: str = Field("task=c,classes=10,per_class=100,size=32,seed=0",
                      description="dataset folder; for synthetic, a spec like task=c,classes=10")
    train_split: str = Field("train", description="training split as named on disk")
    test_split: str = Field("test", description="test split as named on disk (only reported)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="class-balanced validation share held out from train")
    split_seed: int = Field(0, description="seed of the validation hold-out and the per-class subset")
    per_class: Optional[int] = Field(None, ge=1, description="limited-data regime: training images per class")
    official_splits: Optional[str] = Field(
        None, description="prefix of the official L2T-ww split files, e.g. ../shared/data/l2tww-splits/stl10")
    image_size: int = Field(32, ge=8, le=512, description="side of the square images fed to the networks")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    augment: bool = Field(True, description="random training augmentation: memory pipeline, pad-4 crop and "
                                            "horizontal flip; stream pipeline, RandomResizedCrop and flip")
    pipeline: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: every split decoded once into uint8 tensors (sizes up to 96; pad-4 crop + flip); "
                            "stream: each batch decoded from the original images by data.decode_workers processes "
                            "with the official L2T-ww transforms (train RandomResizedCrop + flip, eval Resize "
                            "size*256/224 + CenterCrop); auto: stream when data.image_size > 96 or the decoded splits "
                            "would exceed 2 GiB, else memory (decided from the job and the dataset's size only, so "
                            "every worker and every resume agree)")
    decode_workers: int = Field(2, ge=0, le=64, description="processes that decode and augment the batches of the "
                                                            "stream pipeline; 0: in the training process")


class _Network(_Section):
    """A section naming a network by `arch` (checked: built-in, tv:NAME or timm:NAME)."""

    @field_validator("arch", check_fields=False)
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _check_arch(v)


class SourceConfig(_Network):
    """One frozen, pretrained source network."""

    name: str = Field(..., min_length=1, description="a short name, used in pair names and metrics")
    arch: str = Field(..., description=ARCH_DESCRIPTION)
    checkpoint: str = Field(..., description="checkpoint file (L2T-ww, akamaster, a state_dict, safetensors or "
                                             "l2t-dist format)")
    taps: Optional[list[TapSpec]] = Field(None, description=TAPS_DESCRIPTION)
    num_classes: Optional[int] = Field(None, ge=1,
                                       description="classes of the source task; default: from the checkpoint")
    allow_unsafe_pickle: bool = Field(
        False, description="DANGEROUS: unpickle the checkpoint in full if it holds Python objects beyond tensors "
                           "(a pickle can run any code while it loads); only for a file you trust")


class TargetConfig(_Network):
    """The network that is trained on the target task."""

    arch: str = Field("vgg9_bn", description=ARCH_DESCRIPTION)
    taps: Optional[list[TapSpec]] = Field(None, description=TAPS_DESCRIPTION)
    checkpoint: Optional[str] = Field(
        None, description="start the target from this checkpoint of target.arch (the formats of "
                          "sources[].checkpoint) instead of a random initialisation; every key must fit except the "
                          "classifier head, which is new (the task's classes). Required by method finetune, "
                          "allowed for every method")
    allow_unsafe_pickle: bool = Field(
        False, description="DANGEROUS: unpickle target.checkpoint in full if it holds Python objects beyond tensors "
                           "(a pickle can run any code while it loads); only for a file you trust")


class MethodConfig(_Section):
    """Which transfer method, on which pairs, with which strength."""

    name: MethodName = "l2t_ww"
    pairs: Optional[Union[Literal["single", "one_to_one", "all_to_all"], list[list[str]]]] = Field(
        None, description="single, one_to_one, all_to_all, or a list of [source:tap, target_tap]; default: "
                          + ", ".join(f"{m.name} {m.default_pairs}" for m in map(get_method, method_names())
                                      if m.uses_pairs))
    beta: float = Field(0.5, ge=0.0, description="weight of the transfer loss")
    T: int = Field(2, ge=1, le=50, description="matching steps in the look-ahead")
    where: Literal["relu6", "relu", "const"] = Field("relu6", description="where-network type")
    meta_interval: int = Field(1, ge=1, description="run the meta-update every k iterations")
    hypergrad: Literal["keep", "replay"] = Field(
        "keep", description="keep: hold look-ahead graphs (fast); replay: recompute them (lean memory)")

    @field_validator("pairs")
    @classmethod
    def _pairs_shape(cls, v):
        if isinstance(v, list):
            for p in v:
                if len(p) != 2 or ":" not in str(p[0]):
                    raise ValueError(f"each explicit pair must be [SOURCE:TAP, TARGET_TAP], got {p!r}")
        return v

    def resolved_pairs(self):
        """The job's pairs, else the method's preset (the paper's pairing); None: no pairs."""
        return self.pairs if self.pairs is not None else get_method(self.name).default_pairs


class OptimConfig(_Section):
    """SGD with momentum for θ, cosine-annealed per epoch."""

    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(200, ge=1)


class MetaConfig(_Section):
    """Adam for φ, the what/where networks."""

    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)


class RunConfig(_Section):
    """Bookkeeping: where outputs go, seeds, devices."""

    name: str = Field("job", min_length=1)
    seed: int = 0
    out_dir: str = Field("runs", description="runs are written to OUT_DIR/NAME")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    checkpoint_every: Optional[int] = Field(None, ge=1, description="also checkpoint every K iterations")
    max_iters_per_epoch: Optional[int] = Field(None, ge=1, description="cap iterations per epoch (smoke runs)")
    eval_every: int = Field(1, ge=1, description="evaluate val and test every k epochs (and after the last)")
    trace: bool = Field(False, description="write RUN_DIR/trace.jsonl: metrics, λ and checksums of every iteration")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="floating-point type of the training process (torch's default dtype there); "
                               "float64 is for exactness checks, served sources still compute in float32")


class ClusterConfig(_Section):
    """Where and how `--backend ray` runs (ignored by the local backend). See docs/distributed.md."""

    address: Optional[str] = Field(
        None, description="Ray cluster: None starts a local Ray (or joins $RAY_ADDRESS, e.g. under "
                          "`ray job submit`); 'auto', HOST:PORT or ray://HOST:10001 joins a running one")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the local Ray that the command starts; "
                                                            "default: every core")
    workers: int = Field(2, ge=1, description="data-parallel train workers; the global batch is split among them")
    cpus_per_worker: Optional[float] = Field(
        None, gt=0, description="CPUs per worker (fractions allowed); default: fit the free CPUs")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (fractions allowed)")
    memory_per_worker_gb: Optional[float] = Field(
        None, ge=0, description="memory (GiB) Ray reserves per worker; default: estimated from the job "
                                "(docs/distributed.md); 0: reserve none")
    worker_resources: dict[str, float] = Field(default_factory=dict,
                                               description="custom Ray resources per worker (pins workers to nodes)")
    sources_mode: Literal["served", "colocated"] = Field(
        "served", description="served: one Ray actor per source (and replica) streams features to the workers; "
                              "colocated: every worker runs the sources itself")
    source_actors: int = Field(1, ge=1, description="actors (replicas) per source; worker r uses replica r mod k")
    cpus_per_source_actor: Optional[float] = Field(
        None, gt=0, description="CPUs per source actor (fractions allowed); default: fit the free CPUs")
    gpus_per_source_actor: float = Field(0.0, ge=0, description="GPUs per source actor (fractions allowed)")
    memory_per_source_actor_gb: Optional[float] = Field(
        None, ge=0, description="memory (GiB) Ray reserves per source actor; default: estimated; 0: reserve none")
    source_resources: dict[str, float] = Field(default_factory=dict,
                                               description="custom Ray resources per source actor")
    feature_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="transport dtype of served features")
    prefetch: int = Field(1, ge=0, le=8, description="batches of features requested ahead of the step")
    meta_sync: Literal["per_shard", "global"] = Field(
        "global", description="global: every look-ahead step and reverse product is all-reduced, so N workers "
                              "compute the one-process hyper-gradient of the global batch (the default: it matched "
                              "one process's accuracy, docs/distributed.md); per_shard: each worker looks ahead on "
                              "its shard and the hyper-gradients are averaged (2T+2 fewer θ-sized all-reduces per "
                              "iteration, another algorithm)")
    sync_bn: Optional[bool] = Field(
        None, description="batch norm with the global batch's moments (a differentiable all-reduce per BN forward, "
                          "real step and look-ahead). null: whenever meta_sync is global and every BN of the target "
                          "is torch's, so N workers equal one process (else per-worker statistics); true: require "
                          "it (needs meta_sync: global; refuses BN layers with a forward of their own, like timm's "
                          "BatchNormAct2d); false: per-worker statistics, averaged before evaluation and checkpoints "
                          "(no all-reduce per BN forward)")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the latest checkpoint")
    actor_max_restarts: int = Field(2, ge=0, description="restarts of a dead source actor (requests are retried)")
    request_timeout_s: float = Field(300.0, gt=0, description="longest wait for one batch of served features")
    start_timeout_s: float = Field(120.0, gt=0, description="longest wait for source actors to load")
    storage_path: Optional[str] = Field(
        None, description="Ray Train checkpoint storage (shared storage on multi-node); default OUT_DIR/NAME/ray")

    @model_validator(mode="after")
    def _sync_bn_needs_global(self):
        if self.sync_bn and self.meta_sync != "global":
            raise ValueError("cluster.sync_bn=true needs cluster.meta_sync=global: synchronised moments are those of "
                             "the global batch, which a look-ahead per shard does not see")
        return self


class TrackingConfig(_Section):
    """MLflow experiment tracking and model registry, written by rank 0 only. See docs/tracking.md."""

    enabled: Optional[bool] = Field(
        None, description="None: track when mlflow is importable (the `l2t-dist` command); true: require it; "
                          "false: no tracking")
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                          "working directory (registry included, no server)")
    experiment: str = Field("l2t-dist", min_length=1, description="MLflow experiment of the run")
    registered_model: Optional[str] = Field(
        None, description="register the final target model under this name; the alias 'champion' moves to it "
                          "only when its val accuracy beats the current champion's")
    heatmap_every: int = Field(1, ge=0, description="log the λ heat-map PNG every k epochs (0: at the end only)")
    log_checkpoint: bool = Field(True, description="log the final checkpoint (last.pt) as an artifact")


class JobConfig(_Section):
    data: DataConfig = DataConfig()
    sources: list[SourceConfig] = Field(default_factory=list)
    target: TargetConfig = TargetConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    meta: MetaConfig = MetaConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _sources_fit_method(self):
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        method = get_method(self.method.name)
        if method.needs_sources and not self.sources:
            raise ValueError(f"method {method.name!r} needs at least one entry under 'sources' "
                             "(name, arch, checkpoint); use method.name=scratch to train without one")
        if method.single_source and len(self.sources) != 1:
            raise ValueError(f"method {method.name!r} takes exactly one source")
        if not method.takes_sources and self.sources:
            raise ValueError(f"method {method.name!r} uses no sources, but the job lists {', '.join(names)}; "
                             "remove them (sources=[] on the command line)")
        if method.needs_target_checkpoint and not self.target.checkpoint:
            raise ValueError(f"method {method.name!r} starts the target from a pretrained checkpoint: set "
                             "target.checkpoint=PATH, a checkpoint of target.arch (its classifier head is replaced)")
        return self


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"invalid job {where}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1])
            lines.append(f"  - unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e.get('input')!r})" if e["loc"] else ""  # at the top level the input is the whole job
            lines.append(f"  - {key}: {msg}{got}")
    return "\n".join(lines)


def _allowed_keys(loc) -> list[str]:
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return sorted(model.model_fields)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: '{'.'.join(parts[:i + 1])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML (so 0.5, true, [1,2] work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. method.beta=0.5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        try:
            _set_dotted(tree, key.strip(), value)
        except (IndexError, ValueError):
            raise ConfigError(f"override {item!r}: no such list entry") from None
    return tree


def parse_job(tree: dict, where: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


def load_job(path: Optional[str | Path], overrides: list[str] = ()) -> JobConfig:
    """Read a YAML job (or the embedded defaults when path is None) and apply overrides."""
    tree: dict = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job file {str(p)!r} not found; ready-made jobs are in jobs/")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"job file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"job file {str(p)!r} must hold a mapping of sections (data, sources, ...)")
        where = f"file {str(p)!r}"
    apply_overrides(tree, list(overrides))
    return parse_job(tree, where)


def dump_job(job: JobConfig) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


def flatten(job: JobConfig) -> dict[str, Any]:
    """Dotted keys to scalar values, for experiment trackers."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = node

    walk("", job.model_dump(mode="json"))
    return out
