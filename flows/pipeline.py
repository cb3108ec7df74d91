"""The ``prune_pipeline`` flow: data → baseline → per method (search → prune → retrain → evaluate → export)
→ compare → register the best pruned model (only when every method succeeded: a failing run promotes nothing).

Method chains run at once on the Dask cluster of ``project.cluster`` (``pruneflow.flows.chains``,
``pruneflow.flows.cluster``);
evaluation and export then run one method at a time, because latency measured while other methods train would
be noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger

from pruneflow.config import PipelineConfig, load_config
from pruneflow.flows import cluster
from pruneflow.flows.chains import method_chains
from pruneflow.layout import ProjectLayout
from pruneflow.preflight import check_inputs
from pruneflow.stages import project_run
from pruneflow.tasks.deploy import register_champion
from pruneflow.tasks.stages import compare_methods, log_config, train_baseline, version_data
from pruneflow.tasks.tracking import Tracker, check_tracking, params_md5
from pruneflow.versioning import git_commit


class MethodsFailed(RuntimeError):
    pass


def preflight(cfg: PipelineConfig, root: Path, log: Callable[[str], None]) -> None:
    """Check what can be checked before an MLflow run is opened: the tracking store answers, the data decode,
    the model builds, runs, prunes and exports (``pruneflow.preflight``), the workers of ``project.cluster`` have
    what they need (``pruneflow.flows.cluster``). Raises ConfigError naming the input.

    ``pruneflow run`` calls it before starting Prefect (exit code 2, no flow run); the flow calls it again for
    its other callers (deployments), cheaply: the data is then prepared and cached, the model already checked.
    """
    check_tracking(ProjectLayout(root, cfg))
    cluster.check_cluster(cfg, root)
    check_inputs(cfg, root, log)


@flow(name="prune_pipeline", log_prints=True)
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
    with tracker.failing(parent):
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.info(f"MLflow parent run {parent}; artifacts in {run_dir}")
        log_config(tracker, parent, cfg)
        tracker.log_params(parent, {"model": cfg.model.name, "dataset": cfg.data.dataset,
                                    "methods": ",".join(cfg.methods)})
        run = project_run(layout, version_data(layout), run_dir)
        tracker.set_tags(parent, {"pruneflow.data_md5": run.data.md5})
        baseline_run_id = tracker.start_run("baseline", parent)
        baseline = train_baseline(run, baseline_run_id)

        chains = method_chains.with_options(task_runner=cluster.task_runner(cfg))(run, parent)
        results, failures = chains["results"], chains["failures"]
        if results:
            compare_methods(run, baseline, results, parent)
        if failures:
            raise MethodsFailed("; ".join(f"{m}: {e}" for m, e in failures.items()))
        champion = register_champion(run, baseline_run_id, results,
                                     {method: chains["run_ids"][method] for method in results}, parent)
    tracker.finish(parent)
    return {"parent_run_id": parent, "run_dir": str(run_dir), "tracking_uri": tracker.uri, "results": results,
            "champion": champion}
