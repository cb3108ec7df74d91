"""Bad input, row by row: each kind a user can give stops with a non-zero exit and one line naming the problem.

Every row runs the real command in-process (typer's CliRunner, in a fresh project folder) and must fail before
anything trains or opens an MLflow run, leaving nothing that looks like a result. The observed message must also
be the one docs/reliability.md shows for the row, so the doc cannot drift from the code. Regenerate the doc with

    .venv/bin/python -m tests.test_reliability
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pruneflow.flows.cli import app

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
RUN_ID = "0123456789abcdef0123456789abcdef"

# The model factories of the model rows: a user's module, each factory with one mistake.
MY_MODELS = '''"""Model factories with one mistake each (docs/reliability.md)."""
import torch
from torch import nn

WIDTH = 32  # not a factory; wider than a channel block (16), so round_to auto can thin a layer


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, extra=None):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, WIDTH, 3, padding=1)
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.extra = extra  # what the user added: a GRU over the pixels, an SVD of the features, a grouped conv
        self.fc = nn.Linear(WIDTH, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        if isinstance(self.extra, nn.GRU):
            return self.fc(self.extra(x.flatten(2).transpose(1, 2))[0][:, -1])
        if self.extra == "svd":
            return self.fc(x.mean((2, 3))) + torch.linalg.svdvals(x.flatten(2))[:, :1]
        if isinstance(self.extra, nn.Sequential):
            x = torch.relu(self.extra(x))
        return self.fc(x.mean((2, 3)))


def layers(in_channels, num_classes):
    return {"stem": nn.Conv2d(in_channels, WIDTH, 3), "fc": nn.Linear(WIDTH, num_classes)}


def imagenet_head(in_channels, num_classes):
    return Net(in_channels, 1000)


def rgb_only(in_channels, num_classes):
    return Net(3, num_classes)


def gru(in_channels, num_classes):
    return Net(in_channels, num_classes, nn.GRU(WIDTH, WIDTH, batch_first=True))


def svd(in_channels, num_classes):
    return Net(in_channels, num_classes, "svd")


def grouped(in_channels, num_classes):  # no BatchNorm, and a conv in 4 groups
    extra = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, padding=1, groups=4), nn.Conv2d(WIDTH, WIDTH, 3, padding=1))
    return Net(in_channels, num_classes, extra)
'''


class Shared:
    """What several rows need, made once: the prepared digits, the user's model module, a tracking store."""

    def __init__(self, root: Path, data_dir: Path | None = None) -> None:
        self.root = root
        self._data_dir = data_dir

    @functools.cached_property
    def data_dir(self) -> Path:
        """A project data_dir holding prepared digits (conftest's when under pytest)."""
        if self._data_dir is None:
            from pruneflow.config import DataConfig
            from pruneflow.data import prepare_dataset

            prepare_dataset(DataConfig(), self.root / "data", log=lambda _: None)
            self._data_dir = self.root / "data"
        return self._data_dir

    @functools.cached_property
    def models_dir(self) -> Path:
        folder = self.root / "models"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "my_models.py").write_text(MY_MODELS)
        return folder

    @functools.cached_property
    def tracking_store(self) -> Path:
        """An MLflow sqlite store with its tables made (creating them takes seconds: once, then copied)."""
        from mlflow.tracking import MlflowClient

        path = self.root / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
        return path


@dataclass
class Outcome:
    code: int
    error: str  # the line that says what is wrong


