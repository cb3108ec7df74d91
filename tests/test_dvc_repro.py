"""``dvc repro`` runs the same stages (``pruneflow stage ...``) with DVC's caching, on the tiny config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, write_params
from tests.test_stages import covers, declared

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def test_dvc_repro_runs_the_pipeline_stage_by_stage(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    # One baseline epoch and trials without fine-tuning: what is checked here is DVC's wiring, not accuracy.
    params = {**TINY_PARAMS, "train": {"epochs": 1}, "methods": {"l1": {}}, "export": {"opset": 17},
              "search": {**TINY_PARAMS["search"], "finetune_epochs": 0}}
    write_params(tmp_path, params, full=True)
    prepared = run(["pruneflow", "stage", "data"], tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert (tmp_path / "data" / "digits.dvc").is_file()

    first = run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = json.loads((tmp_path / "runs" / "dvc" / "l1" / "metrics.json").read_text())
    assert metrics["macs_reduction"] >= TINY_PARAMS["search"]["target"]["value"]
    assert (tmp_path / "runs" / "dvc" / "l1" / "export" / "cpu" / "model.int8.onnx").is_file()
    assert (tmp_path / "dvc.lock").is_file()
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    outs = set().union(*(declared(entry.get("do", entry), "digits", "l1")[2] for entry in stages.values()))
    # Not outputs: lock files (pruneflow.concurrency), and what only a search writes (a skipped one does not, so
    # DVC cannot declare it).
    searched = {"runs/dvc/l1/trials.md", "runs/dvc/l1/search.png"}
    written = {path.relative_to(tmp_path).as_posix() for path in (tmp_path / "runs" / "dvc").rglob("*")
               if path.is_file() and path.name != ".gitignore" and path.suffix != ".lock"} - searched
    assert covers(outs, written), f"the stages wrote {sorted(written)}; dvc.yaml declares {sorted(outs)}"

    second = run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout  # DVC's cache: nothing reruns


def test_stage_needs_a_configured_method(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    done = run(["pruneflow", "stage", "prune", "--method", "fpgm9"], tmp_path)
    assert done.returncode == 2
    assert "--method must be one of" in done.stderr


def test_search_stage_chooses_the_same_whatever_ran_before(tmp_path, digits_dir):
    """`dvc repro`'s search stage runs a study of its own: trials an earlier pipeline added to runs/optuna.db (a
    study of the same name) must not change its choice."""
    import optuna
    from typer.testing import CliRunner

    from pruneflow import stages
    from pruneflow.config import load_config
    from pruneflow.flows.cli import app
    from pruneflow.layout import ProjectLayout, ProjectRun
    from pruneflow.stores import sqlite_url
    from pruneflow.versioning import DataVersion
    from tests.test_reliability import Shared, baseline_ready, inside

    params = {"methods": {"l1": {}}, "search": {"n_trials": 2, "ratio_low": 0.3, "ratio_high": 0.7,
                                                "finetune_epochs": 0, "target": {"value": 0.2}}}
    shared = Shared(tmp_path / "shared", digits_dir.parent)
    chosen = {}
    for name, earlier_trials in (("clean", 0), ("after-a-pipeline", 1)):
        project = tmp_path / name
        project.mkdir()
        write_params(project, params)
        baseline_ready(project, shared)
        cfg, _ = load_config(project / "params.yaml")
        study = stages.study_name(cfg, "l1", "0" * 32 + ".dir")
        if earlier_trials:  # what `pruneflow run` leaves: the same study, more trials
            more = cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_trials": earlier_trials})})
            layout = ProjectLayout(project, more)
            pipeline = ProjectRun(layout, DataVersion(layout.dataset_dir), layout.dvc_run_dir / "baseline",
                                  layout.runs_dir / "pipeline").method_run("l1")
            assert pipeline.study_storage == layout.study_storage  # runs/optuna.db, which `pruneflow run` resumes
            stages.search(pipeline, log=lambda _: None)
        with inside(project, tmp_path):
            done = CliRunner().invoke(app, ["stage", "search", "--method", "l1"])
        assert done.exit_code == 0, done.output
        chosen[name] = json.loads((project / "runs" / "dvc" / "l1" / "search.json").read_text())
        own = sqlite_url(project / "runs" / "dvc" / "l1" / "study.db")
        assert len(optuna.load_study(study_name=study, storage=own).trials) == 2
    assert chosen["clean"] == chosen["after-a-pipeline"]
