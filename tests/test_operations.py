"""Operations: schedules on a real Prefect server, `make servers`, and pipelines that crash or run side by side
on one project's stores.

The end-to-end tests run what users run, as subprocesses: `make servers` (on free loopback ports),
`pruneflow serve --cron`, `pruneflow run`, `prefect deploy`, `make servers-stop`. Everything shares the one
Prefect server `make servers` starts, which saves each pipeline a temporary server's start-up; serve's own
server, started when none is configured, is checked on a stand-in server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows import servers as server_control
from flows.cli import app
from flows.servers import ServerError, ServerSpec, answers, prefect_api
from pruneflow.concurrency import owner_alive, owner_id
from pruneflow.config import load_config
from pruneflow.layout import ProjectLayout
from pruneflow.search import fail_stale, open_study
from tasks.tracking import ENDED_BY_TAG, OWNER_TAG, Tracker
from tests.conftest import write_params
from tests.system_deps import ROOT, free_port

HOST = socket.gethostname()
CRON = "0 2 * * *"
TRIALS = 2  # per pipeline: a pipeline is still searching when its first trial is done
PARAMS = {"train": {"epochs": 1}, "methods": {"l1": {}}, "retrain": {"epochs": 1, "lr": 0.01},
          "search": {"n_trials": TRIALS, "ratio_low": 0.4, "ratio_high": 0.6, "finetune_epochs": 1,
                     "target": {"metric": "macs_reduction", "value": 0.3}},
          "evaluate": {"latency_repeats": 5, "latency_warmup": 2}, "prune": {"round_to": 8}}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test session's quiet settings, this checkout's code first, no configured Prefect or MLflow server."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in its own session, so a kill reaches the whole pipeline and nothing of pytest's."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(check: Callable[[], Any], timeout: float, what: str, watched: dict[Path, subprocess.Popen]) -> Any:
    """Poll ``check`` until it returns something truthy; fail early, with its log, if a watched process ends."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        for log, process in watched.items():
            if process.poll() is not None:
                pytest.fail(f"waiting for {what}: {process.args} exited with {process.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: nothing after {timeout:.0f} s")
        time.sleep(0.5)


def trials_by_worker(optuna_db: Path, workers: set[str]) -> dict[int, str]:
    """Trial number -> state of some workers' trials, read with plain sqlite (read-only: creates no schema)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{optuna_db}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("SELECT t.number, t.state FROM trials t JOIN trial_user_attributes a "
                              "ON a.trial_id = t.trial_id WHERE a.key = 'worker' AND a.value_json IN "
                              f"({', '.join('?' * len(workers))})", [f'"{worker}"' for worker in workers]).fetchall()
    except sqlite3.OperationalError:  # no database or no table yet
        return {}
    return dict(rows)


def prefect_client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return get_client(sync_client=True)


def read_deployment(api: str, name: str):
    from prefect.exceptions import ObjectNotFound

    if not answers(api + "/health"):
        return None
    with prefect_client(api) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def next_scheduled_run_now(api: str, deployment_id) -> Any:
    """The schedule's earliest run, brought forward to now: the run Prefect's scheduler created, unchanged but
    for its start time, so it runs as it would at 2 a.m."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Scheduled

    with prefect_client(api) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        if not runs:
            return None
        run = min(runs, key=lambda r: r.expected_start_time)
        client.set_flow_run_state(run.id, Scheduled(scheduled_time=datetime.now(timezone.utc)), force=True)
        return run


def final_state(api: str, run_id):
    """The flow run's state once final, else None."""
    with prefect_client(api) as client:
        state = client.read_flow_run(run_id).state
    return state if state.is_final() else None


# --- units: who owns what, and ending what the dead left ----------------------------------------------------


