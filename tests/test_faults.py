"""Faults beside bad input: broken models the gates stop, stores in awkward folders, disks that fill up, child
processes whose command is killed. docs/reliability.md lists each of these tests in its second table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pruneflow import gates, stages
from pruneflow.checkpoint import ModelSpec, save_model
from pruneflow.config import PipelineConfig, TrainConfig
from pruneflow.data.loading import DataSplits, Split
from pruneflow.deploy import Deployment, report
from pruneflow.export import ExportError, check_parity, export_torchscript
from pruneflow.files import replacing
from pruneflow.flows.cli import app
from pruneflow.flows.watchdog import stop_orphans
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.methods import create_method
from pruneflow.metrics import count_macs_params
from pruneflow.models import build_model
from pruneflow.plan import PrunePlan
from pruneflow.stores import in_project, sqlite_url
from pruneflow.tasks.tracking import Tracker, tracking_uri
from pruneflow.training import train
from pruneflow.versioning import DataVersion
from tests.system_deps import ROOT, free_port

# ---- gates -----------------------------------------------------------------------------------------------------


def tiny_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


def test_training_stops_on_a_non_finite_loss():
    with pytest.raises(gates.GateError, match=r"training diverged: the loss is nan at epoch 1, batch 2 \(lr inf\)"):
        train(build_model("small_cnn", 1, 10), tiny_batches(3), TrainConfig(epochs=1, lr=float("inf")))


def test_training_stops_on_non_finite_weights_after_its_last_step():
    """One batch: its loss is finite, the step it takes is not."""
    with pytest.raises(gates.GateError, match=r"training diverged: \d+ of \d+ weight tensors hold NaN or Inf"):
        train(build_model("small_cnn", 1, 10), tiny_batches(1), TrainConfig(epochs=1, lr=float("inf")))


def splits_of(labels: list[int], classes: int = 2) -> DataSplits:
    images = torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8)
    split = Split(images, torch.tensor(labels))
    return DataSplits(split, split, split, [str(c) for c in range(classes)], [0.0], [1.0])


class Constant(nn.Module):
    """Answers one class for every image: a model that collapsed (or diverged into it)."""

    def __init__(self, answer: int, classes: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(answer), classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_a_model_no_better_than_chance_on_its_training_images_fails():
    splits = splits_of([0] * 70 + [1] * 30)
    with pytest.raises(gates.GateError,
                       match=r"scores 70.0 % on 100 .* most common class scores 70.0 %; needed > 83.7"):
        gates.check_learned(Constant(0, 2), splits, "the trained baseline", "check train.lr")


def test_a_model_that_learnt_passes_the_chance_gate():
    class Reader(nn.Module):  # reads the label off the image
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = x[:, 0, 0, 0]
            return torch.stack([1 - first, first], dim=1)

    labels = [0] * 70 + [1] * 30
    splits = splits_of(labels)
    splits.train.images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.uint8) * 255
    gates.check_learned(Reader(), splits, "the trained baseline", "check train.lr")


def test_the_data_gate_needs_two_images_and_two_classes():
    config = PipelineConfig().data
    with pytest.raises(gates.GateError, match="the training split holds 1 image"):
        gates.check_training_split(splits_of([0]), config)
    with pytest.raises(gates.GateError, match=r"images of one class only \(1\)"):
        gates.check_training_split(splits_of([1, 1, 1]), config)
    gates.check_training_split(splits_of([0, 1]), config)


def test_a_pruning_step_that_removes_nothing_fails_and_says_why():
    x = torch.zeros(2, 1, 8, 8)
    pruner = create_method("l1")
    for plan, why in ((PrunePlan(ratio=0.5, round_to=1000), "prune.round_to=1000 is not below"),
                      (PrunePlan(ratio=0.02, round_to=8), "every layer keeps its full width")):
        model = build_model("small_cnn", 1, 10)
        result = pruner.prune(model, x, plan)
        with pytest.raises(gates.GateError, match=why):
            gates.check_removed("l1", True, plan, result)
    # round_to auto prunes at the asked count first (round_to None), then steps up to latency edges
    auto = PrunePlan(ratio=0.003, round_to="auto")
    result = pruner.prune(build_model("small_cnn", 1, 10), x, replace(auto, round_to=None))
    with pytest.raises(gates.GateError, match="every layer keeps its full width"):
        gates.check_removed("l1", True, auto, result)
    gates.check_removed("l1", True, PrunePlan(ratio=0.0), result)  # nothing asked, nothing removed: fine


def macs_removed(method: str, ratio: float, round_to: int | None, max_layer_ratio: float = 0.9) -> float:
    x = torch.zeros(2, 3, 8, 8)
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10)
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():  # distinct γ, skewed as sparsity training leaves them
        if isinstance(norm, nn.BatchNorm2d):
            norm.weight.data = torch.rand(norm.num_features, generator=generator) ** 3
    before = count_macs_params(model, x[:1])[0]
    create_method(method).prune(model, x, PrunePlan(ratio=ratio, round_to=round_to, max_layer_ratio=max_layer_ratio))
    return 1 - count_macs_params(model, x[:1])[0] / before


@pytest.mark.parametrize("method", ["slimming", "lamp"])
def test_global_threshold_methods_remove_more_as_the_ratio_grows(method):
    """Torch-Pruning's own global threshold leaves a layer whole when it would empty it: slimming removed 93 % of
    the demo baseline's MACs at ratio 0.56 and 9 % at 0.62."""
    removed = [macs_removed(method, ratio, 8) for ratio in (0.3, 0.56, 0.62, 0.8)]
    assert removed == sorted(removed) and removed[0] > 0, removed


