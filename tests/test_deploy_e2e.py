"""A deliberately broken export through the whole flow: the stage fails loudly and nothing is registered."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pruneflow.flows.pipeline import MethodsFailed, prune_pipeline
from tests.conftest import TINY_PARAMS, write_params

pytestmark = pytest.mark.e2e


def test_a_failed_export_check_fails_the_method_and_registers_nothing(tmp_path, prefect_server):
    # fp16 always differs from fp32 a little, so a zero tolerance must fail; the baseline (fp32 only) is unaffected.
    # round_to 8: auto would measure on the GPU platform's runtime, which this machine lacks
    params = {**TINY_PARAMS, "methods": {"l1": {}}, "train": {"epochs": 1}, "prune": {"ratio": 0.5, "round_to": 8},
              "export": {"platform": "generic-gpu", "fp16_rtol": 0}}
    with pytest.raises(MethodsFailed, match=r"l1: ExportError: .*model\.fp16\.onnx: output differs from PyTorch by "
                                            r".* more than export\.fp16_rtol=0"):
        prune_pipeline(params=str(write_params(tmp_path, params)))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruneflow").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    assert runs["l1"].info.status == "FAILED" and runs["baseline"].info.status == "FINISHED"
    assert not any(item.path.startswith("export") for item in client.list_artifacts(runs["l1"].info.run_id))
    assert not list((tmp_path / "runs").glob("*/l1/export/generic-gpu/*"))
    assert client.search_registered_models() == []