def dead_process() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_owner_ids_tell_dead_processes_from_live_ones():
    me, gone = owner_id(), dead_process()
    assert owner_alive(me) and owner_alive(f"{HOST}:{os.getpid()}")  # also the search's host:pid worker ids
    assert not owner_alive(f"{HOST}:{gone}:1.00") and not owner_alive(f"{HOST}:{gone}")
    assert not owner_alive(f"{HOST}:{os.getpid()}:1.00")  # the pid, reused by a process started later
    assert owner_alive(f"another-host:{gone}:1.00") and owner_alive("not an id")  # cannot tell: leave alone


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # trials made by hand, not by optimize
def test_orphaned_runs_and_trials_of_dead_processes_are_ended_and_live_ones_kept(tmp_path):
    cfg, root = load_config(write_params(tmp_path, PARAMS))
    tracker = Tracker.open(ProjectLayout(root, cfg))
    gone = dead_process()
    runs = {name: tracker.start_run(name, tags=tags) for name, tags in {
        "dead": {OWNER_TAG: f"{HOST}:{gone}:1.00"}, "live": {}, "remote": {OWNER_TAG: f"elsewhere:{gone}:1.00"},
        "done": {OWNER_TAG: f"{HOST}:{gone}:1.00"}}.items()}
    tracker.finish(runs["done"])
    assert tracker.end_orphaned_runs() == [runs["dead"]]
    status = {name: tracker.client.get_run(run_id) for name, run_id in runs.items()}
    assert {name: run.info.status for name, run in status.items()} == {
        "dead": "KILLED", "live": "RUNNING", "remote": "RUNNING", "done": "FINISHED"}
    assert status["dead"].data.tags[ENDED_BY_TAG].endswith(f"its owner {HOST}:{gone}:1.00 is gone")

    study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s", cfg.search, seed=0)
    for worker in (f"{HOST}:{gone}", f"{HOST}:{os.getpid()}"):
        trial = study.ask({"ratio": optuna.distributions.FloatDistribution(0.1, 0.9)})
        trial.set_user_attr("worker", worker)
    fail_stale(study)
    states = [(t.state.name, t.user_attrs["worker"]) for t in study.get_trials()]
    assert states == [("FAIL", f"{HOST}:{gone}"), ("RUNNING", f"{HOST}:{os.getpid()}"),
                      ("WAITING", f"{HOST}:{gone}")]  # the dead worker's trial, queued again (once)


def test_serve_rejects_a_bad_schedule_before_starting_anything(project):
    for option, value in (("--cron", "0 2 * *"), ("--timezone", "Mars/Olympus")):
        done = CliRunner().invoke(app, ["serve", option, value, "--params", str(project / "params.yaml")])
        assert done.exit_code == 2 and f"{option}:" in done.output, done.output
    assert not (project / ".servers").exists()