def test_uniform_pruning_without_rounding_never_leaves_a_layer_whole_at_high_ratios():
    """At 0.99 Torch-Pruning alone keeps int(64 x 0.01) = 0 channels, so it leaves 64-channel layers whole while
    128-channel ones drop to one."""
    removed = [macs_removed("l1", ratio, None, 0.9999) for ratio in (0.9, 0.99, 0.9999)]
    assert removed == sorted(removed) and removed[-1] > 0.95, removed


def test_slimming_refuses_a_model_whose_scales_are_all_equal():
    with pytest.raises(ValueError, match="every γ of this model is 1"):
        create_method("slimming").prune(build_model("resnet20", 3, 10), torch.zeros(2, 3, 8, 8), PrunePlan())


# ---- parity ----------------------------------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def exported(model: nn.Module, folder: Path) -> tuple[Path, list]:
    """A TorchScript file of ``model`` (parity treats it like an ONNX file, and tracing it takes milliseconds)."""
    torch.manual_seed(0)
    batches = [(torch.randn(5, 4), None)]
    return export_torchscript(model, batches[0][0], folder / "model.pt"), batches


def test_parity_fails_when_an_output_is_nan_even_if_both_sides_are(tmp_path):
    model = Scaled(1.0)
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    path, batches = exported(model, tmp_path)
    with pytest.raises(ExportError,
                       match=r"outputs are not finite on real inputs \(PyTorch gives 5 NaN/Inf values, the file 5\)"):
        check_parity(path, model, batches, atol=1e-4, rtol=1e-5)


def test_parity_bound_grows_with_large_outputs_and_shrinks_with_tiny_ones(tmp_path):
    large = Scaled(1e4)
    path, batches = exported(large, tmp_path)
    with torch.no_grad():
        large.linear.bias += 3e-7  # 3e-3 in the output: 4e-7 of its scale, far above atol alone
    assert check_parity(path, large, batches, atol=1e-4, rtol=1e-5) > 1e-3

    tiny = Scaled(1e-9)
    path, batches = exported(tiny, tmp_path)
    with torch.no_grad():
        tiny.linear.bias += 0.1  # the outputs' own size: an absolute 1e-4 alone would let this pass
    with pytest.raises(ExportError, match=r"export.atol=0.0001 x min\(1, S\) \+ export.rtol=1e-05 x S"):
        check_parity(path, tiny, batches, atol=1e-4, rtol=1e-5)


def test_the_int8_report_shows_a_loss_as_a_negative_change():
    deployment = Deployment("cpu", {"onnx_int8": "model.int8.onnx"},
                            {"int8_psnr": 23.68, "int8_psnr_drop": 1.17})
    text = report(deployment, PipelineConfig(task="super_resolution"))
    assert "test psnr 23.68 dB (-1.17 vs fp32 ONNX)" in text


