"""The measured latency model (pruneflow.latency) on a tiny residual net.

Entries are timed with few repeats here: assertions only rely on effects far larger than the noise (a layer
with 16 times the work is slower), on what is counted (measurements, cache hits), and on pure logic.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from torch import nn

from pruneflow.export import export_onnx
from pruneflow.latency import (
    BudgetError,
    GroupCurve,
    LatencyTable,
    allocate,
    group_curves,
    importance_scores,
    read_graph,
    round_to_edge,
    sliced_model,
)
from pruneflow.latency.allocate import Allocation
from pruneflow.latency.graph import conv_call_order
from pruneflow.latency.measured import measured_allocation
from pruneflow.latency.rounding import step_rounded
from pruneflow.latency.table import _on_calibration, fingerprint
from pruneflow.latency.target import LatencyPredictor, prunable_groups
from pruneflow.methods import create_method
from pruneflow.plan import PrunePlan
from pruneflow.stages import PruneSummary, method_report

SHAPE = (3, 32, 32)
FAST = {"warmup": 1, "repeats": 5, "progress": False}


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Tiny(nn.Module):
    """A stem, one residual block (its inner width is the prunable group) and a classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def exported(model: nn.Module, folder) -> tuple[nn.Module, object]:
    path = export_onnx(model, torch.zeros(2, *SHAPE), folder / "model.onnx", opset=17)
    return model, read_graph(path, conv_call_order(model, torch.zeros(1, *SHAPE)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    return exported(Tiny().eval(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[nn.Module, object]:
    """Tiny at 64 channels: half of every group is a whole number of the runtime's blocks (8 or 16)."""
    torch.manual_seed(0)
    return exported(Tiny(64).eval(), tmp_path_factory.mktemp("wide"))


def inner(graph) -> int:
    return graph.group_of[graph.unit_by_name["block.conv1"].out]


def test_graph_units_groups_and_sliced_model(tiny):
    _, graph = tiny
    units = graph.unit_by_name
    assert list(units) == ["stem.0", "block.conv1", "block.conv2"]
    assert units["block.conv2"].residual and not units["block.conv1"].residual
    assert graph.group_of[units["block.conv2"].out] == graph.group_of[units["stem.0"].out]  # joined by the add
    assert graph.sizes[inner(graph)] == 16
    sliced = sliced_model(graph, {inner(graph): 5})
    onnx.checker.check_model(sliced)
    weights = {init.name: list(init.dims) for init in sliced.graph.initializer}

    def weight(unit: str) -> list[int]:
        return weights[sliced.graph.node[units[unit].nodes[0]].input[1]]
    assert weight("block.conv1")[0] == 5 and weight("block.conv2")[1] == 5 and weight("stem.0")[0] == 16
    import onnxruntime as ort
    out = ort.InferenceSession(sliced.SerializeToString()).run(None, {"x": np.zeros((2, *SHAPE), np.float32)})[0]
    assert out.shape == (2, 10)


def test_table_is_cached_and_a_second_build_does_not_measure(tiny, tmp_path):
    _, graph = tiny
    first = LatencyTable(tmp_path, threads=1, **FAST)
    curve = group_curves(first, graph, [inner(graph)])[0]
    assert first.measured > 0 and len(first) >= first.measured
    second = LatencyTable(tmp_path, threads=1, **FAST)
    again = group_curves(second, graph, [inner(graph)])[0]
    assert second.measured == 0 and again.ms == curve.ms
    # a layer with 16 times the channels costs more (far beyond timing noise); no count beyond the full one
    assert curve.at(16) > curve.at(1) and curve.counts[-1] == 16


def test_thread_count_and_runtime_are_part_of_the_key(tmp_path):
    one, two = LatencyTable(tmp_path, threads=1, **FAST), LatencyTable(tmp_path, threads=2, **FAST)
    assert one.path != two.path
    assert fingerprint(1)["threads"] == 1 and "onnxruntime" in fingerprint(1)
    with pytest.raises(Exception, match="TensorrtExecutionProvider is not in this onnxruntime build"):
        LatencyTable(tmp_path, provider="TensorrtExecutionProvider")


def test_concurrent_builds_measure_each_entry_once(tiny, tmp_path):
    """Two workers building the same entries at once: whoever holds the table's lock measures, the other waits
    and reads them (``flock`` excludes threads as it does processes: each opens the lock file itself)."""
    _, graph = tiny

    def build(_: int) -> int:
        table = LatencyTable(tmp_path, threads=1, **FAST)
        table.predict_many(graph, [{inner(graph): c} for c in (4, 8, 12)])
        return table.measured

    with ThreadPoolExecutor(2) as pool:
        measured = list(pool.map(build, range(2)))
    assert sum(measured) == len(LatencyTable(tmp_path, threads=1, **FAST).entries)  # none measured twice


def test_prediction_adds_the_fixed_cost_and_tracks_a_pruned_net(tiny, tmp_path):
    _, graph = tiny
    table = LatencyTable(tmp_path, threads=1, warmup=2, repeats=20, progress=False)
    assert table.predict(graph).fixed_ms is None
    fixed = table.calibrate(graph, repeats=50)
    whole = table.predict(graph)
    stored = table.data["fixed"][f"{graph.structure_hash()}|b1"]
    assert whole.fixed_ms == pytest.approx(fixed) and whole.ms == pytest.approx(stored["model_ms"])
    thin = table.predict(graph, {inner(graph): 2})
    assert thin.ms < whole.ms and set(thin.units_ms) == set(whole.units_ms)
    gone = table.predict(graph, removed=["block.conv1", "block.conv2"])
    assert set(gone.units_ms) == {"stem.0"} and gone.ms < whole.ms


def test_calibration_places_predictions_on_the_unpruned_and_the_half_width_model(wide, tmp_path):
    model, graph = wide
    table = LatencyTable(tmp_path, threads=1, warmup=2, repeats=20, progress=False)
    prunable = prunable_groups(model, torch.zeros(2, *SHAPE), graph)
    assert prunable == [inner(graph)]  # the stem (and so the residual stream it writes) is left alone
    table.calibrate(graph, repeats=50, prunable=prunable)
    stored = table.data["fixed"][f"{graph.structure_hash()}|b1"]
    assert stored["half"]["model_ms"] < stored["model_ms"]  # a quarter of the block's work: far beyond the noise
    block = table.channel_block() or 1
    half = {group: 32 // block * block for group in prunable}
    assert table.predict(graph).ms == pytest.approx(stored["model_ms"])
    assert table.predict(graph, half).ms == pytest.approx(stored["half"]["model_ms"])
    thinner = table.predict(graph, {group: block for group in prunable}).ms
    assert 0 < thinner < stored["half"]["model_ms"]
    measured = table.measured
    table.calibrate(graph, repeats=50, prunable=prunable)  # calibrated: nothing is timed again
    assert table.measured == measured and table.data["fixed"][f"{graph.structure_hash()}|b1"] == stored


def test_a_prediction_sits_on_the_line_through_the_two_calibrated_models():
    whole = {"model_ms": 10.0, "units_ms": 8.0}
    fixed = {**whole, "half": {"model_ms": 4.0, "units_ms": 5.0}}
    assert _on_calibration(fixed, 8.0, "units_ms", "model_ms") == pytest.approx(10.0)
    assert _on_calibration(fixed, 6.5, "units_ms", "model_ms") == pytest.approx(7.0)  # between: the line
    assert _on_calibration(fixed, 2.5, "units_ms", "model_ms") == pytest.approx(2.0)  # below: through the half's
    assert _on_calibration(whole, 4.0, "units_ms", "model_ms") == pytest.approx(5.0)  # one point: proportional
    slower = {**whole, "half": {"model_ms": 10.5, "units_ms": 5.0}}  # a noisy half point is not used
    assert _on_calibration(slower, 4.0, "units_ms", "model_ms") == pytest.approx(5.0)


def staircase() -> GroupCurve:
    """Blocks of 8 padded (9..16 cost as 16), counts off a multiple of 4 above 8 on a slow path."""
    counts = list(range(1, 25))
    ms = [1.0 + 0.1 * -(-c // 8) + (0.3 if c > 8 and c % 4 else 0.0) for c in counts]
    return GroupCurve("conv", 0, counts, ms)


def test_step_edges_and_rounding_to_them():
    curve = staircase()
    assert curve.edges() == [8, 16, 24]
    assert round_to_edge(curve, 16).kept == 16
    up = round_to_edge(curve, 13)  # costs more than 16 (slow path): 16 is faster and keeps more channels
    assert up.kept == 16 and "cost no more" in up.reason
    assert round_to_edge(curve, 12).kept == 16  # same step as 16
    assert round_to_edge(curve, 5).kept == 8  # 5..8 cost the same
    assert round_to_edge(curve, 20).kept == 24 and round_to_edge(curve, 25).kept == 24  # above the sweep: its top
    coarse = GroupCurve("conv", 0, [4, 8, 12, 16], [1.0, 1.1, 1.2, 1.3])  # a count between swept ones costs as
    assert round_to_edge(coarse, 9).kept == 12 and round_to_edge(coarse, 8).kept == 8  # the next swept count


def test_rounding_to_a_block_raises_off_block_counts_to_a_multiple_and_says_why():
    blocked = GroupCurve("conv", 0, [16, 32, 48], [1.0, 1.2, 1.1])  # 48 is faster than 32 (a slow kernel at 32)
    assert "blocks of 16" in round_to_edge(blocked, 9, block=16).reason
    assert round_to_edge(blocked, 9, block=16).kept == 16
    faster = round_to_edge(blocked, 20, block=16)
    assert faster.kept == 48 and "48 channels cost no more than 32" in faster.reason


def test_the_channel_block_is_read_once_and_kept_in_the_table(tmp_path, monkeypatch):
    block = LatencyTable(tmp_path, threads=1, **FAST).channel_block()
    assert block in (None, 4, 8, 16)  # None: a runtime without the NCHWc layout

    def probe_again(*args):
        raise AssertionError("the block was probed again")

    monkeypatch.setattr("pruneflow.latency.table.block_size", probe_again)
    assert LatencyTable(tmp_path, threads=1, **FAST).channel_block() == block


def test_allocator_meets_the_budget_and_rejects_an_unreachable_one(tiny, tmp_path):
    model, graph = tiny
    table = LatencyTable(tmp_path, threads=1, **FAST)
    scores = importance_scores(model, torch.zeros(2, *SHAPE), tp.importance.GroupMagnitudeImportance(p=1), graph)
    assert list(scores) == [inner(graph)]  # the stem's group holds an ignored layer; the classifier is not timed
    whole = table.predict(graph).ms
    budget = 0.85 * whole
    allocation = allocate(table, graph, scores, budget, blocks=["block"])
    assert allocation.predicted_ms <= budget
    variant = table.predict(graph, allocation.counts,
                            removed=[u.name for u in graph.units if u.name.startswith("block.")]
                            if allocation.removed_blocks else ())
    assert variant.ms == pytest.approx(allocation.predicted_ms)
    with pytest.raises(BudgetError, match="below the .* ms that the smallest pruned net reaches"):
        allocate(table, graph, scores, 1e-6, blocks=["block"])


def stepped_allocator(speedups: list[float], baseline_ms: float = 10.0, factor: float = 0.85):
    """A knapsack whose allocations are predicted at ``speedups`` (the least one at or above what is asked), and
    a target where each measures ``factor`` times its prediction (0.85: a table over-predicting, as on
    ResNet-56)."""
    def allocate(plan: PrunePlan) -> tuple[PrunePlan, Allocation]:
        asked = baseline_ms / plan.budget_ms(baseline_ms)
        reachable = [s for s in speedups if s >= asked]
        if not reachable:
            raise BudgetError(f"{asked:.2f}x is out of reach")
        predicted = min(reachable)
        allocation = Allocation({0: round(10 * predicted)}, [], baseline_ms / predicted, plan.budget_ms(baseline_ms),
                                {0: "conv"})
        return replace(plan, kept_channels={"conv": allocation.counts[0]}), allocation

    def measure(plan: PrunePlan) -> tuple[float, float]:
        predicted = plan.kept_channels["conv"] / 10  # a stand-in count: the predicted speed-up, x10
        return baseline_ms / (factor * predicted), baseline_ms

    return allocate, measure


def test_a_latency_budget_is_met_as_measured_by_correcting_what_is_asked_of_the_table():
    allocate, measure = stepped_allocator([1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0])
    plan, allocation, attempts = measured_allocation(allocate, PrunePlan(speedup=2.0), 10.0, measure)
    assert [round(a.measured, 3) for a in attempts] == [1.785, 2.04]  # 2.1 predicted, then 2.4 asked of the table
    assert plan.speedup == 2.0 and "measured 2.04x for a goal of 2.00x" in plan.origin.note
    assert allocation.predicted_ms == pytest.approx(10.0 / 2.4)
    # a corrected ask out of the table's reach stops the rounds: the fastest one measured is kept
    plan, _, attempts = measured_allocation(allocate, PrunePlan(speedup=2.6), 10.0, measure)
    assert len(attempts) == 1 and plan.origin.note.startswith("measured 2.29x for a goal of 2.60x")
    with pytest.raises(BudgetError):  # the budget itself out of reach: said, as without measuring
        measured_allocation(allocate, PrunePlan(speedup=5.0), 10.0, measure)
    # measured far above the goal (a noisy timing): a corrected ask of no speed-up at all is not made
    allocate, measure = stepped_allocator([1.2, 1.5], factor=1.6)
    plan, _, attempts = measured_allocation(allocate, PrunePlan(speedup=1.1), 10.0, measure)
    assert len(attempts) == 1 and plan.kept_channels == {"conv": 12}
    # a latency ceiling becomes the speed-up it asks of the baseline as measured: 10 ms / 5 ms = 2x
    allocate, measure = stepped_allocator([1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0])
    plan, _, attempts = measured_allocation(allocate, PrunePlan(latency_ms=5.0), 10.0, measure)
    assert plan.latency_ms == 5.0 and attempts[-1].measured >= 2.0


def test_round_to_auto_keeps_step_edges_in_the_plan_and_says_why(tiny, tmp_path):
    """``round_to: auto`` turns the method's unrounded counts into kept channels per group, never fewer than
    asked, and the plan it returns is what pruning then does."""
    model, graph = tiny
    table = LatencyTable(tmp_path, threads=1, **FAST)
    method, x = create_method("l1"), torch.zeros(2, *SHAPE)
    plan, rounding = step_rounded(method, model, x, PrunePlan(ratio=0.4, round_to="auto"), table,
                                   exported=graph.model, window=8)
    assert plan.round_to is None and plan.kept_channels == {"block.conv1": rounding[0]["kept"]}
    row = rounding[0]
    assert row["name"] == "block.conv1" and row["asked"] == 10 and 10 <= row["kept"] <= 16 and row["reason"]
    block = table.channel_block() or 1  # only the runtime's block multiples are candidates (and the whole count)
    assert row["kept"] % block == 0 or row["kept"] == 16
    assert "round_to: auto" in plan.origin.note
    pruned = copy.deepcopy(model)
    method.prune(pruned, x, plan)
    assert pruned.block.conv1.out_channels == row["kept"]
    with pytest.raises(ValueError, match="resolved to kept channels before pruning"):
        method.prune(copy.deepcopy(model), x, PrunePlan(ratio=0.4, round_to="auto"))


def test_the_method_report_shows_each_groups_rounding(tmp_path):
    rounding = [{"name": "layer1.0.conv1", "channels": 16, "asked": 10, "kept": 12,
                 "reason": "10→12: 12 channels cost no more than 10 (1.000 vs 1.010 ms)"},
                {"name": "layer2.0.conv1", "channels": 32, "asked": 16, "kept": 16, "reason": "16 is a step edge"}]
    plan = PrunePlan(kept_channels={"layer1.0.conv1": 12, "layer2.0.conv1": 16}, round_to=None)
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(PruneSummary(plan, 10, 5, 4, 2, [], "", rounding).as_dict()))
    report = method_report("l1", {"accuracy": 90.0}, path)
    assert "latency step edges" in report and "10→12: 12 channels cost no more than 10" in report
    assert report.index("layer1.0.conv1 ") < report.index("layer2.0.conv1 ")  # changed counts first


def test_predictor_reads_pruned_torch_models_and_removed_blocks(tiny, tmp_path):
    model, graph = tiny
    table = LatencyTable(tmp_path, threads=1, **FAST)
    predictor = LatencyPredictor(model, torch.zeros(1, *SHAPE), graph.model, table)
    assert predictor.costs(model) == {"latency_ms": pytest.approx(predictor.baseline_ms), "speedup": pytest.approx(1.0)}
    thin = copy.deepcopy(model)
    create_method("l1").prune(thin, torch.zeros(2, *SHAPE), PrunePlan(ratio=0.75, round_to=None))
    assert predictor.predict(thin).units_ms.keys() == {"stem.0", "block.conv1", "block.conv2"}
    assert predictor.costs(thin)["speedup"] > 1.0  # a quarter of the block's inner channels: far beyond noise
    gone = create_method("cascade", {"blocks": ["block"]}).prune(copy.deepcopy(model), torch.zeros(2, *SHAPE),
                                                                 PrunePlan()).model
    assert set(predictor.predict(gone).units_ms) == {"stem.0"}


LATENCY_TARGET = {"model": {"name": "small_cnn", "kwargs": {"width": 8}}, "prune": {"round_to": None},
                  "export": {"opset": 17}, "search": {"target": {"metric": "latency_ms", "value": 1e-6}}}


def test_an_unreachable_latency_target_or_a_missing_runtime_stops_before_training(digits_dir):
    """Checked before the baseline trains, on the untrained model, with one line naming the key."""
    from pruneflow.config import ConfigError, PipelineConfig
    from pruneflow.preflight import check_model
    from pruneflow.stages import load_data

    splits = load_data(PipelineConfig.model_validate(LATENCY_TARGET), digits_dir)
    with pytest.raises(ConfigError, match=r"search.target: latency_ms 1e-06 is out of reach on this machine: "
                                          r"the smallest net .* is predicted at"):
        check_model(PipelineConfig.model_validate(LATENCY_TARGET), splits)
    jetson = PipelineConfig.model_validate({**LATENCY_TARGET, "export": {"platform": "jetson"}})
    with pytest.raises(ConfigError, match="search.target.metric latency_ms: export.platform jetson: the latency table "
                                          "needs TensorrtExecutionProvider or CUDAExecutionProvider"):
        check_model(jetson, splits)
    jetson = PipelineConfig.model_validate({"export": {"platform": "jetson"}, "prune": {"round_to": "auto"}})
    with pytest.raises(ConfigError, match="prune.round_to auto measures channel counts on the target's runtime: "
                                          "export.platform jetson: the latency table needs"):
        check_model(jetson, splits)
    check_model(PipelineConfig.model_validate({"export": {"platform": "jetson"}, "prune": {"round_to": 8}}), splits)
    with pytest.raises(ValueError, match="a speedup target is a factor above 1"):
        PipelineConfig.model_validate({"search": {"target": {"metric": "speedup", "value": 0.5}}})


def test_halp_allocates_under_a_predicted_latency_budget_and_prunes_that_plan(tiny, tmp_path):
    """The knapsack's plan meets the budget on the table, and the surgery prunes exactly that plan."""
    model, graph = tiny
    table = LatencyTable(tmp_path, threads=1, **FAST)
    predictor = LatencyPredictor(model, torch.zeros(1, *SHAPE), graph.model, table)
    halp, x = create_method("halp"), torch.randn(2, *SHAPE)
    calib = [(torch.randn(4, *SHAPE), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match="turns the plan's latency_ms or speedup into kept channels first"):
        halp.prune(copy.deepcopy(model), x, PrunePlan(ratio=0.5), calib)
    for params, budget in (({"blocks": False}, {"speedup": 1.15}), ({}, {"latency_ms": 0.7 * predictor.baseline_ms})):
        halp = create_method("halp", params)
        plan, allocation = halp.allocate(model, x, PrunePlan(round_to=None, **budget), predictor, calib)
        assert allocation.predicted_ms <= plan.budget_ms(predictor.baseline_ms) < predictor.baseline_ms
        assert "HALP knapsack" in plan.origin.note and plan.describe().endswith(f"{allocation.log.__len__()} steps)")
        pruned = copy.deepcopy(model)
        assert halp.prune(pruned, x, plan, calib).plan == plan
        assert predictor.predict(pruned).ms == pytest.approx(allocation.predicted_ms)  # the plan pruned is the plan
        if plan.removed_blocks:
            assert plan.removed_blocks == ["block"] and isinstance(pruned.block, nn.Identity)
        else:
            assert pruned.block.conv1.out_channels == plan.kept_channels["block.conv1"] < 16
    assert not create_method("halp", {"blocks": False}).allocate(
        model, x, PrunePlan(speedup=1.15, round_to=None), predictor, calib)[0].removed_blocks


HALP = {"model": {"name": "small_cnn", "kwargs": {"width": 16}}, "export": {"opset": 17}, "methods": {"halp": {}},
        "train": {"epochs": 3}, "retrain": {"epochs": 1, "lr": 0.01}, "prune": {"calib_batches": 2},
        "evaluate": {"latency_repeats": 5, "latency_warmup": 2},
        "search": {"target": {"metric": "speedup", "value": 1.1}}}


def test_halp_runs_the_pipelines_stages_on_digits_and_meets_its_speedup_target(digits_dir, tmp_path):
    """search (skipped: halp meets the target itself) → prune (the budget allocated into kept channels) →
    retrain → evaluate (the prediction logged beside the measured latency), as the flow runs them; then the
    ways a budget is refused before anything trains."""
    from pruneflow import stages
    from pruneflow.config import ConfigError, PipelineConfig, validate
    from pruneflow.layout import ProjectLayout, ProjectRun
    from pruneflow.preflight import check_model
    from pruneflow.search import SearchOutcome
    from pruneflow.versioning import DataVersion

    cfg = PipelineConfig.model_validate(HALP)
    run = ProjectRun(ProjectLayout(tmp_path, cfg), DataVersion(digits_dir, "digits-md5"), tmp_path / "base",
                     tmp_path).method_run("halp")
    stages.train_baseline(run, log=lambda _: None)
    outcome = stages.search_ratio(run, log=lambda _: None)
    assert outcome.plan.speedup == 1.1 and outcome.plan.origin.kind == "search.target" and not outcome.searched
    summary = stages.prune_model(run, log=lambda _: None)
    assert summary.plan.kept_channels and summary.plan.speedup == 1.1 and summary.macs_after < summary.macs_before
    assert "for a goal of 1.10x (round 1: asked 1.10x of the table" in summary.plan.origin.note  # timed, corrected
    assert SearchOutcome.from_dict(json.loads(run.search_json.read_text())).plan.kept_channels == {}
    stages.retrain_model(run, log=lambda _: None)
    metrics = stages.evaluate_model(run, log=lambda _: None)
    assert metrics["speedup_predicted"] >= 1.1 and "latency_prediction_error_pct" in metrics
    assert "HALP knapsack" in run.report_md.read_text()

    splits = stages.load_data(cfg, digits_dir)
    with pytest.raises(ConfigError, match=r"search.target.value: method halp: latency budget .* ms is below the "
                                          r".* ms that the smallest pruned net reaches"):
        check_model(PipelineConfig.model_validate({**HALP, "search": {"target": {"metric": "speedup",
                                                                                  "value": 1000}}}), splits)
    with pytest.raises(ConfigError, match="halp allocate.* under a latency budget, which a params_reduction target "
                                          "does not give"):
        validate({**HALP, "search": {"target": {"metric": "params_reduction", "value": 0.5}}})
    assert stages.latency_plan(PipelineConfig.model_validate({**HALP, "prune": {"ratio": 0.5}}),
                               "halp").speedup == pytest.approx(2.0)
