"""Method chains on a Dask cluster: a real `dask scheduler` and two `dask worker` processes on loopback, as on
three machines, a pipeline sent to its address, and one worker killed with SIGKILL in the middle of a chain.

Also what a worker is told when it lacks something the pipeline needs (code, project folder, stores, Prefect API).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import socket
import sqlite3
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import optuna
import pytest
from distributed import Client
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pruneflow.concurrency import owner_alive
from pruneflow.config import ConfigError, load_config
from pruneflow.flows import cluster
from pruneflow.flows.cli import app
from pruneflow.layout import ProjectLayout
from pruneflow.tasks.chain import WORKER_TAG
from tests.conftest import write_params
from tests.system_deps import free_port
from tests.test_operations import cli, start, subprocess_env, tail, trials_by_worker, wait_for

HOST = socket.gethostname()
PARAMS = {"train": {"epochs": 1}, "methods": {"l1": {}, "random": {}}, "retrain": {"epochs": 1, "lr": 0.01},
          "search": {"n_trials": 3, "ratio_low": 0.4, "ratio_high": 0.6, "finetune_epochs": 1,
                     "target": {"metric": "macs_reduction", "value": 0.3}},
          "evaluate": {"latency_repeats": 5, "latency_warmup": 2},
          "export": {"opset": 17}}  # the TorchScript exporter: seconds less per chain (conftest.FAST)
pytestmark = pytest.mark.xdist_group("prefect")  # beside the Prefect server its pipeline test needs


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[str]:
    """`dask scheduler` and two `dask worker --nthreads 1` (each with its nanny) on 127.0.0.1; the address."""
    folder = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = subprocess_env()
    dask = [sys.executable, "-m"]
    commands = {"scheduler": [*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
                **{f"worker-{i}": [*dask, "distributed.cli.dask_worker", address, "--nthreads", "1", "--host",
                                   "127.0.0.1", "--no-dashboard", "--name", f"worker-{i}"] for i in range(2)}}
    processes = {folder / f"{name}.log": start(command, folder, env, folder / f"{name}.log")
                 for name, command in commands.items()}
    try:
        def two_workers() -> bool:
            with contextlib.suppress(OSError, TimeoutError), Client(address, timeout=2) as client:
                return len(client.scheduler_info()["workers"]) == 2
            return False

        wait_for(two_workers, 120, "the scheduler and its two workers", processes)
        yield address
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def method_runs(mlflow_db: Path) -> dict[str, str]:
    """Method run name -> the worker tag, read with plain sqlite (read-only: an MLflow client would migrate a
    database the pipeline may be creating)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("SELECT r.name, w.value FROM runs r JOIN tags w ON w.run_uuid = r.run_uuid "
                              "WHERE w.key = ?", (WORKER_TAG,)).fetchall()
    except sqlite3.OperationalError:  # no database or no table yet
        return {}
    return dict(rows)


@pytest.mark.e2e
def test_chains_run_in_two_worker_processes_and_survive_one_killed(scheduler, prefect_server, tmp_path):
    """`pruneflow run -S project.cluster=<scheduler>`: the two chains start in the two worker processes (each
    tags its method run with host:pid); the l1 chain's worker is killed with SIGKILL after its first trial, and
    the chain runs again in another worker process, so the pipeline ends well and no run is left RUNNING."""
    from prefect.settings import PREFECT_API_URL

    write_params(tmp_path, PARAMS)
    log = tmp_path / "run.log"
    run = start(cli("run", "--params", "params.yaml", "-S", f"project.cluster={scheduler}"), tmp_path,
                subprocess_env(PREFECT_API_URL=PREFECT_API_URL.value()), log)
    watched = {log: run}
    try:
        workers = wait_for(lambda: (runs := method_runs(tmp_path / "mlflow.db")).keys() == set(PARAMS["methods"])
                           and runs, 600, "both chains to start", watched)
        assert workers["l1"] != workers["random"] and all(w.startswith(f"{HOST}:") for w in workers.values())
        assert str(run.pid) not in {w.split(":")[1] for w in workers.values()}  # in workers, not the pipeline

        killed = workers["l1"]

        def finished_one_and_running_one() -> bool:  # killed mid-trial, once the trial has named its worker
            states = set(trials_by_worker(tmp_path / "runs" / "optuna.db", {killed}).values())
            return bool({"COMPLETE", "PRUNED"} & states) and "RUNNING" in states

        wait_for(finished_one_and_running_one, 600, "a finished and a running trial of l1", watched)
        os.kill(int(killed.split(":")[1]), signal.SIGKILL)
        assert run.wait(timeout=900) == 0, tail(log)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert not owner_alive(killed)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id], max_results=1000)
    assert "RUNNING" not in {r.info.status for r in runs}
    final = {r.info.run_name: r for r in runs if r.info.run_name in PARAMS["methods"]}
    assert {method: r.info.status for method, r in final.items()} == {"l1": "FINISHED", "random": "FINISHED"}
    assert final["l1"].data.tags[WORKER_TAG] != killed  # the chain ran again, in another worker process
    assert final["random"].data.tags[WORKER_TAG] == workers["random"]
    [parent] = [r for r in runs if r.info.run_name.startswith("pipeline-")]
    assert parent.info.status == "FINISHED" and parent.data.tags["pruneflow.cluster"] == scheduler

    with Client(scheduler, timeout=10) as dask:  # the workers up now, the killed one's successor once it joined
        plugins = dask.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert all({cluster.TorchThreads.name, cluster.TrainingHeap.name} <= set(names) for names in plugins.values()), \
        plugins

    cfg, _ = load_config(tmp_path / "params.yaml")
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    for name in optuna.get_all_study_names(storage):
        states = {t.state.name for t in optuna.load_study(study_name=name, storage=storage).get_trials()}
        assert states <= {"COMPLETE", "PRUNED", "FAIL"}, (name, states)  # the killed trial failed, not running