# ---- stores ----------------------------------------------------------------------------------------------------

AWKWARD = "x%41y a?b#c"  # percent-escape, query, fragment and a space: all legal in a folder name


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (seconds of migrations: once, then copied)."""
    from tests.test_reliability import Shared

    return Shared(tmp_path_factory.mktemp("faults")).tracking_store


def test_stores_stay_in_a_project_whose_folder_name_holds_url_characters(tmp_path, monkeypatch, tracking_store):
    from pruneflow.search import open_study

    project = tmp_path / AWKWARD
    project.mkdir()
    shutil.copy(tracking_store, project / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    layout = ProjectLayout(project, PipelineConfig())
    tracker = Tracker.open(layout)
    tracker.finish(tracker.start_run("probe"))
    open_study(layout.study_storage, "probe", layout.cfg.search, seed=0)  # as the search stage opens it
    assert tracker.client.search_runs([tracker.experiment_id])[0].info.status == "FINISHED"
    assert (project / "runs" / "optuna.db").is_file()
    # no file beside the project (xAy a, ...). MLflow 3.x itself makes an empty folder named with the escaped path
    # (its _make_parent_dirs_if_sqlite does not unquote the URL); the store it opens is the project's.
    assert [str(path) for path in tmp_path.rglob("*") if path.is_file() and project not in path.parents] == []


def test_relative_sqlite_uris_in_params_are_the_projects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "p"
    cfg = PipelineConfig(project={"tracking_uri": "sqlite:///stores/mlflow.db"}, search={"storage": "sqlite:///s.db"})
    layout = ProjectLayout(project, cfg)
    assert tracking_uri(layout) == sqlite_url(project / "stores" / "mlflow.db")
    assert layout.study_storage == sqlite_url(project / "s.db")
    assert in_project("postgresql://host/db", project) == "postgresql://host/db"
    assert in_project(sqlite_url(tmp_path / "abs.db"), project) == sqlite_url(tmp_path / "abs.db")


def test_a_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    """A full disk fails the write; its partial file goes, so the space is back for marking the run FAILED."""
    def disk_full(payload, path):
        Path(path).write_bytes(b"x" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(tmp_path / "model.pt", nn.Linear(2, 2), ModelSpec("small_cnn", 1, 10, (1, 8, 8)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), replacing(tmp_path / "x.json") as partial:
        partial.write_text("{")
        raise RuntimeError("exporter failed")
    assert list(tmp_path.iterdir()) == []


def test_a_run_is_never_left_running_by_a_failure_even_when_the_store_refuses_the_mark(tmp_path, tracking_store):
    shutil.copy(tracking_store, tmp_path / "mlflow.db")
    tracker = Tracker.open(ProjectLayout(tmp_path, PipelineConfig()))
    failed = tracker.start_run("fails")
    with pytest.raises(OSError, match="No space"), tracker.failing(failed):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert tracker.client.get_run(failed).info.status == "FAILED"

    refused = tracker.start_run("store full too")

    def store_full(run_id: str, status: str = "FINISHED") -> None:
        raise OSError("database or disk is full")

    tracker.finish = store_full
    with pytest.raises(OSError, match="No space"), tracker.failing(refused):  # the cause, not the store's error
        raise OSError(errno.ENOSPC, "No space left on device")
    del tracker.finish
    assert tracker.end_own_runs() == [refused]  # what `pruneflow run` does before it exits
    assert tracker.client.get_run(refused).info.status == "FAILED"


# ---- baseline reuse and the registry --------------------------------------------------------------------------

def baseline_run(folder: Path, digits_dir: Path) -> ProjectRun:
    cfg = PipelineConfig(train={"epochs": 1})
    return ProjectRun(ProjectLayout(folder, cfg), DataVersion(digits_dir, "0" * 32 + ".dir"), folder / "baseline",
                      folder)


@pytest.fixture(scope="module")
def trained_baseline(tmp_path_factory, digits_dir) -> Path:
    """A baseline the stage trained (small_cnn on digits, one epoch: seconds), copied by the tests that damage it."""
    folder = tmp_path_factory.mktemp("trained")
    stages.train_baseline(baseline_run(folder, digits_dir), log=lambda _: None)
    return folder


def garbage_with_its_checksum(folder: Path) -> None:
    """A model.pt that does not load, its checksum recorded as if it had been trained so (model code that changed)."""
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    (folder / "checksums.json").write_text(json.dumps({"model.pt": stages.sha256(folder / "model.pt")}))


def test_checksums_need_no_python_3_11(tmp_path, monkeypatch):
    """requires-python is >=3.10: the baseline's checksums must not use hashlib.file_digest (new in 3.11)."""
    import hashlib

    data = os.urandom(3 << 20 | 5)  # several read chunks and a partial one
    (tmp_path / "model.pt").write_bytes(data)
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    assert stages.sha256(tmp_path / "model.pt") == hashlib.sha256(data).hexdigest()


