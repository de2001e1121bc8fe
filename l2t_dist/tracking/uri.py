"""Where MLflow writes, decided and probed before any data or model is loaded.

No mlflow import here: a wrong URI must fail in seconds, not after a 3 s import and an hour of
training. The embedded default is an absolute sqlite database in the working directory (the
registry works with no server) with artifacts in `mlartifacts/` beside it, absolute so that
Ray workers with another working directory write to the same place.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from l2t_dist.errors import ConfigError

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PROBE_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 2.0  # the breaker's probe of a server that stopped answering (tracking/breaker.py)
_FIX = ("correct tracking.uri (or $MLFLOW_TRACKING_URI), or train without tracking with "
        "tracking.enabled=false")


def mlflow_available() -> bool:
    """True when mlflow can be imported, found without importing it (that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def _field(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def resolve_tracking_uri(job_tracking_cfg: Any = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; local paths made absolute.

    `job_tracking_cfg`: a TrackingConfig, its dict form, or None."""
    uri = _field(job_tracking_cfg, "uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    uri = uri.strip()
    if not uri:
        return "sqlite:///" + str(Path.cwd().resolve() / DEFAULT_DB)
    return _absolute(uri)


def _absolute(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("/"):
            return "sqlite:///" + str(Path(path).resolve())
        return uri
    scheme = urlparse(uri).scheme
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path: a file store
        return Path(uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def default_artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Embedded sqlite: artifacts in mlartifacts/EXPERIMENT beside the database (MLflow's own
    default is ./mlruns of whichever process created the experiment). None: the server decides."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db.parent / ARTIFACTS_DIR / safe).as_uri()


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """ConfigError unless the tracking store can be used: a server answers, a database folder is
    writable. Bounded by `timeout` seconds per probe; imports no mlflow."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _probe_http(uri, parsed, timeout)
    elif parsed.scheme == "sqlite":
        db = sqlite_path(uri)
        if db is not None:
            _check_writable(uri, db)
    elif parsed.scheme == "file":
        _check_writable(uri, Path(urllib.request.url2pathname(parsed.path)))  # the store folder may be new
    # databricks, postgresql://..., mysql://...: MLflow's own client reports those


def _probe_http(uri: str, parsed, timeout: float) -> None:
    if not parsed.hostname:
        raise ConfigError(f"tracking URI {uri!r} names no host; expected e.g. http://127.0.0.1:5000")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the MLflow tracking server at {uri!r} ({exc.strerror or exc}); start it, e.g. "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host {parsed.hostname} --port {port}`, "
            + _FIX) from None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answers (a proxy without /health, or a login): the client reports the details
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"the MLflow tracking server at {uri!r} accepts connections but does not answer "
                          f"HTTP ({reason}); is it an MLflow server? " + _FIX) from None


def server_down(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> Optional[str]:
    """Why a tracking server does not answer (its /health, within `timeout` s), or None when it
    answers anything at all. Stores without a server (sqlite, files) always answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answers (a proxy, a login): the error came from the server, not from its absence
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(getattr(reason, "strerror", None) or reason)
    return None


def _check_writable(uri: str, file: Path) -> None:
    folder = file.parent
    if not folder.is_dir():
        raise ConfigError(f"tracking URI {uri!r}: folder {str(folder)!r} does not exist; create it, " + _FIX)
    if not os.access(folder, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ConfigError(f"tracking URI {uri!r}: {str(file if file.exists() else folder)!r} is not writable; "
                          + _FIX)
