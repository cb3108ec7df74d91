"""The project's sqlite stores (mlflow.db, optuna.db): their URLs, and whether they can be used at all.

A URL is built with SQLAlchemy's own quoting, never by pasting a path after ``sqlite:///``: a folder named
``x%41y`` or ``a?b`` would otherwise put the store in ``xAy/`` or in a file ``a``. A relative sqlite path in
params is the project's, like every path there. And a damaged, read-only or full store is named before a run
starts, instead of failing a minute in with a page of SQL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL

from pruneflow.concurrency import sqlite_file

MIN_FREE_MB = 100  # what a run needs at least beside its stores: checkpoints, ONNX files, MLflow rows


class StoreError(ValueError):
    """A store that cannot be used as it is; the message names the file and what to do."""


def sqlite_url(path: Path, driver: str = "sqlite") -> str:
    """The SQLAlchemy URL of the sqlite file ``path``, with every character a folder name may hold escaped."""
    return URL.create(driver, database=str(path)).render_as_string(hide_password=False)


def in_project(url: str, root: Path) -> str:
    """``url`` with a relative sqlite path made the project's (``sqlite:///mlflow.db`` → ``<root>/mlflow.db``)."""
    if not url.startswith("sqlite"):
        return url
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(root / database)).render_as_string(hide_password=False)


def check_store(url: str, what: str, key: str) -> None:
    """Raise StoreError when the sqlite store ``url`` is damaged, read-only or on a full disk (other URLs are
    servers, checked by their own clients). A store that does not exist yet is fine if its folder is writable."""
    path = sqlite_file(url)
    if path is None:
        return
    folder = next(parent for parent in (path.parent, *path.parents) if parent.exists())
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise StoreError(f"{path}: the disk holding the {what} has {free_mb:.0f} MB free, less than the "
                         f"{MIN_FREE_MB} MB a run needs; free some space, or point {key} at another disk")
    if not path.exists():
        if not writable(folder):
            raise StoreError(f"{path}: cannot create the {what}, {folder} is read-only; make it writable or point "
                             f"{key} elsewhere")
        return
    if not writable(path) or not writable(path.parent):
        raise StoreError(f"{path}: the {what} is read-only (sqlite also writes a journal beside it); make the file "
                         f"and its folder writable, or point {key} elsewhere")
    problem = _damage(path)
    if problem:
        raise StoreError(f"{path}: the {what} is damaged ({problem}); move it aside (the next run starts a new one) "
                         "or restore it from a backup")


def writable(path: Path) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def _damage(path: Path) -> str | None:
    """What sqlite's quick check finds wrong with the file, read-only; None when it is sound."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as err:  # "file is not a database", "database disk image is malformed"
        return str(err)
    return None if rows == [("ok",)] else "; ".join(str(row[0]) for row in rows[:2])
