"""The ``pruneflow`` command line.

    pruneflow run    [--params params.yaml] [-S key.path=value ...]   run the Prefect flow prune_pipeline
    pruneflow serve  [--cron "0 2 * * *"] [--interval S] [--params ...] [-S ...]  serve it as a Prefect deployment
    pruneflow stage  NAME [--method M] [--params ...] [-S ...]        run one stage (dvc.yaml calls this)
    pruneflow dvc-yaml [--write] [--params ...]                       dvc.yaml from the stage table (print or write)
    pruneflow search-worker --method M [--n-trials N] [--params ...]  add trials to the method's shared study
    pruneflow methods                                                 list the pruning methods
    pruneflow prune  --model M --method NAME [--ratio R] [--json]     prune once: MACs/params before/after, layers
    pruneflow export --run-id ID [--platform P] [--params ...] [-S ...]  re-export a logged method run for a platform
    pruneflow ui     [--port 5000]                                    MLflow UI on 127.0.0.1
    pruneflow dashboard [--port 8080]                                 Optuna dashboard of the studies on 127.0.0.1
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


def _config(params: Path, overrides: list[str] | None) -> tuple[PipelineConfig, Path]:
    try:
        return load_config(params, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(params: Path = PARAMS, overrides: list[str] | None = SET) -> None:
    """Run the whole pipeline (Prefect flow ``prune_pipeline``), logging everything to MLflow."""
    cfg, root = _config(params, overrides)
    from pruneflow.flows.pipeline import preflight, prune_pipeline

    try:  # bad data, model or tracking URI: one line and exit 2 now, not a failed flow after baseline training
        preflight(cfg, root, lambda line: typer.echo(line, err=True))
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    from pruneflow.flows.servers import STATE_DIR
    from pruneflow.flows.watchdog import guard_children

    guard_children(root / STATE_DIR)  # stops the temporary Prefect server whenever this process ends
    try:
        with _sigterm_raises():
            result = prune_pipeline(params=str(params.resolve()), overrides=list(overrides or []))
    except Terminated:
        _end_own_runs(cfg, root, "KILLED")
        typer.echo("error: pipeline stopped by SIGTERM; its MLflow runs are marked KILLED", err=True)
        sys.stderr.flush()
        os._exit(143)  # not a normal exit: that would wait for the training threads to end
    except Exception as err:
        _end_own_runs(cfg, root, "FAILED")
        typer.echo(f"error: pipeline failed: {type(err).__name__}: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo("\n" + (Path(result["run_dir"]) / "compare.md").read_text())
    typer.echo(f"Artifacts:    {result['run_dir']}")
    champion = result["champion"]
    if champion["method"] is None:
        typer.echo(f"Registered:   nothing: {champion['reason']}")
    else:
        typer.echo(f"Registered:   {champion['uri']} = {champion['name']} version {champion['version']} "
                   f"({champion['method']})")
    typer.echo(f"MLflow run:   {result['parent_run_id']} in experiment '{cfg.project.experiment}' "
               f"({result['tracking_uri']})")
    typer.echo(f"Open the UI:  pruneflow ui --params {params}   (or: make ui), then browse http://127.0.0.1:5000")


class Terminated(BaseException):
    """SIGTERM, as an exception, so that the pipeline's runs are marked before the process goes."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_own_runs(cfg: PipelineConfig, root: Path, status: str) -> None:
    """Mark the MLflow runs this process left RUNNING (method runs of tasks that were still going). A store that
    cannot be written now (a full disk) is left alone: the next run on the project ends them as orphans."""
    from mlflow.entities import RunStatus

    from pruneflow.concurrency import sqlite_file
    from pruneflow.layout import ProjectLayout
    from pruneflow.tasks.tracking import Tracker, tracking_uri

    layout = ProjectLayout(root, cfg)
    store = sqlite_file(tracking_uri(layout))
    if store is not None and not store.is_file():
        return  # the flow failed before it opened the store: no runs, and no empty store to leave behind
    with contextlib.suppress(Exception):
        Tracker.open(layout).end_own_runs(RunStatus.from_string(status))


