"""The pruning plan: what one prune removes, and what decided it.

One object from the choice to the surgery: the search (or ``prune.ratio``, or a method's params) makes it,
``search.json`` holds it, the prune stage hands it to ``PruningMethod.prune`` unchanged, and MLflow logs it as
the run's ``plan.*`` params. So what a run says it pruned is what it pruned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pruneflow.config import PruneConfig


@dataclass
class PlanOrigin:
    """What fixed a plan, for the run's record.

    ``kind`` is ``prune.ratio`` (set in params), ``method_params`` (the method's params say what goes),
    ``search`` (trial ``trial`` of Optuna study ``study``), ``search.target`` (a method that meets the target
    itself: ``halp`` allocates under it, nothing is searched) or ``given`` (a caller's own plan: the
    ``pruneflow prune`` command, a benchmark, a test). ``note`` says it in words for logs.
    """

    kind: str = "given"
    study: str | None = None
    trial: int | None = None
    note: str = ""


@dataclass
class PrunePlan:
    """What to remove, group by group, and how.

    Layer groups are Torch-Pruning's channel groups, named by their root module (``methods.groups``). A group
    keeps exactly ``kept_channels[name]`` channels if listed there, else loses ``layer_ratios[name]`` of them,
    else ``ratio`` of them. Methods that allocate per layer themselves (entropy, masks, blocks) read ``ratio``
    as the overall share, or aim at ``macs_reduction`` of the MACs when it is set. Methods that allocate under
    a latency budget (``halp``) aim at ``latency_ms`` (a ceiling) or ``speedup`` (a floor over the baseline),
    predicted on the latency table; the prune stage turns the budget into ``kept_channels`` and
    ``removed_blocks`` before the surgery, and keeps the budget in the plan. ``removed_blocks`` (units
    the model declares removable) go before any channel does. Kept counts from ratios are rounded to a
    multiple of ``round_to``; no group loses more than ``max_layer_ratio``. Explicit kept counts are taken as
    they are, so make them multiples of ``round_to``: Torch-Pruning rounds the kept count down to one, and
    leaves a group whole rather than empty it.
    """

    ratio: float = 0.5
    layer_ratios: dict[str, float] = field(default_factory=dict)
    kept_channels: dict[str, int] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)
    macs_reduction: float | None = None
    latency_ms: float | None = None  # a latency budget (ms at evaluate.latency_batch), for halp
    speedup: float | None = None  # or a speed-up over the baseline, for halp
    round_to: int | str | None = 8  # "auto": resolved to kept_channels by pruneflow.latency.rounding
    max_layer_ratio: float = 0.9
    origin: PlanOrigin = field(default_factory=PlanOrigin)

    @classmethod
    def from_config(cls, prune: PruneConfig, **fields: Any) -> PrunePlan:
        """A plan with the project's rounding and per-layer cap (``prune.round_to``, ``prune.max_layer_ratio``)."""
        return cls(round_to=prune.round_to, max_layer_ratio=prune.max_layer_ratio, **fields)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        return cls(**{**data, "origin": PlanOrigin(**data.get("origin", {}))})

    @property
    def latency_budget(self) -> bool:
        """Whether the plan is a latency budget (``latency_ms`` or ``speedup``) for a latency-allocating method."""
        return self.latency_ms is not None or self.speedup is not None

    def budget_ms(self, baseline_ms: float) -> float:
        """The budget in ms, given the baseline's (predicted) latency; the tighter of the two if both are set."""
        budgets = [ms for ms in (self.latency_ms, None if self.speedup is None else baseline_ms / self.speedup)
                   if ms is not None]
        if not budgets:
            raise ValueError("the plan sets no latency budget (latency_ms or speedup)")
        return min(budgets)

    def describe(self) -> str:
        """The plan in one line, as the logs and report.md say it: per-group settings when there are any,
        since then ``ratio`` applies to no group."""
        parts = []
        if self.removed_blocks:
            parts.append(f"without blocks {', '.join(self.removed_blocks)}")
        if self.kept_channels:
            parts.append("keeping " + ", ".join(f"{name}={kept}" for name, kept in self.kept_channels.items()))
        if self.layer_ratios:
            parts.append("at layer ratios " + ", ".join(f"{name}={r:.3f}" for name, r in self.layer_ratios.items()))
        if self.latency_ms is not None or self.speedup is not None:
            parts.append(f"under a predicted latency of {self.latency_ms:.3f} ms" if self.latency_ms is not None
                         else f"aiming at a {self.speedup:.2f}x predicted speed-up")
        elif not parts or self.macs_reduction is not None:
            parts.append(f"at ratio {self.ratio:.3f}" if self.macs_reduction is None
                         else f"aiming at {self.macs_reduction:.1%} fewer MACs")
        return "; ".join(parts) + (f" ({self.origin.note})" if self.origin.note else "")
