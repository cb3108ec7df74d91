"""Where a project keeps things. Every stage derives its paths here, so the flow, the CLI and dvc.yaml agree:
``ProjectLayout`` names a project's folders, ``ProjectRun`` and ``MethodRun`` every file a pipeline run reads or
writes (the stages take them as their one argument besides ``log``).

    <project>/data/<dataset>/            prepared data, versioned by DVC (data/<dataset>.dvc)
    <project>/runs/baselines/<key>/      trained baselines, keyed by data md5 + model + training params
    <project>/runs/<run>/<method>/       one pipeline run's artifacts per method (export/<platform>/: deployable files)
    <project>/runs/optuna.db             the Optuna studies (resumed by name; any SQLAlchemy URL instead)
    <project>/runs/dvc/                  what `dvc repro` writes (fixed paths, as DVC needs)
    <project>/runs/locks/                lock files of concurrent pipelines (pruneflow.concurrency)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneflow.concurrency import file_lock
from pruneflow.config import PipelineConfig
from pruneflow.stores import in_project, sqlite_url
from pruneflow.versioning import DataVersion


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

    def data_lock(self) -> AbstractContextManager[None]:
        """Held while the data is prepared and versioned: pipelines and workers on this project take turns."""
        return file_lock(self.runs_dir / "locks" / "data.lock")

    def baseline_lock(self, key: str) -> AbstractContextManager[None]:
        """Held while a baseline is checked for and trained, so processes starting at once train it once."""
        return file_lock(self.runs_dir / "locks" / f"baseline-{key}.lock")

    def dvc_run(self) -> ProjectRun:
        """The run ``pruneflow stage`` (and so ``dvc repro``) makes: fixed paths under runs/dvc/, as DVC needs."""
        return ProjectRun(self, DataVersion(self.dataset_dir), self.dvc_run_dir / "baseline", self.dvc_run_dir)


@dataclass(frozen=True)
class ProjectRun:
    """One pipeline run of a project: its versioned data, its baseline's folder and the run's own folder
    (``runs/<MLflow parent run id>``, or ``runs/dvc``). Names the baseline's files and the run's comparison."""

    layout: ProjectLayout
    data: DataVersion
    baseline_dir: Path
    run_dir: Path

    @property
    def cfg(self) -> PipelineConfig:
        return self.layout.cfg

    @property
    def data_dir(self) -> Path:
        return self.data.path

    @property
    def baseline_model(self) -> Path:
        return self.baseline_dir / "model.pt"

    @property
    def baseline_onnx(self) -> Path:
        return self.baseline_dir / "model.onnx"

    @property
    def baseline_metrics(self) -> Path:
        """Written last by the baseline stage: its presence marks a complete baseline."""
        return self.baseline_dir / "metrics.json"

    @property
    def baseline_checksums(self) -> Path:
        """The sha256 of each file the baseline stage wrote, recorded when it trained: what a reuse verifies."""
        return self.baseline_dir / "checksums.json"

    def baseline_records(self, method: str) -> Path:
        """What a method's recorder kept during baseline training (``PruningMethod.recorder``)."""
        return self.baseline_dir / "records" / f"{method}.pt"

    @property
    def compare_md(self) -> Path:
        return self.run_dir / "compare.md"

    def method_run(self, name: str, trial_callbacks: tuple[Callable, ...] = ()) -> MethodRun:
        return MethodRun(self.layout, self.data, self.baseline_dir, self.run_dir, name, trial_callbacks)


@dataclass(frozen=True)
class MethodRun(ProjectRun):
    """One method's stages in a pipeline run: everything they read and write, under ``<run dir>/<method>/``.

    ``trial_callbacks`` are told of every finished search trial (the flow logs each to MLflow); they must
    pickle, since search worker processes receive them.
    """

    method: str
    trial_callbacks: tuple[Callable, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        """The method's entry in params' ``methods``."""
        return self.cfg.methods[self.method]

    @property
    def dir(self) -> Path:
        return self.run_dir / self.method

    @property
    def records(self) -> Path:
        return self.baseline_records(self.method)

    @property
    def own_study(self) -> Path | None:
        """The DVC run's study of this method (``runs/dvc/<method>/study.db``), which its search stage starts
        afresh every time: `dvc repro` then chooses from params and data alone, not from the trials earlier
        pipelines left in the project's store. None for a pipeline run, which resumes the project's study."""
        return self.dir / "study.db" if self.run_dir == self.layout.dvc_run_dir else None

    @property
    def study_storage(self) -> str:
        """The Optuna storage the search uses: ``own_study``, else the project's (``ProjectLayout.study_storage``)."""
        return sqlite_url(self.own_study) if self.own_study is not None else self.layout.study_storage

    @property
    def search_json(self) -> Path:
        """The plan the search stage chose (``search.SearchOutcome``)."""
        return self.dir / "search.json"

    @property
    def trials_md(self) -> Path:
        """The study's top trials; written only when a search ran, as is ``search_png``."""
        return self.dir / "trials.md"

    @property
    def search_png(self) -> Path:
        return self.dir / "search.png"

    @property
    def pruned(self) -> Path:
        return self.dir / "pruned.pt"

    @property
    def history_json(self) -> Path:
        """Torch-Pruning's history and the removed blocks: what rebuilds the pruned net from the baseline."""
        return self.dir / "history.json"

    @property
    def layers_json(self) -> Path:
        """The prune stage's summary: the plan it followed, the cost before and after, layer by layer."""
        return self.dir / "layers.json"

    @property
    def retrained(self) -> Path:
        return self.dir / "retrained.pt"

    @property
    def metrics_json(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.dir / "report.md"

    @property
    def latency_dir(self) -> Path:
        return self.dir / "latency"

    @property
    def latency_onnx(self) -> Path:
        """The retrained net as ONNX, timed against the baseline's."""
        return self.latency_dir / "model.onnx"

    @property
    def exports_dir(self) -> Path:
        """Every platform's ``export_dir``."""
        return self.dir / "export"

    @property
    def export_dir(self) -> Path:
        """One folder per export platform, so re-exporting a run for another device keeps the first files."""
        return self.exports_dir / self.cfg.export.platform

    @property
    def export_report(self) -> Path:
        return self.export_dir / "report.md"

    @property
    def export_json(self) -> Path:
        return self.export_dir / "export.json"
