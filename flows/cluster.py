"""Where the method chains run: a Dask cluster, reached through prefect-dask's ``DaskTaskRunner``.

``project.cluster: null`` starts a cluster of worker processes on this machine for the length of the run:
``project.max_parallel_methods`` of them, by default one per GPU (without GPUs, one: see ``local_size``), at most
one per method; with room for one chain only, the chains run one after another in the pipeline's process, no
cluster.
``project.cluster: tcp://host:8786`` sends the chains to the workers of that scheduler, on as many machines as
it has. Every worker runs one chain at a time (``--nthreads 1``), in its own process: torch's ONNX exporter
flags its whole process as exporting, which breaks the optimiser steps of chains running beside it as threads,
and a process can own one GPU (``CUDA_VISIBLE_DEVICES``, Dask resource ``GPU=1``).

What a worker needs, checked on every worker before anything is submitted (``check_workers``), one error each:
the same pruneflow code (a digest of its sources) and the same versions of the libraries that shape results;
the project folder at the same path (a shared file system: params, data, baseline, run folders); the tracking
and search stores as servers (an MLflow server, PostgreSQL) when it is on another machine, since a sqlite file
on the pipeline's disk cannot be shared safely; and the Prefect API, to which it reports its task runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dask
import distributed
from distributed import Nanny, Scheduler, SpecCluster
from distributed.diagnostics.plugin import WorkerPlugin
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

import pruneflow
import pruneflow.flows
import pruneflow.tasks
from pruneflow.concurrency import sqlite_file
from pruneflow.config import ConfigError, PipelineConfig
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.stages import fixed_plan
from pruneflow.tasks.tracking import probe_tracking, root_cause, tracking_uri
from pruneflow.versioning import VersioningError, git_commit, read_md5

# Libraries whose version changes a chain's results or how Prefect and Dask talk to the worker
LIBRARIES = ("torch", "torch-pruning", "onnx", "onnxruntime", "optuna", "mlflow", "prefect", "distributed")
CONNECT_TIMEOUT = "10s"
SERVER_HINT = {"project.tracking_uri": "an MLflow tracking server (mlflow server), project.tracking_uri: http://...",
               "search.storage": "PostgreSQL, search.storage: postgresql+psycopg://..."}


def code_digest() -> str:
    """A digest of the pipeline's own sources (pruneflow, tasks, flows): what every worker must run alike.

    Unlike the git commit it also sees uncommitted edits, and it works where the code is an installed wheel.
    """
    digest = hashlib.md5()
    for package in (pruneflow, pruneflow.tasks, pruneflow.flows):
        folder = Path(list(package.__path__)[0])  # pruneflow is a namespace package: no __file__
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class WorkerNeeds:
    """What the pipeline expects on every worker; ``inspect_worker`` checks it there. Fields left None are
    not checked: the data and the baseline exist only once the flow has prepared them."""

    host: str  # the pipeline's machine
    code: str
    commit: str | None
    libraries: dict[str, str]
    project: str
    tracking_uri: str
    study_storage: str | None  # None: nothing is searched
    prefect_api: str | None  # None: the flow will start a temporary server on the pipeline's machine
    dataset: str | None = None
    data_md5: str | None = None
    baseline: str | None = None
    run_dir: str | None = None


def worker_needs(layout: ProjectLayout, prefect_api: str | None, run: ProjectRun | None = None) -> WorkerNeeds:
    """What the pipeline of ``layout`` expects on a worker; with ``run``, also its data, baseline and run folder."""
    cfg = layout.cfg
    return WorkerNeeds(
        socket.gethostname(), code_digest(), git_commit(Path(list(pruneflow.flows.__path__)[0]).parent),
        {name: version(name) for name in LIBRARIES}, str(layout.root.resolve()), tracking_uri(layout),
        layout.study_storage if searches(cfg) else None, prefect_api,
        run and str(run.data.path), run and run.data.md5, run and str(run.baseline_dir), run and str(run.run_dir))


def inspect_worker(needs: WorkerNeeds) -> dict[str, Any]:
    """Run on a worker: what it is (host, pid, usable cores, GPUs) and, one line each, what it lacks of ``needs``."""
    host = socket.gethostname()
    problems = []
    if (code := code_digest()) != needs.code:
        commit = f" (git commit {needs.commit})" if needs.commit else ""
        problems.append(f"runs other pruneflow code (digest {code}, the pipeline's {needs.code}): install the "
                        f"pipeline's code{commit} on every worker")
    for name, wanted in needs.libraries.items():
        try:
            found = version(name)
        except ImportError:
            found = "nothing"
        if found != wanted:
            problems.append(f"has {name} {found} where the pipeline has {wanted}: install constraints.txt's pins")
    if not Path(needs.project).is_dir():
        problems.append(f"cannot see the project folder {needs.project}: mount it at the same path on every "
                        "worker (a shared file system)")
    else:
        problems += _missing_inputs(needs)
    stores = [("project.tracking_uri", needs.tracking_uri, probe_tracking)]
    if needs.study_storage:
        stores.append(("search.storage", needs.study_storage, _probe_database))
    for key, url, probe in stores:
        if (path := sqlite_file(url)) is not None:
            if host != needs.host:
                problems.append(f"{key} is the sqlite file {path} on {needs.host}, which a worker on another "
                                f"machine cannot share: use {SERVER_HINT[key]}")
        elif (reason := probe(url)) is not None:
            problems.append(f"cannot reach {key} {_hide_password(url)}: {reason}")
    problems += _prefect_api_problem(needs, host)
    return {"host": host, "pid": os.getpid(), "cores": usable_cores(), "gpus": cuda_devices(), "problems": problems}


def _missing_inputs(needs: WorkerNeeds) -> list[str]:
    shared = "the project folder must be the same shared folder on every worker"
    problems = []
    if needs.dataset:
        try:
            md5 = read_md5(Path(needs.dataset)) if Path(needs.dataset).is_dir() else None
        except VersioningError:
            md5 = None
        if md5 != needs.data_md5:
            problems.append(f"lacks the data {needs.dataset} (DVC md5 {needs.data_md5}): {shared}")
    if needs.baseline and not (Path(needs.baseline) / "model.pt").is_file():
        problems.append(f"lacks the baseline checkpoint {needs.baseline}/model.pt: {shared}")
    if needs.run_dir and not os.access(needs.run_dir, os.W_OK):
        problems.append(f"cannot write the run folder {needs.run_dir}: {shared}, writable by the workers")
    return problems


def _probe_database(url: str) -> str | None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if "postgres" in url else {})
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as err:  # the driver's own first line: refused, bad password, no database
        return str(err.orig).splitlines()[0]
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as err:  # a malformed URL, a missing driver
        return root_cause(err)
    return None


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (an MLflow http URI): no password in it
        return url


def _prefect_api_problem(needs: WorkerNeeds, host: str) -> list[str]:
    if needs.prefect_api is None:
        if host == needs.host:
            return []
        return [f"PREFECT_API_URL is not set, so the flow would report to a temporary Prefect server on 127.0.0.1 of "
                f"{needs.host}, which a worker on another machine cannot reach: start a Prefect server the workers "
                "can reach (prefect server start --host 0.0.0.0) and export PREFECT_API_URL=http://<host>:4200/api"]
    import httpx

    try:
        httpx.get(needs.prefect_api.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        return [f"cannot reach the Prefect API {needs.prefect_api} to report its task runs: {err}"]
    return []


@dataclass
class Workers:
    """Where the chains and the timed stages run, once the cluster is checked; no addresses: in the flow's process."""

    addresses: list[str] = field(default_factory=list)
    threads_by_host: dict[str, int] = field(default_factory=dict)  # torch threads of each worker process
    chain_resources: dict[str, int] = field(default_factory=dict)  # {"GPU": 1} when workers declare GPUs

    @property
    def timing(self) -> str | None:
        """The worker every latency is measured on, so the methods' latencies compare."""
        return self.addresses[0] if self.addresses else None

    def for_chains(self) -> contextlib.AbstractContextManager:
        """Annotates the chains' tasks: one GPU each when the workers have GPUs."""
        return dask.annotate(resources=self.chain_resources) if self.chain_resources else contextlib.nullcontext()

    def for_timing(self) -> contextlib.AbstractContextManager:
        """Annotates the timed stages' tasks: on the timing worker, elsewhere only if it died."""
        if not self.addresses:
            return contextlib.nullcontext()
        return dask.annotate(workers=[self.timing], allow_other_workers=True)

    def describe(self) -> str:
        if not self.addresses:
            return "one at a time in this process"
        return (f"{len(self.addresses)} worker process(es), torch threads {self.threads_by_host}; latency timed on "
                f"{self.timing}")


