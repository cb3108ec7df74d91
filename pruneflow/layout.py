"""Where a project keeps things. Every stage derives its paths here, so the flow, the CLI and dvc.yaml agree.

    <project>/data/<dataset>/            prepared data, versioned by DVC (data/<dataset>.dvc)
    <project>/runs/baselines/<key>/      trained baselines, keyed by data md5 + model + training params
    <project>/runs/<run>/<method>/       one pipeline run's artifacts per method (export/<target>/: deployable files)
    <project>/runs/optuna.db             the Optuna studies (resumed by name; any SQLAlchemy URL instead)
    <project>/runs/dvc/                  what `dvc repro` writes (fixed paths, as DVC needs)
    <project>/runs/locks/                lock files of concurrent pipelines (pruneflow.concurrency)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

from pruneflow.concurrency import file_lock
from pruneflow.config import PipelineConfig
from pruneflow.stores import in_project, sqlite_url

BASELINE_FILES = ("model.pt", "model.onnx", "metrics.json")


@dataclass(frozen=True)
class ProjectLayout:
    root: Path
    cfg: PipelineConfig

    @property
    def data_dir(self) -> Path:
        return self.root / self.cfg.project.data_dir

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir / self.cfg.data.dataset

    @property
    def runs_dir(self) -> Path:
        return self.root / self.cfg.project.runs_dir

    @property
    def artifacts_dir(self) -> Path:
        return self.root / self.cfg.project.artifacts_dir

    @property
    def dvc_run_dir(self) -> Path:
        return self.runs_dir / "dvc"

    @property
    def study_storage(self) -> str:
        """``search.storage`` (a relative sqlite path is the project's), else ``$PRUNEFLOW_SEARCH_STORAGE`` (e.g. a
        PostgreSQL URL), else runs/optuna.db."""
        if self.cfg.search.storage:
            return in_project(self.cfg.search.storage, self.root)
        return os.environ.get("PRUNEFLOW_SEARCH_STORAGE") or sqlite_url(self.runs_dir / "optuna.db")

    def baseline_dir(self, key: str) -> Path:
        return self.runs_dir / "baselines" / key

    def data_lock(self) -> ContextManager[None]:
        """Held while the data is prepared and versioned: pipelines and workers on this project take turns."""
        return file_lock(self.runs_dir / "locks" / "data.lock")

    def baseline_lock(self, key: str) -> ContextManager[None]:
        """Held while a baseline is checked for and trained, so processes starting at once train it once."""
        return file_lock(self.runs_dir / "locks" / f"baseline-{key}.lock")

    @staticmethod
    def method_dir(run_dir: Path, method: str) -> Path:
        return run_dir / method

    @staticmethod
    def export_dir(method_dir: Path, target: str) -> Path:
        """One folder per export target, so re-exporting a run for another device keeps the first files."""
        return method_dir / "export" / target
