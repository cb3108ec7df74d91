"""Optuna search of a method's pruning ratios.

A trial samples ratios from a search space (one global ratio, one per resolution, or one per prunable layer
group), prunes the baseline, fine-tunes briefly and scores the task's main metric on validation (accuracy, or
PSNR for super-resolution: ``objectives[0]``, called *the metric* below). The user's target (MACs
or params reduction, or a latency ceiling) is an Optuna constraint, so infeasible trials stay in the
study but are never chosen and trial pruning still works; with a second objective the study is a
Pareto search instead. After the study, a selection policy picks one trial.

The study lives in an RDB storage under a name derived from everything that changes its trials, so a
rerun resumes and extends it; heartbeats mark a crashed run's trials failed and re-queue them.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
import sqlalchemy.exc
from tabulate import tabulate

from pruneflow.bisection import bisect
from pruneflow.concurrency import owner_alive, store_lock
from pruneflow.config import SearchConfig
from pruneflow.plan import PlanOrigin, PrunePlan

COST_METRICS = ("macs_reduction", "params_reduction", "latency_ms", "speedup")
LOWER_IS_BETTER = {"latency_ms"}


class SearchError(RuntimeError):
    pass


@dataclass(frozen=True)
class SearchSpace:
    """Optuna parameter name -> the layer groups it sets (none for the one global ``ratio``), and the plan a
    trial's ratios are written into (it carries the project's rounding and per-layer cap)."""

    params: dict[str, list[str]]
    base: PrunePlan = field(default_factory=PrunePlan)

    @classmethod
    def of(cls, kind: str, resolutions: dict[str, list[str]], layers: list[str], base: PrunePlan) -> SearchSpace:
        """``global``: the single parameter ``ratio``; ``per_resolution``: one per spatial size; ``per_layer``: one per
        group."""
        if kind == "global":
            return cls({"ratio": []}, base)
        if kind == "per_resolution":
            return cls({f"ratio.{size}": members for size, members in resolutions.items()}, base)
        return cls({f"ratio.{layer}": [layer] for layer in layers}, base)

    @property
    def is_global(self) -> bool:
        return list(self.params) == ["ratio"]

    def plan(self, ratios: dict[str, float]) -> PrunePlan:
        """The plan for these parameter values. In a finer space every group has its own ratio, so the global
        ``ratio`` (what groups without one lose) is 0."""
        if self.is_global:
            return replace(self.base, ratio=ratios["ratio"])
        return replace(self.base, ratio=0.0,
                       layer_ratios={layer: ratios[name] for name, layers in self.params.items() for layer in layers})


@dataclass
class TrialMeasure:
    metric: float  # the task's main metric on validation
    costs: dict[str, float]  # macs_reduction, params_reduction and, when predicted, latency_ms and speedup
    epochs_run: int = 0


# measure(plan) -> costs of the pruned (not yet fine-tuned) model; score(plan, report) -> TrialMeasure.
# report(epoch, metric) may raise optuna.TrialPruned.
Measure = Callable[[PrunePlan], dict[str, float]]
Score = Callable[[PrunePlan, Callable[[int, float], None]], TrialMeasure]
TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

_STORAGE_LOCK = threading.Lock()  # concurrent first use of one sqlite file would race on CREATE TABLE


def suggest(trial: optuna.Trial, space: SearchSpace, cfg: SearchConfig, measure: Measure | None = None) -> PrunePlan:
    """The trial's plan: its sampled ratios, fitted to the target when ``fits_target`` (the fitted ratios are
    kept as the trial's ``fitted_ratios`` attribute: they, not the sampled ones, are what the trial pruned)."""
    ratios = {name: trial.suggest_float(name, cfg.ratio_low, cfg.ratio_high) for name in space.params}
    if measure is not None and fits_target(cfg, space):
        ratios = fit_to_target(ratios, space, cfg, measure)
        trial.set_user_attr("fitted_ratios", ratios)
    return space.plan(ratios)