@dataclass(frozen=True)
class Row:
    id: str
    bad_input: str
    args: tuple[str, ...]  # after `pruneflow`, as the user types them in the project folder
    expect: str  # what the error must contain: the key or file at fault
    code: int = 2
    params: str = "{}\n"  # the project's params.yaml
    given: str = ""  # what else the project holds (made by ``setup``), for the doc
    setup: Callable[[Path, Shared], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    digits: bool = False  # harness: point the command at the already prepared digits
    absent: tuple[str, ...] | None = None  # what must not be left behind; None: anything like a result
    patches: tuple[tuple[str, Callable], ...] = ()  # harness: (target, replacement) faults injected while it runs


# ---- project contents the rows need ---------------------------------------------------------------------------

def images(root: Path, classes: tuple[str, ...] = ("cat", "dog"), size: int = 32, per_class: int = 2) -> Path:
    """A valid image folder: random grey PNGs in train/<class>/ and test/<class>/."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def image_folder(change: Callable[[Path], None]) -> Callable[[Path, Shared], None]:
    return lambda project, shared: change(images(project / "my_images"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def data_ready(project: Path, shared: Shared) -> None:
    """What `pruneflow stage data` leaves: the digits, versioned."""
    data = project / "data"
    data.mkdir()
    (data / "digits").symlink_to(shared.data_dir / "digits", target_is_directory=True)
    (data / "digits.dvc").write_text(f"outs:\n- md5: {'0' * 32}.dir\n  path: digits\n")


def baseline_ready(project: Path, shared: Shared) -> None:
    """What `pruneflow stage data` and `stage baseline` leave: versioned digits and a baseline with its ONNX export
    (untrained: the search's reachability check counts MACs, and latency does not depend on the weights)."""
    from pruneflow import stages
    from pruneflow.checkpoint import save_model
    from pruneflow.config import load_config
    from pruneflow.export import export_onnx
    from pruneflow.metrics import count_macs_params

    data_ready(project, shared)
    data = project / "data"
    cfg, _ = load_config(project / "params.yaml")
    spec = stages.model_spec(cfg, stages.load_data(cfg, data / "digits"))
    torch.manual_seed(cfg.project.seed)  # the same params give the same baseline, as the baseline stage does
    model = spec.build()
    macs, params = count_macs_params(model, spec.example_inputs(1))
    out = project / "runs" / "dvc" / "baseline"
    save_model(out / "model.pt", model, spec)
    export_onnx(model, spec.example_inputs(), out / "model.onnx", cfg.export.opset)
    stages.write_json(out / "metrics.json", {"macs": macs, "params": params, "accuracy": 10.0, "val_accuracy": 10.0})


def broken_retrained(project: Path, shared: Shared) -> None:
    """The data ready and a retrained l1 model whose weights hold NaN (what a diverged fine-tune would save)."""
    from pruneflow import stages
    from pruneflow.checkpoint import save_model
    from pruneflow.config import load_config

    data_ready(project, shared)
    cfg, _ = load_config(project / "params.yaml")
    spec = stages.model_spec(cfg, stages.load_data(cfg, project / "data" / "digits"))
    model = spec.build()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    save_model(project / "runs" / "dvc" / "l1" / "retrained.pt", model, spec)


def code_running_checkpoint(project: Path, shared: Shared) -> None:
    """A checkpoint in pruneflow's format whose model names an importable function that would run code."""
    spec = {"name": "os:system", "in_channels": 1, "num_classes": 10, "input_shape": [1, 8, 8], "kwargs": {}}
    torch.save({"spec": spec, "history": [], "state_dict": {}}, project / "model.pt")


def damaged(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)


def full_disk(path: object) -> object:
    return shutil._ntuple_diskusage(2**40, 2**40 - 10 * 2**20, 10 * 2**20)


ALIAS_BOMB = """model:
  kwargs:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
"""
ONE_EPOCH = "train: {epochs: 1}\nmethods: [l1]\n"
NO_GPU = (("torch.cuda.is_available", lambda: False),)  # the same row on a machine with a GPU


IMAGES = ("run", "-S", "data.dataset=imagefolder", "-S", "data.path=my_images")  # a user's own image folder
S = "-S"

ROWS = [
    # params.yaml and -S
    Row("params-missing", "params file missing", ("run", "--params", "nope.yaml"), "params file not found"),
    Row("yaml-syntax", "params.yaml is not valid YAML", ("run",), "invalid YAML at line 2, column 1",
        params="train: {epochs: [\n", given="params.yaml: `train: {epochs: [`"),
    Row("yaml-not-mapping", "params.yaml is a list, not sections", ("run",), "expected a mapping of sections",
        params="- train\n- search\n", given="params.yaml: `- train` / `- search`"),
    Row("unknown-section", "unknown section (typo)", ("run",), "trian: unknown key",
        params="trian: {epochs: 3}\n", given="params.yaml: `trian: {epochs: 3}`"),
    Row("unknown-key", "unknown key (typo)", ("run", S, "train.epoch=3"), "train.epoch: unknown key"),
    Row("wrong-type", "wrong type", ("run", S, "train.epochs=many"), "train.epochs: Input should be a valid integer"),
    Row("section-scalar", "a section given as a value", ("run",), "train: Input should be a valid dictionary",
        params="train: 5\n", given="params.yaml: `train: 5`"),
    Row("ratio-range", "pruning ratio out of range", ("run", S, "prune.ratio=1.5"),
        "prune.ratio: Input should be less than 1"),
    Row("search-bounds", "search bounds low > high", ("run", S, "search.ratio_low=0.8", S, "search.ratio_high=0.2"),
        "ratio_low (0.8) is greater than ratio_high (0.2)"),
    Row("search-space", "unknown search space", ("run", S, "search.space=diagonal"), "search.space: Input should be"),
    Row("unknown-method", "unknown pruning method", ("run", S, "methods=[l1,l0]"), "unknown pruning method 'l0'"),
    Row("method-param", "unknown method parameter", ("run", S, "methods.slimming.sparsty=1e-4"),
        "slimming: sparsty: unknown key"),
    Row("unknown-model", "unknown model", ("run", S, "model.name=resnet9000"), "unknown model 'resnet9000'"),
    Row("unknown-dataset", "unknown dataset", ("run", S, "data.dataset=mnist9"), "unknown dataset 'mnist9'"),
    Row("export-platform", "unknown export platform", ("run", S, "export.platform=tpu"),
        "export.platform: Input should be"),
    Row("override-syntax", "`-S` without `=`", ("run", S, "train.epochs"), "malformed override 'train.epochs'"),
    Row("override-yaml", "`-S` value is not YAML", ("run", S, "methods=[l1"),
        "override methods: value '[l1' is not valid YAML"),
    Row("override-into-value", "`-S` key goes below a value", ("run", S, "train.epochs.max=3"),
        "train.epochs is not a section", params="train: {epochs: 3}\n", given="params.yaml: `train: {epochs: 3}`"),
    # data
    Row("imagefolder-no-path", "imagefolder without data.path", ("run", S, "data.dataset=imagefolder"),
        "needs data.path"),
    Row("data-path-missing", "data.path does not exist", IMAGES, "data.path: folder not found"),
    Row("no-test-split", "no test/ folder", IMAGES, "has no test/ folder", given="my_images/ without test/",
        setup=image_folder(lambda root: shutil.rmtree(root / "test"))),
    Row("no-class-folders", "a split without class folders", IMAGES, "test has no class folders",
        given="my_images/test/ empty",
        setup=image_folder(lambda root: [shutil.rmtree(folder) for folder in (root / "test").iterdir()])),
    Row("empty-class", "empty class folder", IMAGES, "class folder <project>/my_images/train/bird holds no images",
        given="my_images/train/bird/ empty", setup=image_folder(lambda root: (root / "train" / "bird").mkdir())),
    Row("non-image-file", "a file that is not an image", IMAGES, "train/cat/labels.csv is not an image file",
        given="my_images/train/cat/labels.csv",
        setup=image_folder(lambda root: (root / "train" / "cat" / "labels.csv").write_text("0,cat\n"))),
    Row("class-mismatch", "train/ and test/ classes differ", IMAGES, "only in test/: dgo",
        given="my_images/test/dog/ misspelt dgo/",
        setup=image_folder(lambda root: (root / "test" / "dog").rename(root / "test" / "dgo"))),
    Row("corrupt-image", "an image file that is not an image", IMAGES,
        "my_images/train/cat/0.png is not a readable image",
        given="my_images/train/cat/0.png holds text",
        setup=image_folder(lambda root: (root / "train" / "cat" / "0.png").write_text("not a png"))),
    Row("truncated-image", "a truncated image", IMAGES,
        "my_images/train/dog/1.png: unreadable image (image file is truncated)",
        given="my_images/train/dog/1.png cut in half",
        setup=image_folder(lambda root: truncate(root / "train" / "dog" / "1.png"))),
    Row("mixed-sizes", "images of different sizes", IMAGES, "all images must share one size",
        given="my_images/test/cat/big.png is 64x64, the others 32x32",
        setup=image_folder(lambda root: Image.new("L", (64, 64)).save(root / "test" / "cat" / "big.png"))),
    # models
    Row("model-module-missing", "model module not importable", ("run", S, "model.name=my_modles:gru"),
        "cannot import module 'my_modles'"),
    Row("model-attribute-missing", "no such factory in the module", ("run", S, "model.name=my_models:resnet"),
        "module 'my_models' has no attribute 'resnet'", given="my_models.py (below) in the project"),
    Row("model-not-callable", "factory is not callable", ("run", S, "model.name=my_models:WIDTH"),
        "'WIDTH' is not callable"),
    Row("model-kwargs", "model.kwargs the factory rejects", ("run", S, "model.kwargs={widht: 2}"),
        "unexpected keyword argument 'widht' (check model.kwargs)", digits=True),
    Row("model-not-module", "factory returns no nn.Module", ("run", S, "model.name=my_models:layers"),
        "the factory returned a dict, not a torch.nn.Module", digits=True),
    Row("model-output-shape", "model ignores num_classes", ("run", S, "model.name=my_models:imagenet_head"),
        "gives 2x1000, not 2x10 class scores", digits=True),
    Row("model-forward", "model does not fit the data (RGB model, grey digits)",
        ("run", S, "model.name=my_models:rgb_only"),
        "a forward pass on a 2x1x8x8 batch of the data failed", digits=True),
    Row("model-unprunable-layer", "layer Torch-Pruning cannot prune (GRU)", ("run", S, "model.name=my_models:gru"),
        "Torch-Pruning cannot prune it (IndexError", digits=True),
    Row("model-onnx-op", "op ONNX export cannot convert (SVD)", ("run", S, "model.name=my_models:svd"),
        "ONNX export (opset 18) fails", digits=True),
    Row("torchvision-unknown", "unknown torchvision model", ("run", S, "model.name=torchvision:resnet9000"),
        "torchvision has no classification model 'resnet9000'"),
    Row("prune-unprunable-layer", "`pruneflow prune` of that GRU model",
        ("prune", "--model", "my_models:gru", "--method", "l1"), "Torch-Pruning cannot prune it (IndexError", code=1,
        digits=True),
    # tracking
    Row("tracking-unreachable", "MLflow server not running", ("run", S, "project.tracking_uri=http://127.0.0.1:9"),
        "no MLflow tracking server answers at http://127.0.0.1:9 ([Errno 111] Connection refused)", digits=True),
    Row("tracking-env-unreachable", "$MLFLOW_TRACKING_URI unreachable", ("run",),
        "$MLFLOW_TRACKING_URI: no MLflow tracking server answers", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        digits=True),
    Row("tracking-file-store", "a file store URI", ("run", S, "project.tracking_uri=file:./mlruns"),
        "MLflow cannot use file:./mlruns", digits=True),
    Row("export-no-store", "`export --run-id` before any run", ("export", "--run-id", RUN_ID),
        "there is no MLflow store at", code=1),
    Row("export-unknown-run", "`export --run-id` of an unknown run", ("export", "--run-id", RUN_ID),
        f"run {RUN_ID} not found in sqlite:///<project>/mlflow.db", code=1, given="the project's mlflow.db",
        setup=lambda project, shared: shutil.copy(shared.tracking_store, project / "mlflow.db"),
        absent=("runs", "mlartifacts")),
    # prune, stage
    Row("checkpoint-missing", "`prune --checkpoint` file missing",
        ("prune", "--checkpoint", "model.pt", "--method", "l1"),
        "Invalid value for '--checkpoint': file 'model.pt' does not exist"),
    Row("checkpoint-foreign", "`prune --checkpoint` not a pruneflow model",
        ("prune", "--checkpoint", "model.pt", "--method", "l1"), "model.pt: not a model file pruneflow wrote", code=1,
        given="model.pt holds text", setup=lambda project, shared: (project / "model.pt").write_text("weights")),
    Row("prune-ratio", "`prune --ratio` out of range",
        ("prune", "--model", "resnet20", "--method", "l1", "--ratio", "1"),
        "--ratio must be in [0, 1)"),
    Row("stage-method", "`stage` for a method not in params", ("stage", "search", "--method", "l2"),
        "--method must be one of the configured methods"),
    Row("stage-order", "`stage` before the stages it needs", ("stage", "prune", "--method", "l1"),
        "search.json not found: run the stages before prune first", code=1),
    Row("target-unreachable", "search target no ratio reaches",
        ("stage", "search", "--method", "l1", S, "search.ratio_high=0.1", S, "search.target.value=0.9"),
        "search.target unreachable", code=1, given="the data and baseline stages done", setup=baseline_ready,
        absent=("runs/dvc/l1/search.json", "mlflow.db")),
    # params files and values that read as valid YAML but would run something else than the user wrote
    Row("duplicate-key", "a section given twice", ("run",),
        "key 'train' appears twice in one mapping, at lines 1 and 3",
        params="train: {epochs: 3}\nsearch: {n_trials: 2}\ntrain: {lr: 0.1}\n",
        given="params.yaml: `train: {epochs: 3}` / `search: {n_trials: 2}` / `train: {lr: 0.1}`"),
    Row("empty-params", "params.yaml holds no settings", ("run",), "holds no settings (it is empty or only comments)",
        params="# filled in later\n", given="params.yaml: only a comment"),
    Row("binary-params", "params.yaml is a binary file", ("run",), "a binary file, not YAML text",
        given="params.yaml: a PNG",
        setup=lambda project, shared: (project / "params.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
    Row("latin1-params", "params.yaml is not UTF-8", ("run",), "not UTF-8 text (byte 0xe9 at offset 24)",
        given="params.yaml saved as Latin-1: `# café`",
        setup=lambda project, shared: (project / "params.yaml").write_bytes(b"train: {epochs: 3}\n# caf\xe9\n")),
    Row("alias-bomb", "nested YAML aliases (an alias bomb)", ("run",), "its aliases expand to more than 100000 values",
        params=ALIAS_BOMB, given="params.yaml: six levels of ten aliases in `model.kwargs` (10^6 values)"),
    Row("repeated-method", "a method listed twice", ("run", S, "methods=[l1,l1]"), "methods: l1 listed twice"),
    Row("zero-epochs", "no baseline training", ("run", S, "train.epochs=0"),
        "train.epochs: 0 leaves the baseline untrained"),
    Row("registry-name", "a model registry name MLflow refuses", ("run", S, "export.registered_model=team/digits"),
        "export.registered_model: 'team/digits' is not a model registry name"),
    Row("cuda-without-gpu", "`train.device=cuda` on a machine without a GPU", ("run", S, "train.device=cuda"),
        "train.device is 'cuda' but torch sees no CUDA GPU here", patches=NO_GPU),
    Row("data-dir-outside", "project.data_dir outside the project", ("run", S, "project.data_dir=../elsewhere"),
        "project.data_dir: ../elsewhere is outside the project <project>"),
    # data the model cannot learn from
    Row("subset-one", "a training split of no image", ("run", S, "data.subset=1"),
        "the training split holds 0 image(s), less than one batch of 2", digits=True),
    Row("one-class", "an image folder with one class", IMAGES, "the dataset has one class (cat)",
        given="my_images/{train,test}/cat/ only",
        setup=lambda project, shared: images(project / "my_images", classes=("cat",), per_class=4)),
    Row("symlink-loop", "an image that links to itself", IMAGES, "my_images/train/cat/loop.png",
        given="my_images/train/cat/loop.png -> loop.png",
        setup=image_folder(lambda root: (root / "train" / "cat" / "loop.png").symlink_to("loop.png"))),
    # pruning that cannot work, found before training
    Row("method-unprunable", "a method Torch-Pruning cannot apply to the model (FPGM, grouped conv)",
        ("run", S, "model.name=my_models:grouped", S, "methods=[l1,fpgm]"), "; method fpgm)", digits=True),
    Row("method-needs-bn", "slimming on a model without BatchNorm", ("run", S, "model.name=my_models:grouped"),
        "methods.slimming: method slimming ranks channels by their BatchNorm scale", digits=True),
    Row("method-needs-blocks", "cascade on a model without removable blocks", ("run", S, "methods=[l1,cascade]"),
        "method cascade: SmallCNN has no removable blocks", digits=True),
    Row("round-to-too-big", "round_to above every layer's width", ("run", S, "prune.round_to=1000"),
        "prune.round_to=1000 is not below any prunable layer's channel count", digits=True),
    Row("ratio-removes-nothing", "a ratio too small to remove a channel", ("run", S, "prune.ratio=0.02"),
        "l1 at ratio 0.02 removed nothing", digits=True),
    # pruneflow prune
    Row("prune-round-to", "`prune --round-to` above every layer's width",
        ("prune", "--model", "small_cnn", "--method", "l1", "--round-to", "1000"),
        "--round-to=1000 is not below any prunable layer's channel count", code=1, digits=True),
    Row("prune-round-to-word", "`prune --round-to` neither auto nor a number",
        ("prune", "--model", "small_cnn", "--method", "l1", "--round-to", "eight"),
        "--round-to must be auto or a whole number >= 1, got 'eight'"),
    Row("prune-untrained-slimming", "`prune` slimming on a model trained without its sparsity term",
        ("prune", "--model", "resnet20", "--method", "slimming"), "every γ of this model is 1", code=1, digits=True),
    Row("prune-method-precondition", "`prune` cascade on a model without removable blocks",
        ("prune", "--model", "small_cnn", "--method", "cascade"),
        "error: method cascade: SmallCNN has no removable blocks", code=1, digits=True),
    Row("prune-input-size", "`prune` an ImageNet model on 8x8 digits",
        ("prune", "--model", "torchvision:densenet121", "--method", "l1"),
        "model 'torchvision:densenet121' cannot run on a 1x8x8 input", code=1, digits=True),
    Row("checkpoint-runs-code", "`prune --checkpoint` whose model names code to run",
        ("prune", "--checkpoint", "model.pt", "--method", "l1"), "its model 'os:system' is neither registered",
        code=1, given="model.pt names the model `os:system`", setup=code_running_checkpoint),
    # stores
    Row("tracking-damaged", "a damaged mlflow.db", ("run",), "the MLflow tracking store is damaged", digits=True,
        given="mlflow.db overwritten with junk", setup=lambda project, shared: damaged(project / "mlflow.db"),
        absent=("runs", "mlartifacts")),
    Row("tracking-read-only", "a read-only mlflow.db", ("run",), "the MLflow tracking store is read-only", digits=True,
        given="mlflow.db on a read-only mount", absent=("runs", "mlartifacts"),
        setup=lambda project, shared: shutil.copy(shared.tracking_store, project / "mlflow.db"),
        patches=(("pruneflow.stores.writable", lambda path: False),)),
    Row("disk-full", "a full disk", ("run",), "has 10 MB free, less than the 100 MB a run needs", digits=True,
        given="10 MB free on the project's disk", patches=(("pruneflow.stores.shutil.disk_usage", full_disk),)),
    Row("study-damaged", "a damaged runs/optuna.db", ("run",), "the Optuna study store is damaged", digits=True,
        given="runs/optuna.db overwritten with junk", absent=("mlflow.db", "mlartifacts"),
        setup=lambda project, shared: damaged(project / "runs" / "optuna.db")),
    # what only training shows
    Row("diverged", "a learning rate that makes training diverge", ("stage", "baseline", S, "train.lr=.inf"),
        "training diverged", code=1, given="the data stage done", setup=data_ready, params=ONE_EPOCH),
    Row("chance", "a baseline no better than chance", ("stage", "baseline", S, "train.lr=10"),
        "no better than chance", code=1, given="the data stage done", setup=data_ready, params=ONE_EPOCH),
    Row("nan-export", "an export of a model with NaN weights", ("stage", "export", "--method", "l1"),
        "outputs are not finite on real inputs", code=1, given="runs/dvc/l1/retrained.pt holds a NaN weight",
        setup=broken_retrained, params="methods: [l1]\nexport: {opset: 17}\n",  # 17: the quick exporter
        absent=("runs/dvc/l1/export/cpu", "mlflow.db")),
]


@dataclass(frozen=True)
class Fault:
    """A fault the rows cannot stage (a killed process, a broken model inside a stage) and the test that injects it."""

    kind: str
    reproduce: str
    outcome: str
    test: str  # tests/<module>.py::<test function>


FAULTS = [
    Fault("the loss turns NaN in training", "`pruneflow run -S train.lr=.inf`",
          "`training diverged: the loss is nan at epoch 1, batch 2 (lr inf); lower the learning rate (train.lr for the "
          "baseline, retrain.lr for fine-tuning)`; the stage's MLflow run FAILED, nothing cached",
          "tests/test_faults.py::test_training_stops_on_a_non_finite_loss"),
    Fault("weights turn NaN in the last step", "one batch per epoch, `-S train.lr=.inf`",
          "`training diverged: 22 of 26 weight tensors hold NaN or Inf (...)`",
          "tests/test_faults.py::test_training_stops_on_non_finite_weights_after_its_last_step"),
    Fault("a trained classifier at chance", "a net that collapsed onto one class",
          "`... scores 70.0 % on 100 of its own training images, no better than chance (always answering the most "
          "common class scores 70.0 %; needed > 83.7 %)`; the rule: accuracy > p + 3·sqrt(p(1−p)/n), p the majority "
          "share (`pruneflow/gates.py`)",
          "tests/test_faults.py::test_a_model_no_better_than_chance_on_its_training_images_fails"),
    Fault("a training split too small, or of one class", "`data.subset` leaving 1 image, or one class",
          "`the training split holds 1 image(s), less than one batch of 2 ...`",
          "tests/test_faults.py::test_the_data_gate_needs_two_images_and_two_classes"),
    Fault("a prune step that removes nothing", "ratio 0.02 with round_to 8, or round_to 1000",
          "`l1 at ratio 0.02 removed nothing (...): at this ratio every layer keeps its full width ...`",
          "tests/test_faults.py::test_a_pruning_step_that_removes_nothing_fails_and_says_why"),
    Fault("a global threshold that removes less at a higher ratio", "slimming on the demo baseline at 0.56 and 0.62",
          "removed MACs grow with the ratio (slimming, lamp): one ranking, then per-layer counts",
          "tests/test_faults.py::test_global_threshold_methods_remove_more_as_the_ratio_grows"),
    Fault("ratio 0.99 without rounding leaves 64-channel layers whole",
          "`-S prune.ratio=0.99 -S prune.max_layer_ratio=0.9999 -S prune.round_to=null`",
          "every layer keeps at least one channel and the reduction grows with the ratio",
          "tests/test_faults.py::test_uniform_pruning_without_rounding_never_leaves_a_layer_whole_at_high_ratios"),
    Fault("ONNX/TorchScript output NaN on both sides", "a model with a NaN weight, exported",
          "`...: outputs are not finite on real inputs (PyTorch gives 5 NaN/Inf values, the file 5) ...`",
          "tests/test_faults.py::test_parity_fails_when_an_output_is_nan_even_if_both_sides_are"),
    Fault("parity on very large or very small outputs", "logits of 1e4; outputs of 1e-9",
          "passes within `export.atol`·min(1, S) + `export.rtol`·S; a 1e-9-scale model off by 0.1 fails",
          "tests/test_faults.py::test_parity_bound_grows_with_large_outputs_and_shrinks_with_tiny_ones"),
    Fault("int8 worse than fp32", "an export whose int8 loses 1.17 dB",
          "report.md: `test psnr 23.68 dB (-1.17 vs fp32 ONNX)`",
          "tests/test_faults.py::test_the_int8_report_shows_a_loss_as_a_negative_change"),
    Fault("a baseline damaged, deleted or replaced after training",
          "`model.pt` truncated, `model.onnx` deleted, `checksums.json` gone, or a checkpoint that no longer loads",
          "`baseline: not reusing runs/baselines/<key>: <file> is not the file trained there (its sha256 differs from "
          "checksums.json's); training it again`: each file's sha256, recorded at training, is checked and the "
          "checkpoint loaded before a reuse",
          "tests/test_faults.py::test_a_damaged_baseline_is_trained_again_not_reused"),
    Fault("a damaged baseline that cannot be removed", "as above, in a folder the user may not write",
          "`the baseline in <folder> cannot be reused (...) nor removed (Permission denied): delete that folder, then "
          "run again`; the run FAILED",
          "tests/test_faults.py::test_a_damaged_baseline_that_cannot_be_removed_names_the_folder_to_delete"),
    Fault("every method lost more than `export.registry_max_drop`", "l1 at ratio 0.5 without retraining (−79 points)",
          "nothing is registered: `registry: no model is within export.registry_max_drop=1 of the baseline's accuracy "
          "(drops: l1 79.00), so none is registered: prune less, retrain longer or raise export.registry_max_drop`, "
          "also the parent run's tag `pruneflow.champion_reason`",
          "tests/test_faults.py::test_no_model_is_registered_when_every_method_lost_more_than_registry_max_drop"),
    Fault("a project folder named with URL characters", "a project in `x%41y a?b#c/`",
          "mlflow.db and runs/optuna.db inside it, no file beside it (MLflow 3 itself leaves an empty folder named "
          "with the escaped path)",
          "tests/test_faults.py::test_stores_stay_in_a_project_whose_folder_name_holds_url_characters"),
    Fault("a relative sqlite URI in params", "`project.tracking_uri: sqlite:///stores/mlflow.db`, run elsewhere",
          "the store is `<project>/stores/mlflow.db`, as every path in params",
          "tests/test_faults.py::test_relative_sqlite_uris_in_params_are_the_projects"),
    Fault("the disk fills during a write", "`torch.save` fails with ENOSPC",
          "no `.partial` file is left, so the run can still be marked FAILED",
          "tests/test_faults.py::test_a_write_that_fails_leaves_no_partial_file"),
    Fault("the store refuses the FAILED mark", "the disk is full for sqlite too",
          "the block's own error (`No space left on device`) is raised; `pruneflow run` ends its open runs before it "
          "exits, and the next run marks what is left KILLED",
          "tests/test_faults.py::test_a_run_is_never_left_running_by_a_failure_even_when_the_store_refuses_the_mark"),
    Fault("a command killed with SIGKILL", "`kill -9 <pid of pruneflow run/ui/serve>`",
          "its watchdog stops every process it had started (checked by pid) and removes its record",
          "tests/test_faults.py::test_a_killed_command_leaves_no_process_behind[SIGKILL]"),
    Fault("a command stopped with SIGTERM", "`kill <pid of pruneflow run/ui/serve>`",
          "as for SIGKILL; `pruneflow run` also marks its MLflow runs KILLED and exits 143",
          "tests/test_faults.py::test_a_killed_command_leaves_no_process_behind[SIGTERM]"),
    Fault("a command and its watchdog both killed", "`kill -9` of both",
          "the next command on the project stops the processes the watchdog had recorded",
          "tests/test_faults.py::test_the_next_command_stops_what_a_dead_command_and_its_dead_watchdog_left"),
    Fault("`pruneflow ui` on a taken port", "`pruneflow ui --port 5000` with 5000 in use",
          "`error: --port 5000: something already listens on 127.0.0.1:5000 (another pruneflow ui?); stop it or choose "
          "another port` (exit 1)", "tests/test_faults.py::test_ui_exits_non_zero_when_its_port_is_taken"),
    Fault("`pruneflow ui` stopped with SIGTERM or killed with SIGKILL", "`kill [-9] <pid of pruneflow ui>`",
          "no MLflow server process is left and the port is free (ui has no handler of its own: either signal ends "
          "it at once, and its watchdog stops the server, as in the two rows above)",
          "tests/test_faults.py::test_ui_leaves_no_mlflow_server_behind"),
    Fault("`dvc repro` after pipelines added trials to the study", "`make demo` twice, then `make repro`",
          "the search stages choose as in a fresh project: each runs its own study (runs/dvc/<method>/study.db)",
          "tests/test_dvc_repro.py::test_search_stage_chooses_the_same_whatever_ran_before"),
]


# ---- running a row ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def inside(folder: Path, path_entry: Path) -> Iterator[None]:
    """The project as working directory and the user's model module importable, as for a user in a shell."""
    cwd = os.getcwd()
    os.chdir(folder)
    sys.path.insert(0, str(path_entry))
    try:
        yield
    finally:
        sys.path.remove(str(path_entry))
        os.chdir(cwd)


def invoke(row: Row, project: Path, shared: Shared) -> Outcome:
    """Run the row's command in ``project``; the flow is replaced by a failure, so a row that got past the checks
    shows up as a wrong outcome instead of a pipeline run."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(row.params)
    if row.setup:
        row.setup(project, shared)
    args = list(row.args)
    if row.digits and args[0] == "prune":
        args += ["--data-dir", str(shared.data_dir)]
    elif row.digits:  # the prepared digits, linked where the project keeps its data
        (project / "data").mkdir(exist_ok=True)
        (project / "data" / "digits").symlink_to(shared.data_dir / "digits", target_is_directory=True)
    with contextlib.ExitStack() as faults:
        for target, replacement in row.patches:
            faults.enter_context(mock.patch(target, replacement))
        faults.enter_context(inside(project, shared.models_dir))
        faults.enter_context(mock.patch("pruneflow.flows.pipeline.prune_pipeline",
                                        side_effect=AssertionError("the flow started")))
        result = CliRunner().invoke(app, args, env=row.env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Outcome(result.exit_code, f"unhandled {type(result.exception).__name__}: {result.exception}")
    return Outcome(result.exit_code, error_line(result.stderr))


def error_line(stderr: str) -> str:
    """``error: ...`` (the last line; progress lines may precede it), or the message in a usage-error box."""
    lines = [line.strip() for line in stderr.strip().splitlines()]
    boxed = [line.strip("│ ") for line in lines if line.startswith("│")]
    return " ".join(boxed) if boxed else (lines[-1] if lines else "")


def left_behind(project: Path, row: Row) -> list[str]:
    """What a failed command left that could pass for a result: a tracking store, run outputs, prepared data in
    the making. Lock files under runs/locks are not results."""
    if row.absent is not None:
        return [name for name in row.absent if (project / name).exists()]
    found = [name for name in ("mlflow.db", "mlartifacts") if (project / name).exists()]
    found += [str(path.relative_to(project)) for path in (project / "runs").glob("*") if path.name != "locks"]
    return found + [str(path.relative_to(project)) for path in (project / "data").glob("*.partial")]


def normalise(text: str, project: Path) -> str:
    """The message as the doc shows it: the project folder as ``<project>``, lists of known names elided, and a
    trained model's accuracy, which other CPUs' kernels round differently, as ``…``."""
    for folder in {str(project.resolve()), str(project)}:
        text = text.replace(folder, "<project>")
    text = re.sub(r"(baseline scores )[\d.]+ %", r"\1… %", text)
    return re.sub(r"known: [^;)]*", "known: …", text)


def code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}".replace("|", "\\|")


def doc_row(number: int, row: Row, outcome: Outcome, project: Path) -> str:
    env = "".join(f"{key}={value} " for key, value in row.env.items())
    prefix = "PYTHONPATH=. " if "my_models" in " ".join(row.args) else ""
    command = code(f"{prefix}{env}pruneflow {' '.join(row.args)}")
    given = f"; {row.given}" if row.given else ""
    return (f"| {number} | {row.bad_input} | {command}{given} | {code(normalise(outcome.error, project))} "
            f"(exit {outcome.code}) | `test_bad_input[{row.id}]` |")


# ---- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory, digits_dir) -> Shared:
    return Shared(tmp_path_factory.mktemp("reliability"), digits_dir.parent)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, shared: Shared, tmp_path: Path) -> None:
    project = tmp_path / "project"
    outcome = invoke(row, project, shared)
    assert outcome.code == row.code, outcome.error
    message = normalise(outcome.error, project)
    assert row.expect in message
    assert message.startswith("error: ") or message.startswith("Invalid value"), message
    assert not left_behind(project, row), f"bad input left {left_behind(project, row)} behind"
    documented = [line for line in DOC.read_text().splitlines() if f"`test_bad_input[{row.id}]`" in line]
    assert len(documented) == 1 and code(message) in documented[0], \
        "docs/reliability.md differs from the code: regenerate it with .venv/bin/python -m tests.test_reliability"


def test_every_row_is_documented() -> None:
    assert DOC.read_text().count("`test_bad_input[") == len(ROWS) == len({row.id for row in ROWS})


def test_every_fault_names_a_test_and_is_documented() -> None:
    text = DOC.read_text()
    for fault in FAULTS:
        module, _, name = fault.test.partition("::")
        function = name.partition("[")[0]
        assert hasattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), function), fault.test
        assert text.count(f"`{fault.test}`") == 1, f"docs/reliability.md does not list {fault.test}"


HEADER = """# Bad input, faults and the errors they give

{kinds} kinds of bad input and fault, each tested. The first table is bad input: it stops with a non-zero exit code
and one line naming the problem (the key, the file, the setting) and its remedy, leaving nothing behind that
looks like a result. Exit code 2 is bad input found before anything started (params, data, model, tracking
and study stores); 1 is a command that started and failed (`pruneflow prune`, `export`, `stage`). The second
table is faults the pipeline meets while it runs (a model that diverged, a full disk, a killed process) and
what it does about them.

Params keys are checked when params.yaml is read (duplicate keys, alias bombs and non-text files included); the
data, the model and the stores by the checks `pruneflow run` makes before starting the flow
(`pruneflow/preflight.py`, `tasks/tracking.py`): the stores are checked for damage, write access and disk space,
the dataset is prepared and decoded, the model built and run on it, and pruned on a copy with every configured
method as far as the run may go (a model from outside the registry is also exported to ONNX). The flow repeats
the checks for its other callers (deployments). What only training or a stage's result shows is stopped by the
sanity gates of `pruneflow/gates.py` before anything is cached, logged as done or registered: a training split
under one batch of two images or of one class, a non-finite loss or weight after any training, a trained
classifier no better than chance on its own training images (accuracy ≤ p + 3·sqrt(p(1−p)/n), p the share of
its most common class, n ≤ 2048 images scored), a prune step that removed nothing, and an export whose outputs
are NaN or Inf or differ from PyTorch by more than `export.atol`·min(1, S) + `export.rtol`·S (S the largest
|output|).

Each bad-input row is a case of `tests/test_reliability.py`, which runs the command and checks that the message
below is the one the code gives. `<project>` is the project folder; `known: …` stands for the list of valid
names the message gives, `scores … %` for a trained model's accuracy. \
This file is generated from those runs: `.venv/bin/python -m tests.test_reliability`.

| # | bad input | how to reproduce (in the project folder) | exact error the user sees (exit code) | test |
|---|---|---|---|---|
"""

FAULTS_HEADER = """
## Faults

| # | fault | how it happens | what pruneflow does | test |
|---|---|---|---|---|
"""

FOOTER = """
A search target no ratio reaches is found by the search stage, after the baseline is trained (the MACs a ratio
removes depend on the trained weights for some methods). `pruneflow run` then prints `error: pipeline failed:
MethodsFailed: l1: SearchError: search.target unreachable: …` (exit 1); the method's MLflow run and the pipeline
run end FAILED and no model is registered (checked by
`tests/test_pipeline_e2e.py::test_a_failing_stage_marks_its_run_and_the_pipeline_failed`).

`my_models.py`, the user module of the model rows:

```python
{models}```
"""


def main() -> None:
    """Run every row in a scratch folder and write docs/reliability.md from what the commands printed."""
    lines = []
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the rows expect the project's own store, as under pytest
    with tempfile.TemporaryDirectory(prefix="pruneflow-reliability-") as scratch:
        shared = Shared(Path(scratch) / "shared")
        for number, row in enumerate(ROWS, 1):
            project = Path(scratch) / row.id / "project"
            lines.append(doc_row(number, row, invoke(row, project, shared), project))
    faults = [f"| {number} | {fault.kind} | {fault.reproduce} | {fault.outcome} | `{fault.test}` |"
              for number, fault in enumerate(FAULTS, len(ROWS) + 1)]
    DOC.write_text(HEADER.format(kinds=len(ROWS) + len(FAULTS)) + "\n".join(lines) + "\n"
                   + FAULTS_HEADER + "\n".join(faults) + "\n" + FOOTER.format(models=MY_MODELS))
    print(f"wrote {DOC} ({len(ROWS)} rows, {len(FAULTS)} faults)")


if __name__ == "__main__":
    main()
