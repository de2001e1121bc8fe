"""`l2t-dist models list|show|load|sync`: thin wrappers over the MLflow model registry.

`sync RUN_DIR` completes the MLflow run of a training run whose server stopped answering
(tracking/sync.py).

`load` uses plain `mlflow.pytorch.load_model("models:/NAME@ALIAS")`, exactly as a user or a
serving process would, so it proves that a registered model is usable outside l2t-dist.
Exit codes as everywhere: 2 for a bad input (unknown model, version or alias, unreachable
store), 3 when MLflow fails at run time. This module imports no mlflow at import time (the
parser is built for every `l2t-dist --help`).
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from l2t_dist.errors import ConfigError


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="registered models in MLflow: list, show, load; sync a run "
                                           "(see docs/tracking.md)")
    msub = models.add_subparsers(dest="action", required=True)

    def common(p) -> None:
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=run)

    common(msub.add_parser("list", help="registered model names with their versions and champion"))
    show = msub.add_parser("show", help="versions of a registered model with their tags and val accuracy")
    show.add_argument("name")
    common(show)
    load = msub.add_parser("load", help="load a registered model with mlflow.pytorch.load_model and run it")
    load.add_argument("spec", metavar="NAME[@ALIAS|/VERSION]",
                      help="e.g. my-model@champion or my-model/3; a bare NAME means its champion (else latest)")
    load.add_argument("--predict-random", type=_positive, default=2, metavar="N",
                      help="predict on a random batch of N images and print the output shape (default 2)")
    common(load)
    sync = msub.add_parser("sync", help="send what a run's MLflow server missed (metrics, model, registration, "
                                        "status) from its run directory")
    sync.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of an `l2t-dist train` run (OUT_DIR/NAME)")
    sync.add_argument("--tracking-uri", default=None,
                      help="the store to send to (default: the one in RUN_DIR/mlflow_run.json)")
    sync.add_argument("--json", action="store_true", help="print one JSON object")
    sync.set_defaults(func=run)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _store(uri_arg: Optional[str]) -> tuple[str, bool]:
    """(URI, exists): an embedded database that does not exist yet is not created by a look-up."""
    from l2t_dist.tracking.uri import check_tracking_uri, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri({"uri": uri_arg})
    check_tracking_uri(uri)
    db = sqlite_path(uri)
    return uri, db is None or db.is_file()


def _no_store(uri: str) -> ConfigError:
    return ConfigError(f"no MLflow database at {uri!r}: nothing has been tracked here yet; run `l2t-dist train` "
                       "in this folder, or point --tracking-uri (or $MLFLOW_TRACKING_URI) at your store")


def _unknown(uri: str, name: str, c) -> ConfigError:
    names = sorted(m.name for m in c.search_registered_models(max_results=200))
    known = ", ".join(names) if names else "none"
    return ConfigError(f"no registered model {name!r} in {uri}; registered models: {known} "
                       "(see `l2t-dist models list`)")


# ---- queries -----------------------------------------------------------------------------------

def list_models(uri: str) -> list[dict]:
    from l2t_dist.tracking.registry import CHAMPION, registered_versions, version_val_acc
    from l2t_dist.tracking.runs import client

    c = client(uri)
    out, token = [], None
    while True:
        page = c.search_registered_models(max_results=200, page_token=token)
        for rm in page:
            versions = registered_versions(c, rm.name)
            champ = (rm.aliases or {}).get(CHAMPION)
            champ_v = next((v for v in versions if str(v.version) == str(champ)), None)
            out.append({"name": rm.name, "versions": len(versions),
                        "latest_version": int(versions[-1].version) if versions else None,
                        "champion_version": int(champ) if champ is not None else None,
                        "champion_val_acc": version_val_acc(c, champ_v) if champ_v is not None else None})
        token = page.token
        if not token:
            return sorted(out, key=lambda m: m["name"])


def show_model(uri: str, name: str) -> dict:
    from l2t_dist.tracking.registry import (
        describe_signature,
        registered_signature,
        registered_versions,
        version_val_acc,
    )
    from l2t_dist.tracking.runs import client

    c = client(uri)
    versions = registered_versions(c, name)
    if not versions:
        raise _unknown(uri, name, c)
    rm = c.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    signature = None
    try:
        signature = describe_signature(registered_signature(uri, name, versions[-1].version))
    except Exception:  # noqa: BLE001 - shown as unknown
        pass
    return {"name": name, "aliases": dict(rm.aliases or {}), "latest_signature": signature,
            "versions": [{"version": int(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
                          "val_acc": version_val_acc(c, v), "run_id": v.run_id, "created": v.creation_timestamp,
                          "tags": dict(v.tags or {})} for v in versions]}


def parse_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """NAME@ALIAS -> (NAME, ALIAS, None); NAME/3 -> (NAME, None, "3"); NAME -> (NAME, None, None)."""
    if "@" in spec:
        name, _, alias = spec.rpartition("@")
        if not name or not alias:
            raise ConfigError(f"model {spec!r}: expected NAME@ALIAS, e.g. my-model@champion")
        return name, alias, None
    name, sep, version = spec.rpartition("/")
    if sep and name and version.isdigit():
        return name, None, version
    return spec, None, None


def resolve_model_uri(uri: str, spec: str) -> tuple[str, object]:
    """("models:/...", ModelVersion), or ConfigError naming what does not exist."""
    from mlflow.exceptions import MlflowException

    from l2t_dist.tracking.registry import CHAMPION, champion_version, registered_versions
    from l2t_dist.tracking.runs import client

    c = client(uri)
    name, alias, version = parse_spec(spec)
    versions = registered_versions(c, name)
    if not versions:
        raise _unknown(uri, name, c)
    if alias is not None:
        try:
            return f"models:/{name}@{alias}", c.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = sorted(c.get_registered_model(name).aliases or {})
            raise ConfigError(f"registered model {name!r} has no alias {alias!r}; its aliases: "
                              f"{', '.join(aliases) or 'none'}") from None
    if version is not None:
        match = next((v for v in versions if str(v.version) == version), None)
        if match is None:
            raise ConfigError(f"registered model {name!r} has no version {version}; versions: "
                              f"{', '.join(str(v.version) for v in versions)}")
        return f"models:/{name}/{version}", match
    champ = champion_version(c, name)
    if champ is not None:
        return f"models:/{name}@{CHAMPION}", champ
    return f"models:/{name}/{versions[-1].version}", versions[-1]


def load_and_predict(uri: str, spec: str, n: int) -> dict:
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    from l2t_dist.tracking.registry import RegistryError, registered_signature, use_tracking_uri

    model_uri, mv = resolve_model_uri(uri, spec)
    name = parse_spec(spec)[0]
    try:
        with use_tracking_uri(uri):
            model = mlflow.pytorch.load_model(model_uri)
        signature = registered_signature(uri, name, mv.version)
    except MlflowException as exc:
        raise RegistryError(f"loading {model_uri} from {uri} failed: {exc.message}") from None
    spec_in = signature.inputs.to_dict()[0]["tensor-spec"] if signature and signature.inputs else None
    if spec_in is None:
        raise RegistryError(f"{model_uri} has no tensor input signature; cannot make a random batch")
    shape = [n if d == -1 else int(d) for d in spec_in["shape"]]
    with torch.no_grad():
        out = model(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    return {"model_uri": model_uri, "version": int(mv.version), "input_shape": shape,
            "output_shape": list(out.shape), "val_acc": (mv.tags or {}).get("val_acc")}


# ---- the command --------------------------------------------------------------------------------

def run(args) -> int:
    if args.action == "sync":
        from l2t_dist.tracking.sync import describe, sync_run

        result = sync_run(args.run_dir, args.tracking_uri)
        print(json.dumps(result, default=str) if args.json else describe(result))
        return 0
    uri, exists = _store(args.tracking_uri)
    if args.action == "list":
        models = list_models(uri) if exists else []
        if args.json:
            print(json.dumps({"tracking_uri": uri, "models": models}))
        elif not models:
            print(f"no registered models in {uri}")
        else:
            print(f"{'name':<32} {'versions':>8} {'latest':>6} {'champion':>8} {'val acc':>8}")
            for m in models:
                acc = "-" if m["champion_val_acc"] is None else f"{m['champion_val_acc']:.2f}"
                champ = "-" if m["champion_version"] is None else str(m["champion_version"])
                print(f"{m['name']:<32} {m['versions']:>8} {m['latest_version'] or '-':>6} {champ:>8} {acc:>8}")
        return 0
    if not exists:
        raise _no_store(uri)
    if args.action == "show":
        info = show_model(uri, args.name)
        if args.json:
            print(json.dumps(info, default=str))
            return 0
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(info["aliases"].items())) or "none"
        print(f"{info['name']}  aliases: {aliases}")
        print(f"signature (latest): {info['latest_signature']}")
        for v in info["versions"]:
            acc = "-" if v["val_acc"] is None else f"{v['val_acc']:.2f}"
            marks = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            print(f"  version {v['version']}{marks}: val_acc {acc}  run {v['run_id']}")
            decision = v["tags"].get("champion_decision")
            if decision:
                print(f"    {decision}")
        return 0
    result = load_and_predict(uri, args.spec, args.predict_random)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loaded {result['model_uri']} (version {result['version']}) with mlflow.pytorch.load_model: "
              f"input {tuple(result['input_shape'])} -> output {tuple(result['output_shape'])}")
    return 0
