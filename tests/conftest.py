"""Shared test set-up: quiet, offline Prefect/MLflow/DVC settings, one Prefect server per session, tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

_HOME = tempfile.mkdtemp(prefix="pruneflow-tests-")
os.environ.update({
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "PRUNEFLOW_LATENCY_CACHE": os.path.join(_HOME, "latency"),  # not the user's table of this machine
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Test tensors are tiny: one intra-op thread avoids oversubscribing a 2-core CI box (up to 100x less CPU).
torch.set_num_threads(1)

# A config that exercises every stage in seconds: few epochs, two trials, few latency repeats.
TINY_PARAMS = {
    "train": {"epochs": 3},
    "methods": {"l1": {}, "slimming": {"sparsity": 1e-4}, "random": {}},
    "search": {"n_trials": 2, "ratio_low": 0.4, "ratio_high": 0.6, "finetune_epochs": 1,
               "target": {"metric": "macs_reduction", "value": 0.3}},
    "retrain": {"epochs": 1, "lr": 0.01},
    "evaluate": {"latency_repeats": 5, "latency_warmup": 2},
}
# Overrides for reruns of the shared ``pipeline_run`` whose subject is not its local cluster or its exporter:
# chains one at a time in the pipeline's process (the default without GPUs; no Dask cluster: ~60 CPU-s less),
# and the TorchScript ONNX exporter (opset 17: under a second a net, where the dynamo exporter takes several).
FAST = ["project.max_parallel_methods=1", "export.opset=17"]


def write_params(folder: Path, params: dict, full: bool = False) -> Path:
    """Write a params.yaml; ``full`` expands it to every key (DVC's templating needs them all)."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    if full:
        from pruneflow.config import load_config

        cfg, _ = load_config(path)
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


class PipelineRun(NamedTuple):
    project: Path  # the project folder: params.yaml, mlflow.db, runs/
    result: dict   # what prune_pipeline returned (parent_run_id, run_dir, tracking_uri, champion)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, prefect_server) -> PipelineRun:
    """One tiny pipeline run shared by the tests that read its results (a run costs about a minute), with the
    defaults: chains one at a time in the pipeline's process (no GPUs), exported through the dynamo exporter (the
    default opset). Chains on worker processes: tests/test_cluster.py."""
    from pruneflow.flows.pipeline import prune_pipeline

    folder = tmp_path_factory.mktemp("pipeline")
    write_params(folder, TINY_PARAMS)
    return PipelineRun(folder, prune_pipeline(params=str(folder / "params.yaml")))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The built-in digits data, prepared once for the session."""
    from pruneflow.config import DataConfig
    from pruneflow.data import prepare_dataset

    return prepare_dataset(DataConfig(), tmp_path_factory.mktemp("data"), log=lambda _: None)


@pytest.fixture
def project(tmp_path) -> Path:
    """An empty project folder with the tiny params."""
    write_params(tmp_path, TINY_PARAMS)
    return tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: four workers; half of the suite's time is spent waiting on servers and
    subprocesses), two workers hold the tests that need a Prefect server: one the tests of the shared pipeline
    run (it runs once), one the others. Two temporary servers, not one per worker: each takes ~20 s of CPU to
    start, and four starting at once on two busy cores missed the start-up timeout.

    The end-to-end tests (a minute or more each) come first, so that no worker starts one when the others are
    done: the Makefile keeps this order (``--no-loadscope-reorder``; xdist would otherwise send the groups with
    most tests first, and single tests after them in this order)."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if "pipeline_run" in needs:
            item.add_marker(pytest.mark.xdist_group("pipeline_run"))
        elif "prefect_server" in needs:
            item.add_marker(pytest.mark.xdist_group("prefect"))
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: files keep their order
