"""The pipeline's Prefect tasks. Each calls one ``pruneflow.stages`` function and logs its output to MLflow.

Tasks receive the config and paths and return paths and small dicts: models never travel through Prefect.
The I/O-bound tasks (DVC, MLflow uploads) retry; compute tasks do not, since a rerun would redo the work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pruneflow import stages, versioning
from pruneflow.checkpoint import load_model
from pruneflow.config import PipelineConfig
from pruneflow.data import prepare_dataset
from pruneflow.layout import ProjectLayout
from pruneflow.search import trial_ratios
from pruneflow.export import ExportError
from tasks.deploy import log_export
from tasks.tracking import Tracker, pinned_requirements

Info = dict[str, Any]


def _context(root: str, cfg: PipelineConfig) -> tuple[ProjectLayout, Tracker]:
    layout = ProjectLayout(Path(root), cfg)
    return layout, Tracker.open(layout)


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def version_data(root: str, cfg: PipelineConfig) -> Info:
    """Prepare the dataset into data/ and ``dvc add`` it; the DVC md5 identifies the data downstream.

    One pipeline at a time: DVC locks its workspace and fails the second caller, and two writers would
    replace each other's data folder.
    """
    layout = ProjectLayout(Path(root), cfg)
    logger = get_run_logger()
    with layout.data_lock():
        path = prepare_dataset(cfg.data, layout.data_dir, log=logger.info)
        md5 = versioning.add(layout.root, path)
    logger.info(f"data: {path} versioned by DVC, md5 {md5}")
    return {"path": str(path), "md5": md5}


@task(cache_policy=NO_CACHE)
def train_baseline(root: str, cfg: PipelineConfig, data: Info, parent_run_id: str) -> Info:
    """Train the baseline, or reuse the checkpoint trained on the same data, model and training params.

    A pipeline started beside this one waits for the lock, then reuses what this one trained.
    """
    layout, tracker = _context(root, cfg)
    logger = get_run_logger()
    key = stages.baseline_key(cfg, data["md5"])
    out_dir = layout.baseline_dir(key)
    with layout.baseline_lock(key):
        reused = (out_dir / "metrics.json").is_file()
        run_id = tracker.start_run("baseline", parent_run_id, {"pruneflow.baseline_key": key,
                                                              "pruneflow.reused": str(reused).lower()})
        with tracker.failing(run_id):
            if reused:
                logger.info(f"baseline: reusing {out_dir} (same data, model and training params)")
                metrics = stages.read_json(out_dir / "metrics.json")
            else:
                metrics = stages.train_baseline(cfg, Path(data["path"]), out_dir, log=logger.info)
            tracker.log_params(run_id, {"model": cfg.model.model_dump(), "train": cfg.train.model_dump()})
            tracker.log_metrics(run_id, metrics)
            for name in ("model.onnx", "metrics.json"):
                tracker.log_artifact(run_id, out_dir / name)
            tracker.finish(run_id)
    return {"dir": str(out_dir), "run_id": run_id, "metrics": metrics, "reused": reused}


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
        tracker.log_metrics(run_id, {self.metric: value, **{k: v for k, v in trial.user_attrs.items()
                                                            if k in ("macs_reduction", "params_reduction", "latency_ms")}})
        tracker.finish(run_id, "FINISHED" if trial.state.name in ("COMPLETE", "PRUNED") else "FAILED")


@task(cache_policy=NO_CACHE)
def search_ratio(root: str, cfg: PipelineConfig, method: str, data: Info, baseline: Info, run_dir: str,
                 method_run_id: str) -> Info:
    """The method's Optuna study; its top trials become a Prefect artifact, its plot an MLflow artifact."""
    layout, tracker = _context(root, cfg)
    out_dir = layout.method_dir(Path(run_dir), method)
    with tracker.failing(method_run_id):
        name = stages.study_name(cfg, method, data["md5"])
        logger = TrialLogger(tracker.uri, tracker.experiment_id, method_run_id, method, cfg.search.objectives[0])
        chosen = stages.search(cfg, method, Path(baseline["dir"]), Path(data["path"]), out_dir, layout.study_storage,
                               name, callbacks=[logger], log=get_run_logger().info)
        tracker.log_params(method_run_id, {"ratio": chosen["ratio"], "searched": chosen["searched"]})
        if chosen["searched"]:
            tracker.set_tags(method_run_id, {"pruneflow.study": chosen["study_name"],
                                             "pruneflow.chosen_trial": chosen["trial_number"]})
            tracker.log_metrics(method_run_id, {"search_finetune_epochs_saved": chosen["finetune_epochs_saved"],
                                                "search_completed_trials": chosen["completed_trials"],
                                                "search_pruned_trials": chosen["pruned_trials"]})
            for name in ("search.png", "trials.md", "search.json"):
                tracker.log_artifact(method_run_id, out_dir / name, "search")
            create_markdown_artifact(
                key=re.sub(r"[^a-z0-9-]+", "-", f"search-{method}".lower()),  # Prefect keys: a-z, 0-9, -
                markdown=f"## {method}: trial {chosen['trial_number']} chosen ({cfg.search.selection})\n\n"
                         + (out_dir / "trials.md").read_text(),
                description=f"pruneflow: top trials of study {chosen['study_name']}",
            )
    return chosen


