"""The names params gives checked against the registries: the dataset, the model and the pruning methods exist,
take the settings given, and fit the task and each other.

The schema (``pruneflow.config``) checks the shape and values of params; this module knows what is registered,
so the schema imports no registry and the registries' modules can import the schema. ``config.validate`` (and so
``load_config``) runs both. Problems read ``key: problem``, like the schema's.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from pruneflow.config import PipelineConfig, describe
from pruneflow.data import DATASETS
from pruneflow.methods import METHODS, method_name
from pruneflow.models import accepts, resolve_model
from pruneflow.task import TASKS


def check_registered(cfg: PipelineConfig) -> None:
    """Raise ValueError naming each key at fault: first every unknown or misconfigured name, then, once all are
    known, whether they fit the task and the search space."""
    problems = [problem for key, check in (("data", _dataset), ("model", _model), ("methods", _methods),
                                           ("search", _objectives))
                if (problem := _problem(key, check, cfg))]
    if problems:
        raise ValueError("; ".join(problems))
    _parts_fit_task(cfg)
    _space_fits_methods(cfg)
    _target_fits_methods(cfg)


def _problem(key: str, check: Callable[[PipelineConfig], None], cfg: PipelineConfig) -> str | None:
    try:
        check(cfg)
    except ValueError as err:
        return f"{key}: {err}"
    return None


def _dataset(cfg: PipelineConfig) -> None:
    DATASETS.get(cfg.data.dataset).check_config(cfg.data)


def _model(cfg: PipelineConfig) -> None:
    resolve_model(cfg.model.name)


def _methods(cfg: PipelineConfig) -> None:
    for name, params in cfg.methods.items():
        try:
            method = METHODS.get(method_name(name))  # raises with the list of known names
        except ValueError as err:
            raise ValueError(f"{name}: {err}" if "-" in name else str(err)) from None
        try:
            method.Params.model_validate(params)
        except ValidationError as err:
            raise ValueError(f"{name}: {describe(err)}") from None


def _objectives(cfg: PipelineConfig) -> None:
    quality = {task.metric for task in TASKS.values()}  # each task's main metric: the first objective
    objectives = cfg.search.objectives
    if objectives[0] not in quality or len(objectives) > 2 or any(name in quality for name in objectives[1:]):
        raise ValueError(f"objectives must be [<metric>] or [<metric>, <cost>] with metric accuracy or psnr, "
                         f"got {objectives}")


def _parts_fit_task(cfg: PipelineConfig) -> None:
    """Dataset, model, search objective and methods must all be of this task, or the run fails hours in."""
    task = TASKS[cfg.task]
    dataset = DATASETS.get(cfg.data.dataset)
    if dataset.task != cfg.task:
        raise ValueError(f"data.dataset: {cfg.data.dataset} is a {dataset.task} dataset, not {cfg.task} (task)")
    if cfg.search.objectives[0] != task.metric:
        raise ValueError(f"search.objectives: task {cfg.task} optimises {task.metric}, got {cfg.search.objectives}")
    wrong = [name for name in cfg.methods if cfg.task not in METHODS.get(method_name(name)).tasks]
    if wrong:
        raise ValueError(f"methods: {', '.join(wrong)} cannot prune {cfg.task} models")
    if not accepts(cfg.model.name, task.model_argument):
        raise ValueError(f"model.name: {cfg.model.name} takes no {task.model_argument}, "
                         f"so it is not a {cfg.task} model")


def _space_fits_methods(cfg: PipelineConfig) -> None:
    if cfg.search.space != "global" and cfg.prune.ratio is None:
        fixed = [name for name in cfg.methods if not METHODS.get(method_name(name)).accepts_layer_ratios]
        if fixed:
            raise ValueError(f"search.space {cfg.search.space}: {', '.join(fixed)} choose per-layer ratios "
                             "themselves; search them with space: global")


def _target_fits_methods(cfg: PipelineConfig) -> None:
    """A method that allocates under a latency budget (``halp``) reads it from the target or ``prune.ratio``
    (``stages.latency_plan``); a params target says nothing about latency."""
    if cfg.prune.ratio is None and cfg.search.target.metric == "params_reduction":
        allocating = [name for name in cfg.methods if METHODS.get(method_name(name)).allocates_latency]
        if allocating:
            raise ValueError(f"search.target.metric: {', '.join(allocating)} allocate(s) under a latency budget, which "
                             "a params_reduction target does not give; use speedup, latency_ms or macs_reduction "
                             "(read as the speed-up its MACs promise), or set prune.ratio")
