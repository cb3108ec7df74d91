"""The whole flow on the built-in data, checked by reading MLflow back, as a user's dashboard would."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pruneflow.flows.cli import app
from pruneflow.flows.pipeline import MethodsFailed, prune_pipeline
from tests.conftest import FAST, TINY_PARAMS, PipelineRun, write_params

pytestmark = pytest.mark.e2e

METRICS = {"accuracy", "accuracy_drop", "params", "macs", "params_reduction", "macs_reduction", "size_mb",
           "latency_ms", "latency_ms_p90", "speedup", "latency_ms_b32", "speedup_b32", "speedup_efficiency",
           "onnx_max_abs_diff", "int8_accuracy", "int8_latency_ms"}
EXPORTED = {"export/cpu/model.onnx", "export/cpu/model.int8.onnx", "export/cpu/report.md", "retrained.pt"}


def runs_of(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in found}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_pipeline_logs_every_stage_and_reuses_the_baseline_on_rerun(pipeline_run: PipelineRun):
    project, result = pipeline_run
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
        assert run.data.metrics["macs_reduction"] >= TINY_PARAMS["search"]["target"]["value"]
        assert run.data.metrics["onnx_max_abs_diff"] < 1e-4
        assert {*EXPORTED, "pruning/history.json", "report.md"} <= artifact_paths(client, run.info.run_id)
        trials = runs_of(client, run.info.run_id)
        assert len(trials) == TINY_PARAMS["search"]["n_trials"]
        assert all("pruneflow.trial" in trial.data.tags for trial in trials.values())
    assert client.search_logged_models([parent.info.experiment_id])  # the PyTorch models, one per method
    assert_champion_registered(client, result, children)
    assert_reexport_logs_a_jetson_export(client, project, children["l1"].info.run_id)

    # neither setting changes the baseline or the studies; both spare the rerun a minute on two cores
    again = prune_pipeline(params=str(project / "params.yaml"), overrides=FAST)
    rerun = runs_of(client, again["parent_run_id"])
    assert rerun["baseline"].data.tags["pruneflow.reused"] == "true"
    for method in TINY_PARAMS["methods"]:  # the study resumed: the rerun added its trials, none repeated
        chosen = json.loads((Path(again["run_dir"]) / method / "search.json").read_text())
        assert chosen["completed_trials"] + chosen["pruned_trials"] == 2 * TINY_PARAMS["search"]["n_trials"]
        assert len(runs_of(client, rerun[method].info.run_id)) == TINY_PARAMS["search"]["n_trials"]
    assert str(client.get_model_version_by_alias("pruneflow-small_cnn", "champion").version) == "2"


def assert_champion_registered(client: MlflowClient, result: dict, children: dict) -> None:
    """The registry holds the pipeline's best model as ONNX, with its lineage, under the alias champion."""
    version = client.get_model_version_by_alias("pruneflow-small_cnn", "champion")
    method = version.tags["pruneflow.method"]
    assert result["champion"] == {"name": "pruneflow-small_cnn", "version": str(version.version), "method": method,
                                  "uri": "models:/pruneflow-small_cnn@champion"}
    assert version.tags["pruneflow.method_run_id"] == children[method].info.run_id == version.run_id
    assert version.tags["pruneflow.baseline_run_id"] == children["baseline"].info.run_id
    assert version.tags["pruneflow.data_md5"] == client.get_run(result["parent_run_id"]).data.tags["pruneflow.data_md5"]
    logged_model = client.get_logged_model(version.source.removeprefix("models:/"))
    logged = Model.load(str(Path(urlparse(logged_model.artifact_location).path) / "MLmodel"))
    assert "onnx" in logged.flavors and logged.signature is not None and logged.saved_input_example_info is not None


def assert_reexport_logs_a_jetson_export(client: MlflowClient, project: Path, run_id: str) -> None:
    """``pruneflow export --run-id`` rebuilds the logged model and adds the jetson files to the same run."""
    done = CliRunner().invoke(app, ["export", "--run-id", run_id, "--platform", "jetson",
                                    "--params", str(project / "params.yaml")])
    assert done.exit_code == 0, done.output
    assert "Export for platform `jetson` (opset 17)" in done.output
    paths = artifact_paths(client, run_id)
    assert {"export/jetson/model.fp16.onnx", "export/jetson/model.torchscript.pt",
            "export/cpu/model.int8.onnx"} <= paths
    run = client.get_run(run_id)
    assert run.data.metrics["jetson/fp16_max_abs_diff"] > 0
    assert "pruneflow.device_latency.jetson" in run.data.tags
    missing = CliRunner().invoke(app, ["export", "--run-id", "0" * 32, "--params", str(project / "params.yaml")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_a_failing_stage_marks_its_run_and_the_pipeline_failed(tmp_path, prefect_server):
    params = {**TINY_PARAMS, "methods": {"l1": {}},
              "search": {**TINY_PARAMS["search"], "ratio_high": 0.45, "target": {"value": 0.95}}}
    path = write_params(tmp_path, params)
    with pytest.raises(MethodsFailed, match="search.target unreachable"):
        prune_pipeline(params=str(path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id])
    status = {run.info.run_name: run.info.status for run in runs if "pruneflow.trial" not in run.data.tags}
    assert status["l1"] == "FAILED"
    assert status["baseline"] == "FINISHED"
    assert [s for name, s in status.items() if name.startswith("pipeline-")] == ["FAILED"]
    assert "RUNNING" not in {run.info.status for run in runs}
