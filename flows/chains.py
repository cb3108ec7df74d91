"""The ``method_chains`` flow: every method's chain (search → prune → retrain) at once on the Dask cluster of
``project.cluster`` (``pruneflow.flows.cluster``), then each method's evaluation and export, one at a time on one
worker.

Latency is measured only once every chain has ended, one method at a time and always on the same worker, so
that no training runs beside a measurement and the methods' latencies compare. The pipeline calls this flow
with the task runner ``pruneflow.flows.cluster.task_runner`` builds from the config.
"""

from __future__ import annotations

from typing import Any

from mlflow.entities import RunStatus
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import wait

from pruneflow.flows import cluster
from pruneflow.layout import ProjectRun
from pruneflow.tasks.chain import TIMED, method_chain
from pruneflow.tasks.stages import STAGE_TASKS
from pruneflow.tasks.tracking import Tracker


def flat(outcome: Any) -> dict[str, Any]:
    """A timed stage's result as the comparison and the champion's choice read it: metrics, or a result's fields."""
    return outcome if isinstance(outcome, dict) else outcome.as_dict()


# No parameter validation: the run context is a dataclass the pipeline built, and pydantic would have to resolve
# its annotation by name where Prefect loads the pipeline from a deployment's entrypoint (it cannot there).
@flow(name="method_chains", log_prints=True, validate_parameters=False)
def method_chains(run: ProjectRun, parent_run_id: str) -> dict:
    """Run the chains; return each method's metrics (``results``), errors (``failures``) and MLflow run id."""
    logger = get_run_logger()
    cfg = run.cfg
    tracker = Tracker.open(run.layout)
    with cluster.workers_for(run, FlowRunContext.get().task_runner, logger.warning) as workers:
        where = cfg.project.cluster or ("a local cluster" if workers.addresses else "this process")
        logger.info(f"method chains on {where}: {workers.describe()}")
        tracker.set_tags(parent_run_id, {"pruneflow.cluster": where,
                                         "pruneflow.cluster_workers": len(workers.addresses)})
        run_ids, chains = {}, {}
        with workers.for_chains():
            for method in cfg.methods:
                run_ids[method] = tracker.start_run(method, parent_run_id, {"pruneflow.method": method})
                with tracker.failing(run_ids[method]):
                    tracker.log_params(run_ids[method], {
                        "method": method, **{f"method.{k}": v for k, v in cfg.methods[method].items()}})
                chains[method] = method_chain.submit(run.method_run(method), run_ids[method])
        wait(list(chains.values()))
        for orphan in tracker.end_orphaned_runs():  # a trial's run, left RUNNING by a worker that died
            logger.warning(f"MLflow run {orphan} belonged to a worker process that is gone: marked KILLED")
        results, failures = {}, {}
        with workers.for_timing():
            for method, chain in chains.items():
                run_id = run_ids[method]
                try:
                    chain.result()  # the chain's failure raises itself
                    outcomes = [STAGE_TASKS[name].submit(name, run.method_run(method), run_id).result()
                                for name in TIMED]
                except Exception as err:  # one broken method must not hide the others' results
                    failures[method] = f"{type(err).__name__}: {err}"
                    logger.error(f"{method} failed: {failures[method]}")
                    if tracker.client.get_run(run_id).info.status == "RUNNING":  # its worker died
                        tracker.finish(run_id, RunStatus.to_string(RunStatus.FAILED))
                    continue
                tracker.finish(run_id)
                results[method] = {key: value for outcome in outcomes for key, value in flat(outcome).items()}
    return {"results": results, "failures": failures, "run_ids": run_ids}
