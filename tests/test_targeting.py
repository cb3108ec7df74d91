"""Bisection of a method's pruning ratio to a MACs-reduction goal (pruneflow.targeting)."""

from __future__ import annotations

import pytest
import torch

from pruneflow.checkpoint import ModelSpec
from pruneflow.methods import create_method
from pruneflow.metrics import count_macs_params, zero_weight_share
from pruneflow.plan import PrunePlan
from pruneflow.targeting import bisect_ratio, ratio_for_macs_reduction

SPEC = ModelSpec("small_cnn", in_channels=1, num_classes=10, input_shape=(1, 8, 8))


def test_bisection_lands_within_tolerance_of_a_smooth_curve():
    found = bisect_ratio(lambda r: r ** 0.5, 0.5, steps=20, tolerance=1e-3)
    assert found.reached and found.ratio == pytest.approx(0.25, abs=2e-3)
    assert len(found.trials) <= 21


def test_bisection_picks_the_closest_step_of_a_staircase():
    # Reductions come in steps of 0.12 (whole channels): 0.48 is the closest reachable value to 0.5.
    found = bisect_ratio(lambda r: 0.12 * int(r * 10), 0.5, steps=10, tolerance=0.005)
    assert not found.reached and found.reduction == pytest.approx(0.48)
    assert 0.4 <= found.ratio < 0.5


def test_an_unreachable_goal_returns_the_high_end_after_one_trial():
    found = bisect_ratio(lambda r: r / 4, 0.5, high=0.8)
    assert (found.ratio, found.reached, len(found.trials)) == (0.8, False, 1)


def rounded_uniform(ratio: float) -> float:
    """The shape of ResNet-20's MACs reduction under Torch-Pruning's own round_to=8 rounding (kept channels
    rounded down, layers it would empty skipped): steps, then a fall."""
    for upper, reduction in ((0.125, 0.384), (0.25, 0.445), (0.375, 0.600), (0.5, 0.643), (0.75, 0.569)):
        if ratio <= upper:
            return reduction
    return 0.0 if ratio >= 0.9 else 0.31


def test_a_scan_finds_the_crossing_that_plain_bisection_misses_on_a_non_monotone_curve():
    plain = bisect_ratio(rounded_uniform, 0.5, high=0.9)
    assert plain.reduction == 0.0  # the high end removes nothing, so plain bisection gives up
    scanned = bisect_ratio(rounded_uniform, 0.5, high=0.9, scan=8, steps=6)
    assert scanned.reduction == pytest.approx(0.445) and 0.125 < scanned.ratio <= 0.25
    assert len(scanned.trials) == 3 + 6  # scanned up to the first crossing, then bisected inside it


def test_a_scan_stops_at_the_first_ratio_within_tolerance():
    found = bisect_ratio(lambda r: r, 0.5, high=0.8, scan=8, tolerance=0.01)
    assert found.reached and found.ratio == pytest.approx(0.5) and len(found.trials) == 5


@pytest.mark.parametrize("goal, low, high", [(0.0, 0.0, 0.9), (1.0, 0.0, 0.9), (0.5, 0.6, 0.5), (0.5, 0.0, 1.0)])
def test_bad_arguments_are_refused(goal, low, high):
    with pytest.raises(ValueError):
        bisect_ratio(lambda r: r, goal, low=low, high=high)


@pytest.mark.parametrize("method", ["l1", "random"])
def test_the_ratio_found_gives_that_reduction_when_pruned_for_real(method):
    torch.manual_seed(0)
    model = SPEC.build().eval()
    x = SPEC.example_inputs(4)
    base_macs, base_params = count_macs_params(model, x[:1])
    found = ratio_for_macs_reduction(create_method(method), model, x, 0.5, round_to=None, steps=10,
                                     scan=4, tolerance=0.01)
    assert abs(found.reduction - 0.5) < 0.05
    assert count_macs_params(model, x[:1]) == (base_macs, base_params)  # trials prune copies
    torch.manual_seed(0)  # the default seed of the trials
    create_method(method).prune(model, x, PrunePlan(ratio=found.ratio, round_to=None))
    assert 1 - count_macs_params(model, x[:1])[0] / base_macs == pytest.approx(found.reduction)


def test_unstructured_methods_are_targeted_by_weight_sparsity():
    model = SPEC.build().eval()
    found = ratio_for_macs_reduction(create_method("magnitude_unstructured"), model, SPEC.example_inputs(), 0.4,
                                     tolerance=0.01)
    assert found.reached
    create_method("magnitude_unstructured").prune(model, SPEC.example_inputs(), PrunePlan(ratio=found.ratio))
    assert zero_weight_share(model) == pytest.approx(found.reduction)
