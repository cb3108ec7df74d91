"""The MLflow UI as a person sees it: a tiny pipeline's runs, opened in headless Chromium through `pruneflow ui`.

The browser is Debian's Chromium driven by Selenium through Debian's ChromeDriver (scripts/install-system-deps.sh
installs both). The test does what the README tells a user to do: open the experiment's runs, expand the
pipeline's parent run and add the `accuracy` and `speedup` columns; then it checks that the page shows them
with the values MLflow holds, and keeps a screenshot. With PRUNEFLOW_UPDATE_SCREENSHOT=1 the screenshot
also replaces docs/img/mlflow-compare.png, the README's picture.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_PARAMS, PipelineRun
from tests.system_deps import ROOT, free_port, require

pytestmark = pytest.mark.e2e

DOCS_SCREENSHOT = ROOT / "docs" / "img" / "mlflow-compare.png"
SIZE = (1600, 900)
METRICS = ("accuracy", "accuracy_drop", "macs_reduction", "speedup")  # the compare columns added to the table
HIDDEN = ("Dataset", "Source", "Models")  # default columns, empty for these runs: hidden to make room
# Without the background-networking flags Chromium keeps calling Google's hosts, which this network refuses.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  f"--window-size={SIZE[0]},{SIZE[1]}")


@pytest.fixture
def mlflow_ui(pipeline_run: PipelineRun) -> Iterator[str]:
    """``pruneflow ui`` on a free loopback port against the pipeline's store; its URL once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pruneflow.flows.cli", "ui", "--params",
                               str(pipeline_run.project / "params.yaml"), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: mlflow's workers stop with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"pruneflow ui exited: {server.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the MLflow UI did not answer within 120 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def browser():
    """Headless Chromium with a viewport of exactly ``SIZE``, so the screenshot has that size."""
    require("chromium", lambda: bool(shutil.which("chromium") and shutil.which("chromedriver")))
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is a dev dependency: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # Naming Debian's driver keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": SIZE[0], "height": SIZE[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def test_the_runs_table_shows_the_pipeline_and_its_methods_with_compare_columns(pipeline_run, mlflow_ui, browser,
                                                                               tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(pipeline_run.result["tracking_uri"])
    parent = client.get_run(pipeline_run.result["parent_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    children = {run.info.run_name: run for run in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    methods = {name: children[name] for name in TINY_PARAMS["methods"]}
    wait = WebDriverWait(browser, 60)

    def row(run_id: str) -> str:  # ag-grid renders each row once per column block, all with the run id
        return f"//div[@role='row'][@row-id='{run_id}']"

    def cell(run_id: str, metric: str):
        return browser.find_element(By.XPATH, f"{row(run_id)}//div[@role='gridcell'][@col-id='metrics.`{metric}`']")

    # MLflow 3 opens experiments on its GenAI overview: ask for the model-training runs table.
    browser.get(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
    columns = wait.until(ready.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Columns']")))
    for close in browser.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # the assistant side panel
        close.click()
    wait.until(ready.element_to_be_clickable(
        (By.XPATH, f"{row(parent.info.run_id)}//button[contains(@data-component-id, 'runnamecellrenderer')]"))).click()
    columns.click()
    for title in (*HIDDEN, *METRICS):
        checkbox = wait.until(ready.element_to_be_clickable(
            (By.XPATH, f"//div[contains(@class, 'tree-treenode')][.//span[@title='{title}']]"
                       "//span[contains(@class, 'tree-checkbox')]")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", checkbox)
        checkbox.click()
    columns.click()
    for metric in METRICS:
        header = f"//div[@role='columnheader'][@col-id='metrics.`{metric}`']"
        wait.until(ready.visibility_of_element_located((By.XPATH, header)))

    # Wider name and metric columns, so the screenshot shows whole names and numbers.
    for col_id, extra in (("attributes.`Run Name`", 140), *((f"metrics.`{m}`", 40) for m in METRICS)):
        handle = browser.find_element(By.XPATH, f"//div[@role='columnheader'][@col-id='{col_id}']"
                                                "//div[contains(@class, 'ag-header-cell-resize')]")
        ActionChains(browser).drag_and_drop_by_offset(handle, extra, 0).perform()

    links = browser.find_elements(By.XPATH, f"//a[normalize-space()='{experiment.name}']")
    visible = [e for e in links if e.is_displayed()]
    assert visible, f"experiment {experiment.name} is not shown"
    for run in (parent, children["baseline"], *methods.values()):
        name = browser.find_element(By.XPATH, f"{row(run.info.run_id)}//a[normalize-space()='{run.info.run_name}']")
        assert name.is_displayed(), f"run {run.info.run_name} is not shown"
    headers = {e.get_attribute("col-id"): e.text for e in browser.find_elements(By.XPATH, "//div[@role='columnheader']")
               if e.is_displayed()}
    assert {f"metrics.`{m}`": m for m in METRICS}.items() <= headers.items(), headers
    for name, run in methods.items():
        for metric in ("accuracy", "speedup"):
            shown = cell(run.info.run_id, metric)
            assert shown.is_displayed(), (name, metric)
            assert float(shown.text) == pytest.approx(run.data.metrics[metric]), (name, metric, shown.text)

    screenshot = tmp_path / "mlflow-compare.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("PRUNEFLOW_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
