"""The whole flow on the built-in data, checked by reading MLflow back, as a user's dashboard would."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import MethodsFailed, prune_pipeline
from tests.conftest import TINY_PARAMS, write_params

pytestmark = pytest.mark.e2e

METRICS = {"accuracy", "accuracy_drop", "params", "macs", "params_reduction", "macs_reduction", "size_mb",
           "latency_ms", "speedup", "onnx_max_abs_diff"}


def runs_of(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in found}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_pipeline_logs_every_stage_and_reuses_the_baseline_on_rerun(project, prefect_server):
    result = prune_pipeline(params=str(project / "params.yaml"))
    client = MlflowClient(result["tracking_uri"])
    assert result["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"

    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pruneflow.data_md5"].endswith(".dir")
    assert len(parent.data.tags["pruneflow.params_md5"]) == 32
    assert {"params.yaml", "compare.md"} <= artifact_paths(client, parent.info.run_id)
    assert (project / "data" / "digits.dvc").is_file()

    children = runs_of(client, parent.info.run_id)
    assert set(children) == {"baseline", *TINY_PARAMS["methods"]}
    assert children["baseline"].data.metrics["accuracy"] > 80
    for method in TINY_PARAMS["methods"]:
        run = children[method]
        assert run.info.status == "FINISHED"
        assert run.data.tags["pruneflow.method"] == method
        assert METRICS <= set(run.data.metrics), METRICS - set(run.data.metrics)
        assert run.data.metrics["macs_reduction"] >= TINY_PARAMS["search"]["target_macs_reduction"]
        assert run.data.metrics["onnx_max_abs_diff"] < 1e-4
        assert {"onnx/model.onnx", "pruning/history.json", "report.md"} <= artifact_paths(client, run.info.run_id)
        trials = runs_of(client, run.info.run_id)
        assert len(trials) == TINY_PARAMS["search"]["n_trials"]
        assert all("pruneflow.trial" in trial.data.tags for trial in trials.values())
    assert client.search_logged_models([parent.info.experiment_id])  # the PyTorch models, one per method

    again = prune_pipeline(params=str(project / "params.yaml"))
    rerun = runs_of(client, again["parent_run_id"])
    assert rerun["baseline"].data.tags["pruneflow.reused"] == "true"
    assert all(not runs_of(client, rerun[m].info.run_id) for m in TINY_PARAMS["methods"])  # study resumed, no new trials


def test_a_failing_stage_marks_its_run_and_the_pipeline_failed(tmp_path, prefect_server):
    params = {**TINY_PARAMS, "methods": {"l1": {}},
              "search": {**TINY_PARAMS["search"], "ratio_high": 0.45, "target_macs_reduction": 0.95}}
    path = write_params(tmp_path, params)
    with pytest.raises(MethodsFailed, match="target_macs_reduction"):
        prune_pipeline(params=str(path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id])
    status = {run.info.run_name: run.info.status for run in runs if "pruneflow.trial" not in run.data.tags}
    assert status["l1"] == "FAILED"
    assert status["baseline"] == "FINISHED"
    assert [s for name, s in status.items() if name.startswith("pipeline-")] == ["FAILED"]
    assert "RUNNING" not in {run.info.status for run in runs}
