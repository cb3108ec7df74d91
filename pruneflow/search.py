"""Optuna search of a method's pruning ratio: maximise accuracy after a short fine-tune, subject to a
MACs-reduction target expressed as an Optuna constraint (feasible when ≤ 0).

The study lives in an RDB storage under a name derived from everything that changes its trials, so
running the pipeline again resumes it: only the missing trials run.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import optuna

from pruneflow.config import SearchConfig

# score(ratio, report) -> (accuracy, macs_reduction); report(epoch, accuracy) may raise optuna.TrialPruned.
TrialScorer = Callable[[float, Callable[[int, float], None]], tuple[float, float]]
TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class SearchError(RuntimeError):
    pass


_STORAGE_LOCK = threading.Lock()  # concurrent first use of one sqlite file would race on CREATE TABLE


@dataclass
class SearchOutcome:
    study_name: str
    trial_number: int
    ratio: float
    accuracy: float
    macs_reduction: float
    completed_trials: int
    pruned_trials: int
    new_trials: int

    def as_dict(self) -> dict:
        return asdict(self)


def open_study(storage_url: str, study_name: str, cfg: SearchConfig, seed: int) -> optuna.Study:
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    with _STORAGE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are what we want
        storage = optuna.storages.RDBStorage(
            storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=90,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if cfg.pruner == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner, load_if_exists=True)


def finished(study: optuna.Study) -> tuple[int, int]:
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    return states.count(optuna.trial.TrialState.COMPLETE), states.count(optuna.trial.TrialState.PRUNED)


def search_ratio(study: optuna.Study, cfg: SearchConfig, score: TrialScorer,
                 callbacks: list[TrialCallback] = ()) -> SearchOutcome:
    """Top the study up to ``cfg.n_trials`` finished trials, then return its best feasible trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a crashed run go FAILED and are retried
    done_before = sum(finished(study))

    def objective(trial: optuna.Trial) -> float:
        ratio = trial.suggest_float("ratio", cfg.ratio_low, cfg.ratio_high)

        def report(epoch: int, accuracy: float) -> None:
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"accuracy {accuracy:.2f} at epoch {epoch} is below the median")

        accuracy, macs_reduction = score(ratio, report)
        trial.set_user_attr("macs_reduction", macs_reduction)
        trial.set_constraint("macs_reduction", cfg.target_macs_reduction - macs_reduction)
        return accuracy

    missing = max(0, cfg.n_trials - done_before)
    if missing:
        study.optimize(objective, n_trials=missing, callbacks=list(callbacks), catch=())
    completed, pruned = finished(study)
    feasible = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("macs_reduction", -1.0) >= cfg.target_macs_reduction]
    if not feasible:
        reached = max((t.user_attrs.get("macs_reduction", 0.0) for t in study.trials), default=0.0)
        raise SearchError(
            f"no trial reached search.target_macs_reduction={cfg.target_macs_reduction:g} "
            f"(best reached {reached:.3f} with ratio_high={cfg.ratio_high:g}); raise search.ratio_high or lower the target"
        )
    best = max(feasible, key=lambda t: (t.value, t.user_attrs["macs_reduction"]))
    return SearchOutcome(study.study_name, best.number, best.params["ratio"], best.value,
                         best.user_attrs["macs_reduction"], completed, pruned, completed + pruned - done_before)