DAMAGES = [
    ("a truncated checkpoint", lambda folder: folder.joinpath("model.pt").write_bytes(
        folder.joinpath("model.pt").read_bytes()[:1000]), "model.pt is not the file trained there"),
    ("a deleted ONNX file", lambda folder: folder.joinpath("model.onnx").unlink(), "model.onnx is missing"),
    ("no record of its files", lambda folder: folder.joinpath("checksums.json").unlink(),
     "checksums.json is missing (no record of the files it trained)"),
    ("a checkpoint that does not load", garbage_with_its_checksum, "model.pt does not load"),
]


@pytest.mark.xdist_group("trained_baseline")  # one worker trains it for both tests
def test_a_damaged_baseline_is_trained_again_not_reused(trained_baseline, digits_dir, tmp_path, monkeypatch):
    retrained = []
    for name, damage, why in DAMAGES:
        project = tmp_path / name.replace(" ", "-")
        shutil.copytree(trained_baseline, project)
        run, logs = baseline_run(project, digits_dir), []
        assert stages.ensure_baseline(run, logs.append).reused, name  # intact: reused, no training
        assert "files verified" in logs[-1]
        damage(run.baseline_dir)
        with monkeypatch.context() as patched:
            patched.setattr(stages, "train_baseline",
                            lambda run, log: retrained.append(run.baseline_dir.exists()) or {})
            assert not stages.ensure_baseline(run, logs.append).reused, name
        assert logs[-1].startswith(f"baseline: not reusing {run.baseline_dir}: ") and why in logs[-1], logs[-1]
        assert logs[-1].endswith("; training it again")
    assert retrained == [False] * len(DAMAGES)  # each damaged folder was removed before training


@pytest.mark.xdist_group("trained_baseline")
def test_a_damaged_baseline_that_cannot_be_removed_names_the_folder_to_delete(trained_baseline, digits_dir, tmp_path,
                                                                              monkeypatch):
    shutil.copytree(trained_baseline, tmp_path, dirs_exist_ok=True)
    run = baseline_run(tmp_path, digits_dir)
    (run.baseline_dir / "model.onnx").unlink()

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(stages.shutil, "rmtree", refuse)
    with pytest.raises(RuntimeError, match=rf"the baseline in {run.baseline_dir} cannot be reused \(.*model.onnx is "
                                           r"missing\) nor removed \(Permission denied\): delete that folder"):
        stages.ensure_baseline(run, lambda _: None)


def test_no_model_is_registered_when_every_method_lost_more_than_registry_max_drop(tmp_path, tracking_store):
    """The run that lost 79 points was registered as champion by the old "else the most accurate" rule."""
    from prefect.logging import disable_run_logger

    from pruneflow.tasks.deploy import register_champion

    shutil.copy(tracking_store, tmp_path / "mlflow.db")
    layout = ProjectLayout(tmp_path, PipelineConfig())
    tracker = Tracker.open(layout)
    parent = tracker.start_run("pipeline")
    run = ProjectRun(layout, DataVersion(tmp_path / "data" / "digits", "0" * 32 + ".dir"), tmp_path, tmp_path)
    results = {"l1": {"accuracy": 18.0, "accuracy_drop": 79.0, "speedup": 3.0, "files": {"onnx": "model.onnx"}}}
    with disable_run_logger():
        champion = register_champion.fn(run, "baseline-run", results, {"l1": "l1-run"}, parent)
    assert champion["method"] is None
    tags = tracker.client.get_run(parent).data.tags
    assert tags["pruneflow.champion"] == "none"
    assert tags["pruneflow.champion_reason"] == champion["reason"]
    assert "drops: l1 79.00), so none is registered" in champion["reason"]
    assert tracker.client.search_registered_models() == []


