"""Distributed search for real: a PostgreSQL server and four `pruneflow search-worker` processes on one study.

The server is Debian's PostgreSQL (scripts/install-system-deps.sh installs it), started on a free loopback
port in a temporary data folder and stopped afterwards. The workers start at once on an empty database,
as a user's would, and the pipeline's search then chooses among all their trials.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from pruneflow import stages, versioning
from pruneflow.config import PipelineConfig, load_config
from pruneflow.flows.cli import app
from pruneflow.layout import ProjectLayout
from pruneflow.versioning import DataVersion
from tests.conftest import write_params
from tests.system_deps import ROOT, free_port, require

# Both tests use the module's project and PostgreSQL server: one xdist worker builds them once.
pytestmark = pytest.mark.xdist_group("postgres")
WORKERS, TRIALS_EACH = 4, 2
PARAMS = {"train": {"epochs": 1}, "retrain": {"epochs": 1, "lr": 0.01}, "methods": {"l1": {}},
          "search": {"n_trials": TRIALS_EACH, "ratio_low": 0.3, "ratio_high": 0.7, "finetune_epochs": 0,
                     "target": {"metric": "macs_reduction", "value": 0.3}}}


def postgres_bin() -> Path | None:
    """Debian keeps the server programs off PATH, in /usr/lib/postgresql/<version>/bin; take the newest."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of our own on loopback, with an empty database ``optuna``; stopped at the end."""
    require("postgres", lambda: postgres_bin() is not None)
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is a dev dependency: pip install -e '.[dev]'")
    bin_dir, as_server_user = postgres_bin(), []
    folder = Path(tempfile.mkdtemp(prefix="pruneflow-pg-"))  # not under pytest's tmp: the server user must reach it
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the account Debian's package creates
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(program: str, *args: str) -> None:
        subprocess.run([*as_server_user, str(bin_dir / program), *args], check=True, capture_output=True, timeout=60)

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # No durability needed: fsync off makes the server start and commit faster.
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def worker_project(tmp_path_factory, digits_dir) -> Path:
    """A project whose data is versioned and whose baseline is trained, as after a pipeline run."""
    root = tmp_path_factory.mktemp("distributed")
    cfg, _ = load_config(write_params(root, PARAMS))
    layout = ProjectLayout(root, cfg)
    shutil.copytree(digits_dir, layout.dataset_dir)
    md5 = versioning.add(root, layout.dataset_dir)
    stages.train_baseline(stages.project_run(layout, DataVersion(layout.dataset_dir, md5), layout.runs_dir),
                          log=lambda _: None)
    return root


@pytest.mark.e2e
def test_four_workers_share_one_study_and_the_pipeline_chooses_among_their_trials(worker_project, postgres_url,
                                                                                   tmp_path):
    project = worker_project
    env = {**os.environ, "PRUNEFLOW_SEARCH_STORAGE": postgres_url, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pruneflow.flows.cli", "search-worker", "--method", "l1",
               "--params", str(project / "params.yaml"), "--n-trials", str(TRIALS_EACH)]
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(WORKERS)]
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err
        assert f"added {TRIALS_EACH} trial(s)" in out

    cfg, _ = load_config(project / "params.yaml")
    layout = ProjectLayout(project, cfg)
    data_md5 = versioning.read_md5(layout.dataset_dir)
    name = stages.study_name(cfg, "l1", data_md5)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS_EACH))  # none lost, none numbered twice
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    by_worker = [t.user_attrs["worker"] for t in trials]
    assert sorted(set(by_worker)) == sorted(f"{socket.gethostname()}:{w.pid}" for w in workers)
    assert all(by_worker.count(w) == TRIALS_EACH for w in set(by_worker))

    # The pipeline's search on the same params finds the workers' study, adds its own trial and chooses.
    pipeline_cfg = PipelineConfig.model_validate({**cfg.model_dump(), "search": {**cfg.search.model_dump(),
                                                                                  "n_trials": 1,
                                                                                  "storage": postgres_url}})
    pipeline = ProjectLayout(project, pipeline_cfg)
    run = stages.project_run(pipeline, DataVersion(pipeline.dataset_dir, data_md5), tmp_path).method_run("l1")
    chosen = stages.search_ratio(run, log=lambda _: None)
    assert chosen.study_name == name
    assert chosen.completed_trials + chosen.pruned_trials == WORKERS * TRIALS_EACH + 1
    assert chosen.costs["macs_reduction"] >= PARAMS["search"]["target"]["value"]
    assert (tmp_path / "l1" / "search.json").is_file()


def test_a_worker_that_cannot_start_says_why(worker_project, tmp_path):
    params = str(worker_project / "params.yaml")
    unknown = CliRunner().invoke(app, ["search-worker", "--method", "slimming", "--params", params])
    assert unknown.exit_code == 2 and "--method must be one of the configured methods: l1" in unknown.output
    fixed = CliRunner().invoke(app, ["search-worker", "-m", "l1", "--params", params, "-S", "prune.ratio=0.5"])
    assert fixed.exit_code == 2 and "runs no search" in fixed.output

    write_params(tmp_path, PARAMS)  # a project whose data was never versioned
    no_data = CliRunner().invoke(app, ["search-worker", "-m", "l1", "--params", str(tmp_path / "params.yaml")])
    assert no_data.exit_code == 1 and "pruneflow stage data" in no_data.output

    nobody = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/optuna"
    unreachable = CliRunner().invoke(app, ["search-worker", "-m", "l1", "--params", params,
                                           "-S", f"search.storage={nobody}"])
    assert unreachable.exit_code == 1 and "error: search-worker:" in unreachable.output
    assert "Connection refused" in unreachable.output, unreachable.output
