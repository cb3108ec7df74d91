"""The stage table and the dvc.yaml rendered from it, and the pruning plan from JSON to Torch-Pruning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from torch import nn
from typer.testing import CliRunner

from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import PipelineConfig, load_config
from pruneflow.dvcfile import render
from pruneflow.flows.cli import app
from pruneflow.layout import ProjectLayout
from pruneflow.methods import create_method
from pruneflow.methods.groups import channel_groups
from pruneflow.plan import PlanOrigin, PrunePlan
from pruneflow.search import SearchOutcome
from pruneflow.stages import STAGES, PruneSummary
from tests.conftest import TINY_PARAMS, write_params

REPO = Path(__file__).resolve().parents[1]
RESNET = ModelSpec("resnet20", in_channels=3, num_classes=10, input_shape=(3, 16, 16))


def declared(entry: dict, dataset: str, method: str) -> tuple[str, set[str], set[str], list[str]]:
    """A dvc.yaml stage's command, deps, outs (metrics count as outs) and params for one method."""
    def expand(text: str) -> str:
        return text.replace("${key}", method).replace("${data.dataset}", dataset)

    outs = [*entry.get("outs", []), *entry.get("metrics", [])]
    return (expand(entry["cmd"]), {expand(dep) for dep in entry.get("deps", [])},
            {expand(out if isinstance(out, str) else next(iter(out))) for out in outs},
            [expand(key) for key in entry.get("params", [])])


def covers(declared: set[str], paths: set[str]) -> bool:
    """Each path is declared or inside a declared folder, and each declaration holds one of the paths."""
    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + "/")

    return (all(any(inside(path, entry) for entry in declared) for path in paths)
            and all(any(inside(path, entry) for path in paths) for entry in declared))


def test_the_shipped_dvc_yaml_is_the_one_the_stage_table_renders(tmp_path):
    shown = CliRunner().invoke(app, ["dvc-yaml", "--params", str(REPO / "params.yaml")])
    assert shown.exit_code == 0, shown.output
    assert (REPO / "dvc.yaml").read_text() == shown.output, \
        "dvc.yaml is not what pruneflow.stages.STAGES declares: regenerate it with `pruneflow dvc-yaml --write`"
    shutil.copy(REPO / "params.yaml", tmp_path)
    written = CliRunner().invoke(app, ["dvc-yaml", "--write", "--params", str(tmp_path / "params.yaml")])
    assert written.exit_code == 0 and (tmp_path / "dvc.yaml").read_text() == shown.output


def test_dvc_yaml_declares_what_each_stage_of_the_table_reads_and_writes(tmp_path):
    cfg = PipelineConfig(methods={"l1": {}})
    layout = ProjectLayout(tmp_path, cfg)
    layout.dataset_dir.mkdir(parents=True)
    layout.dataset_dir.with_name("digits.dvc").write_text(f"outs:\n- md5: {'0' * 32}.dir\n  path: digits\n")
    run = layout.dvc_run()
    dvc = yaml.safe_load(render(cfg, tmp_path))["stages"]
    assert list(dvc) == list(STAGES)

    def relative(paths: list[Path]) -> set[str]:
        return {path.relative_to(tmp_path).as_posix() for path in paths}

    def has(params: dict, key: str) -> bool:
        head, _, rest = key.partition(".")
        return head in params and (not rest or isinstance(params[head], dict) and has(params[head], rest))

    for name, stage in STAGES.items():
        entry, context = dvc[name], run.method_run("l1") if stage.per_method else run
        if stage.per_method:
            assert entry["foreach"] == "${methods}", name
            entry = entry["do"]
        cmd, deps, outs, params = declared(entry, cfg.data.dataset, "l1")
        assert cmd == f"pruneflow stage {name}" + (" --method l1" if stage.per_method else "")
        reads, writes = relative(stage.paths(context, stage.reads)), relative(stage.paths(context, stage.writes))
        assert covers(deps, reads), (name, deps, reads)
        assert covers(outs, writes), (name, outs, writes)
        assert params and all(has(cfg.model_dump(), key) for key in params), (name, params)


def test_a_skipped_search_writes_every_output_dvc_declares(project):
    params = write_params(project, {**TINY_PARAMS, "prune": {"ratio": 0.3}})
    done = CliRunner().invoke(app, ["stage", "search", "--method", "l1", "--params", str(params)])
    assert done.exit_code == 0, done.output
    assert "search skipped" in done.output
    run, stage = ProjectLayout(project, load_config(params)[0]).dvc_run().method_run("l1"), STAGES["search"]
    assert all(path.is_file() for path in stage.paths(run, stage.writes))


def test_pruneflow_stage_runs_the_stages_of_the_table(project):
    done = CliRunner().invoke(app, ["stage", "nope", "--params", str(project / "params.yaml")])
    assert done.exit_code == 2
    assert f"no stage nope: choose one of data, {', '.join(STAGES)}, compare" in done.output


def test_a_plan_and_what_the_search_decided_round_trip_through_json():
    plan = PrunePlan(ratio=0.0, layer_ratios={"layer1.0.conv1": 0.25}, kept_channels={"layer2.0.conv1": 16},
                     removed_blocks=["layer3.1"], round_to=None, origin=PlanOrigin("search", "study-x", 4, "trial 4"))
    outcome = SearchOutcome(plan, 97.5, {"macs_reduction": 0.52}, 6, 2, 0, [1, 4], 0.25)
    again = SearchOutcome.from_dict(json.loads(json.dumps(outcome.as_dict())))
    assert again == outcome and again.searched and (again.study_name, again.trial_number) == ("study-x", 4)
    summary = PruneSummary(plan, 10, 5, 4, 2, [], "")
    assert PruneSummary.from_dict(json.loads(json.dumps(summary.as_dict()))) == summary
    assert "layer2.0.conv1=16" in plan.describe() and "(trial 4)" in plan.describe()


def test_a_plan_keeps_exact_channel_counts_and_removes_blocks_before_pruning(tmp_path):
    model = RESNET.build()
    group = channel_groups(model, RESNET.example_inputs())[1].name
    block = RESNET.build().removable_blocks()[-1]
    plan = PrunePlan(ratio=0.3, kept_channels={group: 5}, removed_blocks=[block], round_to=None)
    result = create_method("l1").prune(model, RESNET.example_inputs(), plan)
    assert model.get_submodule(group).out_channels == 5  # the count, not the ratio
    assert isinstance(model.get_submodule(block), nn.Identity) and result.removed_blocks == [block]
    assert result.plan == plan
    path = save_model(tmp_path / "pruned.pt", model, RESNET, result.history, result.removed_blocks)
    assert load_model(path)[0].get_submodule(group).out_channels == 5  # the checkpoint replays both


def test_a_plan_naming_layers_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match="the plan names layers the model lacks: nowhere"):
        create_method("l1").prune(RESNET.build(), RESNET.example_inputs(), PrunePlan(kept_channels={"nowhere": 4}))
