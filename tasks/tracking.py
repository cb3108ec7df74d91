"""MLflow conventions of pruneflow: the tracking store, run hierarchy, names and failure marking.

MLflow's active run is per thread and Prefect runs tasks in worker threads, so everything here
addresses runs by id through ``MlflowClient`` instead of the fluent API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.time import get_current_time_millis

from pruneflow.concurrency import owner_alive, owner_id, store_lock
from pruneflow.config import ConfigError
from pruneflow.layout import ProjectLayout
from pruneflow.stores import StoreError, check_store, in_project, sqlite_url

OWNER_TAG = "pruneflow.owner"  # host:pid:start-time of the process that must finish the run
ENDED_BY_TAG = "pruneflow.ended_by"  # set when a later process ended a run its dead owner left RUNNING


def tracking_uri(layout: ProjectLayout) -> str:
    """params' ``project.tracking_uri`` (a relative sqlite path is the project's), else ``$MLFLOW_TRACKING_URI``,
    else sqlite ``mlflow.db`` in the project."""
    if layout.cfg.project.tracking_uri:
        return in_project(layout.cfg.project.tracking_uri, layout.root)
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_url(layout.root / "mlflow.db")


# One quick request, not MLflow's default 7 retries with back-off and a 120 s timeout each (minutes of silence)
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_tracking(layout: ProjectLayout) -> None:
    """Raise ConfigError in seconds, naming the setting, when the tracking store cannot be used.

    Otherwise a mistyped server URI hangs a run's start for minutes of retries and then fails with a page of
    urllib3 errors. A sqlite store is a local file: it is checked for damage, write access and disk space
    (``stores.check_store``) without being opened by MLflow, so no empty store is left behind by a run that
    other bad input stops before it starts.
    """
    uri = tracking_uri(layout)
    from_env = not layout.cfg.project.tracking_uri and os.environ.get("MLFLOW_TRACKING_URI")
    source = "$MLFLOW_TRACKING_URI" if from_env else "project.tracking_uri"
    if uri.startswith("sqlite:"):
        try:
            check_store(uri, "MLflow tracking store", source)
        except StoreError as err:
            raise ConfigError(str(err)) from None
        return
    reason = probe_tracking(uri)
    if reason is None:
        return
    if uri.startswith(("http:", "https:")):
        raise ConfigError(f"{source}: no MLflow tracking server answers at {uri} ({reason}); start it, or set "
                          "project.tracking_uri: null to use the project's sqlite store")
    raise ConfigError(f"{source}: MLflow cannot use {uri}: {reason}")


def probe_tracking(uri: str) -> str | None:
    """Why MLflow cannot use the tracking store ``uri`` (one quick request to a server), or None if it can."""
    try:
        with _environment(PROBE_ENV):
            client = MlflowClient(uri)  # an unsupported scheme fails here
            if uri.startswith(("http:", "https:")):
                client.search_experiments(max_results=1)
    except MlflowException as err:
        return root_cause(err)
    return None


def root_cause(err: BaseException) -> str:
    """A network error's innermost message (``[Errno 111] Connection refused``), not MLflow's wrapping of urllib3's;
    else the first two sentences of MLflow's own message."""
    inner = err
    while (cause := inner.__cause__ or inner.__context__) is not None:
        inner = cause
    if isinstance(inner, OSError):
        return str(inner)
    return ". ".join(" ".join(str(err).split()).split(". ")[:2])[:300]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value



def pinned_requirements(*packages: str) -> list[str]:
    """``pkg==<installed version>`` for a logged model's ``pip_requirements``.

    Without them MLflow infers the requirements by loading the model in a subprocess, seconds per logged
    model. The packages that load a pruneflow model are known (the same ones inference found), so name them.
    """
    return [f"{package}=={version(package)}" for package in packages]

class Tracker:
    """One experiment in one tracking store; creates and finishes runs by id."""

    def __init__(self, uri: str, experiment_id: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.client = MlflowClient(uri)

    @classmethod
    def open(cls, layout: ProjectLayout) -> "Tracker":
        uri = tracking_uri(layout)
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)  # for the fluent calls (log_model); it also exports the env variable,
        if previous is None:          # which would then outrank the next project's default store: undo that
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        name = layout.cfg.project.experiment
        with store_lock(uri):  # pipelines starting at once: one migrates a new database and creates the experiment
            client = MlflowClient(uri)  # opens the store, migrating a new database
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                location = layout.artifacts_dir.resolve().as_uri() if uri.startswith("sqlite") else None
                experiment_id = client.create_experiment(name, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
        return cls(uri, experiment_id)

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {MLFLOW_RUN_NAME: name, OWNER_TAG: owner_id(), **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def end_orphaned_runs(self) -> list[str]:
        """Mark KILLED the experiment's RUNNING runs whose owner process (tag ``pruneflow.owner``) is gone.

        A pipeline killed with SIGKILL never finishes its runs, which would otherwise show as running forever;
        so would one that could not write its end into a full disk. Runs of live processes (a pipeline running
        beside this one), of other hosts and without the tag are left alone (``concurrency.owner_alive``).
        Returns the ids of the runs it ended.
        """
        return self._end_running(lambda owner: bool(owner) and not owner_alive(owner), RunStatus.KILLED, "is gone")

    def end_own_runs(self, status: int = RunStatus.FAILED) -> list[str]:
        """End the RUNNING runs this process opened: what a pipeline that fails or is stopped leaves open (the
        method runs of tasks still running when the flow gave up)."""
        me = owner_id()
        return self._end_running(lambda owner: owner == me, status, "stopped before finishing it")

    def _end_running(self, ended_if: Callable[[str | None], bool], status: int, why: str) -> list[str]:
        ended, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000,
                                           page_token=token)
            for run in page:
                owner = run.data.tags.get(OWNER_TAG)
                if ended_if(owner):
                    self.client.set_tag(run.info.run_id, ENDED_BY_TAG, f"{owner_id()}: its owner {owner} {why}")
                    self.finish(run.info.run_id, RunStatus.to_string(status))
                    ended.append(run.info.run_id)
            token = page.token
            if not token:
                return ended

    @contextlib.contextmanager
    def failing(self, run_id: str) -> Iterator[None]:
        """Mark the run FAILED if the block raises (then re-raise the block's error); leave it running otherwise.

        A store that cannot take the mark (a full disk) must not hide the error that says why: the run is then
        left for the next pipeline on the project, which ends it as its owner's process is gone.
        """
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.finish(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        """The finite numbers of ``metrics``, in one request; anything else (text, NaN, flags) is left out."""
        now = get_current_time_millis()
        self.client.log_batch(run_id, metrics=[
            Metric(key, float(value), now, step) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(key, str(value)) for key, value in flatten(params).items()])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def params_md5(config_dump: dict[str, Any]) -> str:
    return hashlib.md5(json.dumps(config_dump, sort_keys=True, default=str).encode()).hexdigest()
