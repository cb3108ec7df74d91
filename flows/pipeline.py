"""The ``prune_pipeline`` flow: data → baseline → per method (search → prune → retrain → evaluate → export) → compare.

Method chains run concurrently up to ``project.max_parallel_methods``; evaluation and export then run one
method at a time, because latency measured while other methods train would be noise.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pruneflow.config import load_config
from pruneflow.layout import ProjectLayout
from pruneflow.versioning import git_commit
from tasks.stages import (compare_methods, evaluate_model, export_model, log_config, prune_model, retrain_model,
                          search_ratio, train_baseline, version_data)
from tasks.tracking import Tracker, params_md5


class MethodsFailed(RuntimeError):
    pass


@flow(name="prune_pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def prune_pipeline(params: str = "params.yaml", overrides: list[str] | None = None, trigger: str = "manual") -> dict:
    """Run the whole pruning pipeline for the project whose params file is ``params``.

    Returns the MLflow parent run id, the run directory and each method's metrics.
    """
    logger = get_run_logger()
    cfg, root = load_config(params, overrides or [])
    layout = ProjectLayout(root, cfg)
    tracker = Tracker.open(layout)
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
        data = version_data(str(root), cfg)
        tracker.set_tags(parent, {"pruneflow.data_md5": data["md5"]})
        baseline = train_baseline(str(root), cfg, data, parent)

        chains = {}
        for method in cfg.methods:
            run_id = tracker.start_run(method, parent, {"pruneflow.method": method})
            tracker.log_params(run_id, {"method": method, **{f"method.{k}": v for k, v in cfg.methods[method].items()}})
            chosen = search_ratio.submit(str(root), cfg, method, data, baseline, str(run_dir), run_id)
            pruned = prune_model.submit(str(root), cfg, method, data, baseline, chosen, str(run_dir), run_id)
            retrained = retrain_model.submit(str(root), cfg, method, data, pruned, str(run_dir), run_id)
            chains[method] = (run_id, [chosen, pruned, retrained])

        results, failures = {}, {}
        for method, (run_id, chain) in chains.items():
            try:
                retrained_info = [future.result() for future in chain][-1]  # the first failure raises itself
                metrics = evaluate_model(str(root), cfg, method, data, baseline, retrained_info, str(run_dir), run_id)
                export = export_model(str(root), cfg, method, data, retrained_info, str(run_dir), run_id)
                results[method] = {**metrics, **export}
            except Exception as err:  # one broken method must not hide the others' results
                failures[method] = f"{type(err).__name__}: {err}"
                logger.error(f"{method} failed: {failures[method]}")
        if results:
            compare_methods(str(root), cfg, baseline, results, str(run_dir), parent)
        if failures:
            raise MethodsFailed("; ".join(f"{m}: {e}" for m, e in failures.items()))
    tracker.finish(parent)
    return {"parent_run_id": parent, "run_dir": str(run_dir), "tracking_uri": tracker.uri, "results": results}
