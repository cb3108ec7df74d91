"""dvc.yaml, rendered from ``pruneflow.stages.STAGES``, so the table is the one declaration of what each stage
reads, writes and depends on, and dvc.yaml is never edited by hand: ``pruneflow dvc-yaml --write`` regenerates it,
and tests/test_stages.py fails while the shipped file differs from the rendering.

The paths are the run context's (``ProjectLayout.dvc_run``), with DVC templating where they depend on params:
``${data.dataset}`` for the dataset, ``${key}`` for the method of a per-method stage (``foreach: ${methods}``).
"""

from __future__ import annotations

from pathlib import Path

from pruneflow.config import PipelineConfig
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.stages import STAGES, Stage

METHOD = "${key}"  # DVC's foreach item: the name of an entry of params' methods
DATASET = "${data.dataset}"

HEADER = """\
# Generated from pruneflow.stages.STAGES by `pruneflow dvc-yaml --write`: change the table, not this file.
# The same pipeline, stage by stage, with DVC's own caching. Every stage calls `pruneflow stage`, which
# reads params.yaml and writes to {runs}/. Each stage's deps and outs are the files the table says it reads
# and writes. Version the data first, then reproduce:
#   pruneflow stage data && dvc repro        (or: make repro)
# Compare methods with `dvc metrics show`; change a param and `dvc repro` reruns only what depends on it.
# The search stages use studies of their own, so a repro chooses the same ratios whatever `pruneflow run` did
# before. dvc.lock records the last repro of the shipped params: commit it after a repro, as DVC expects.
"""


def render(cfg: PipelineConfig, root: Path) -> str:
    """The text of dvc.yaml for the project at ``root`` (its ``project.data_dir`` and ``runs_dir``)."""
    template = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": DATASET})})
    project = ProjectLayout(root, template).dvc_run()
    stages = [_stage(stage, project.method_run(METHOD) if stage.per_method else project, root)
              for stage in STAGES.values()]
    runs = _relative(project.run_dir, root)
    return HEADER.format(runs=runs) + "stages:\n" + "\n".join("".join(lines) for lines in stages)


def _stage(stage: Stage, run: ProjectRun, root: Path) -> list[str]:
    """One stage's entry: per method a ``foreach`` over params' methods, else the stage itself."""
    def paths(names: tuple[str, ...]) -> list[tuple[str, str | None]]:
        return [(_relative(path, root), stage.notes.get(name))
                for name in names if (path := getattr(run, name)) is not None]

    method = f" --method {METHOD}" if stage.per_method else ""
    body = [f"cmd: pruneflow stage {stage.name}{method}\n"]
    body += _section("deps", paths(stage.reads))
    body += _section("params", [(key.format(method=METHOD), stage.notes.get(key)) for key in stage.params])
    body += _section("outs", paths(tuple(name for name in stage.writes if name not in stage.metrics)))
    body += _section("metrics", [(f"{path}:", note) for path, note in paths(stage.metrics)], under="cache: false")
    if stage.per_method:
        return [f"  {stage.name}:\n", "    foreach: ${methods}\n", "    do:\n", *_indent(body, 6)]
    return [f"  {stage.name}:\n", *_indent(body, 4)]


def _section(key: str, items: list[tuple[str, str | None]], under: str = "") -> list[str]:
    """A list of entries, each with its note as a comment (lined up after the longest entry) and the ``under``
    line beneath it (an entry's options)."""
    if not items:
        return []
    width = max(len(text) for text, _ in items) + 2
    lines = [f"{key}:\n"]
    for text, note in items:
        comment = f"{' ' * (width - len(text))}# {note}" if note else ""
        lines += [f"  - {text}{comment}\n", *([f"      {under}\n"] if under else [])]
    return lines


def _indent(lines: list[str], spaces: int) -> list[str]:
    return [" " * spaces + line for line in lines]


def _relative(path: Path, root: Path) -> str:
    return (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()