@app.command()
def serve(
    params: Path = PARAMS, overrides: list[str] | None = SET,
    cron: str | None = typer.Option(None, help='cron schedule, e.g. "0 2 * * *" (every night at 2:00)'),
    interval: int | None = typer.Option(None, min=1, help="also (or instead) run every SECONDS"),
    timezone: str | None = typer.Option(None, help="IANA time zone of the schedule, e.g. Europe/Paris; default UTC"),
    name: str = typer.Option("pruneflow", help="deployment name: Prefect shows prune_pipeline/NAME"),
    port: int = typer.Option(4200, help="port of the Prefect server started on 127.0.0.1 when none is configured"),
) -> None:
    """Serve the pipeline as a Prefect deployment: runs on --cron/--interval and on demand, until Ctrl-C.

    Schedules need a real Prefect server: $PREFECT_API_URL if set, else the one `make servers` started in this
    project, else one started here on 127.0.0.1 for as long as this command runs. Scheduled runs log to MLflow
    like manual ones, tagged pruneflow.trigger=schedule.
    """
    _, root = _config(params, overrides)  # a bad key stops here, not in the first scheduled run at 2 a.m.
    from pruneflow.flows.servers import STATE_DIR, ServerError
    from pruneflow.flows.serving import deployment_schedules, serve_pipeline
    from pruneflow.flows.watchdog import guard_children

    try:
        schedules = deployment_schedules(cron, interval, timezone)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    guard_children(root / STATE_DIR)  # a Prefect server started here stops with this command, even on SIGKILL
    try:
        serve_pipeline(params.resolve(), list(overrides or []), schedules, name, port, root / STATE_DIR, typer.echo)
    except ServerError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@app.command()
def stage(name: str = typer.Argument(..., help="data (version the data), a stage of dvc.yaml, or compare (the table)"),
          params: Path = PARAMS, overrides: list[str] | None = SET,
          method: str | None = typer.Option(None, "--method", "-m", help="the method, for per-method stages")) -> None:
    """Run one stage alone, writing to runs/dvc/ (the fixed paths dvc.yaml declares); no Prefect, no MLflow.

    ``search`` starts a study of its own each time (runs/dvc/<method>/study.db, ``MethodRun.own_study``), so
    `dvc repro` chooses the same ratios from the same params and data whatever ran before."""
    cfg, root = _config(params, overrides)
    from pruneflow import stages, versioning
    from pruneflow.data import prepare_dataset
    from pruneflow.layout import ProjectLayout
    from pruneflow.preflight import check_model

    names = ["data", *stages.STAGES, "compare"]
    if name not in names:
        typer.echo(f"error: no stage {name}: choose one of {', '.join(names)}", err=True)
        raise typer.Exit(2)
    step = stages.STAGES.get(name)
    if step is not None and step.per_method and method not in cfg.methods:
        typer.echo(f"error: --method must be one of the configured methods: {', '.join(cfg.methods)}", err=True)
        raise typer.Exit(2)
    layout = ProjectLayout(root, cfg)
    try:
        if name == "data":
            versioning.add(root, prepare_dataset(cfg.data, layout.data_dir))
            return
        run = layout.dvc_run()
        if name == "compare":
            results = {m: stages.read_json(run.method_run(m).metrics_json) for m in cfg.methods}
            table = stages.compare(stages.read_json(run.baseline_metrics), results, cfg.evaluate.latency_batch_large,
                                   cfg.task)
            run.compare_md.write_text(table)
            typer.echo(table)
        elif step.per_method:
            step.run(run.method_run(method), stages.say)
        else:
            check_model(cfg, stages.load_data(cfg, run.data_dir))  # fails before training, not at its export
            step.run(run, stages.say)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        message = str(err)
        if isinstance(err, FileNotFoundError) and err.filename:  # an earlier stage's output: say so, not just Errno 2
            message = f"{err.filename} not found: run the stages before {name} first (dvc repro runs them in order)"
        typer.echo(f"error: stage {name}: {message}", err=True)
        raise typer.Exit(1) from None


