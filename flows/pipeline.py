"""The ``prune_pipeline`` flow: data → baseline → per method (search → prune → retrain → evaluate → export)
→ compare → register the best pruned model (only when every method succeeded: a failing run promotes nothing).

Method chains run concurrently up to ``project.max_parallel_methods``; evaluation and export then run one
method at a time, because latency measured while other methods train would be noise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from pruneflow.config import PipelineConfig, load_config
from pruneflow.layout import ProjectLayout
from pruneflow.preflight import check_inputs
from pruneflow.stages import STAGES, fixed_plan, project_run
from pruneflow.versioning import git_commit
from tasks.deploy import register_champion
from tasks.stages import STAGE_TASKS, compare_methods, log_config, train_baseline, version_data
from tasks.tracking import Tracker, check_tracking, params_md5

# A method's stages: its chain, run for several methods at once, then the timed ones, one method at a time.
CHAIN = [stage.name for stage in STAGES.values() if stage.per_method and not stage.timed]
TIMED = [stage.name for stage in STAGES.values() if stage.per_method and stage.timed]


class MethodsFailed(RuntimeError):
    pass


def chain_batch_size(cfg: PipelineConfig) -> int:
    """How many method chains run at once: ``project.max_parallel_methods``, or one when search trials
    export ONNX (latency targets), since an export in one thread breaks training in the others."""
    search = cfg.search
    searches = any(fixed_plan(cfg, method) is None for method in cfg.methods)
    exports = searches and (search.measure_latency or "latency_ms" in (search.target.metric, *search.objectives))
    return 1 if exports else cfg.project.max_parallel_methods


def preflight(cfg: PipelineConfig, root: Path, log: Callable[[str], None]) -> None:
    """Check what can be checked before an MLflow run is opened: the tracking store answers, the data decode,
    the model builds, runs, prunes and exports (``pruneflow.preflight``). Raises ConfigError naming the input.

    ``pruneflow run`` calls it before starting Prefect (exit code 2, no flow run); the flow calls it again for
    its other callers (deployments), cheaply: the data is then prepared and cached, the model already checked.
    """
    check_tracking(ProjectLayout(root, cfg))
    check_inputs(cfg, root, log)


def flat(outcome: Any) -> dict[str, Any]:
    """A timed stage's result as the comparison and the champion's choice read it: metrics, or a result's fields."""
    return outcome if isinstance(outcome, dict) else outcome.as_dict()


@flow(name="prune_pipeline", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def prune_pipeline(params: str = "params.yaml", overrides: list[str] | None = None, trigger: str = "manual") -> dict:
    """Run the whole pruning pipeline for the project whose params file is ``params``.

    ``trigger`` becomes the parent run's tag ``pruneflow.trigger``: ``manual``, or ``schedule``, which the
    schedules of ``pruneflow serve`` and prefect.yaml pass, so scheduled runs can be told apart in MLflow.
    Returns the MLflow parent run id, the run directory and each method's metrics.
    """
    logger = get_run_logger()
    cfg, root = load_config(params, overrides or [])
    preflight(cfg, root, logger.info)
    layout = ProjectLayout(root, cfg)
    tracker = Tracker.open(layout)
    for orphan in tracker.end_orphaned_runs():  # left RUNNING by a pipeline that was killed
        logger.warning(f"MLflow run {orphan} belonged to a pipeline process that is gone: marked KILLED")
    config_dump = cfg.model_dump(mode="json")
    parent = tracker.start_run(time.strftime("pipeline-%Y%m%d-%H%M%S"), tags={
        "pruneflow.params_md5": params_md5(config_dump), "pruneflow.trigger": trigger,
        **({"pruneflow.git_commit": commit} if (commit := git_commit(root)) else {}),
    })
    run_dir = layout.runs_dir / parent
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info(f"MLflow parent run {parent}; artifacts in {run_dir}")
    with tracker.failing(parent):
        log_config(tracker, parent, cfg)
        tracker.log_params(parent, {"model": cfg.model.name, "dataset": cfg.data.dataset,
                                    "methods": ",".join(cfg.methods)})
        run = project_run(layout, version_data(layout), run_dir)
        tracker.set_tags(parent, {"pruneflow.data_md5": run.data.md5})
        baseline_run_id = tracker.start_run("baseline", parent)
        baseline = train_baseline(run, baseline_run_id)

        chains, methods = {}, list(cfg.methods)
        batch = chain_batch_size(cfg)
        if batch < cfg.project.max_parallel_methods:
            logger.info("search trials export ONNX to time latency: method chains run one at a time")
        for start in range(0, len(methods), batch):
            for method in methods[start:start + batch]:
                run_id = tracker.start_run(method, parent, {"pruneflow.method": method})
                tracker.log_params(run_id, {"method": method,
                                            **{f"method.{k}": v for k, v in cfg.methods[method].items()}})
                futures = []
                for name in CHAIN:  # each stage reads what the one before wrote
                    futures.append(STAGE_TASKS[name].submit(name, run.method(method), run_id, wait_for=futures[-1:]))
                chains[method] = (run_id, futures)
            # Every chain of a batch ends before the next batch, and all before the first evaluation: latency
            # timed beside training is noise, and torch's ONNX exporter flags the whole process as exporting,
            # which breaks optimizers stepping in other threads.
            wait([future for method in methods[start:start + batch] for future in chains[method][1]])
        results, failures = {}, {}
        for method, (run_id, chain) in chains.items():
            try:
                for future in chain:
                    future.result()  # the first failure raises itself
                outcomes = [STAGE_TASKS[name](name, run.method(method), run_id) for name in TIMED]
            except Exception as err:  # one broken method must not hide the others' results
                failures[method] = f"{type(err).__name__}: {err}"
                logger.error(f"{method} failed: {failures[method]}")
                continue
            tracker.finish(run_id)
            results[method] = {key: value for outcome in outcomes for key, value in flat(outcome).items()}
        if results:
            compare_methods(run, baseline, results, parent)
        if failures:
            raise MethodsFailed("; ".join(f"{m}: {e}" for m, e in failures.items()))
        champion = register_champion(run, baseline_run_id, results, {method: chains[method][0] for method in results},
                                     parent)
    tracker.finish(parent)
    return {"parent_run_id": parent, "run_dir": str(run_dir), "tracking_uri": tracker.uri, "results": results,
            "champion": champion}
