"""``pruneflow serve``: the pipeline as a Prefect deployment, run on demand and on its schedules.

Scheduled runs must be told apart from manual ones in MLflow (tag ``pruneflow.trigger``). The deployment's
``trigger`` parameter is ``manual`` (a run started from the UI or with ``prefect deployment run``) and every
schedule overrides it with ``schedule``: Prefect merges a schedule's parameters into the runs it creates,
so the tag says what started a run without the flow asking Prefect. prefect.yaml declares the same
deployment for ``prefect deploy`` and a process work pool.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from pathlib import Path

from prefect.schedules import Cron, Interval, Schedule

from pruneflow.flows.servers import prefect_api

SCHEDULED = {"trigger": "schedule"}  # what every schedule passes to the runs it creates


def deployment_schedules(cron: str | None, interval: int | None, timezone: str | None) -> list[Schedule]:
    """A schedule per given ``cron`` string and ``interval`` (seconds), in ``timezone`` (IANA; default UTC).

    Raises ValueError naming the bad option, before any server is started.
    """
    if timezone is not None:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--timezone: unknown time zone {timezone!r} (IANA names, e.g. Europe/Paris)") from None
    found = []
    if cron is not None:
        try:
            found.append(Cron(cron, timezone=timezone, parameters=SCHEDULED))
        except ValueError as err:
            raise ValueError(f"--cron: {err}") from None
    if interval is not None:
        found.append(Interval(interval, timezone=timezone, parameters=SCHEDULED))
    return found


def serve_pipeline(params: Path, overrides: list[str], schedules: list[Schedule], name: str, port: int,
                   state_dir: Path, log: Callable[[str], None]) -> None:
    """Register the deployment ``prune_pipeline/<name>`` and run its flow runs here until interrupted.

    The server is found or started by ``servers.prefect_api``. Prefect pauses the schedules when serving
    stops, so no run piles up while nothing would execute it.
    """
    from prefect.types.entrypoint import EntrypointType

    with prefect_api(state_dir, port, log) as api:
        from pruneflow.flows.pipeline import prune_pipeline

        log(f"Prefect API {api}; deployment prune_pipeline/{name}"
            + (f", schedules: {', '.join(describe(s) for s in schedules)}" if schedules else ", no schedule"))
        prune_pipeline.serve(name=name, schedules=schedules or None, tags=["pruneflow"],
                             parameters={"params": str(params), "overrides": overrides, "trigger": "manual"},
                             entrypoint_type=EntrypointType.MODULE_PATH)  # the installed package, from any folder


def describe(schedule: Schedule) -> str:
    when = f"cron {schedule.cron!r}" if schedule.cron else f"every {schedule.interval}"
    return f"{when} ({schedule.timezone or 'UTC'})"
