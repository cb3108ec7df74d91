"""``dvc repro`` runs the same stages (``pruneflow stage ...``) with DVC's caching, on the tiny config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, write_params

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def test_dvc_repro_runs_the_pipeline_stage_by_stage(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    write_params(tmp_path, {**TINY_PARAMS, "methods": {"l1": {}}}, full=True)
    prepared = run(["pruneflow", "stage", "data"], tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert (tmp_path / "data" / "digits.dvc").is_file()

    first = run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = json.loads((tmp_path / "runs" / "dvc" / "l1" / "metrics.json").read_text())
    assert metrics["macs_reduction"] >= TINY_PARAMS["search"]["target"]["value"]
    assert (tmp_path / "runs" / "dvc" / "l1" / "export" / "cpu" / "model.int8.onnx").is_file()
    assert (tmp_path / "dvc.lock").is_file()

    second = run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout  # DVC's cache: nothing reruns


def test_stage_needs_a_configured_method(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    done = run(["pruneflow", "stage", "prune", "--method", "fpgm9"], tmp_path)
    assert done.returncode == 2
    assert "--method must be one of" in done.stderr