# ---- child processes -------------------------------------------------------------------------------------------

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from pruneflow.flows.watchdog import guard_children
    guard_children(Path(sys.argv[1]))
    subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"])
    time.sleep(600)
""")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def tree_of(process: subprocess.Popen, count: int, timeout: float = 60.0) -> list[int]:
    """The pids of ``count`` descendants of ``process``, once they all run, the watchdog excluded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [child for child in psutil.Process(process.pid).children(recursive=True)
                 if "pruneflow.flows.watchdog" not in " ".join(child.cmdline())]
        if len(found) >= count:
            return [child.pid for child in found]
        time.sleep(0.2)
    raise AssertionError(f"{process.args} did not start {count} processes")


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def recorded(state_dir: Path, pids: list[int], timeout: float = 60.0) -> None:
    """Wait until the watchdog has noted ``pids`` (it takes a moment to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in state_dir.glob("watchdog-*.json"):
            try:
                if {str(pid) for pid in pids} <= set(json.loads(record.read_text())["processes"]):
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"no watchdog record of {pids} in {state_dir}")


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])


@SIGNALS
def test_a_killed_command_leaves_no_process_behind(tmp_path, sig):
    parent = start([sys.executable, "-c", PARENT, str(tmp_path / ".servers")], tmp_path)
    pids = tree_of(parent, 2)
    recorded(tmp_path / ".servers", pids)
    os.kill(parent.pid, sig)  # the command alone, as `kill` or the OOM killer would
    parent.wait(timeout=30)
    assert gone(pids), f"left running: {[pid for pid in pids if running(pid)]}"
    deadline = time.monotonic() + 10
    while list((tmp_path / ".servers").glob("watchdog-*.json")):  # removed once it has stopped them
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_the_next_command_stops_what_a_dead_command_and_its_dead_watchdog_left(tmp_path):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    record = tmp_path / "watchdog-1.json"
    record.write_text(json.dumps({"owner": f"{host}:{dead.stdout.strip()}:1.00",
                                  "watchdog": f"{host}:{dead.stdout.strip()}:1.00",
                                  "processes": {str(orphan.pid): psutil.Process(orphan.pid).create_time()}}))
    assert stop_orphans(tmp_path) == [orphan.pid]
    assert orphan.wait(timeout=30) is not None and not record.exists()


def test_ui_exits_non_zero_when_its_port_is_taken(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = CliRunner().invoke(app, ["ui", "--params", str(tmp_path / "params.yaml"), "--port", str(port)])
    assert done.exit_code == 1
    assert f"error: --port {port}: something already listens on 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_ui_leaves_no_mlflow_server_behind(tmp_path, tracking_store):
    """SIGTERM, as the drill found it; ui handles no signal, so SIGKILL ends it the same way (one MLflow server
    start is the cost of this test: the watchdog's handling of both signals is tested above)."""
    from pruneflow.flows.servers import answers

    (tmp_path / "params.yaml").write_text("{}\n")
    shutil.copy(tracking_store, tmp_path / "mlflow.db")
    port = free_port()
    ui = start([sys.executable, "-m", "pruneflow.flows.cli", "ui", "--port", str(port)], tmp_path)
    deadline = time.monotonic() + 180
    while not answers(f"http://127.0.0.1:{port}/health"):
        assert ui.poll() is None and time.monotonic() < deadline, ui.stdout.read().decode(errors="replace")
        time.sleep(0.5)
    pids = tree_of(ui, 1)
    recorded(tmp_path / ".servers", pids)
    os.kill(ui.pid, signal.SIGTERM)
    ui.wait(timeout=30)
    assert gone(pids), f"left running: {[pid for pid in pids if running(pid)]}"
    assert not answers(f"http://127.0.0.1:{port}/health")