@task(cache_policy=NO_CACHE)
def prune_model(root: str, cfg: PipelineConfig, method: str, data: Info, baseline: Info, chosen: Info, run_dir: str,
                method_run_id: str) -> Info:
    layout, tracker = _context(root, cfg)
    out_dir = layout.method_dir(Path(run_dir), method)
    with tracker.failing(method_run_id):
        summary = stages.prune(cfg, method, Path(baseline["dir"]), chosen, Path(data["path"]), out_dir,
                               log=get_run_logger().info)
        tracker.log_artifact(method_run_id, out_dir / "history.json", "pruning")
        tracker.log_artifact(method_run_id, out_dir / "layers.json", "pruning")
    return {"path": str(out_dir / "pruned.pt"), "ratio": summary["ratio"]}


@task(cache_policy=NO_CACHE)
def retrain_model(root: str, cfg: PipelineConfig, method: str, data: Info, pruned: Info, run_dir: str,
                  method_run_id: str) -> Info:
    layout, tracker = _context(root, cfg)
    out_dir = layout.method_dir(Path(run_dir), method)
    with tracker.failing(method_run_id):
        result = stages.retrain(cfg, method, Path(pruned["path"]), Path(data["path"]), out_dir, log=get_run_logger().info)
        tracker.log_metrics(method_run_id, result)
    return {"path": str(out_dir / "retrained.pt"), **result}


@task(cache_policy=NO_CACHE)
def evaluate_model(root: str, cfg: PipelineConfig, method: str, data: Info, baseline: Info, retrained: Info,
                   run_dir: str, method_run_id: str) -> Info:
    layout, tracker = _context(root, cfg)
    out_dir = layout.method_dir(Path(run_dir), method)
    with tracker.failing(method_run_id):
        metrics = stages.evaluate_model(cfg, method, Path(baseline["dir"]), Path(retrained["path"]), Path(data["path"]),
                                        out_dir, log=get_run_logger().info)
        tracker.log_metrics(method_run_id, metrics)
        tracker.log_artifact(method_run_id, out_dir / "report.md")
    return metrics


def _retry_unless_check_failed(task, task_run, state) -> bool:
    """A file that failed its check fails again: retry only other trouble (an MLflow upload)."""
    try:
        state.result()
    except ExportError:
        return False
    except Exception:  # anything else (an upload, a full disk) may pass on a retry
        pass
    return True


@task(retries=1, retry_delay_seconds=3, retry_condition_fn=_retry_unless_check_failed, cache_policy=NO_CACHE)
def export_model(root: str, cfg: PipelineConfig, method: str, data: Info, retrained: Info, run_dir: str,
                 method_run_id: str) -> Info:
    """Export the target's deployable files (each checked) and log them with the checkpoint and the PyTorch model.

    ``retrained.pt`` (spec + pruning history + weights) is what ``pruneflow export --run-id`` rebuilds the net from.
    """
    layout, tracker = _context(root, cfg)
    out_dir = layout.method_dir(Path(run_dir), method)
    with tracker.failing(method_run_id):
        result = stages.export(cfg, Path(retrained["path"]), Path(data["path"]), out_dir, log=get_run_logger().info)
        log_export(tracker, method_run_id, result)
        tracker.log_artifact(method_run_id, Path(retrained["path"]))
        model, spec, _ = load_model(Path(retrained["path"]))
        with mlflow.start_run(run_id=method_run_id):  # log_model needs the fluent run; this thread owns it
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                     input_example=spec.example_inputs(2).numpy(),
                                     pip_requirements=pinned_requirements("torch", "cloudpickle", "numpy", "pruneflow"))
        tracker.finish(method_run_id)
    return result


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def compare_methods(root: str, cfg: PipelineConfig, baseline: Info, results: dict[str, Info], run_dir: str,
                    parent_run_id: str) -> str:
    """The comparison table, as a Prefect markdown artifact and on the parent MLflow run."""
    _, tracker = _context(root, cfg)
    table = stages.compare(baseline["metrics"], results, cfg.evaluate.latency_batch_large, cfg.task)
    path = Path(run_dir) / "compare.md"
    path.write_text(table)
    tracker.log_artifact(parent_run_id, path)
    create_markdown_artifact(key="compare", markdown=table, description="pruneflow: methods vs baseline")
    return str(path)


def log_config(tracker: Tracker, run_id: str, cfg: PipelineConfig) -> None:
    tracker.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "params.yaml")
