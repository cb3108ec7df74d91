"""The MLflow side of deployment: an export's files on its method run, the pipeline's best model in the model
registry with its lineage, and re-exporting a logged run for another platform (``pruneflow export --run-id``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow import stages
from pruneflow.concurrency import sqlite_file
from pruneflow.config import PipelineConfig
from pruneflow.deploy import choose_champion, registered_model_name
from pruneflow.export import predictor
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.stages import STAGES
from pruneflow.task import TASKS
from pruneflow.tasks.tracking import Tracker, check_tracking, pinned_requirements, tracking_uri
from pruneflow.versioning import DataVersion

Info = dict[str, Any]
CHAMPION = "champion"


def log_export(tracker: Tracker, run_id: str, deployment: Info, metric_prefix: str = "") -> None:
    """The export folder as artifacts ``export/<platform>/``, its numbers as metrics, where it measured as a tag."""
    platform = deployment["platform"]
    tracker.log_artifacts(run_id, Path(deployment["files"]["onnx"]).parent, f"export/{platform}")
    tracker.log_metrics(run_id, {f"{metric_prefix}{key}": value for key, value in deployment.items()})
    tracker.set_tags(run_id, {f"pruneflow.device_latency.{platform}": deployment["device_latency"]})


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def register_champion(run: ProjectRun, baseline_run_id: str, results: dict[str, Info], method_run_ids: dict[str, str],
                      parent_run_id: str) -> Info:
    """Register the best pruned model (``deploy.choose_champion``) as an ONNX model with a signature, a real input
    example and lineage tags (data md5, baseline run, method run), and point the ``champion`` alias at it.

    When no model may be registered (none within ``export.registry_max_drop``), nothing is: the parent run's tags
    and the log say why, and the result's ``method`` is None."""
    cfg = run.cfg
    tracker = Tracker.open(run.layout)
    metric = TASKS[cfg.task].metric
    method, reason = choose_champion(results, cfg.export.registry_max_drop, metric)
    if method is None:
        tracker.set_tags(parent_run_id, {"pruneflow.champion": "none", "pruneflow.champion_reason": reason})
        get_run_logger().warning(f"registry: {reason}")
        return {"method": None, "reason": reason}
    name, run_id = registered_model_name(cfg), method_run_ids[method]
    onnx_path = Path(results[method]["files"]["onnx"])
    example = next(iter(stages.load_data(cfg, run.data_dir).loader("test", 2)))[0].numpy()
    signature = infer_signature(example, predictor(onnx_path)(example))
    with mlflow.start_run(run_id=run_id):  # log_model needs the fluent run; this thread owns it
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx", signature=signature,
                                     input_example=example, registered_model_name=name,
                                     pip_requirements=pinned_requirements("onnx", "onnxruntime", "numpy"))
    version = str(info.registered_model_version)
    lineage = {"pruneflow.data_md5": run.data.md5, "pruneflow.baseline_run_id": baseline_run_id,
               "pruneflow.method_run_id": run_id, "pruneflow.method": method, "pruneflow.parent_run_id": parent_run_id,
               "pruneflow.export_platform": cfg.export.platform}
    for key, value in lineage.items():
        tracker.client.set_model_version_tag(name, version, key, value)
    tracker.client.set_registered_model_alias(name, CHAMPION, version)
    tracker.set_tags(parent_run_id, {"pruneflow.champion": method, "pruneflow.champion_reason": reason,
                                     "pruneflow.registered_model": f"{name}/{version}"})
    chosen = results[method]
    get_run_logger().info(f"registry: {method} registered as {name} version {version}, alias {CHAMPION} "
                          f"(speedup x{chosen['speedup']:.2f}, {metric} drop {chosen[f'{metric}_drop']:+.2f}; "
                          f"{reason})")
    return {"name": name, "version": version, "method": method, "uri": f"models:/{name}@{CHAMPION}"}


def reexport(root: Path, cfg: PipelineConfig, run_id: str, log: Callable[[str], None]) -> Info:
    """Export a logged method run's model for ``export.platform`` without rerunning the pipeline.

    The export stage runs as in the pipeline, on the files it reads (``STAGES["export"].reads``) fetched back
    from the run's artifacts into the run's method folder, and on the project's data (which must be the data
    the run used). Files go to the run's ``export/<platform>/`` artifacts; metrics are logged as
    ``<platform>/<name>`` so the pipeline's own numbers stay.
    """
    layout = ProjectLayout(root, cfg)
    check_tracking(layout)
    uri = tracking_uri(layout)
    store = sqlite_file(uri)
    if store is not None and not store.is_file():
        # opening it would create an empty store (and an experiment) just to report that the run is not there
        raise LookupError(f"run {run_id} not found: there is no MLflow store at {uri} (pruneflow run creates it)")
    tracker = Tracker.open(layout)
    try:
        logged = tracker.client.get_run(run_id)
    except MlflowException:
        raise LookupError(f"run {run_id} not found in {tracker.uri}") from None
    method, parent_id = logged.data.tags.get("pruneflow.method"), logged.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if method is None or parent_id is None or "pruneflow.trial" in logged.data.tags:
        raise LookupError(f"run {run_id} is not a pruneflow method run "
                          "(a child of a pipeline run, tagged pruneflow.method)")
    used_md5 = tracker.client.get_run(parent_id).data.tags.get("pruneflow.data_md5")
    data = DataVersion(layout.dataset_dir)
    if used_md5 != data.md5:
        raise ValueError(f"run {run_id} used data {used_md5}, but {layout.dataset_dir} is now {data.md5}: "
                         "calibration and checks would run on other data")
    run = stages.project_run(layout, data, layout.runs_dir / parent_id).method_run(method)
    stage = STAGES["export"]
    run.dir.mkdir(parents=True, exist_ok=True)
    for path in stage.paths(run, stage.reads):
        if path.is_relative_to(run.dir):  # the method's own files; the data is the project's
            artifact = path.relative_to(run.dir).as_posix()
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(run.dir),
                                                    tracking_uri=tracker.uri)
            except (MlflowException, OSError):
                raise LookupError(f"run {run_id} has no {artifact} artifact to rebuild the model from") from None
    result = stage.run(run, log).as_dict()
    log_export(tracker, run_id, result, metric_prefix=f"{cfg.export.platform}/")
    return result