def check_workers(client: distributed.Client, needs: WorkerNeeds) -> Workers:
    """Inspect every worker (``inspect_worker``, run there) and raise ConfigError, one line per problem and the
    workers that have it, if any worker lacks what the pipeline needs."""
    info = client.scheduler_info()["workers"]
    if not info:
        raise ConfigError(f"project.cluster: the Dask scheduler at {client.scheduler.address} has no workers: start "
                          f"them (dask worker {client.scheduler.address} --nthreads 1)")
    jobs = {address: client.submit(inspect_worker, needs, workers=[address], pure=False) for address in info}
    reports = {address: job.result() for address, job in jobs.items()}
    by_problem: dict[str, list[str]] = {}
    for address in sorted(info):
        threads = info[address]["nthreads"]
        problems = list(reports[address]["problems"])
        if threads != 1:
            problems.append(f"runs {threads} threads: start it with --nthreads 1 (one chain per process; each "
                            "chain's torch uses its share of the cores)")
        for problem in problems:
            by_problem.setdefault(problem, []).append(f"{address} ({reports[address]['host']})")
    if by_problem:
        raise ConfigError("\n".join(f"project.cluster: worker {', '.join(workers)} {problem}"
                                    for problem, workers in by_problem.items()))
    per_host = Counter(report["host"] for report in reports.values())
    threads_by_host = {report["host"]: max(1, report["cores"] // per_host[report["host"]])
                       for report in reports.values()}
    gpus = any("GPU" in worker.get("resources", {}) for worker in info.values())
    return Workers(sorted(info), threads_by_host, {"GPU": 1} if gpus else {})


class TorchThreads(WorkerPlugin):
    """Sets each worker process's torch threads to its share of its host's cores, also on workers that join later.

    Set in the worker's main thread before any task: the executor threads take it when they first compute.
    """

    name = "pruneflow-torch-threads"

    def __init__(self, threads_by_host: dict[str, int]) -> None:
        self.threads_by_host = threads_by_host

    def setup(self, worker: distributed.Worker) -> None:
        import torch

        torch.set_num_threads(self.threads_by_host.get(socket.gethostname(), torch.get_num_threads()))


class TrainingHeap(WorkerPlugin):
    """Lets a worker's C heap keep freed memory for the next training step, as a process Python started does.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``)
    to hand memory back to the OS soon. Setting it also freezes glibc's mmap threshold at 128 KiB, so every tensor
    above that is mapped, faulted in and unmapped again at each step, which slows training (measured in
    docs/benchmarks/scaling.md). The thresholds go to the top of glibc's own dynamic range (mmap 32 MiB, trim
    twice that); the heap then holds at most 64 MiB more than it uses. Other C libraries are left as they are.
    """

    name = "pruneflow-training-heap"
    MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems

    def setup(self, worker: distributed.Worker) -> None:
        self.set_thresholds(self.MMAP_THRESHOLD, 2 * self.MMAP_THRESHOLD)

    @staticmethod
    def set_thresholds(mmap: int, trim: int) -> None:
        """glibc's mmap and trim thresholds of this process, in bytes (``mallopt``); nothing on other C libraries."""
        if platform.libc_ver()[0] != "glibc":
            return
        libc = ctypes.CDLL(None)  # the C library the process runs on
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        libc.mallopt(m_mmap_threshold, mmap)
        libc.mallopt(m_trim_threshold, trim)


class QuietDaskLogs(WorkerPlugin):
    """Dask's INFO lines (workers starting, an event loop busy while torch imports) kept out of the pipeline's
    output, where the local cluster's workers print: Prefect's logging, set up in each worker, shows them."""

    name = "pruneflow-quiet-dask-logs"

    def setup(self, worker: distributed.Worker) -> None:
        logging.getLogger("distributed").setLevel(logging.WARNING)


def flush_prefect_events(client: distributed.Client, log: Callable[[str], None]) -> None:
    """Send what each worker still holds of task-run events and logs to the Prefect API: a local cluster's
    workers are killed if they do not exit within seconds of its close, which would lose them."""
    jobs = {address: client.submit(_drain, workers=[address], pure=False)
            for address in client.scheduler_info()["workers"]}
    for address, job in jobs.items():
        try:
            job.result(timeout=60)
        except TimeoutError:  # a worker gone or stuck: its task runs may show as still running in Prefect
            job.cancel()
            log(f"worker {address} did not send its Prefect events within 60 s")


def _drain() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all()
    APILogWorker.drain_all()


@contextlib.contextmanager
def api_for_workers() -> Iterator[str]:
    """The flow's Prefect API URL, set in the settings the task runner sends to the workers with each task.

    With no PREFECT_API_URL the flow runs on a temporary server that Prefect started in this process on
    127.0.0.1; the workers must be told its URL, or each would start a temporary server of its own.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    url = str(get_client(sync_client=True).api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def searches(cfg: PipelineConfig) -> bool:
    """Does a method search its plan (rather than take a fixed one)?"""
    return any(fixed_plan(cfg, method) is None for method in cfg.methods)


def trials_time_latency(cfg: PipelineConfig) -> bool:
    """Do search trials measure latency (``search.measure_latency``, a latency target or objective)?"""
    search = cfg.search
    return searches(cfg) and (search.measure_latency or "latency_ms" in (search.target.metric, *search.objectives))


def local_size(cfg: PipelineConfig) -> tuple[int, int]:
    """(worker processes, GPUs) of the local cluster: ``project.max_parallel_methods`` workers (at most one per GPU
    when there are GPUs), by default one per GPU, else one: the chains in the pipeline's process, since one chain
    there already keeps the cores busy with torch's threads and worker processes start up at a cost that chains
    side by side only win back (see docs/benchmarks/scaling.md); at most one per method. One
    only when search trials time latency: a trial timed while other chains train on the same cores would choose
    its plan by noise."""
    gpus = cuda_devices() if cfg.retrain.device != "cpu" else 0  # chains train with the retrain settings
    wanted = 1 if trials_time_latency(cfg) else cfg.project.max_parallel_methods or gpus or 1
    return min(wanted, gpus or wanted, len(cfg.methods)), gpus


def local_cluster(workers: int, gpus: int) -> SpecCluster:
    """Worker processes on 127.0.0.1, one thread each; with GPUs, worker i sees GPU i only (a Dask resource GPU=1).

    LocalCluster gives every worker the same environment; one GPU per worker needs one spec per worker.
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler's and nannies' INFO lines
    options = {"host": "127.0.0.1", "nthreads": 1, "silence_logs": logging.WARNING,
               "memory_limit": 0}  # chains hold no Dask data to spill: the OS decides about memory
    specs = {}
    for index in range(workers):
        gpu = {"env": {"CUDA_VISIBLE_DEVICES": str(index)}, "resources": {"GPU": 1}} if index < gpus else {}
        specs[index] = {"cls": Nanny, "options": {**options, **gpu}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False,
                                               "dashboard_address": "127.0.0.1:0"}}  # any free port
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name="pruneflow")