def trial_ratios(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """The ratios a trial pruned at: fitted to the target if it was, else as sampled."""
    return trial.user_attrs.get("fitted_ratios") or trial.params


def fits_target(cfg: SearchConfig, space: SearchSpace) -> bool:
    """Latency targets fit too: a trial's latency is predicted from the table, so a bisection step costs a prune,
    not an export and a timing."""
    return cfg.fit_target and not space.is_global


def fit_to_target(ratios: dict[str, float], space: SearchSpace, cfg: SearchConfig, measure: Measure,
                  steps: int = 10) -> dict[str, float]:
    """Scale all ratios by the smallest factor (bisected) whose pruned model meets the reduction target.

    Why: with free per-resolution ratios almost every sampled point misses the target or overshoots it, so a
    small trial budget compares models of different sizes and the "best" one is mostly the least pruned
    feasible one. Scaled onto the target, the sampled ratios only decide how the cut is *shared* between
    stages, and every trial is scored at the budget the user asked for. Ratios are capped at ``ratio_high``.
    """
    def scaled(factor: float) -> dict[str, float]:
        return {name: min(cfg.ratio_high, ratio * factor) for name, ratio in ratios.items()}

    def meets(factor: float) -> bool:
        return target_gap(cfg, measure(space.plan(scaled(factor)))) <= 0

    top = cfg.ratio_high / max(min(ratios.values()), 1e-6)  # at ``top`` every ratio is ratio_high
    if not meets(top):
        return scaled(top)
    _, smallest = bisect(lambda factor: 1 if meets(factor) else -1, 0.0, top, steps)
    return scaled(smallest)


def target_gap(cfg: SearchConfig, costs: dict[str, float]) -> float:
    """≤ 0 when the target is met (Optuna's constraint convention)."""
    value = costs[cfg.target.metric]
    return value - cfg.target.value if cfg.target.metric in LOWER_IS_BETTER else cfg.target.value - value


def _rdb_storage(storage_url: str, engine_kwargs: dict, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage, with heartbeats; retried while other processes create a new database's tables.

    Workers started at once on an empty server database (PostgreSQL) all run CREATE TABLE, and the losers
    get a unique or duplicate-table violation; once the winner is done the schema is there and a retry opens it.
    """
    def storage() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=90,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )

    for attempt in range(1, attempts):
        try:
            return storage()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(random.uniform(0.2, 1.0) * attempt)  # jittered, so the losers do not collide again
    return storage()  # the last attempt raises what it meets


def open_study(storage_url: str, study_name: str, cfg: SearchConfig, seed: int) -> optuna.Study:
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    with _STORAGE_LOCK, store_lock(storage_url), warnings.catch_warnings():  # threads, then processes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are what we want
        storage = _rdb_storage(storage_url, engine_kwargs)
    up, down = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    directions = [up] + [down if cost in LOWER_IS_BETTER else up for cost in cfg.objectives[1:]]
    return optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                               sampler=make_sampler(cfg, seed), pruner=make_pruner(cfg), load_if_exists=True)


def make_sampler(cfg: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    kind = cfg.sampler if cfg.sampler != "auto" else ("nsga2" if cfg.multi_objective else "tpe")
    if kind == "nsga2":  # Optuna 5 defaults multi-objective studies to TPE: name NSGA-II explicitly
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, cfg.n_trials)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, cfg.n_trials // 2)))


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    kind = cfg.pruner if cfg.pruner != "auto" else ("none" if cfg.multi_objective or cfg.proxy == "adaptive_bn"
                                                    else "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, cfg.finetune_epochs))
    return optuna.pruners.NopPruner()


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials of crashed processes, each retried once.

    Heartbeats catch them ``grace_period`` after their last beat. A trial whose worker (``worker_id``) is a
    process of this host that is gone is failed at once: a pipeline killed and rerun straight away would
    otherwise leave its trial RUNNING. Trials of live workers (a pipeline running beside this one) are kept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a crashed run go FAILED and are retried
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")
            if worker is None or owner_alive(worker):
                continue
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another process finished it first, and retried it
            retry(study, study.get_trials(deepcopy=False)[trial.number])


def check_reachable(cfg: SearchConfig, space: SearchSpace, measure: Measure, probes: int = 5) -> None:
    """Fail before any fine-tuning if no ratio in the bounds meets the target.

    ``ratio_high`` is tried first, then evenly spaced ratios below it: a method that allocates per-layer ratios
    itself (from data, or learnt masks) need not remove more at a higher ratio. (The global-threshold methods,
    slimming and lamp, are monotone since ``PruningMethod.global_kept_channels``.)
    """
    ratios = [cfg.ratio_high] + [cfg.ratio_low + (cfg.ratio_high - cfg.ratio_low) * i / probes for i in range(probes)]
    measured = []
    for ratio in ratios:
        costs = measure(space.plan({name: ratio for name in space.params}))
        if target_gap(cfg, costs) <= 0:
            return
        measured.append(costs)
    best = min(measured, key=lambda costs: target_gap(cfg, costs))
    raise SearchError(
        f"search.target unreachable: the best {cfg.target.metric} over ratios {cfg.ratio_low:g}..{cfg.ratio_high:g} "
        f"is {best[cfg.target.metric]:.3f}, which does not meet {cfg.target.value:g}; raise search.ratio_high or "
        "relax search.target"
    )


def worker_id() -> str:
    """``host:pid`` of this process: tells apart the trials that several workers added to one study."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_trials(study: optuna.Study, cfg: SearchConfig, space: SearchSpace, score: Score, n_trials: int,
               callbacks: Sequence[TrialCallback] = (), measure: Measure | None = None) -> None:
    """Add ``n_trials`` trials to the study; ``measure`` (prune-only costs) lets trials be fitted to the target."""

    def objective(trial: optuna.Trial):
        trial.set_user_attr("worker", worker_id())  # which process (and machine) ran it, in a shared study
        plan = suggest(trial, space, cfg, measure)
        epochs = [0]

        def report(epoch: int, value: float) -> None:
            epochs[0] = epoch
            trial.set_user_attr("epochs_run", epoch)
            if cfg.multi_objective:
                return  # Optuna prunes single-objective studies only
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{cfg.objectives[0]} {value:.2f} at epoch {epoch} is below the median")

        result = score(plan, report)
        for name, value in result.costs.items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_constraint("target", target_gap(cfg, result.costs))
        if cfg.multi_objective:
            return result.metric, result.costs[cfg.objectives[1]]
        return result.metric

    study.optimize(objective, n_trials=n_trials, callbacks=list(callbacks), catch=())


@dataclass
class SearchOutcome:
    """What the search stage decided (``search.json``): the plan, and how the study went when one chose it."""

    plan: PrunePlan
    metric: float | None = None  # the chosen trial's validation metric (objectives[0])
    costs: dict[str, float] = field(default_factory=dict)
    completed_trials: int = 0
    pruned_trials: int = 0
    failed_trials: int = 0
    pareto_trials: list[int] = field(default_factory=list)
    finetune_epochs_saved: float = 0.0  # share of planned fine-tune epochs the trial pruner skipped

    @property
    def searched(self) -> bool:
        return self.plan.origin.kind == "search"

    @property
    def study_name(self) -> str | None:
        return self.plan.origin.study

    @property
    def trial_number(self) -> int | None:
        return self.plan.origin.trial

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchOutcome:
        return cls(**{**data, "plan": PrunePlan.from_dict(data["plan"])})


def metric_of(trial: optuna.trial.FrozenTrial) -> float:
    return trial.values[0]


def cost_score(cfg: SearchConfig, trial: optuna.trial.FrozenTrial) -> float:
    """The target metric oriented so that larger is better."""
    value = trial.user_attrs[cfg.target.metric]
    return -value if cfg.target.metric in LOWER_IS_BETTER else value


def feasible_trials(study: optuna.Study, cfg: SearchConfig) -> list[optuna.trial.FrozenTrial]:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in done if cfg.target.metric in t.user_attrs and target_gap(cfg, t.user_attrs) <= 0]


