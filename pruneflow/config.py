"""The one config schema: params.yaml, the CLI's ``-S`` overrides, the DVC stages and the flow all read it.

Every section forbids unknown keys, so a typo fails loudly instead of silently using a default.
Paths in the file are relative to the directory that holds it (the *project directory*).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruneflow import strict_yaml
from pruneflow.profiles import PROFILES


class ConfigError(ValueError):
    """A config problem, worded for the user: it names the key or file at fault."""


# (key path, value) a config of the task gets where it does not say otherwise (the schema's defaults are the
# classification ones); slimming, a default method, needs BatchNorm, which ESPCN has none of
TASK_DEFAULTS: dict[str, tuple[tuple[tuple[str, ...], Any], ...]] = {
    "super_resolution": ((("data", "dataset"), "skimage"), (("model", "name"), "espcn"),
                         (("search", "objectives"), ["psnr"]),
                         (("methods",), {"l1": {}, "layer_entropy": {}, "random": {}})),
}
# a methods entry: a registered method name (lowercase, digits, _), optionally -<label>; "@" would break DVC's
# foreach stage names (search@<entry>), "." and "=" the -S overrides (methods.<entry>.<param>=value)
METHOD_ENTRY = re.compile(r"[a-z0-9_]+(-[A-Za-z0-9_-]+)?")

Objective = Literal["accuracy", "psnr", "macs_reduction", "params_reduction", "latency_ms"]
# the classification defaults of a list and a dict field (each config gets its own copy)
DEFAULT_OBJECTIVES: list[Objective] = ["accuracy"]
DEFAULT_METHODS: dict[str, dict[str, Any]] = {"l1": {}, "slimming": {}, "random": {}}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectConfig(Section):
    experiment: str = "pruneflow"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the project dir"
    )
    artifacts_dir: str = "mlartifacts"
    runs_dir: str = "runs"
    data_dir: str = "data"
    seed: int = 0
    cluster: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786) whose workers run the method chains; null: a local "
                          "cluster of worker processes on this machine")
    max_parallel_methods: int | None = Field(
        None, ge=1, description="local cluster: method chains at once, one worker process each (1: one after "
                                "another in the pipeline's process); null: one per GPU, or 1 without GPUs (docs/"
                                "benchmarks/scaling.md)")

    @field_validator("cluster")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls)://[^\s/:]+:\d+", value):
            raise ValueError(f"a Dask scheduler address is tcp://host:port (e.g. tcp://10.0.0.5:8786), got {value!r}")
        return value


class DataConfig(Section):
    dataset: str = "digits"
    path: str | None = Field(None, description="dataset root (imagefolder: a folder with train/ and test/)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of train held out for the search objective")
    subset: int | None = Field(None, gt=0, description="use only the first N training images (quick runs)")
    batch_size: int = Field(64, ge=1)
    augment: Literal["none", "crop_flip"] = Field(
        "none", description="crop_flip: random crop + horizontal flip (super-resolution: random data.patch patches)")
    # super-resolution only (task: super_resolution)
    scale: int = Field(3, ge=2, description="SR upscale factor r: inputs are the crops downscaled r times")
    crop: int | None = Field(None, ge=2, description="SR centre crop side; null: 256 - 256 mod scale")
    patch: int | None = Field(None, ge=2, description="SR crop_flip patch side (multiple of scale); null: crop / 2")
    train_dir: str = Field("train", description="image_dir: the folder under data.path holding training images")
    test_dir: str = Field("test", description="image_dir: the folder under data.path holding test images")


class ModelConfig(Section):
    name: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class BaselineConfig(Section):
    """A trained model to start from instead of training one from scratch."""

    checkpoint: str | None = Field(
        None, description="a model file pruneflow wrote, or a state_dict for model.name (relative to the params file)")
    mean: list[float] | None = Field(None, description="per-channel input mean it was trained with, which every stage "
                                                       "then feeds it; null: the data's own statistics")
    std: list[float] | None = Field(None, description="per-channel input std it was trained with (with mean)")

    @model_validator(mode="after")
    def _normalisation(self) -> BaselineConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std: give both or neither")
        if self.mean is not None and self.std is not None:  # both or neither, checked above
            if self.checkpoint is None:
                raise ValueError("mean and std describe a checkpoint's training; without baseline.checkpoint the "
                                 "baseline is trained on the data's own statistics")
            if len(self.mean) != len(self.std) or min(self.std) <= 0:
                raise ValueError(f"mean and std need one value per input channel and std > 0, "
                                 f"got {self.mean}, {self.std}")
        return self


class TrainConfig(Section):
    epochs: int = Field(12, ge=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (Nesterov momentum) or adam (ignores momentum)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate over the epochs")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where training runs (auto: a CUDA GPU if there is one); pruning and export stay on CPU")


class DistillConfig(Section):
    """Knowledge distillation while retraining a pruned net: it learns from the baseline's outputs as well."""

    weight: float = Field(0.0, ge=0, le=1, description="share of the loss taken from the baseline's outputs "
                                                        "(0: off; the rest is the task's loss on the labels)")
    temperature: float = Field(4.0, gt=0, description="classification: softmax temperature of Hinton's KD term")


