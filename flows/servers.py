"""Local servers for operations, on 127.0.0.1 only: a Prefect server, which schedules need (the temporary
server a plain ``pruneflow run`` starts refuses them), and an MLflow tracking server on a database.

    python -m pruneflow.flows.servers start [--prefect-port 4200] [--mlflow-port 5000] [--mlflow-backend URI]
                                  [--mlflow-artifacts DIR] [--prefect-database URL] [--dir .servers]
    python -m pruneflow.flows.servers stop [--dir .servers]
    python -m pruneflow.flows.servers status [--dir .servers]

``make servers`` and ``make servers-stop`` call these. Each server's state (pid, URL) and log live in the
state folder (``.servers/``, git-ignored): a second ``start`` reports the running servers instead of starting
twins, and ``stop`` ends exactly the process trees it started. ``pruneflow serve`` finds its Prefect server
the same way, or starts one for as long as it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pruneflow.concurrency import end_processes, owner_alive, owner_id
from pruneflow.stores import sqlite_url

HOST = "127.0.0.1"
STATE_DIR = ".servers"
SERVERS = ("prefect", "mlflow")
STARTUP_TIMEOUT_S = 120.0  # a first Prefect start migrates its database, which a busy machine makes slow
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}

State = dict[str, Any]


class ServerError(RuntimeError):
    """A server that cannot start (its port is taken, it crashed at start-up) or does not answer."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    port: int
    health_path: str  # answers 200 once the server takes requests
    env: dict[str, str] = field(default_factory=dict)
    detail: str = ""  # shown by `status`, e.g. where the server stores its data

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def prefect_server(port: int, database: str) -> ServerSpec:
    """``prefect server start`` with its scheduler, on ``database`` (a SQLAlchemy URL; sqlite or PostgreSQL)."""
    return ServerSpec("prefect",
                      [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
                      port, "/api/health", {**QUIET, "PREFECT_API_DATABASE_CONNECTION_URL": database},
                      f"database {database}")


def mlflow_command(subcommand: str, backend_uri: str, port: int, *extra: str) -> tuple[list[str], dict[str, str]]:
    """``mlflow ui|server`` on 127.0.0.1 with its environment, for ``pruneflow ui`` and ``make servers`` alike.

    One web worker, and no job runner unless ``$MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` asks for it: that runner
    serves MLflow's GenAI jobs (scorers, trace roll-ups), which pruneflow does not use, with seven more
    processes that cost CPU to start and seconds to stop.
    """
    jobs = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [sys.executable, "-m", "mlflow", subcommand, "--backend-store-uri", backend_uri, *extra,
               "--host", HOST, "--port", str(port), "--workers", "1"]
    return command, {**QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs}


def mlflow_server(port: int, backend_uri: str, artifacts: Path) -> ServerSpec:
    """``mlflow server`` on the ``backend_uri`` database, proxying artifacts to the ``artifacts`` folder."""
    command, env = mlflow_command("server", backend_uri, port, "--artifacts-destination", str(artifacts))
    return ServerSpec("mlflow", command, port, "/health", env, f"store {backend_uri}, artifacts {artifacts}")


def default_prefect_database(state_dir: Path) -> str:
    """The project's own Prefect database, so its deployments and run history stay with the project."""
    return sqlite_url(state_dir.resolve() / "prefect.db", "sqlite+aiosqlite")


def _state_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def find(state_dir: Path, name: str) -> State | None:
    """The state of a server started from ``state_dir`` that still runs, else None (dropping a stale state file)."""
    path = _state_file(state_dir, name)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if owner_alive(state["owner"]):
        return state
    path.unlink(missing_ok=True)
    return None


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a TIME_WAIT port is free
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def port_taken(spec: ServerSpec) -> str:
    return (f"port {spec.port} on {HOST} is already in use: stop what listens there or choose another port for "
            f"the {spec.name} server")


def start(spec: ServerSpec, state_dir: Path) -> State:
    """Start the server in its own session (a Ctrl-C meant for the caller does not reach it) and record it.

    Returns at once; ``wait_ready`` waits for it to answer.
    """
    if not port_free(spec.port):
        raise ServerError(port_taken(spec))
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"{spec.name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(spec.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **spec.env}, start_new_session=True)
    state = {"name": spec.name, "pid": process.pid, "owner": owner_id(process.pid), "url": spec.url,
             "health": spec.url + spec.health_path, "log": str(log.resolve()), "detail": spec.detail}
    _state_file(state_dir, spec.name).write_text(json.dumps(state, indent=1) + "\n")
    return state


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(state: State, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not answers(state["health"]):
        if not owner_alive(state["owner"]):
            tail = "\n".join(Path(state["log"]).read_text(errors="replace").splitlines()[-15:])
            raise ServerError(f"the {state['name']} server exited while starting; the end of {state['log']}:\n{tail}")
        if time.monotonic() > deadline:
            raise ServerError(f"the {state['name']} server did not answer {state['health']} within {timeout:.0f} s; "
                              f"see {state['log']}")
        time.sleep(0.3)


def stop(state_dir: Path, *names: str, timeout: float = 20.0) -> list[str]:
    """Stop the named servers started from ``state_dir`` and every process they spawned, all at once (each
    takes seconds to shut down); returns the names of those that were running."""
    running = [state for state in (find(state_dir, name) for name in names) if state is not None]
    processes = []
    for state in running:
        try:
            root = psutil.Process(state["pid"])
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    end_processes(processes, timeout)
    for state in running:
        _state_file(state_dir, state["name"]).unlink(missing_ok=True)
    return [state["name"] for state in running]


@contextlib.contextmanager
def prefect_api(state_dir: Path, port: int, log: Callable[[str], None]) -> Iterator[str]:
    """The Prefect API URL for the block, set in Prefect's settings and the environment (for the processes
    Prefect starts): ``$PREFECT_API_URL`` (or the profile's) if set, else the server ``make servers`` started
    from ``state_dir``, else a server started here on 127.0.0.1 and stopped when the block ends."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLOUD_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        cloud = configured.startswith(PREFECT_CLOUD_API_URL.value())  # a workspace URL: no /health to ask
        if not cloud and not answers(configured.rstrip("/") + "/health"):
            raise ServerError(f"PREFECT_API_URL={configured} does not answer: start that server (make servers) "
                              "or unset PREFECT_API_URL to let this command start one")
        yield configured
        return
    state, started = find(state_dir, "prefect"), False
    if state is None:
        state, started = start(prefect_server(port, default_prefect_database(state_dir)), state_dir), True
        log(f"Starting a Prefect server on {state['url']} (log: {state['log']}); it stops with this command")
        try:
            wait_ready(state)
        except ServerError:
            stop(state_dir, "prefect")
            raise
    api = state["url"] + "/api"
    os.environ["PREFECT_API_URL"] = api
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if started:
            stop(state_dir, "prefect")


def _start_all(args: argparse.Namespace) -> None:
    state_dir: Path = args.dir
    specs = [prefect_server(args.prefect_port, args.prefect_database or default_prefect_database(state_dir)),
             mlflow_server(args.mlflow_port, args.mlflow_backend, args.mlflow_artifacts.resolve())]
    missing = [spec for spec in specs if find(state_dir, spec.name) is None]  # a running one is not started twice
    for spec in missing:  # every port checked before anything starts
        if not port_free(spec.port):
            raise ServerError(port_taken(spec))
    started: list[State] = []
    try:
        for spec in missing:
            started.append(start(spec, state_dir))
        for state in started:  # both start at once: waiting one after the other would add their start-ups
            wait_ready(state)
    except ServerError:
        stop(state_dir, *(state["name"] for state in started))
        raise
    _print_status(state_dir)


def _print_status(state_dir: Path) -> None:
    prefect, mlflow = (find(state_dir, name) for name in SERVERS)
    if prefect:
        print(f"Prefect  {prefect['url']:<24} UI; clients: export PREFECT_API_URL={prefect['url']}/api")
        print(f"         pid {prefect['pid']}, {prefect['detail']}")
    if mlflow:
        print(f"MLflow   {mlflow['url']:<24} UI; clients: export MLFLOW_TRACKING_URI={mlflow['url']}")
        print(f"         pid {mlflow['pid']}, {mlflow['detail']}")
    if prefect or mlflow:
        print(f"Logs and pids in {state_dir}/; stop with: make servers-stop")
    else:
        print(f"no servers running from {state_dir}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruneflow.flows.servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(STATE_DIR), help="state folder: pids, logs, Prefect's db")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--prefect-database", help="SQLAlchemy URL; default sqlite DIR/prefect.db")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--mlflow-backend", default=sqlite_url(Path("mlflow.db").resolve()),
                        help="the tracking database (sqlite:///..., postgresql://...); default the project's mlflow.db")
    parser.add_argument("--mlflow-artifacts", type=Path, default=Path("mlartifacts"),
                        help="where the server stores artifacts clients upload through it")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            _start_all(args)
        elif args.action == "stop":
            stopped = stop(args.dir, *SERVERS)
            for name in SERVERS:
                print(f"{name}: {'stopped' if name in stopped else 'was not running'}")
        else:
            _print_status(args.dir)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
