"""A watchdog that stops every process a pruneflow command started once the command is gone, however it went.

    python -m pruneflow.flows.watchdog PARENT_PID RECORD_FILE      (started by ``guard_children``, not by hand)

A command killed with SIGKILL or SIGTERM runs no cleanup of its own: the temporary Prefect server of
``pruneflow run`` or the MLflow server of ``pruneflow ui`` would be re-parented to init and keep listening
(and ~200 MB) for good. So the command starts this small process in a session of its own (a kill of the
command's process group does not reach it). It notes the command's descendants every ``POLL_S`` seconds in
RECORD_FILE and, as soon as the command exits, stops the ones still running: SIGTERM to each, SIGKILL to what
is left ``STOP_TIMEOUT_S`` later. Processes are matched by pid *and* start time, so a pid the OS gave to
something else meanwhile is never touched.

Should the watchdog itself be killed, its record stays behind: the next command on the project reads it and
stops what it names (``stop_orphans``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import psutil

from pruneflow.concurrency import end_processes, owner_alive, owner_id

POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
RECORD_GLOB = "watchdog-*.json"

Snapshot = dict[int, float]  # pid -> process start time


def guard_children(state_dir: Path) -> subprocess.Popen:
    """Stop what dead commands of this project left running, then start this process's watchdog."""
    stop_orphans(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    record = state_dir / f"watchdog-{os.getpid()}.json"
    code = str(Path(__file__).resolve().parents[1])  # where ``flows`` is, whatever the command's cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "pruneflow.flows.watchdog", str(os.getpid()), str(record)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def descendants(parent: psutil.Process) -> Snapshot:
    """The parent's processes below it, but for this watchdog."""
    found = {}
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.pid != os.getpid():
                found[child.pid] = child.create_time()
    return found


def stop(snapshot: Snapshot, timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """End every process of the snapshot that still runs (same pid, same start time); returns their pids."""
    processes = []
    for pid, started in snapshot.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == started:
                processes.append(process)
    end_processes(processes, timeout)
    return [process.pid for process in processes]


def _write(record: Path, owner: str, snapshot: Snapshot) -> None:
    tmp = record.with_name(record.name + ".partial")
    tmp.write_text(json.dumps({"owner": owner, "watchdog": owner_id(), "processes": snapshot}) + "\n")
    tmp.replace(record)


def stop_orphans(state_dir: Path) -> list[int]:
    """Stop the processes recorded by watchdogs that died beside their command; returns the pids signalled."""
    stopped = []
    for record in state_dir.glob(RECORD_GLOB):
        try:
            state = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # being written, or gone already
        if owner_alive(state["owner"]) or owner_alive(state["watchdog"]):
            continue  # its command, or its watchdog, still looks after it
        stopped += stop({int(pid): started for pid, started in state["processes"].items()})
        record.unlink(missing_ok=True)
    return stopped


def _wait_for_exit(parent: psutil.Process, handle: int | None, timeout: float) -> bool:
    """Whether the parent has exited, waiting up to ``timeout`` (woken at once by its pidfd where there is one)."""
    if handle is not None:
        select.select([handle], [], [], timeout)
    else:
        with contextlib.suppress(psutil.TimeoutExpired):
            parent.wait(timeout)
    try:
        return parent.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch(parent_pid: int, record: Path) -> None:
    try:
        parent = psutil.Process(parent_pid)
        owner = owner_id(parent_pid)
    except psutil.NoSuchProcess:
        return
    try:
        handle: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll instead
        handle = None
    known: Snapshot = {}
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):
            current = descendants(parent)
            if current != known:
                known = current
                _write(record, owner, known)
        if _wait_for_exit(parent, handle, POLL_S):
            break
    stop(known)
    record.unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
