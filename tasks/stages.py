"""The pipeline's Prefect tasks: every stage of ``pruneflow.stages.STAGES`` through one generic task that logs its
result to the method's MLflow run, and the project-wide steps (data, baseline, comparison).

Tasks receive run contexts (paths and the config) and return small typed results: models never travel through
Prefect. The I/O-bound tasks (DVC, MLflow uploads) retry; compute tasks do not, since a rerun would redo the work.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import yaml
from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pruneflow import stages, versioning
from pruneflow.checkpoint import load_model
from pruneflow.config import PipelineConfig
from pruneflow.data import prepare_dataset
from pruneflow.deploy import Deployment
from pruneflow.export import ExportError
from pruneflow.layout import MethodRun, ProjectLayout, ProjectRun
from pruneflow.search import SearchOutcome, trial_ratios
from pruneflow.stages import STAGES, Baseline, PruneSummary
from pruneflow.tasks.deploy import log_export
from pruneflow.tasks.tracking import Tracker, pinned_requirements
from pruneflow.versioning import DataVersion


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def version_data(layout: ProjectLayout) -> DataVersion:
    """Prepare the dataset into data/ and ``dvc add`` it; the DVC md5 identifies the data downstream.

    One pipeline at a time: DVC locks its workspace and fails the second caller, and two writers would
    replace each other's data folder.
    """
    logger = get_run_logger()
    with layout.data_lock():
        path = prepare_dataset(layout.cfg.data, layout.data_dir, log=logger.info)
        md5 = versioning.add(layout.root, path)
    logger.info(f"data: {path} versioned by DVC, md5 {md5}")
    return DataVersion(path, md5)


@task(cache_policy=NO_CACHE)
def train_baseline(run: ProjectRun, run_id: str) -> Baseline:
    """The run's baseline (``stages.ensure_baseline``: trained, or reused from an earlier run), logged to the
    baseline's MLflow run, which it finishes."""
    tracker = Tracker.open(run.layout)
    with tracker.failing(run_id):
        baseline = stages.ensure_baseline(run, log=get_run_logger().info)
        checkpoint = run.cfg.baseline.checkpoint
        started = {"pruneflow.baseline_checkpoint": checkpoint,
                   "pruneflow.baseline_checkpoint_md5": stages.file_md5(Path(checkpoint))} if checkpoint else {}
        tracker.set_tags(run_id, {"pruneflow.baseline_key": run.baseline_dir.name,
                                  "pruneflow.reused": str(baseline.reused).lower(), **started})
        tracker.log_params(run_id, {"model": run.cfg.model.model_dump(), "baseline": run.cfg.baseline.model_dump(),
                                    "train": run.cfg.train.model_dump()})
        tracker.log_metrics(run_id, baseline.metrics)
        for path in (run.baseline_onnx, run.baseline_metrics):
            tracker.log_artifact(run_id, path)
        tracker.finish(run_id)
    return baseline


class TrialLogger:
    """An Optuna callback: each finished trial becomes a nested MLflow run under its method's run.

    It holds only strings, so search worker processes receive it pickled and log their own trials.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, method_run_id: str, method: str,
                 metric: str = "accuracy") -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.method_run_id, self.method, self.metric = method_run_id, method, metric  # metric: the objective

    def __call__(self, study, trial) -> None:
        tracker = Tracker(self.tracking_uri, self.experiment_id)
        run_id = tracker.start_run(f"{self.method}-trial-{trial.number}", self.method_run_id,
                                   {"pruneflow.method": self.method, "pruneflow.trial": str(trial.number),
                                    "pruneflow.trial_state": trial.state.name, "pruneflow.study": study.study_name})
        tracker.log_params(run_id, trial_ratios(trial))  # what the trial pruned at (fitted to the target)
        reported = list(trial.intermediate_values.values())  # a pruned trial has only its per-epoch reports
        value = trial.values[0] if trial.values else (reported[-1] if reported else float("nan"))
        costs = {k: v for k, v in trial.user_attrs.items() if k in ("macs_reduction", "params_reduction", "latency_ms")}
        tracker.log_metrics(run_id, {self.metric: value, **costs})
        tracker.finish(run_id, "FINISHED" if trial.state.name in ("COMPLETE", "PRUNED") else "FAILED")


# What each stage's result adds to its method's MLflow run, beyond the default (a metrics dict, logged as metrics).

def _record_search(tracker: Tracker, run_id: str, run: MethodRun, outcome: SearchOutcome) -> None:
    """The study's numbers and plots on the method run; its top trials as a Prefect artifact."""
    if not outcome.searched:
        return
    tracker.set_tags(run_id, {"pruneflow.study": outcome.study_name, "pruneflow.chosen_trial": outcome.trial_number})
    tracker.log_metrics(run_id, {"search_finetune_epochs_saved": outcome.finetune_epochs_saved,
                                 "search_completed_trials": outcome.completed_trials,
                                 "search_pruned_trials": outcome.pruned_trials})
    for path in (run.search_png, run.trials_md, run.search_json):
        tracker.log_artifact(run_id, path, "search")
    create_markdown_artifact(
        key=re.sub(r"[^a-z0-9-]+", "-", f"search-{run.method}".lower()),  # Prefect keys: a-z, 0-9, -
        markdown=f"## {run.method}: trial {outcome.trial_number} chosen ({run.cfg.search.selection})\n\n"
                 + run.trials_md.read_text(),
        description=f"pruneflow: top trials of study {outcome.study_name}",
    )


