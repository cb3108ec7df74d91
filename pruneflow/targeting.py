"""Find the pruning ratio that removes a given share of MACs, for any method.

Methods read ``PrunePlan.ratio`` differently (a uniform share per layer, a global share of channels, a cap
on dead masks, a share of whole blocks), so equal ratios do not mean equal cost. To compare methods at one
cost, bisect each method's ratio on prune-only trials until the measured MACs reduction is as close to the
goal as channel rounding allows. Pruning is cheap next to training, so a few prunes per method are affordable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pruneflow.bisection import bisect
from pruneflow.methods.base import Batches, PruningMethod
from pruneflow.metrics import count_macs_params, reductions
from pruneflow.plan import PrunePlan


@dataclass
class RatioForTarget:
    """The ratio chosen, the reduction it gives, and every (ratio, reduction) tried on the way."""

    ratio: float
    reduction: float
    goal: float
    tolerance: float
    trials: list[tuple[float, float]] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether the reduction is within ``tolerance`` of the goal (rounding can make that impossible)."""
        return abs(self.reduction - self.goal) <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "reached": self.reached}


def bisect_ratio(reduction_at: Callable[[float], float], goal: float, *, low: float = 0.0, high: float = 0.9,
                 steps: int = 8, scan: int = 0, tolerance: float = 0.005) -> RatioForTarget:
    """Bisect ``ratio`` in [low, high] so that ``reduction_at(ratio)`` comes closest to ``goal``.

    Plain bisection (``scan=0``) assumes the reduction grows with the ratio, perhaps in steps: ``high`` is
    tried first and returned if even it falls short (``reached`` is then False); else at most ``steps``
    midpoints are tried. With ``scan > 0``, ``scan`` evenly spaced ratios in (low, high] are tried first and
    the bisection runs inside the first interval where the reduction crosses the goal. Use a scan when the
    reduction may not be monotone: Torch-Pruning's own ``round_to`` rounds each layer's kept channels *down*
    and skips a layer it would empty (with ``round_to=8`` a ratio in (0, 0.5] halves a 16-channel layer and a
    larger one leaves it whole). The methods that count kept channels themselves avoid that
    (``base.kept_channels``), but the global-threshold methods (slimming, lamp) still meet it, and
    selection-based methods (adversarial's λ grid) can jump.

    Either phase stops as soon as a trial lands within ``tolerance`` of the goal. The result is the closest
    trial seen; on a tie the one at or above the goal wins, then the smaller ratio.
    """
    if not 0.0 < goal < 1.0:
        raise ValueError(f"goal must be a share of MACs in (0, 1), got {goal}")
    if not 0.0 <= low < high < 1.0:
        raise ValueError(f"need 0 <= low < high < 1, got low={low}, high={high}")
    if steps < 0 or scan < 0 or tolerance < 0:
        raise ValueError("steps, scan and tolerance must be >= 0")
    trials: list[tuple[float, float]] = []

    def measure(ratio: float) -> float:
        reduction = float(reduction_at(ratio))
        trials.append((ratio, reduction))
        return reduction

    def result() -> RatioForTarget:
        ratio, reduction = min(trials, key=lambda t: (abs(t[1] - goal), t[1] < goal, t[0]))
        return RatioForTarget(ratio, reduction, goal, tolerance, trials)

    def close(reduction: float) -> bool:
        return abs(reduction - goal) <= tolerance

    def side(ratio: float) -> int:
        reduction = measure(ratio)
        return 0 if close(reduction) else -1 if reduction < goal else 1

    if scan:
        previous = low
        for index in range(1, scan + 1):
            ratio = low + (high - low) * index / scan
            reduction = measure(ratio)
            if close(reduction):
                return result()
            if reduction > goal:
                low, high = previous, ratio  # the first crossing: bisect inside it
                break
            previous = ratio
        else:
            return result()  # no scanned ratio removes enough
    else:
        top = measure(high)
        if top <= goal or close(top):
            return result()
        if low > 0.0 and measure(low) >= goal:
            return result()  # even the low end removes enough
    bisect(side, low, high, steps)
    return result()


def ratio_for_macs_reduction(method: PruningMethod, model: nn.Module, example_inputs: torch.Tensor, goal: float, *,
                             round_to: int | None = 8, max_layer_ratio: float = 0.9,
                             calib_batches: Batches | None = None, low: float = 0.0, high: float | None = None,
                             steps: int = 8, scan: int = 0, tolerance: float = 0.005, seed: int | None = 0,
                             log: Callable[[str], None] | None = None) -> RatioForTarget:
    """The ``PrunePlan.ratio`` at which ``method`` removes ``goal`` of ``model``'s MACs (e.g. 0.5).

    Each trial prunes a deep copy of ``model`` (which is left untouched) with the same ``round_to`` and
    ``max_layer_ratio`` the real prune will use, and counts MACs with ``count_macs_params`` on one example
    input. ``seed`` re-seeds torch before every trial so methods with random parts (``random``, the
    adversarial masks' discriminator) behave as a real prune after ``torch.manual_seed(seed)`` will; ``None``
    leaves the RNG alone. Data-driven methods need ``calib_batches`` (a re-iterable loader, as the prune
    stage gives them). ``high`` defaults to ``max_layer_ratio``. ``steps`` and ``scan`` are ``bisect_ratio``'s:
    with ``round_to`` set, pass a ``scan`` (the reduction is then not monotone in the ratio, see there).

    For methods with ``structured = False`` dense MACs cannot drop; as in the Optuna search, the reduction
    is then read as the share of zeroed conv/linear weights.
    """
    high = max_layer_ratio if high is None else high
    example = example_inputs[:1]
    base_macs, base_params = count_macs_params(model, example)

    def reduction_at(ratio: float) -> float:
        trial = copy.deepcopy(model)
        if seed is not None:
            torch.manual_seed(seed)
        method.prune(trial, example_inputs, PrunePlan(ratio=ratio, round_to=round_to, max_layer_ratio=max_layer_ratio),
                     calib_batches)
        reduction = reductions(trial, example, base_macs, base_params, method.structured)["macs_reduction"]
        if log:
            log(f"{method.name}: ratio {ratio:.4f} -> reduction {reduction:.4f} (goal {goal:.3f})")
        return reduction

    return bisect_ratio(reduction_at, goal, low=low, high=high, steps=steps, scan=scan, tolerance=tolerance)
