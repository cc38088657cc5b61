"""How the CLI shows things to people (rich tables) and to programs (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from routines_client._models import Routine, RoutineRun, format_time

STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "red",
    "missed": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "waiting": "magenta",
    "retrying": "yellow",
    "queued": "blue",
    "enabled": "green",
    "disabled": "yellow",
    "completed": "dim",
}


class Output:
    """stdout for results (a table, YAML, or JSON with ``--json``), stderr for progress and errors."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # Piped output is not cut to 80 columns: tables keep one line per row for grep and friends.
        self.out = Console(highlight=False)
        if not self.out.is_terminal:
            self.out = Console(highlight=False, width=250)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
        sys.stdout.flush()

    def json_line(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def line(self, text: str, style: str | None = None) -> None:
        """A line of plain text (never read as rich markup)."""
        self.out.print(text, style=style, markup=False, soft_wrap=True)

    def markup(self, text: str) -> None:
        self.out.print(text, soft_wrap=True)

    def note(self, text: str) -> None:
        """Progress and remarks, on stderr so that stdout stays the result."""
        self.err.print(text, markup=False)

    def yaml(self, value: Any) -> None:
        text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip()
        self.out.print(text, markup=False, soft_wrap=True)


def when(value: datetime | None) -> str:
    return format_time(value) if value is not None else "-"


def status(text: str | None) -> str:
    text = text or "-"
    style = STATUS_STYLE.get(text)
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def trigger_text(trigger: Any) -> str:
    data = trigger.to_dict() if hasattr(trigger, "to_dict") else dict(trigger or {})
    kind = data.get("type")
    if kind == "schedule":
        return f"{data.get('cron_expression')} ({data.get('time_zone') or 'UTC'})"
    if kind == "timer":
        return f"once at {data.get('at')}"
    if kind == "webhook":
        return f"webhook ({data.get('signature') or 'standard-webhooks'})"
    return str(kind)


def routines_table(routines: Iterable[Routine]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "ID", "STATE", "TRIGGER", "NEXT FIRE"):
        table.add_column(column, overflow="fold")
    for r in routines:
        table.add_row(
            escape(r.name),
            escape(r.id or "-"),
            status(r.state),
            escape(trigger_text(r.trigger)),
            when(r.next_fire_at),
        )
    return table


def runs_table(runs: Iterable[RoutineRun]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RUN ID", "STATUS", "TRIGGER", "SCHEDULED FOR", "ATTEMPT", "ENDED", "ERROR"):
        table.add_column(column, overflow="fold")
    for run in runs:
        table.add_row(*run_cells(run))
    return table


def run_cells(run: RoutineRun) -> list[str]:
    attempt = f"{run.attempt or 0}/{run.max_attempts}" if run.max_attempts else str(run.attempt or 0)
    return [
        escape(run.id),
        status(run.status),
        escape(run.trigger or "-"),
        when(run.scheduled_for),
        attempt,
        when(run.ended_at),
        escape(_short(run.error_message)),
    ]


def run_line(run: RoutineRun) -> str:
    """A run as one line of markup (``runs --follow``)."""
    cells = run_cells(run)
    return "  ".join(c for c in cells if c and c != "-")


def run_detail(run: RoutineRun) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("STEP", "STATUS", "ATTEMPT", "STARTED", "ENDED", "OUTPUT / ERROR"):
        table.add_column(column, overflow="fold")
    for step in run.actions:
        table.add_row(
            escape(step.id or str(step.index)),
            status(step.status),
            str(step.attempt) if step.attempt is not None else "-",
            when(step.started_at),
            when(step.ended_at),
            escape(_short(step.error_message or step.output or step.comment, 120)),
        )
    return table


def fires_table(fires: list[datetime], time_zone: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("UTC")
    try:
        zone: ZoneInfo | None = None if time_zone == "UTC" else ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if zone is not None:
        table.add_column(time_zone)
    for fire in fires:
        row = [format_time(fire)]
        if zone is not None:
            row.append(fire.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z"))
        table.add_row(*row)
    return table


def _short(text: str | None, limit: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