@app.command("dvc-yaml")
def dvc_yaml(params: Path = PARAMS,
             write: bool = typer.Option(False, "--write", help="write dvc.yaml beside the params file")) -> None:
    """Print dvc.yaml as the stage table (``pruneflow.stages.STAGES``) declares it, or --write it: run this after
    changing a stage's reads, writes or params."""
    cfg, root = _config(params, [])
    from pruneflow.dvcfile import render

    text = render(cfg, root)
    if write:
        (root / "dvc.yaml").write_text(text)
        typer.echo(f"wrote {root / 'dvc.yaml'}")
    else:
        typer.echo(text, nl=False)


def _to_stderr(line: str) -> None:
    """Progress goes to stderr, so a command's stdout holds only its result."""
    typer.echo(line, err=True)


@app.command("search-worker")
def search_worker(
    method: str = typer.Option(..., "--method", "-m", help="the method whose study to add trials to"),
    params: Path = PARAMS, overrides: list[str] | None = SET,
    n_trials: int | None = typer.Option(None, "--n-trials", min=1, help="trials to add; default search.n_trials"),
    seed: int | None = typer.Option(None, help="sampler seed; default random, so workers try different ratios"),
) -> None:
    """Add trials to a method's Optuna study, beside a running pipeline or other workers.

    The study is the pipeline's: named from the data hash, model, method and search settings, kept in
    search.storage (or $PRUNEFLOW_SEARCH_STORAGE). With a PostgreSQL URL there, workers on several
    machines with the same params and data share one study, and the pipeline's search chooses among all
    their trials. Needs the versioned data (pruneflow stage data, or dvc pull); trains the baseline if
    this machine lacks it. Trials are not logged to MLflow (the pipeline's method run lists its own).
    """
    cfg, root = _config(params, overrides)
    if method not in cfg.methods:
        typer.echo(f"error: --method must be one of the configured methods: {', '.join(cfg.methods)}", err=True)
        raise typer.Exit(2)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from pruneflow import stages
    from pruneflow.layout import ProjectLayout
    from pruneflow.search import worker_id
    from pruneflow.versioning import DataVersion, read_md5

    fixed = stages.fixed_plan(cfg, method)
    if fixed is not None:
        typer.echo(f"error: {fixed.origin.note}, so the pipeline runs no search to add trials to", err=True)
        raise typer.Exit(2)
    layout = ProjectLayout(root, cfg)
    try:
        data = DataVersion(layout.dataset_dir, read_md5(layout.dataset_dir))
        if not layout.dataset_dir.is_dir():
            raise FileNotFoundError(f"{layout.dataset_dir} is missing: `dvc pull` it or run `pruneflow stage data`")
        project = stages.project_run(layout, data, layout.runs_dir)  # a worker adds trials, it writes no run files
        stages.ensure_baseline(project, log=_to_stderr)
        run = project.method_run(method, trial_callbacks=(stages.trial_progress(method, _to_stderr),))
        name, storage = stages.study_name(cfg, method, data.md5), layout.study_storage
        trials = n_trials or cfg.search.n_trials
        _to_stderr(f"search-worker {worker_id()}: {trials} trial(s) in study {name} at "
                   f"{make_url(storage).render_as_string(hide_password=True)}")
        stages.search_worker(run, trials, seed if seed is not None else random.SystemRandom().randrange(2**31))
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, SQLAlchemyError) as err:
        typer.echo(f"error: search-worker: {str(err).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"search-worker {worker_id()}: added {trials} trial(s) to study {name}")


@app.command()
def methods() -> None:
    """List the registered pruning methods."""
    from pruneflow.methods import METHODS

    for name, cls in METHODS.items():
        typer.echo(f"{name:<24}{cls.description}")


@app.command()
def prune(
    model: str | None = typer.Option(
        None, help="model name: registered, torchvision:<name> or package.module:function"),
    method: str = typer.Option(..., help="pruning method (see: pruneflow methods)"),
    ratio: float = typer.Option(0.5, help="share of channels to remove, in [0, 1)"),
    dataset: str = typer.Option("digits", help="sets a fresh model's channels/classes/input size; feeds calibration"),
    data_path: Path | None = typer.Option(
        None, help="the dataset's data.path (imagefolder root, torchvision files)"),
    data_dir: Path = typer.Option(Path("data"), help="where prepared datasets live (project.data_dir)"),
    checkpoint: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                              help="prune trained weights: a model file pruneflow wrote, or a "
                                                   "state_dict for --model"),
    calib_batches: int = typer.Option(4, min=1, help="training batches given to data-driven methods"),
    round_to: str = typer.Option(
        "auto", help="auto: each layer's count at a latency step edge measured on this machine (as the pipeline's "
                     "prune.round_to default); or a multiple (8, 16; 1: no rounding)"),
    input_size: int | None = typer.Option(
        None, min=1, help="side of the square input; default: the data's or checkpoint's"),
    channels: int | None = typer.Option(None, min=1, help="input channels; default: the data's"),
    classes: int | None = typer.Option(None, min=1, help="classes; default: the data's"),
    out: Path | None = typer.Option(None, dir_okay=False, help="write the pruned model here (a model file)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
) -> None:
    """Prune a fresh (or --checkpoint) model once and print MACs/params before and after, layer by layer.

    No project, training or tracking: a quick look at what a method does to a model. With --channels, --classes
    and --input-size a model needs no dataset; else --dataset sizes what they leave open. Data-driven methods
    calibrate on --dataset, fitted to the model's input (grey repeated to RGB, images resized).
    """
    import json

    from pruneflow.config import DataConfig
    from pruneflow.data import DATASETS
    from pruneflow.inspection import format_report, prune_once
    from pruneflow.latency.rounding import AUTO
    from pruneflow.methods import create_method
    from pruneflow.models import resolve_model
    from pruneflow.plan import PrunePlan

    def fail(message: object, code: int) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code)

    try:
        if model is None and checkpoint is None:
            raise ValueError("give --model or --checkpoint")
        if not 0 <= ratio < 1:
            raise ValueError(f"--ratio must be in [0, 1), got {ratio}")
        if round_to != AUTO and not (round_to.isdigit() and int(round_to) >= 1):
            raise ValueError(f"--round-to must be auto or a whole number >= 1, got {round_to!r}")
        pruner = create_method(method, {})
        if pruner.recorder() is not None:
            raise ValueError(f"method {method} scores filters by statistics recorded while training the baseline; "
                             "run it through the pipeline")
        if model is not None:
            resolve_model(model)
        DATASETS.get(dataset)
    except ValueError as err:
        fail(err, 2)
    try:
        plan = PrunePlan(ratio=ratio, round_to=round_to if round_to == AUTO else int(round_to))
        report = prune_once(pruner, plan, model, checkpoint,
                            DataConfig(dataset=dataset, path=str(data_path) if data_path else None), data_dir,
                            calib_batches, input_size, log=lambda line: typer.echo(line, err=True),  # stdout: report
                            in_channels=channels, num_classes=classes, out=out)
    except (OSError, ValueError, RuntimeError) as err:
        fail(err, 1)
    typer.echo(json.dumps(report) if as_json else format_report(report))