def pareto_front(trials: list[optuna.trial.FrozenTrial], cfg: SearchConfig) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both the metric and the target metric."""
    points = [(metric_of(t), cost_score(cfg, t), t) for t in trials]
    return [t for a, c, t in points
            if not any(a2 >= a and c2 >= c and (a2 > a or c2 > c) for a2, c2, _ in points)]


def knee(front: list[optuna.trial.FrozenTrial], cfg: SearchConfig) -> optuna.trial.FrozenTrial:
    """The front's point farthest from the line joining its extremes, on min-max normalised axes."""
    if len(front) <= 2:
        return max(front, key=metric_of)
    metric = [metric_of(t) for t in front]
    cost = [cost_score(cfg, t) for t in front]

    def normalise(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [(v - low) / (high - low) if high > low else 0.0 for v in values]

    points = sorted(zip(normalise(cost), normalise(metric), front, strict=True), key=lambda p: p[0])
    (x0, y0, _), (x1, y1, _) = points[0], points[-1]
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    return max(points, key=lambda p: abs((y1 - y0) * p[0] - (x1 - x0) * p[1] + x1 * y0 - y1 * x0) / length)[2]


def select(study: optuna.Study, cfg: SearchConfig, space: SearchSpace, baseline_metric: float) -> SearchOutcome:
    """Apply the selection policy to the study's feasible trials; the chosen trial's plan names it as its origin."""
    feasible = feasible_trials(study, cfg)
    if not feasible:
        reached = [t.user_attrs[cfg.target.metric] for t in study.trials if cfg.target.metric in t.user_attrs]
        best = (min if cfg.target.metric in LOWER_IS_BETTER else max)(reached, default=float("nan"))
        raise SearchError(f"no completed trial met search.target ({cfg.target.metric} {cfg.target.value:g}; best "
                          f"reached {best:.3f}); raise search.ratio_high, add trials or relax search.target")
    front = pareto_front(feasible, cfg)
    if cfg.selection == "best_under_target":
        chosen = max(feasible, key=lambda t: (metric_of(t), cost_score(cfg, t)))
    elif cfg.selection == "max_reduction_within_drop":
        within = [t for t in feasible if baseline_metric - metric_of(t) <= cfg.tolerance]
        if not within:
            raise SearchError(f"no feasible trial is within search.tolerance={cfg.tolerance:g} points of the "
                              f"baseline's {cfg.objectives[0]} {baseline_metric:.2f}; raise the tolerance or fine-tune "
                              "longer")
        chosen = max(within, key=lambda t: (cost_score(cfg, t), metric_of(t)))
    else:
        chosen = knee(front, cfg)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    origin = PlanOrigin("search", study.study_name, chosen.number,
                        f"trial {chosen.number} of study {study.study_name}, {cfg.selection}")
    plan = replace(space.plan({name: trial_ratios(chosen)[name] for name in space.params}), origin=origin)
    return SearchOutcome(
        plan, metric_of(chosen),
        {name: chosen.user_attrs[name] for name in COST_METRICS if name in chosen.user_attrs},
        states.count(optuna.trial.TrialState.COMPLETE), states.count(optuna.trial.TrialState.PRUNED),
        states.count(optuna.trial.TrialState.FAIL), sorted(t.number for t in front), epochs_saved(study, cfg),
    )


def finetune_top(study: optuna.Study, rung: optuna.Study, cfg: SearchConfig, space: SearchSpace,
                 finetuned: Callable[[PrunePlan], float], baseline_metric: float,
                 log: Callable[[str], None] = lambda _: None) -> SearchOutcome:
    """The second rung of a search scored by a cheap proxy (successive halving with two rungs): the ``top_k``
    feasible trials of ``study`` by their proxy score are fine-tuned (``finetuned(plan)``: the validation metric
    after ``finetune_epochs``), and the selection policy picks among them by that metric.

    Why: adaptive BN ranks candidates well enough to discard most of them cheaply, not to order the best few,
    which differ by less than its noise; a short fine-tune of a handful does. ``rung`` (a study of its own) keeps
    every fine-tuned trial with the number it has in ``study`` (``proxy_trial``), so a rerun fine-tunes only the
    newcomers to the top k. The outcome's plan names the trial of ``study`` it chose.
    """
    ranked = sorted(feasible_trials(study, cfg), key=metric_of, reverse=True)[:cfg.top_k]
    done = {t.user_attrs["proxy_trial"] for t in rung.get_trials(deepcopy=False)}
    for trial in ranked:
        if trial.number in done:
            continue
        metric = finetuned(space.plan({name: trial_ratios(trial)[name] for name in space.params}))
        log(f"trial {trial.number}: {cfg.objectives[0]} {metric_of(trial):.2f} by {cfg.proxy}, {metric:.2f} after "
            f"{cfg.finetune_epochs} fine-tune epoch(s)")
        rung.add_trial(optuna.trial.create_trial(
            params=trial.params, distributions=trial.distributions, values=[metric, *trial.values[1:]],
            user_attrs={**trial.user_attrs, "proxy_trial": trial.number, "proxy_metric": metric_of(trial)}))
    chosen = select(rung, cfg, space, baseline_metric)
    in_study = {t.number: t.user_attrs["proxy_trial"] for t in rung.get_trials(deepcopy=False)}
    assert chosen.trial_number is not None  # select() names the trial it chose
    number = in_study[chosen.trial_number]
    origin = PlanOrigin("search", study.study_name, number,
                        f"trial {number} of study {study.study_name}, {cfg.selection} of the top {cfg.top_k} by "
                        f"{cfg.proxy} after {cfg.finetune_epochs} fine-tune epoch(s)")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return replace(chosen, plan=replace(chosen.plan, origin=origin),
                   completed_trials=states.count(optuna.trial.TrialState.COMPLETE),
                   pruned_trials=states.count(optuna.trial.TrialState.PRUNED),
                   failed_trials=states.count(optuna.trial.TrialState.FAIL),
                   pareto_trials=sorted(in_study[n] for n in chosen.pareto_trials))


def epochs_saved(study: optuna.Study, cfg: SearchConfig) -> float:
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED))
    planned = cfg.finetune_epochs * len(finished)
    pruned = [t for t in finished if t.state == optuna.trial.TrialState.PRUNED]
    skipped = sum(cfg.finetune_epochs - t.user_attrs.get("epochs_run", cfg.finetune_epochs) for t in pruned)
    return skipped / planned if planned else 0.0