class RetrainConfig(TrainConfig):
    distill: DistillConfig = Field(default_factory=DistillConfig)


class TargetConfig(Section):
    """What a chosen configuration must reach: a share of MACs or params removed, a latency ceiling, or a speed-up
    floor. Latency and speed-up are predicted from the measured latency table (``pruneflow.latency.target``)."""

    metric: Literal["macs_reduction", "params_reduction", "latency_ms", "speedup"] = "macs_reduction"
    value: float = Field(0.5, gt=0, description="reductions: fraction to remove (≥); latency_ms: ceiling in ms at "
                                                "evaluate.latency_batch (≤); speedup: baseline ÷ pruned latency (≥)")

    @model_validator(mode="after")
    def _value_in_range(self) -> TargetConfig:
        if self.metric in ("macs_reduction", "params_reduction") and self.value >= 1:
            raise ValueError(f"value: a {self.metric} target is a fraction below 1, got {self.value}")
        if self.metric == "speedup" and self.value <= 1:
            raise ValueError(f"value: a speedup target is a factor above 1 (2.0: twice as fast), got {self.value}")
        return self


class SearchConfig(Section):
    space: Literal["global", "per_resolution", "per_layer"] = Field(
        "global", description="one ratio; one per resolution (the layers working at one spatial size); one per "
                              "prunable layer group")
    n_trials: int = Field(6, ge=1, description="trials each run adds to the study (a rerun resumes and extends it)")
    n_workers: int = Field(1, ge=1, description="trials run at once, each in its own process")
    ratio_low: float = Field(0.1, ge=0, lt=1)
    ratio_high: float = Field(0.8, ge=0, lt=1)
    finetune_epochs: int = Field(1, ge=0, description="fine-tune epochs per trial before it is scored (finetune "
                                                      "proxy), or per top-k trial (adaptive_bn)")
    proxy: Literal["finetune", "adaptive_bn"] = Field(
        "finetune", description="how a trial is scored: finetune_epochs of fine-tuning; or adaptive_bn: BatchNorm "
                                "statistics re-estimated on calib_batches training batches, no gradient step, so "
                                "many more trials fit a budget; then the top_k are fine-tuned and one is chosen")
    calib_batches: int = Field(
        10, ge=1, description="adaptive_bn: training batches the BN statistics are re-estimated on")
    top_k: int = Field(5, ge=1, description="adaptive_bn: feasible trials with the best proxy score that are then "
                                            "fine-tuned for finetune_epochs before the selection policy picks one")
    target: TargetConfig = Field(default_factory=TargetConfig)
    objectives: list[Objective] = Field(
        default_factory=DEFAULT_OBJECTIVES.copy,
        description="[<the task's metric>] (accuracy; psnr for super-resolution), or it plus one cost (Pareto search)")
    sampler: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto: tpe, or nsga2 if multi-objective")
    pruner: Literal["auto", "none", "median", "hyperband"] = Field(
        "auto", description="auto: median, none if multi-objective")
    selection: Literal["best_under_target", "max_reduction_within_drop", "pareto_knee"] = "best_under_target"
    tolerance: float = Field(1.0, ge=0, description="main-metric points (accuracy %, PSNR dB) "
                                                     "max_reduction_within_drop may lose vs the baseline")
    storage: str | None = Field(
        None, description="SQLAlchemy URL; default $PRUNEFLOW_SEARCH_STORAGE, else runs/optuna.db")
    measure_latency: bool = Field(False, description="record every trial's latency_ms and speedup, predicted from the "
                                                     "latency table (always done for latency targets)")
    fit_target: bool = Field(
        True, description="per_resolution/per_layer: scale each trial's ratios by one factor (bisected; on predicted "
                          "latency for latency targets) "
                          "until the target is just met, so trials compare ways to share one budget")

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if self.ratio_low > self.ratio_high:
            raise ValueError(f"ratio_low ({self.ratio_low}) is greater than ratio_high ({self.ratio_high})")
        if len(self.objectives) == 2 and self.pruner not in ("auto", "none"):
            raise ValueError(f"pruner {self.pruner}: Optuna prunes single-objective studies only; use pruner: none")
        if self.proxy == "adaptive_bn" and self.pruner not in ("auto", "none"):
            raise ValueError(f"pruner {self.pruner}: adaptive_bn trials train no epochs, so there is nothing to prune "
                             "early; use pruner: none")
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class PruneConfig(Section):
    ratio: float | None = Field(None, ge=0, lt=1, description="fixed pruning ratio; set it to skip the search")
    round_to: int | Literal["auto"] | None = Field(
        "auto", description="auto: each layer's count raised to a multiple of the target runtime's channel block "
                            "(16 with AVX-512, 8 with AVX2) at a step edge of its own latency curve, measured on "
                            "this machine (pruneflow.latency.rounding); an integer: kept channels a multiple of it in "
                            "every layer; null: none")

    @field_validator("round_to")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"round_to must be at least 1 or auto, got {value}")
        return value
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="never remove more than this share of one layer")
    calib_batches: int = Field(10, ge=1, description="training batches data-driven methods score channels on")