@app.command("export")
def export_run(
    run_id: str = typer.Option(..., "--run-id", help="an MLflow method run of a pipeline (its child run per method)"),
    platform: str | None = typer.Option(None, help="cpu | jetson | generic-gpu; default: params' export.platform"),
    params: Path = PARAMS, overrides: list[str] | None = SET,
) -> None:
    """Re-export a logged method run's model for a platform without rerunning the pipeline; logs the files to that run.

    The model is rebuilt from the run's retrained.pt; export/evaluate settings and the data come from --params.
    """
    cfg, root = _config(params, [*(overrides or []), *([f"export.platform={platform}"] if platform else [])])
    from pruneflow.tasks.deploy import reexport

    try:
        result = reexport(root, cfg, run_id, log=lambda line: typer.echo(line, err=True))
    except (LookupError, ValueError, RuntimeError, OSError) as err:
        typer.echo(f"error: export: {err}", err=True)
        raise typer.Exit(1) from None
    folder = Path(result["files"]["onnx"]).parent
    typer.echo((folder / "report.md").read_text())
    typer.echo(f"Files:        {folder}  (logged to run {run_id} as export/{cfg.export.platform}/)")


@app.command()
def ui(params: Path = PARAMS, port: int = typer.Option(5000, help="port on 127.0.0.1")) -> None:
    """Start the MLflow UI on 127.0.0.1 against the project's tracking store (as ``make servers`` starts MLflow)."""
    cfg, root = _config(params, [])
    from pruneflow.flows.servers import HOST, STATE_DIR, mlflow_command, port_free
    from pruneflow.flows.watchdog import guard_children
    from pruneflow.layout import ProjectLayout
    from pruneflow.tasks.tracking import tracking_uri

    if not port_free(port):
        typer.echo(f"error: --port {port}: something already listens on {HOST}:{port} (another pruneflow ui?); stop "
                   "it or choose another port", err=True)
        raise typer.Exit(1)
    uri = tracking_uri(ProjectLayout(root, cfg))
    guard_children(root / STATE_DIR)  # the MLflow server stops with this command, even on SIGKILL
    typer.echo(f"MLflow UI for {uri} at http://{HOST}:{port} (Ctrl-C stops it)")
    command, env = mlflow_command("ui", uri, port)
    raise typer.Exit(_serve(command, env))