def _record_prune(tracker: Tracker, run_id: str, run: MethodRun, summary: PruneSummary) -> None:
    """The plan as really pruned, as the run's ``plan.*`` params; the history and layer report as artifacts."""
    tracker.log_params(run_id, {"plan": summary.plan.as_dict()})
    for path in (run.history_json, run.layers_json):
        tracker.log_artifact(run_id, path, "pruning")


def _record_metrics(tracker: Tracker, run_id: str, run: MethodRun, metrics: dict[str, float]) -> None:
    tracker.log_metrics(run_id, metrics)


def _record_evaluation(tracker: Tracker, run_id: str, run: MethodRun, metrics: dict[str, float]) -> None:
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, run.report_md)


def _record_export(tracker: Tracker, run_id: str, run: MethodRun, deployment: Deployment) -> None:
    """The target's files, and the checkpoint and PyTorch model they came from.

    ``retrained.pt`` (spec + pruning history + weights) is what ``pruneflow export --run-id`` rebuilds the net
    from: it is logged under its name in the method folder, where ``pruneflow.tasks.deploy.reexport`` fetches it back
to.
    """
    log_export(tracker, run_id, deployment.as_dict())
    tracker.log_artifact(run_id, run.retrained)
    model, spec, _ = load_model(run.retrained)
    with mlflow.start_run(run_id=run_id):  # log_model needs the fluent run; this thread owns it
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 input_example=spec.example_inputs(2).numpy(),
                                 pip_requirements=pinned_requirements("torch", "cloudpickle", "numpy", "pruneflow"))


RECORDERS: dict[str, Callable[[Tracker, str, MethodRun, Any], None]] = {
    "search": _record_search, "prune": _record_prune, "evaluate": _record_evaluation, "export": _record_export}


@task(cache_policy=NO_CACHE)
def run_stage(name: str, run: MethodRun, run_id: str) -> Any:
    """Run stage ``name`` of ``STAGES`` for the run's method and log its result to the method's MLflow run
    (``RECORDERS``); search trials become nested runs. A failure marks the method run FAILED."""
    tracker = Tracker.open(run.layout)
    trials = TrialLogger(tracker.uri, tracker.experiment_id, run_id, run.method, run.cfg.search.objectives[0])
    with tracker.failing(run_id):
        result = STAGES[name].run(replace(run, trial_callbacks=(*run.trial_callbacks, trials)), get_run_logger().info)
        RECORDERS.get(name, _record_metrics)(tracker, run_id, run, result)
    return result


def _retry_unless_check_failed(task, task_run, state) -> bool:
    """A file that failed its check fails again: retry only other trouble (an MLflow upload)."""
    try:
        state.result()
    except ExportError:
        return False
    except Exception:  # anything else (an upload, a full disk) may pass on a retry
        pass
    return True


# Export uploads files, which may fail for a moment; the other stages compute, and a rerun would redo the work.
RETRIES = {"export": {"retries": 1, "retry_delay_seconds": 3, "retry_condition_fn": _retry_unless_check_failed}}

# One Prefect task per method stage, named after its function (``prune_model``), as the Prefect UI lists them.
STAGE_TASKS: dict[str, Task] = {name: run_stage.with_options(name=stage.run.__name__, **RETRIES.get(name, {}))
                                for name, stage in STAGES.items() if stage.per_method}


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def compare_methods(run: ProjectRun, baseline: Baseline, results: dict[str, dict[str, Any]],
                    parent_run_id: str) -> str:
    """The comparison table, as a Prefect markdown artifact and on the parent MLflow run."""
    tracker = Tracker.open(run.layout)
    table = stages.compare(baseline.metrics, results, run.cfg.evaluate.latency_batch_large, run.cfg.task)
    run.compare_md.write_text(table)
    tracker.log_artifact(parent_run_id, run.compare_md)
    create_markdown_artifact(key="compare", markdown=table, description="pruneflow: methods vs baseline")
    return str(run.compare_md)


def log_config(tracker: Tracker, run_id: str, cfg: PipelineConfig) -> None:
    tracker.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "params.yaml")