def test_serve_starts_a_prefect_server_when_none_is_configured_and_stops_it(tmp_path, monkeypatch):
    """The decision of `prefect_api`, on a stand-in server (Python's http.server) instead of Prefect's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port, said = free_port(), []
    monkeypatch.setattr(server_control, "prefect_server", lambda port, database: ServerSpec(
        "prefect", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port, "/"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with prefect_api(tmp_path / ".servers", port, said.append) as api:
            assert api == f"http://127.0.0.1:{port}/api" == PREFECT_API_URL.value() == os.environ["PREFECT_API_URL"]
            assert answers(f"http://127.0.0.1:{port}/") and (tmp_path / ".servers" / "prefect.json").is_file()
        assert "PREFECT_API_URL" not in os.environ
        assert said[0].startswith(f"Starting a Prefect server on http://127.0.0.1:{port}")
        assert not answers(f"http://127.0.0.1:{port}/") and not (tmp_path / ".servers" / "prefect.json").exists()
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        with pytest.raises(ServerError, match="does not answer"), prefect_api(tmp_path / ".servers", port, said.append):
            pass


def test_io_bound_tasks_retry_and_compute_tasks_do_not():
    from tasks.deploy import register_champion
    from tasks.stages import STAGE_TASKS, compare_methods, train_baseline, version_data

    tasks = (version_data, train_baseline, *STAGE_TASKS.values(), compare_methods, register_champion)
    assert {task.name: task.retries for task in tasks} == {
        "version_data": 2, "train_baseline": 0, "search_ratio": 0, "prune_model": 0, "retrain_model": 0,
        "evaluate_model": 0, "export_model": 1, "compare_methods": 2, "register_champion": 2}



def test_export_retries_other_trouble_but_never_a_failed_check():
    """A file that failed its parity check would fail again; an upload that broke may pass on a retry."""
    from prefect.states import Failed

    from pruneflow.export import ExportError
    from tasks.stages import _retry_unless_check_failed

    assert not _retry_unless_check_failed(None, None, Failed(data=ExportError("onnx parity 0.3 > atol 1e-4")))
    assert _retry_unless_check_failed(None, None, Failed(data=OSError("connection reset during upload")))

# --- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`make servers` for a project of the tiny params, on free ports; `make servers-stop` at the end, checked."""
    folder = tmp_path_factory.mktemp("operations")
    project = folder / "project"
    project.mkdir()
    write_params(project, PARAMS)
    ports = {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port()}
    venv = Path(sys.executable).parent.parent
    settings = [f"{key}={value}" for key, value in {
        **ports, "SERVERS_DIR": project / ".servers", "MLFLOW_BACKEND": f"sqlite:///{folder / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS": folder / "artifacts", "VENV": venv}.items()]
    env = subprocess_env(PREFECT_HOME=str(folder / "prefect-home"))

    def make(target: str) -> subprocess.CompletedProcess:  # -o: use this venv as it is, install nothing
        return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", str(venv / ".installed-stamp"), target, *settings],
                              env=env, capture_output=True, text=True, timeout=240)

    urls = {"prefect": f"http://127.0.0.1:{ports['PREFECT_PORT']}",
            "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}"}
    try:
        started = make("servers")
        assert started.returncode == 0, started.stdout + started.stderr
        yield {**urls, "project": project, "folder": folder, "env": env, "make": make, "started": started.stdout}
    finally:
        stopped = make("servers-stop")
    assert stopped.returncode == 0 and stopped.stdout.count("stopped") == 2, stopped.stdout + stopped.stderr
    assert not answers(urls["prefect"] + "/api/health") and not answers(urls["mlflow"] + "/health")


@pytest.mark.e2e
def test_make_servers_and_prefect_deploy(servers):
    """`make servers` starts both servers on loopback and prints their URLs, reports running ones instead of
    starting twins, the MLflow server writes to its database, and `prefect deploy` registers prefect.yaml's
    deployment with its schedule on the Prefect server."""
    prefect, mlflow = servers["prefect"], servers["mlflow"]
    assert f"export PREFECT_API_URL={prefect}/api" in servers["started"]
    assert f"export MLFLOW_TRACKING_URI={mlflow}" in servers["started"]
    assert answers(f"{prefect}/api/health") and answers(f"{mlflow}/health")
    state_dir = servers["project"] / ".servers"
    states = {path.name: path.read_text() for path in state_dir.glob("*.json")}
    assert set(states) == {"prefect.json", "mlflow.json"}
    again = servers["make"]("servers")
    assert again.returncode == 0 and again.stdout.count(" pid ") == 2, again.stdout + again.stderr
    assert {path.name: path.read_text() for path in state_dir.glob("*.json")} == states  # the same two processes

    client = MlflowClient(mlflow)  # through the server, into its sqlite database
    run = client.create_run(client.create_experiment("through-the-server")).info.run_id
    assert MlflowClient(f"sqlite:///{servers['folder'] / 'mlflow.db'}").get_run(run).info.status == "RUNNING"

    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with prefect_client(f"{prefect}/api") as prefect_api:  # what `prefect work-pool create --type process` makes
        prefect_api.create_work_pool(WorkPoolCreate(name="pruneflow-process", type="process",
                                                    base_job_template=ProcessWorker.get_default_base_job_template()))
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT,
                              env={**servers["env"], "PREFECT_API_URL": f"{prefect}/api"}, capture_output=True,
                              text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment = read_deployment(f"{prefect}/api", "prune_pipeline/pruneflow")
    assert deployment.work_pool_name == "pruneflow-process"
    assert deployment.entrypoint == "flows/pipeline.py:prune_pipeline"
    assert deployment.parameters == {"params": "params.yaml", "overrides": [], "trigger": "manual"}
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.parameters) == (CRON, {"trigger": "schedule"})