@app.command()
def dashboard(params: Path = PARAMS, port: int = typer.Option(8080, help="port on 127.0.0.1")) -> None:
    """Start optuna-dashboard on 127.0.0.1 against the project's study storage (search.storage, else
    runs/optuna.db): every method's study, its trials, history and parameter importances."""
    cfg, root = _config(params, [])
    from sqlalchemy.engine import make_url

    from pruneflow.concurrency import sqlite_file
    from pruneflow.flows.servers import HOST, QUIET, STATE_DIR
    from pruneflow.flows.watchdog import guard_children
    from pruneflow.layout import ProjectLayout

    storage = ProjectLayout(root, cfg).study_storage
    database = sqlite_file(storage)
    if database is not None and not database.is_file():  # the dashboard would create an empty one and show nothing
        typer.echo(f"error: no study storage at {database} yet: run the pipeline first (pruneflow run), or point "
                   "search.storage at the studies", err=True)
        raise typer.Exit(1)
    shown = make_url(storage).render_as_string(hide_password=True)
    guard_children(root / STATE_DIR)  # the dashboard stops with this command, even on SIGKILL
    typer.echo(f"Optuna dashboard for {shown} at http://{HOST}:{port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "optuna_dashboard._cli", storage, "--host", HOST, "--port", str(port)]
    raise typer.Exit(_serve(command, QUIET))


def _serve(command: list[str], env: dict[str, str]) -> int:
    """Run a server until it exits. Ctrl-C stops it the way it expects, SIGINT, and waits for it: the server's
    workers have stopped when this command returns. (``subprocess.call`` would SIGKILL the server's master on
    Ctrl-C, and gunicorn's workers kept answering until they noticed.)"""
    server = subprocess.Popen(command, env={**os.environ, **env})
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        try:
            return server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            return server.wait()


if __name__ == "__main__":
    app()