class EvaluateConfig(Section):
    latency_warmup: int = Field(10, ge=0)
    latency_repeats: int = Field(50, ge=1)
    latency_batch: int = Field(1, ge=1, description="batch of latency_ms and speedup (interactive use)")
    latency_batch_large: int = Field(32, ge=2, description="batch of latency_ms_b<N> and speedup_b<N> (throughput)")
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads for latency")

    @model_validator(mode="after")
    def _batches_differ(self) -> EvaluateConfig:
        if self.latency_batch_large <= self.latency_batch:
            raise ValueError(f"latency_batch_large ({self.latency_batch_large}) must exceed latency_batch "
                             f"({self.latency_batch})")
        return self


class ExportConfig(Section):
    platform: Literal["cpu", "jetson", "generic-gpu"] = Field(
        "cpu", description="deployment profile (pruneflow.profiles): which formats are written, the opset, where "
                           "latency is measured")
    opset: int = Field(18, ge=13, description="ONNX opset; null: the platform profile's (jetson 17, else 18)")
    atol: float = Field(1e-4, ge=0, description="parity of fp32 ONNX and TorchScript on real inputs: max |file - "
                                                "torch| <= atol·min(1, S) + rtol·S, S the largest |torch output|")
    rtol: float = Field(1e-5, ge=0, description="the relative part of that bound (large outputs err in proportion)")
    fp16_rtol: float = Field(1e-2, ge=0, description="max |fp16 onnx - torch| as a share of the largest |output|")
    parity_batches: int = Field(2, ge=1)
    int8_mode: Literal["static", "dynamic"] = Field("static", description="static: calibrated on training batches")
    calib_batches: int = Field(8, ge=1, description="training batches static int8 calibrates on")
    registered_model: str | None = Field(None, description="MLflow registry name; null: pruneflow-<model name>")
    registry_max_drop: float = Field(1.0, ge=0, description="main-metric drop (accuracy points, PSNR dB) the "
                                                            "registered model may have")

    @field_validator("registered_model")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        """What MLflow's registry refuses (empty, ``/``, ``:``), and ``@``, which ends the name in the
        ``models:/<name>@champion`` URI: caught here instead of after every model has trained."""
        if value is not None and (not value.strip() or any(char in value for char in "/:@") or value in (".", "..")):
            raise ValueError(f"{value!r} is not a model registry name: give a non-empty name without '/', ':' or '@'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _platform_opset(cls, data: Any) -> Any:
        """No opset given: the platform profile's (an unknown platform fails on its own key)."""
        if isinstance(data, dict) and data.get("opset") is None:
            platform = data.get("platform", "cpu")
            known = isinstance(platform, str) and platform in PROFILES
            return {**data, "opset": PROFILES[platform if known else "cpu"].opset}
        return data


class PipelineConfig(Section):
    task: Literal["classification", "super_resolution"] = Field(
        "classification", description="what the model does: its loss, metrics and search objective (pruneflow.task)")
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_METHODS),
        description="pruning methods to run, each with its own params",
    )
    search: SearchConfig = Field(default_factory=SearchConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    retrain: RetrainConfig = Field(default_factory=lambda: RetrainConfig(epochs=4, lr=0.01))
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """``task: super_resolution`` alone makes a working config: the dataset, model, search objective and
        methods not given default to the task's (built-in skimage images, ESPCN, PSNR, methods that work without
        BatchNorm) instead of the digits ones."""
        task = data.get("task") if isinstance(data, dict) else None
        if not isinstance(task, str) or task not in TASK_DEFAULTS:
            return data
        defaults = TASK_DEFAULTS[task]
        data = copy.deepcopy(data)
        for (*sections, key), value in defaults:
            node = data
            for section in sections:
                if node.get(section) is None:
                    node[section] = {}
                node = node[section]
            if isinstance(node, dict):  # a section given as a model instance is taken as it is
                node.setdefault(key, copy.deepcopy(value))
        return data

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_defaults(cls, data: Any) -> Any:
        """With ``baseline.checkpoint`` the baseline is trained already: ``train.epochs`` defaults to 0 (evaluate it
        as it is); more epochs fine-tune it on the data."""
        baseline = data.get("baseline") if isinstance(data, dict) else None
        if not isinstance(baseline, dict) or not baseline.get("checkpoint"):
            return data
        train = data.get("train")
        if train is None or (isinstance(train, dict) and "epochs" not in train):
            data = {**data, "train": {**(train or {}), "epochs": 0}}
        return data

    @model_validator(mode="after")
    def _baseline_is_trained(self) -> PipelineConfig:
        if self.train.epochs == 0 and self.baseline.checkpoint is None and not self.model.kwargs.get("weights"):
            raise ValueError("train.epochs: 0 leaves the baseline untrained; give baseline.checkpoint (a trained "
                             "model) or pretrained model.kwargs.weights, or train for some epochs")
        return self

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_as_dict(cls, value: Any) -> Any:
        """Accept a plain list of names (``[l1, random]``) as shorthand for names with default params.

        An entry ``<method>-<label>`` runs ``<method>`` under its own name, so one method can run twice with
        different params (``cascade-one: {drop: 1}``, ``cascade-both: {drop: 2}``).
        """
        if isinstance(value, list):
            repeated = sorted({name for name in value if isinstance(name, str) and value.count(name) > 1})
            if repeated:
                raise ValueError(f"{', '.join(repeated)} listed twice; to run a method twice with other params, "
                                 "give each entry a label: <method>-<label> (l1-a, l1-b)")
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {name: (params or {}) for name, params in value.items()}
        return value

    @field_validator("methods")
    @classmethod
    def _method_entries(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("at least one pruning method is required")
        for name in value:
            if not METHOD_ENTRY.fullmatch(name):
                raise ValueError(f"{name}: an entry is <method> or <method>-<label> (label: letters, digits, _ or -)")
        return value

    def fingerprint(self, *sections: str) -> str:
        """A short stable hash of some sections, for cache keys and study names."""
        payload = {name: _dump(getattr(self, name)) for name in sections} if sections else self.model_dump()
        return hashlib.md5(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (like ``dvc exp run -S``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"malformed override {text!r}: expected key.path=value")
    try:
        value = strict_yaml.load(raw) if raw.strip() else None
    except strict_yaml.YamlProblem as err:
        raise ConfigError(f"override {key}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err.__class__.__name__})") from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def read_params(path: Path) -> dict[str, Any]:
    """The params file's sections. A file that holds no settings at all is refused rather than run on the code
    defaults (which differ from the shipped params.yaml): ``{}`` says "the defaults" on purpose."""
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ConfigError(f"{path}: a binary file, not YAML text (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "params files are UTF-8 YAML") from None
    try:
        tree = strict_yaml.load(text)
    except strict_yaml.YamlProblem as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML{_yaml_problem(err)}") from None
    if tree is None:
        raise ConfigError(f"{path} holds no settings (it is empty or only comments): write the sections to change, "
                          "or {} to run on every default")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`` at line L, column C: <problem>``: the parser's own message spans five lines with a caret drawing."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: {problem}"


def validate(tree: dict[str, Any], source: str = "params") -> PipelineConfig:
    """The schema's checks, then those of the names it holds against the registries (``pruneflow.registered``)."""
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe(err)}") from None
    from pruneflow.registered import check_registered  # the registries import torch: the schema alone stays light

    try:
        check_registered(cfg)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def describe(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key: the form users can paste into ``-S``."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}: {message}" if key else message)  # whole-config checks name their keys themselves
    return "; ".join(lines)


def load_config(params_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[PipelineConfig, Path]:
    """Read, override and validate params; return the config and the project directory."""
    path = Path(params_path).resolve()
    tree = read_params(path)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    for section, key in (("data", "path"), ("baseline", "checkpoint")):  # paths in the file: relative to it
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str((path.parent / Path(node[key]).expanduser()).resolve())
    return validate(tree, source=path.name), path.parent
