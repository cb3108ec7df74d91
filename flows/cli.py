"""The ``pruneflow`` command line.

    pruneflow run    [--params params.yaml] [-S key.path=value ...]   run the Prefect flow prune_pipeline
    pruneflow stage  NAME [--method M] [--params ...] [-S ...]        run one stage (dvc.yaml calls this)
    pruneflow methods                                                 list the pruning methods
    pruneflow ui     [--port 5000]                                    MLflow UI on 127.0.0.1
"""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

# Quiet, offline-friendly defaults; set before Prefect or MLflow is imported. Users' own values win.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)

from pruneflow.config import ConfigError, PipelineConfig, load_config  # noqa: E402

app = typer.Typer(help="pruneflow: automated pruning pipelines for CNNs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="params file; paths in it are relative to it")
SET = typer.Option(None, "--set", "-S", help="override a params key, e.g. -S train.epochs=3 (repeatable)")


def _config(params: Path, overrides: Optional[list[str]]) -> tuple[PipelineConfig, Path]:
    try:
        return load_config(params, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(params: Path = PARAMS, overrides: Optional[list[str]] = SET) -> None:
    """Run the whole pipeline (Prefect flow ``prune_pipeline``), logging everything to MLflow."""
    cfg, root = _config(params, overrides)
    from flows.pipeline import prune_pipeline

    try:
        result = prune_pipeline(params=str(params.resolve()), overrides=list(overrides or []))
    except Exception as err:
        typer.echo(f"error: pipeline failed: {type(err).__name__}: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo("\n" + (Path(result["run_dir"]) / "compare.md").read_text())
    typer.echo(f"Artifacts:    {result['run_dir']}")
    typer.echo(f"MLflow run:   {result['parent_run_id']} in experiment '{cfg.project.experiment}' ({result['tracking_uri']})")
    typer.echo(f"Open the UI:  pruneflow ui --params {params}   (or: make ui), then browse http://127.0.0.1:5000")


class Stage(str, Enum):
    data = "data"
    baseline = "baseline"
    search = "search"
    prune = "prune"
    retrain = "retrain"
    evaluate = "evaluate"
    export = "export"
    compare = "compare"


@app.command()
def stage(name: Stage = typer.Argument(..., help="which stage to run"), params: Path = PARAMS,
          overrides: Optional[list[str]] = SET,
          method: Optional[str] = typer.Option(None, "--method", "-m", help="the method, for per-method stages")) -> None:
    """Run one stage alone, writing to runs/dvc/ (the fixed paths dvc.yaml declares); no Prefect, no MLflow."""
    cfg, root = _config(params, overrides)
    from pruneflow import stages, versioning
    from pruneflow.data import prepare_dataset
    from pruneflow.layout import ProjectLayout

    layout = ProjectLayout(root, cfg)
    base_dir, data_path = layout.dvc_run_dir / "baseline", layout.dataset_dir
    if name in (Stage.search, Stage.prune, Stage.retrain, Stage.evaluate, Stage.export):
        if method not in cfg.methods:
            typer.echo(f"error: --method must be one of the configured methods: {', '.join(cfg.methods)}", err=True)
            raise typer.Exit(2)
        out_dir = layout.method_dir(layout.dvc_run_dir, method)
    try:
        if name is Stage.data:
            versioning.add(root, prepare_dataset(cfg.data, layout.data_dir))
        elif name is Stage.baseline:
            stages.train_baseline(cfg, data_path, base_dir)
        elif name is Stage.search:
            study = stages.study_name(cfg, method, versioning.read_md5(data_path))
            stages.search(cfg, method, base_dir, data_path, out_dir, layout.study_storage, study)
        elif name is Stage.prune:
            ratio = stages.read_json(out_dir / "search.json")["ratio"]
            stages.prune(cfg, method, base_dir, ratio, data_path, out_dir)
        elif name is Stage.retrain:
            stages.retrain(cfg, method, out_dir / "pruned.pt", data_path, out_dir)
        elif name is Stage.evaluate:
            stages.evaluate_model(cfg, method, base_dir, out_dir / "retrained.pt", data_path, out_dir)
        elif name is Stage.export:
            stages.export(cfg, out_dir / "retrained.pt", data_path, out_dir)
        else:
            results = {m: stages.read_json(layout.method_dir(layout.dvc_run_dir, m) / "metrics.json") for m in cfg.methods}
            table = stages.compare(stages.read_json(base_dir / "metrics.json"), results)
            (layout.dvc_run_dir / "compare.md").write_text(table)
            typer.echo(table)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        typer.echo(f"error: stage {name.value}: {err}", err=True)
        raise typer.Exit(1) from None


@app.command()
def methods() -> None:
    """List the registered pruning methods."""
    from pruneflow.methods import METHODS

    for name, cls in METHODS.items():
        typer.echo(f"{name:<24}{cls.description}")


@app.command()
def ui(params: Path = PARAMS, port: int = typer.Option(5000, help="port on 127.0.0.1")) -> None:
    """Start the MLflow UI on 127.0.0.1 against the project's tracking store."""
    cfg, root = _config(params, [])
    from pruneflow.layout import ProjectLayout
    from tasks.tracking import tracking_uri

    uri = tracking_uri(ProjectLayout(root, cfg))
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", "127.0.0.1", "--port", str(port)]))


if __name__ == "__main__":
    app()
