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
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pruneflow.layout import ProjectLayout


def tracking_uri(layout: ProjectLayout) -> str:
    """params' ``project.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the project."""
    return layout.cfg.project.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


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
        client = MlflowClient(uri)
        name = layout.cfg.project.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = layout.artifacts_dir.resolve().as_uri() if uri.startswith("sqlite") else None
            experiment_id = client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        return cls(uri, experiment_id)

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @contextlib.contextmanager
    def failing(self, run_id: str) -> Iterator[None]:
        """Mark the run FAILED if the block raises (then re-raise); leave it running otherwise."""
        try:
            yield
        except BaseException:
            self.finish(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(run_id, key, float(value), step=step)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        for key, value in flatten(params).items():
            self.client.log_param(run_id, key, value)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

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
