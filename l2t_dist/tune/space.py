"""Search spaces: a YAML file of dotted job keys and their distributions.

```yaml
params:
  method.beta: {loguniform: [0.05, 5]}
  method.T: {choice: [1, 2, 3, 5]}
num_samples: 16
max_concurrent_trials: 2
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
search: auto            # auto (Optuna TPE when importable, else random), optuna, random
seed: 0
```

Everything is checked here, before Ray starts: the file's shape, each distribution and its
bounds, and that every key is a job key whose extreme values the job schema accepts (each is
applied to the job with `config.apply_overrides` and validated with `config.parse_job`). A
mistake therefore costs a second, not a cluster start, and the error names the file, the key
and what is allowed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from l2t_dist.config import JobConfig, apply_overrides, parse_job
from l2t_dist.errors import ConfigError

# name -> (argument form shown in errors, number of arguments or None for a list of values)
DISTRIBUTIONS: dict[str, tuple[str, Optional[int]]] = {
    "uniform": ("[low, high]", 2),
    "quniform": ("[low, high, q]", 3),
    "loguniform": ("[low, high], low > 0", 2),
    "qloguniform": ("[low, high, q], low > 0", 3),
    "randint": ("[low, high], integers, high excluded", 2),
    "lograndint": ("[low, high], integers >= 1, high excluded", 2),
    "choice": ("[value, value, ...]", None),
}
TOP_KEYS = ("params", "num_samples", "max_concurrent_trials", "scheduler", "search", "seed", "points_to_evaluate")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("auto", "optuna", "random")
# Keys a sweep sets itself, per trial or for the whole sweep.
RESERVED = {
    "run.name": "every trial is named after its Tune trial id",
    "run.out_dir": "trials write to OUT_DIR/<sweep name>/<trial id>",
    "run.eval_every": "ASHA needs the val accuracy of every epoch",
    "run.checkpoint_every": "trials report once per epoch",
    "optim.epochs": "set scheduler.max_t (the epochs of every trial) instead",
    "tracking": "the sweep writes the MLflow runs itself",
    "cluster": "resources are planned once for the whole sweep",
}


@dataclass
class Param:
    key: str
    dist: str
    args: list

    def domain(self):
        """The Ray Tune sampler (imports Ray)."""
        from ray import tune

        if self.dist == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.dist)(*self.args)

    def extremes(self) -> list:
        """Values the schema must accept for every sample to be valid."""
        if self.dist == "choice":
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.dist in ("randint", "lograndint"):
            return [int(low), int(high) - 1]
        return [low, high]

    def describe(self) -> str:
        return f"{self.dist}{list(self.args)}"


@dataclass
class Scheduler:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2
    max_t: Optional[int] = None  # None: the job's optim.epochs


@dataclass
class SearchSpace:
    path: str
    params: dict[str, Param]
    num_samples: int = 8
    max_concurrent_trials: Optional[int] = None
    scheduler: Scheduler = field(default_factory=Scheduler)
    search: str = "auto"
    seed: Optional[int] = None
    points_to_evaluate: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The file's content, normalised (saved in the sweep folder for --resume)."""
        return {"params": {k: {p.dist: list(p.args)} for k, p in self.params.items()},
                "num_samples": self.num_samples, "max_concurrent_trials": self.max_concurrent_trials,
                "scheduler": dict(vars(self.scheduler)), "search": self.search, "seed": self.seed,
                "points_to_evaluate": [dict(p) for p in self.points_to_evaluate]}


