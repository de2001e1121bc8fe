"""Many runs, one embedded sqlite store: file locks beside the database.

MLflow creates (or migrates) a sqlite database in whichever process opens it first, with no
lock: runs started together on a new store raced through the migrations and died ("Online
migration expected to match one row", "duplicate column name"). `prepare_store` opens the
store under `DB.lock`, so one process runs the migrations and the others find the tables made.
A database of an older MLflow schema is upgraded there too, after a copy is kept beside it.
`registry_lock` serialises registrations on sqlite (the champion rule reads, then moves the
alias); a server store has no shared file, so registry.py re-checks instead.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from pathlib import Path
from typing import Optional

from l2t_dist.errors import ConfigError
from l2t_dist.tracking.uri import sqlite_path

LOCK_WAIT_S = 300.0  # migrations take seconds; a lock held longer than this is not ours to wait for
_READY: set[str] = set()


@contextlib.contextmanager
def _held(path: Path, what: str):
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(path), timeout=LOCK_WAIT_S):
            yield
    except Timeout:
        raise ConfigError(f"waited {LOCK_WAIT_S:.0f} s for the lock {str(path)!r} ({what}); another process "
                          "holds it: let it finish, or stop it") from None


def prepare_store(uri: str) -> None:
    """Create or upgrade the sqlite database of `uri` under its file lock (once per process)."""
    db = sqlite_path(uri)
    if db is None or uri in _READY:
        return
    from mlflow.tracking import MlflowClient

    with _held(db.with_name(db.name + ".lock"), "creating or upgrading the MLflow database"):
        _upgrade_if_old(uri, db)
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)        # a new database: the tables, by MLflow's migrations
        c.search_registered_models(max_results=1)  # and the registry's store
    _READY.add(uri)


def registry_lock(uri: str):
    """Held while registering into a sqlite store; no-op for other stores."""
    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    return _held(db.with_name(db.name + ".registry.lock"), "registering a model")


def _revision(db: Path) -> Optional[str]:
    """The alembic revision of an existing MLflow database, None when it has none (new or empty)."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _upgrade_if_old(uri: str, db: Path) -> None:
    current = _revision(db)
    if current is None:
        return
    from mlflow.store.db import utils

    head = utils._get_latest_schema_revision()
    if current == head:
        return
    backup = db.with_name(f"{db.name}.bak-{current}")
    with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as src, \
            contextlib.closing(sqlite3.connect(str(backup))) as dst:
        src.backup(dst)
    engine = utils.create_sqlalchemy_engine_with_retry(uri)
    try:
        utils._upgrade_db(engine)
    finally:
        engine.dispose()
    print(f"note: upgraded the MLflow database {db} from schema {current} to {head} (the old one is kept as "
          f"{backup})", file=sys.stderr, flush=True)