def test_workers_are_checked_before_chains_are_sent(scheduler, tmp_path):
    """One line per problem, naming every worker that has it; a scheduler nobody runs fails `pruneflow run` fast."""
    cfg, root = load_config(write_params(tmp_path, PARAMS))
    needs = cluster.worker_needs(ProjectLayout(root, cfg), prefect_api=None)
    with Client(scheduler, timeout=10) as client:
        workers = cluster.check_workers(client, needs)
        assert len(workers.addresses) == 2 and workers.chain_resources == {}
        assert workers.threads_by_host == {HOST: max(1, cluster.usable_cores() // 2)}  # the cores shared out
        with pytest.raises(ConfigError) as raised:
            cluster.check_workers(client, dataclasses.replace(needs, code="0" * 12))
    [line] = str(raised.value).splitlines()
    assert line.startswith("project.cluster: worker ") and line.count("(" + HOST + ")") == 2
    assert "runs other pruneflow code" in line

    nobody = f"tcp://127.0.0.1:{free_port()}"
    params = str(tmp_path / "params.yaml")
    done = CliRunner().invoke(app, ["run", "--params", params, "-S", f"project.cluster={nobody}"])
    assert done.exit_code == 2 and f"project.cluster: no Dask scheduler answers at {nobody}" in done.output, done.output
    bad = CliRunner().invoke(app, ["run", "--params", params, "-S", "project.cluster=host:8786"])
    assert bad.exit_code == 2 and "project.cluster: a Dask scheduler address is tcp://host:port" in bad.output


def test_a_worker_is_told_what_it_lacks(tmp_path):
    """``inspect_worker`` as a worker on another machine would run it, against needs it cannot meet."""
    cfg, root = load_config(write_params(tmp_path, PARAMS))
    needs = dataclasses.replace(
        cluster.worker_needs(ProjectLayout(root, cfg), prefect_api=None), host="laptop", code="0" * 12,
        libraries={"torch": "0.1"}, dataset=str(tmp_path / "data" / "digits"), data_md5="abc.dir",
        baseline=str(tmp_path / "runs" / "baselines" / "k"))
    problems = cluster.inspect_worker(needs)["problems"]
    db = tmp_path / "mlflow.db"
    assert problems == [
        "runs other pruneflow code (digest " + cluster.code_digest() + ", the pipeline's 000000000000): install the "
        f"pipeline's code{' (git commit ' + needs.commit + ')' if needs.commit else ''} on every worker",
        f"has torch {version('torch')} where the pipeline has 0.1: install constraints.txt's pins",
        f"lacks the data {tmp_path}/data/digits (DVC md5 abc.dir): the project folder must be the same shared "
        "folder on every worker",
        f"lacks the baseline checkpoint {tmp_path}/runs/baselines/k/model.pt: the project folder must be the same "
        "shared folder on every worker",
        f"project.tracking_uri is the sqlite file {db} on laptop, which a worker on another machine cannot share: "
        "use an MLflow tracking server (mlflow server), project.tracking_uri: http://...",
        f"search.storage is the sqlite file {tmp_path}/runs/optuna.db on laptop, which a worker on another machine "
        "cannot share: use PostgreSQL, search.storage: postgresql+psycopg://...",
        "PREFECT_API_URL is not set, so the flow would report to a temporary Prefect server on 127.0.0.1 of laptop, "
        "which a worker on another machine cannot reach: start a Prefect server the workers can reach (prefect "
        "server start --host 0.0.0.0) and export PREFECT_API_URL=http://<host>:4200/api"]

    port = free_port()  # servers nobody runs
    unreachable = dataclasses.replace(
        needs, host=HOST, code=cluster.code_digest(), libraries={}, project=str(tmp_path / "elsewhere"),
        tracking_uri=f"http://127.0.0.1:{port}", study_storage=f"postgresql+psycopg://u:secret@127.0.0.1:{port}/db",
        prefect_api=f"http://127.0.0.1:{port}/api")
    problems = cluster.inspect_worker(unreachable)["problems"]
    assert problems[0] == (f"cannot see the project folder {tmp_path}/elsewhere: mount it at the same path on every "
                           "worker (a shared file system)")
    assert problems[1].startswith(f"cannot reach project.tracking_uri http://127.0.0.1:{port}: ")
    assert problems[2].startswith(f"cannot reach search.storage postgresql+psycopg://u:***@127.0.0.1:{port}/db: ")
    assert problems[3].startswith(f"cannot reach the Prefect API http://127.0.0.1:{port}/api to report its task runs")
    assert len(problems) == 4 and all("refused" in p for p in problems[1:]), problems


def test_local_cluster_gives_each_worker_one_thread_and_its_own_gpu():
    """The local cluster ``max_parallel_methods`` asks for (the pipeline's chains on it: the scheduler test above,
    whose flow code is the same): worker processes on 127.0.0.1 with one thread each, worker i seeing GPU i only."""
    def visible_gpus() -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    with cluster.local_cluster(workers=2, gpus=1) as local, Client(local) as client:
        client.wait_for_workers(2, timeout=120)
        workers = client.scheduler_info()["workers"]
        assert sorted(w["nthreads"] for w in workers.values()) == [1, 1]
        assert all(w["host"] == "127.0.0.1" for w in workers.values())
        assert sorted(str(w["resources"]) for w in workers.values()) == ["{'GPU': 1}", "{}"]
        gpu_worker = next(address for address, w in workers.items() if w["resources"])
        seen = client.run(visible_gpus)
        assert seen[gpu_worker] == "0" and {v for a, v in seen.items() if a != gpu_worker} == {None}
        assert len(set(client.run(os.getpid).values())) == 2  # two processes


def _page_faults_of_big_tensors() -> int:
    """Minor page faults of a loop that allocates and frees a 1 MiB tensor 100 times, as a training step does."""
    import resource

    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        torch.ones(1 << 18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the nanny's MALLOC_TRIM_THRESHOLD_ acts on glibc")
def test_workers_keep_freed_memory_for_the_next_step():
    """A Dask worker maps every tensor over 128 KiB afresh (its nanny sets MALLOC_TRIM_THRESHOLD_): 256 page faults
    per 1 MiB tensor. With ``TrainingHeap``, which ``workers_for`` registers on every cluster, the freed memory is
    reused."""
    with cluster.local_cluster(workers=1, gpus=0) as local, Client(local) as client:
        client.wait_for_workers(1, timeout=120)
        [unset] = client.run(_page_faults_of_big_tensors).values()
        client.register_plugin(cluster.TrainingHeap())
        client.run(_page_faults_of_big_tensors)  # the heap grows once
        [kept] = client.run(_page_faults_of_big_tensors).values()
    assert unset > 100 * 200, unset  # measured: 25,700
    assert kept < unset / 10, (kept, unset)  # measured: 0


def test_local_cluster_size(tmp_path, monkeypatch):
    """Without GPUs one chain at a time by default (no cluster, the pipeline's own process), one worker process per
    GPU with them; ``max_parallel_methods`` sets it, at most one per method; one chain at a time when search trials
    time latency."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    monkeypatch.setattr(cluster, "usable_cores", lambda: 3)
    monkeypatch.setattr(cluster, "cuda_devices", lambda: 0)
    four = {"l1": {}, "random": {}, "fpgm": {}, "l2": {}}

    def size(**params) -> tuple[int, int]:
        return cluster.local_size(load_config(write_params(tmp_path, {**PARAMS, **params}))[0])

    three = {"project": {"max_parallel_methods": 3}}
    assert size() == (1, 0) and size(methods=four) == (1, 0)
    assert size(**three) == (2, 0) and size(methods=four, **three) == (3, 0)
    assert size(methods=four, search={**PARAMS["search"], "measure_latency": True}, **three) == (1, 0)
    assert size(methods=four, search={**PARAMS["search"], "measure_latency": True}, prune={"ratio": 0.5},
                **three) == (3, 0)
    cfg, _ = load_config(write_params(tmp_path, PARAMS))
    assert isinstance(cluster.task_runner(cfg), ThreadPoolTaskRunner)
    cfg, _ = load_config(write_params(tmp_path, {**PARAMS, **three}))
    assert isinstance(cluster.task_runner(cfg), DaskTaskRunner)
    monkeypatch.setattr(cluster, "cuda_devices", lambda: 2)
    assert size(methods=four) == (2, 2)  # one chain per GPU