def _fail(path: str, what: str) -> ConfigError:
    return ConfigError(f"search space {path!r}: {what}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _param(path: str, key: str, spec: Any) -> Param:
    allowed = "; ".join(f"{n} {form}" for n, (form, _) in DISTRIBUTIONS.items())
    if not isinstance(key, str) or "." not in key:
        raise _fail(path, f"parameter {key!r} must be a dotted job key such as method.beta or optim.lr")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, f"params.{key} must be a one-entry mapping DISTRIBUTION: ARGUMENTS, e.g. "
                          f"{{loguniform: [0.05, 5]}} or {{choice: [1, 2]}}; got {spec!r}. "
                          f"Distributions: {allowed}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise _fail(path, f"params.{key}: unknown distribution {dist!r}; allowed: {allowed}")
    form, n = DISTRIBUTIONS[dist]
    where = f"params.{key}: {dist}"
    if not isinstance(args, list) or not args:
        raise _fail(path, f"{where} takes a list {form}, got {args!r}")
    if n is None:  # choice
        return Param(key, dist, list(args))
    if len(args) != n or not all(_number(a) for a in args):
        raise _fail(path, f"{where} takes {form} (numbers), got {args!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise _fail(path, f"{where}: low must be below high, got low={low} >= high={high}")
    if dist in ("loguniform", "qloguniform") and low <= 0:
        raise _fail(path, f"{where}: a log scale needs low > 0, got low={low}")
    if dist in ("randint", "lograndint"):
        if not (_int(low) and _int(high)):
            raise _fail(path, f"{where} takes integers {form}, got {args!r}")
        if dist == "lograndint" and low < 1:
            raise _fail(path, f"{where}: a log scale needs low >= 1, got low={low}")
    if n == 3 and args[2] <= 0:
        raise _fail(path, f"{where}: the step q must be positive, got q={args[2]}")
    return Param(key, dist, list(args))


def _positive_int(path: str, name: str, value, minimum: int = 1):
    if value is None:
        return None
    if not _int(value) or value < minimum:
        raise _fail(path, f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _scheduler(path: str, raw: Any) -> Scheduler:
    if raw is None:
        return Scheduler()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise _fail(path, f"scheduler must be a mapping with keys {', '.join(SCHEDULER_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(SCHEDULER_KEYS))
    if unknown:
        raise _fail(path, f"unknown key scheduler.{unknown[0]}; allowed: {', '.join(SCHEDULER_KEYS)}")
    s = Scheduler()
    if "name" in raw:
        if raw["name"] not in SCHEDULERS:
            raise _fail(path, f"scheduler.name {raw['name']!r} is not known; allowed: {', '.join(SCHEDULERS)}")
        s.name = raw["name"]
    s.grace_period = _positive_int(path, "scheduler.grace_period", raw.get("grace_period", s.grace_period))
    s.max_t = _positive_int(path, "scheduler.max_t", raw.get("max_t"))
    rf = raw.get("reduction_factor", s.reduction_factor)
    if not _number(rf) or rf <= 1:
        raise _fail(path, f"scheduler.reduction_factor must be a number > 1, got {rf!r}")
    s.reduction_factor = rf
    if s.max_t is not None and s.grace_period > s.max_t:
        raise _fail(path, f"scheduler.grace_period={s.grace_period} exceeds scheduler.max_t={s.max_t}")
    return s


def parse_space(tree: Any, path: str) -> SearchSpace:
    """Check the structure of a loaded space file (not yet against a job)."""
    if not isinstance(tree, dict):
        raise _fail(path, f"must hold a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(tree) - set(TOP_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    raw_params = tree.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise _fail(path, "needs a non-empty 'params' mapping of dotted job keys to distributions, e.g. "
                          "params: {method.beta: {loguniform: [0.05, 5]}}")
    params = {key: _param(path, key, spec) for key, spec in raw_params.items()}
    for key in params:
        for reserved, why in RESERVED.items():
            if key == reserved or key.startswith(reserved + "."):
                raise _fail(path, f"params.{key} cannot be searched: {why}")
    search = tree.get("search", "auto")
    if search not in SEARCHES:
        raise _fail(path, f"search {search!r} is not known; allowed: {', '.join(SEARCHES)}")
    seed = tree.get("seed")
    if seed is not None and not _int(seed):
        raise _fail(path, f"seed must be an integer, got {seed!r}")
    points = tree.get("points_to_evaluate") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise _fail(path, "points_to_evaluate must be a list of mappings {dotted key: value}")
    for i, p in enumerate(points):
        extra = sorted(set(p) - set(params))
        if extra:
            raise _fail(path, f"points_to_evaluate[{i}] sets {extra[0]!r}, which is not under params "
                              f"({', '.join(params)})")
    return SearchSpace(
        path=path, params=params,
        num_samples=_positive_int(path, "num_samples", tree.get("num_samples", 8)),
        max_concurrent_trials=_positive_int(path, "max_concurrent_trials", tree.get("max_concurrent_trials")),
        scheduler=_scheduler(path, tree.get("scheduler")), search=search, seed=seed,
        points_to_evaluate=[dict(p) for p in points])


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file {str(p)!r} not found; ready-made spaces are in tune_spaces/")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {str(p)!r} is not valid YAML: {exc}") from None
    return parse_space(tree, str(p))


def plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python scalars."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def apply_params(tree: dict, params: dict[str, Any]) -> dict:
    """A copy of the job tree with `dotted key -> value` applied, through the job's own overrides."""
    out = copy.deepcopy(tree)
    apply_overrides(out, [f"{k}={json.dumps(plain(v))}" for k, v in params.items()])
    return out


def check_against_job(space: SearchSpace, job: JobConfig) -> None:
    """Every key must be a job key, and the schema must accept each extreme value and point."""
    tree = job.model_dump(mode="json")
    trials = [(f"params.{k}", {k: v}) for k, p in space.params.items() for v in p.extremes()]
    trials += [(f"points_to_evaluate[{i}]", point) for i, point in enumerate(space.points_to_evaluate)]
    for where, values in trials:
        setting = ", ".join(f"{k}={json.dumps(plain(v))}" for k, v in values.items())
        try:
            parse_job(apply_params(tree, values), where=f"after setting {setting}")
        except ConfigError as err:
            key = next(iter(values))
            hint = ("" if _is_job_key(tree, key) else
                    f" ({key!r} is not a job key; see `l2t-dist job` for the keys and their defaults)")
            raise _fail(space.path, f"{where}{hint}:\n{err}") from None


def _is_job_key(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return not isinstance(node, dict)