@pytest.mark.e2e
def test_scheduled_crashed_and_concurrent_pipelines_share_one_project(servers):
    """On one project: `pruneflow serve --cron` serves the deployment on the Prefect server `make servers` started
    for the project; its scheduled run (B) and a manual `pruneflow run` (A) start at once on empty stores; A is
    killed with SIGKILL in its second trial; the same command again (C) runs beside B.

    Checks the crash (A's runs end KILLED, its finished trials stay, its running trial is failed and retried,
    the baseline is not retrained), the concurrency (one baseline trained, one consistent study, every run
    of B and C complete, none of them ended by another process) and the schedule (B tagged trigger=schedule).
    """
    project, api = servers["project"], servers["prefect"] + "/api"
    env = {**servers["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    logs = {name: servers["folder"] / f"{name}.log" for name in ("serve", "a", "c")}
    # found through project/.servers, as `pruneflow serve` finds the servers of `make servers`
    serve = start(cli("serve", "--cron", CRON, "--name", "scheduled", "--params", "params.yaml"), project, env,
                  logs["serve"])
    processes = {logs["serve"]: serve}
    optuna_db = project / "runs" / "optuna.db"
    try:
        deployment = wait_for(lambda: read_deployment(api, "prune_pipeline/scheduled"), 180,
                              "the served deployment", processes)
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.parameters) == (CRON, {"trigger": "schedule"})
        assert deployment.parameters == {"params": str(project / "params.yaml"), "overrides": [], "trigger": "manual"}

        run_env = {**env, "PREFECT_API_URL": api}
        a = start(cli("run", "--params", "params.yaml"), project, run_env, logs["a"])
        processes[logs["a"]] = a
        scheduled = wait_for(lambda: next_scheduled_run_now(api, deployment.id), 60, "a scheduled run", processes)
        assert scheduled.parameters["trigger"] == "schedule" and "auto-scheduled" in scheduled.tags

        a_workers: set[str] = set()  # A's processes: its trials run in the worker processes of its Dask cluster

        def finished_one_and_running_one() -> bool:  # killed mid-trial, not between two
            with contextlib.suppress(psutil.NoSuchProcess):
                pipeline = psutil.Process(a.pid)
                a_workers.update(f"{HOST}:{p.pid}" for p in [pipeline, *pipeline.children(recursive=True)])
            states = set(trials_by_worker(optuna_db, a_workers).values())
            return bool({"COMPLETE", "PRUNED"} & states) and "RUNNING" in states

        wait_for(finished_one_and_running_one, 300, "a finished trial and a running one of the manual run", processes)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        del processes[logs["a"]]
        a_trials = trials_by_worker(optuna_db, a_workers)

        c = start(cli("run", "--params", "params.yaml"), project, run_env, logs["c"])
        processes[logs["c"]] = c
        assert c.wait(timeout=400) == 0, tail(logs["c"])
        del processes[logs["c"]]
        state = wait_for(lambda: final_state(api, scheduled.id), 400, "the scheduled run to end", processes)
        assert state.is_completed(), f"{state}\n{tail(logs['serve'])}"
    finally:
        for process in processes.values():  # serve: a graceful stop (it pauses its schedule); any other: a kill
            if process.poll() is None:
                if process is serve:
                    serve.terminate()
                else:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=120)
    assert serve.returncode == 0, tail(logs["serve"])
    assert answers(api + "/health"), "serve stopped the server of `make servers`"
    assert read_deployment(api, "prune_pipeline/scheduled").paused  # no runs pile up while nothing serves them

    assert_runs_of_a_killed_and_of_b_c_complete(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), a.pid)
    assert_one_study_kept_a_s_trials(f"sqlite:///{optuna_db}", a_workers, a_trials)


