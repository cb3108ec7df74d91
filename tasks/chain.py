"""One method's chain (the stages of ``STAGES`` that do not time latency: search → prune → retrain) as one task,
the unit a Dask worker runs; and the timed stages (evaluate, export), which the flow runs one method at a time."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow.layout import MethodRun
from pruneflow.search import worker_id
from pruneflow.stages import STAGES
from pruneflow.tasks.stages import STAGE_TASKS
from pruneflow.tasks.tracking import Tracker

CHAIN = [stage.name for stage in STAGES.values() if stage.per_method and not stage.timed]
TIMED = [stage.name for stage in STAGES.values() if stage.per_method and stage.timed]
WORKER_TAG = "pruneflow.worker"  # host:pid of the process that ran (or last began) the method's chain


@task(cache_policy=NO_CACHE)
def method_chain(run: MethodRun, run_id: str) -> None:
    """Run the chain's stages in this process, each as a nested task run that logs to the method's MLflow run.

    One task per chain keeps a chain whole on one worker. If that worker dies, Dask runs the chain again on
    another: a search that had finished (``search.json`` is written last, atomically) is kept, an unfinished one
    adds its trials to the same study, whose trial the dead worker left running is failed and retried.
    """
    Tracker.open(run.layout).set_tags(run_id, {WORKER_TAG: worker_id()})
    logger = get_run_logger()
    logger.info(f"{run.method}: chain on {worker_id()}, {torch.get_num_threads()} torch thread(s)")
    for name in CHAIN:
        if name == "search" and run.search_json.is_file():
            logger.info(f"{run.method}: {run.search_json} is there from an earlier attempt, search kept")
            continue
        STAGE_TASKS[name](name, run, run_id)