def top_trials_markdown(study: optuna.Study, cfg: SearchConfig, chosen: int | None, limit: int = 10) -> str:
    """The best completed trials as a markdown table (the chosen one marked)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done.sort(key=lambda t: (target_gap(cfg, t.user_attrs) <= 0, metric_of(t)), reverse=True)
    costs = [c for c in COST_METRICS if any(c in t.user_attrs for t in done)]
    rows = [[f"{t.number}{' (chosen)' if t.number == chosen else ''}", f"{metric_of(t):.2f}",
             *(f"{t.user_attrs[c]:.3f}" if c in t.user_attrs else "" for c in costs),
             str(target_gap(cfg, t.user_attrs) <= 0),
             ", ".join(f"{k.removeprefix('ratio.')}={v:.2f}" for k, v in trial_ratios(t).items())]
            for t in done[:limit]]
    headers = ["trial", cfg.objectives[0], *costs, "meets target", "ratios"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True) + "\n"


def plot_search(study: optuna.Study, cfg: SearchConfig, chosen: int | None, path: Path) -> Path:
    """One PNG: Optuna's optimisation history (trials that miss the target in grey) beside the metric vs the
    target metric, with the Pareto front of the trials that meet it; the chosen trial starred in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    label = f"validation {cfg.objectives[0]}"
    with matplotlib.rc_context(), warnings.catch_warnings():  # Optuna's plot sets a style: keep it to this figure
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = plot_optimization_history(study, target=metric_of if cfg.multi_objective else None,
                                            target_name=label)
        figure = history.get_figure(root=True)
        assert figure is not None  # optuna draws the history on a figure of its own
        figure.set_size_inches(11, 4)
        grid = figure.add_gridspec(1, 2)
        history.set_subplotspec(grid[0])
        tradeoff = figure.add_subplot(grid[1])
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        feasible = feasible_trials(study, cfg)
        for group, style, name in ((done, "o", "completed"), (feasible, "s", "meets target")):
            tradeoff.plot([t.user_attrs[cfg.target.metric] for t in group], [metric_of(t) for t in group], style,
                          mfc="none", label=name)
        front = sorted(pareto_front(feasible, cfg), key=lambda t: t.user_attrs[cfg.target.metric]) if feasible else []
        tradeoff.plot([t.user_attrs[cfg.target.metric] for t in front], [metric_of(t) for t in front], "-",
                      label="Pareto front")
        for t in done:
            if t.number == chosen:
                history.plot([t.number], [metric_of(t)], "r*", ms=14, label="chosen")
                tradeoff.plot([t.user_attrs[cfg.target.metric]], [metric_of(t)], "r*", ms=14, label="chosen")
        tradeoff.axvline(cfg.target.value, color="grey", ls="--", label="target")
        tradeoff.set(xlabel=cfg.target.metric, ylabel=label, title=f"{cfg.objectives[0]} vs target metric")
        history.legend(fontsize=8)
        tradeoff.legend(fontsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