def task_runner(cfg: PipelineConfig) -> TaskRunner:
    """The task runner of ``project.cluster``: that scheduler's workers, or a local cluster for the run; with room
    for one chain at a time (one core, one method, ``max_parallel_methods: 1``), no cluster: a worker process
    would only add its start-up to chains that run one after another anyway."""
    if cfg.project.cluster:
        return DaskTaskRunner(address=cfg.project.cluster, client_kwargs={"timeout": CONNECT_TIMEOUT})
    workers, gpus = local_size(cfg)
    if workers == 1 and not gpus:
        return ThreadPoolTaskRunner(max_workers=1)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"workers": workers, "gpus": gpus})


@contextlib.contextmanager
def workers_for(run: ProjectRun, runner: TaskRunner, log: Callable[[str], None]) -> Iterator[Workers]:
    """The flow's workers, checked (``check_workers``) and set up (torch threads, quiet Dask logs), for the length
    of the chains; at the end each worker sends the Prefect events it still holds. No cluster: ``Workers()``."""
    if not isinstance(runner, DaskTaskRunner):
        yield Workers()
        return
    client = runner.client  # the runner started the local cluster, or connected to the scheduler
    with api_for_workers() as api:
        workers = check_workers(client, worker_needs(run.layout, api, run))
        client.register_plugin(TorchThreads(workers.threads_by_host))
        client.register_plugin(TrainingHeap())
        if run.cfg.project.cluster is None:  # a remote cluster's workers log where their owner started them
            client.register_plugin(QuietDaskLogs())
        try:
            yield workers
        finally:
            flush_prefect_events(client, log)


def check_cluster(cfg: PipelineConfig, root: Path) -> None:
    """Before the flow starts (``pruneflow run``'s preflight): the scheduler of ``project.cluster`` answers and its
    workers have the code, the project folder and the stores. A local cluster needs no check."""
    if cfg.project.cluster is None:
        return
    from prefect.settings import PREFECT_API_URL

    try:
        client = distributed.Client(cfg.project.cluster, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ConfigError(f"project.cluster: no Dask scheduler answers at {cfg.project.cluster} ({err}): start it "
                          f"(dask scheduler) and its workers (dask worker {cfg.project.cluster} --nthreads 1), or "
                          "set project.cluster: null to run on this machine's cores") from None
    with client:
        check_workers(client, worker_needs(ProjectLayout(root, cfg), PREFECT_API_URL.value() or None))
