"""Several pipelines on one project: inter-process locks on shared files, and owner ids that tell a dead
process's leftovers from a live one's.

Two runs can start at once (two schedules, a user beside a cron run) on the same sqlite stores, baseline
folder and data folder. Creating a sqlite schema, training a baseline or rewriting the data from two
processes at once corrupts them, so those steps hold a file lock (``filelock``: a ``flock`` on Unix); the OS
drops it when its holder dies, so a killed pipeline never leaves a lock behind.

A process killed with SIGKILL (the OOM killer, a reboot) cannot close what it opened: its MLflow runs stay
RUNNING and its Optuna trial stays RUNNING. The next process recognises them by who opened them and ends
them, leaving alone those of processes that are still alive, and those of other hosts, which it cannot
check. MLflow runs carry the owner id (host, pid and the process's start time, since the OS reuses pids);
Optuna trials carry only the worker's host and pid (``search.worker_id``), so a trial whose pid has been
reused by a live process is left to Optuna's heartbeats.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import ContextManager

import psutil
from filelock import FileLock
from sqlalchemy.engine import make_url


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on ``path`` (created if missing) for a ``with`` block, which waits while another holds it.

    Each call is a lock of its own on a file opened anew, so it also excludes threads of one process that each
    call this, and the file stays in place for the next holder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite SQLAlchemy URL (``sqlite:///x.db``), else None (a server, or in memory)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    return Path(database).resolve() if database and database != ":memory:" else None


def store_lock(url: str) -> ContextManager[object]:
    """A lock on a sqlite store (the file ``<database>.lock`` beside it) for creating its schema or first rows.

    Two processes opening a new sqlite file at once both run ``CREATE TABLE`` (Optuna) or the migrations
    (MLflow), and one fails or leaves a half-migrated database. Server databases serialise that themselves.
    """
    path = sqlite_file(url)
    return file_lock(path.with_name(path.name + ".lock")) if path else contextlib.nullcontext()


def end_processes(processes: list[psutil.Process], timeout: float) -> None:
    """SIGTERM them all at once (each may take seconds to shut down), then SIGKILL what is left after ``timeout``."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def _started(pid: int) -> str:
    return f"{psutil.Process(pid).create_time():.2f}"


def owner_id(pid: int | None = None) -> str:
    """``host:pid:start-time`` of this process (or of process ``pid``), to tag what it must finish (MLflow runs)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def owner_alive(owner: str) -> bool:
    """Whether the process an owner id names may still be running.

    Accepts ``host:pid:start-time`` (``owner_id``) and ``host:pid`` (the search's trial ``worker`` attribute).
    Only a process of this host that is gone, a zombie, or a newer process reusing the pid counts as dead;
    anything that cannot be checked (another host, a malformed id) counts as alive, so nothing live is ended.
    """
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        process = psutil.Process(int(pid))
        return process.status() != psutil.STATUS_ZOMBIE and (not started or _started(int(pid)) == started)
    except psutil.NoSuchProcess:
        return False
