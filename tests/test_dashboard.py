"""`pruneflow dashboard`: optuna-dashboard on the project's study storage, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pruneflow.config import load_config
from pruneflow.flows.cli import app
from pruneflow.flows.servers import answers
from pruneflow.search import open_study
from tests.conftest import TINY_PARAMS, write_params
from tests.system_deps import free_port
from tests.test_operations import cli, subprocess_env, tail, wait_for


def default_sigint() -> None:
    """SIGINT's default action in the command, however the suite was started: a suite started in the background by
    a non-interactive shell (`make test &`) runs with SIGINT and SIGQUIT ignored, its subprocesses inherit that
    (SigIgn 0x81001006 was read off the hung command), and Python then keeps ignoring Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_dashboard_serves_the_projects_studies_and_stops(tmp_path):
    cfg, _ = load_config(write_params(tmp_path, TINY_PARAMS))
    (tmp_path / "runs").mkdir()
    open_study(f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}", "l1-study", cfg.search, seed=0)
    port, log = free_port(), tmp_path / "dashboard.log"
    with open(log, "wb") as out:  # as test_operations.start, but with Ctrl-C's default action
        dashboard = subprocess.Popen(cli("dashboard", "--params", "params.yaml", "--port", str(port)), cwd=tmp_path,
                                     env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=default_sigint)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url + "/api/studies"), 120, "the dashboard", {log: dashboard})
        with urllib.request.urlopen(url + "/api/studies", timeout=10) as response:
            studies = json.load(response)["study_summaries"]
        assert [study["study_name"] for study in studies] == ["l1-study"]
    finally:
        dashboard.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            dashboard.wait(timeout=60)  # longer than the command's own 30 s before it kills the server
        except subprocess.TimeoutExpired:
            status = Path(f"/proc/{dashboard.pid}/status").read_text().splitlines()
            os.killpg(dashboard.pid, signal.SIGKILL)
            pytest.fail("the dashboard did not stop on SIGINT; its signal state: "
                        f"{[line for line in status if line.startswith(('Sig', 'Shd'))]}\n{tail(log)}")
    assert not answers(url + "/api/studies"), tail(log)
    assert f"Optuna dashboard for sqlite:///{tmp_path}/runs/optuna.db at {url}" in log.read_text()


def test_dashboard_without_studies_says_so(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    done = CliRunner().invoke(app, ["dashboard", "--params", str(tmp_path / "params.yaml")])
    assert done.exit_code == 1
    assert f"error: no study storage at {tmp_path}/runs/optuna.db yet: run the pipeline first" in done.output
    assert not (tmp_path / "runs" / "optuna.db").exists()