def assert_runs_of_a_killed_and_of_b_c_complete(client: MlflowClient, a_pid: int) -> None:
    experiment = client.get_experiment_by_name("pruneflow").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    assert "RUNNING" not in {run.info.status for run in runs}
    of_a = [run for run in runs if run.data.tags[OWNER_TAG].startswith(f"{HOST}:{a_pid}:")]
    ended = [run for run in runs if ENDED_BY_TAG in run.data.tags]
    assert ended == [run for run in of_a if run.info.status != "FINISHED"] and ended  # A's open runs, nobody else's
    parents = {run.info.run_id: run for run in runs if run.info.run_name.startswith("pipeline-")}
    assert sorted((run.data.tags["pruneflow.trigger"], run.info.status) for run in parents.values()) == [
        ("manual", "FINISHED"), ("manual", "KILLED"), ("schedule", "FINISHED")]
    assert sorted(run.info.run_name.split("-")[0] for run in ended) == ["l1", "pipeline"]

    children = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    baselines = [run for run in runs if run.info.run_name == "baseline"]
    assert sorted(run.data.tags["pruneflow.reused"] for run in baselines) == ["false", "true", "true"]  # trained once
    logged = {}  # B (scheduled) and C (manual) logged alike: the same runs, metrics and artifacts
    for parent in parents.values():
        if parent.info.status == "FINISHED":
            runs_of = {run.info.run_name: run for run in children[parent.info.run_id]}
            assert {name: run.info.status for name, run in runs_of.items()} == {"baseline": "FINISHED",
                                                                                 "l1": "FINISHED"}
            method = runs_of["l1"]
            assert len(children[method.info.run_id]) == TRIALS
            logged[parent.data.tags["pruneflow.trigger"]] = (
                sorted(method.data.metrics), sorted(a.path for a in client.list_artifacts(method.info.run_id)),
                sorted(a.path for a in client.list_artifacts(parent.info.run_id)))
    assert logged["schedule"] == logged["manual"]
    assert str(client.get_model_version_by_alias("pruneflow-small_cnn", "champion").version) == "2"


def assert_one_study_kept_a_s_trials(storage: str, a_workers: set[str], a_trials: dict[int, str]) -> None:
    [name] = optuna.get_all_study_names(storage)  # both pipelines searched one study
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert not {"RUNNING", "WAITING"} & set(states.values()), states
    finished = {number: state for number, state in a_trials.items() if state != "RUNNING"}
    assert finished and all(states[number] == state for number, state in finished.items())  # kept as they were
    [interrupted] = [number for number, state in a_trials.items() if state == "RUNNING"]
    assert states[interrupted] == "FAIL"
    [retried] = [t for t in trials if t.system_attrs.get("failed_trial") is not None]  # its ratios, run again
    assert retried.state.name in ("COMPLETE", "PRUNED") and retried.params == trials[interrupted].params
    others: dict[str, int] = {}
    for trial in trials:
        if trial.user_attrs["worker"] not in a_workers:
            others[trial.user_attrs["worker"]] = others.get(trial.user_attrs["worker"], 0) + 1
    assert sorted(others.values()) == [TRIALS, TRIALS], others  # B and C added theirs; nothing of A's ran again
    assert len(trials) == len(a_trials) + 2 * TRIALS
