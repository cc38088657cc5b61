"""The ``routines`` command: the Routines API from a shell, and routines as code (``apply``).

Endpoint and key: ``--endpoint`` / ``--key``, else ``ROUTINES_ENDPOINT`` / ``ROUTINES_KEY``, else the
local host (``http://127.0.0.1:7071``, no key). A ROUTINE argument is an id (``rt_...``) or a name.

Exit status (also in ``routines --help``): see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from routines_client._client import RoutinesClient
from routines_client._errors import (
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    RoutinesError,
    ValidationError,
)
from routines_client._models import Routine, RoutineRun
from routines_client._version import VERSION
from routines_client.cli import _apply, _files, _render
from routines_client.cli._files import NAME, InputError
from routines_client.cli._render import Output

EXIT_OK = 0
EXIT_ERROR = 1  # an API error not listed below (5xx, 401, ...), or a prompt answered "no"
EXIT_USAGE = 2  # bad arguments, invalid routine files, or a request the API refused as invalid (400/422)
EXIT_NOT_FOUND = 3  # no such routine, run or step (404)
EXIT_CONFLICT = 4  # 409 (name taken, not waiting, completed timer) or 412 (changed since read)
EXIT_UNREACHABLE = 5  # the endpoint did not answer (connection refused, DNS, TLS, timeout)
EXIT_RUN_FAILED = 6  # dispatch --wait: the run ended other than succeeded
EXIT_TIMEOUT = 7  # dispatch --wait: still not finished after --timeout
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = f"""exit status:
  {EXIT_OK}    success
  {EXIT_ERROR}    an API error (5xx, 401, ...), or a confirmation answered no
  {EXIT_USAGE}    bad arguments, invalid routine files, or a request refused as invalid (400, 422)
  {EXIT_NOT_FOUND}    not found (404)
  {EXIT_CONFLICT}    conflict (409) or changed since read (412)
  {EXIT_UNREACHABLE}    the endpoint cannot be reached
  {EXIT_RUN_FAILED}    dispatch --wait: the run did not succeed
  {EXIT_TIMEOUT}    dispatch --wait: timed out waiting
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""

DEFAULT_ENDPOINT = "http://127.0.0.1:7071"


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- commands -------------------------------------------------------------------------------------


def cmd_list(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routines = list(client.list_routines(state=args.state))
    if out.as_json:
        out.json([r.to_dict() for r in routines])
    elif routines:
        out.out.print(_render.routines_table(routines))
    else:
        out.note("no routines")
    return EXIT_OK


def cmd_get(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine = resolve(client, args.routine)
    if out.as_json:
        out.json(routine.to_dict())
    else:
        out.yaml(routine.to_dict())
    return EXIT_OK


def cmd_create(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    docs = _files.load([args.file])
    created = []
    for doc in docs:
        routine = client.create_routine(doc.body)
        created.append(routine)
        if not out.as_json:
            out.line(f"created {routine.name} ({routine.id}), next fire {_render.when(routine.next_fire_at)}")
    if out.as_json:
        out.json([r.to_dict() for r in created] if len(created) != 1 else created[0].to_dict())
    return EXIT_OK


def cmd_apply(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    docs = _files.load(args.file)
    _apply.check_triggers(client, docs)
    changes = _apply.plan(docs, list(client.list_routines()), args.prune)
    count = sum(c.kind != "unchanged" for c in changes)
    unchanged = [c.name for c in changes if c.kind == "unchanged"]
    files = len(_files.collect(args.file))
    summary: dict[str, Any] = {
        "dry_run": args.dry_run,
        "changes": [c.as_json() for c in changes if c.kind != "unchanged"],
        "unchanged": unchanged,
        "created": [],
        "updated": [],
        "deleted": [],
    }
    if not out.as_json:
        out.note(f"validated {len(docs)} routine(s) in {files} file(s)")
        _apply.show_plan(out, changes)
    if count == 0:
        if out.as_json:
            out.json(summary)
        else:
            out.line(f"no changes: {len(unchanged)} routine(s) up to date")
        return EXIT_OK
    kinds = [c.kind for c in changes]
    counts = ", ".join(f"{kinds.count(k)} to {k}" for k in ("create", "update", "delete"))
    if args.dry_run:
        if out.as_json:
            out.json(summary)
        else:
            out.line(f"dry run: {counts}, {len(unchanged)} unchanged; nothing was changed")
        return EXIT_OK
    deletes = [c.name for c in changes if c.kind == "delete"]
    if deletes and not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"--prune would delete {len(deletes)} routine(s) ({', '.join(deletes)}); "
                "confirm with --yes (there is no terminal to ask). Nothing was changed.",
                EXIT_USAGE,
            )
        answer = input(f"Delete {len(deletes)} routine(s) not in the files ({', '.join(deletes)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("aborted: nothing was changed", EXIT_ERROR)
    if not out.as_json:
        out.note(f"applying {counts} (all or nothing: a failure undoes this run's creates and updates)")
    try:
        done = _apply.execute(client, changes, out.note)
    except _apply.ApplyFailed as failed:
        if not isinstance(failed.cause, RoutinesError):
            out.note(f"apply stopped: {failed.rolled_back}")
            raise failed.cause from None
        message = f"apply stopped ({failed.rolled_back}): {failed.cause.message}"
        raise CliError(message, exit_code(failed.cause)) from None
    summary.update(done)
    if out.as_json:
        out.json(summary)
    else:
        out.line(
            f"applied: {len(done['created'])} created, {len(done['updated'])} updated, "
            f"{len(done['deleted'])} deleted, {len(unchanged)} unchanged"
        )
    return EXIT_OK


def cmd_delete(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine_id = resolve_id(client, args.routine)
    client.delete_routine(routine_id)
    if out.as_json:
        out.json({"deleted": routine_id})
    else:
        out.line(f"deleted {args.routine}" + (f" ({routine_id})" if routine_id != args.routine else ""))
    return EXIT_OK


def cmd_state(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine_id = resolve_id(client, args.routine)
    call = client.enable_routine if args.command == "enable" else client.disable_routine
    routine = call(routine_id)
    if out.as_json:
        out.json(routine.to_dict())
    else:
        next_fire = _render.when(routine.next_fire_at)
        out.line(f"{routine.name} ({routine.id}) is {routine.state}, next fire {next_fire}")
    return EXIT_OK


def cmd_dispatch(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine_id = resolve_id(client, args.routine)
    run = client.dispatch_routine(routine_id, input=parse_input(args.input))
    if not args.wait:
        if out.as_json:
            out.json(run.to_dict())
        else:
            out.line(f"dispatched run {run.id} ({run.status})")
        return EXIT_OK
    run = wait_for_run(client, routine_id, run, args.timeout, args.interval, out)
    if out.as_json:
        out.json(run.to_dict())
    else:
        out.markup(f"run {run.id} {_render.status(run.status)} after {run.attempt or 0} attempt(s)")
        if run.actions:
            out.out.print(_render.run_detail(run))
        if run.error_message:
            out.line(f"error: {run.error_message}")
    if not run.is_terminal:
        return EXIT_TIMEOUT
    return EXIT_OK if run.status == "succeeded" else EXIT_RUN_FAILED


def wait_for_run(
    client: RoutinesClient, routine_id: str, run: RoutineRun, timeout: float, interval: float, out: Output
) -> RoutineRun:
    """Poll the run until it ends or ``timeout`` passes: a spinner on a terminal, else a line on stderr
    for each status it goes through."""
    deadline = time.monotonic() + timeout
    live = out.err.is_terminal and not out.as_json
    seen: str | None = None
    spinner = out.err.status(f"run {run.id}: {run.status}") if live else None
    try:
        if spinner is not None:
            spinner.start()
        while True:
            if spinner is not None:
                spinner.update(f"run {run.id}: {run.status} (attempt {run.attempt or 0})")
            elif run.status != seen and not out.as_json:
                out.note(f"run {run.id}: {run.status}")
            seen = run.status
            if run.is_terminal or time.monotonic() >= deadline:
                return run
            time.sleep(interval)
            run = client.get_routine_run(routine_id, run.id)
    finally:
        if spinner is not None:
            spinner.stop()


def cmd_runs(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine_id = resolve_id(client, args.routine)
    if args.follow:
        return follow_runs(client, routine_id, args, out)
    runs = list(_take(client.list_routine_runs(routine_id, status=args.status), args.limit))
    if out.as_json:
        out.json([r.to_dict() for r in runs])
    elif runs:
        out.out.print(_render.runs_table(runs))
    else:
        out.note("no runs")
    return EXIT_OK


def follow_runs(client: RoutinesClient, routine_id: str, args: argparse.Namespace, out: Output) -> int:
    """Print the latest runs, then every new run and every status change as it happens, until Ctrl-C."""
    shown: dict[str, str] = {}
    first = True
    try:
        while True:
            page = list(_take(client.list_routine_runs(routine_id, status=args.status), args.limit))
            for run in reversed(page):  # oldest first, so the stream reads in time order
                if shown.get(run.id) == run.status:
                    continue
                shown[run.id] = run.status
                if out.as_json:
                    out.json_line(run.to_dict())
                else:
                    out.markup(_render.run_line(run))
            if first and not out.as_json:
                out.note("following new runs (Ctrl-C to stop)")
                first = False
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_run(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    run = client.get_routine_run(resolve_id(client, args.routine), args.run_id)
    if out.as_json:
        out.json(run.to_dict())
        return EXIT_OK
    data = run.to_dict()
    data.pop("actions", None)
    out.yaml(data)
    if run.actions:
        out.line("")
        out.out.print(_render.run_detail(run))
    return EXIT_OK


def cmd_decide(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    routine_id = resolve_id(client, args.routine)
    call = client.approve_step if args.command == "approve" else client.reject_step
    run = call(routine_id, args.run_id, args.step, comment=args.comment)
    if out.as_json:
        out.json(run.to_dict())
    else:
        verb = "approved" if args.command == "approve" else "rejected"
        out.markup(f"{verb} step {args.step} of run {run.id}; the run is {_render.status(run.status)}")
    return EXIT_OK


def cmd_preview(client: RoutinesClient, args: argparse.Namespace, out: Output) -> int:
    trigger = {"type": "schedule", "cron_expression": args.cron, "time_zone": args.tz}
    fires = client.preview_fires(trigger, after=args.after, count=args.n)
    if out.as_json:
        out.json([_render.when(f) for f in fires])
    else:
        out.out.print(_render.fires_table(fires, args.tz))
    return EXIT_OK


# --- helpers --------------------------------------------------------------------------------------


def resolve(client: RoutinesClient, ref: str) -> Routine:
    """The routine named or identified by ``ref`` (names never contain ``_``, ids do)."""
    if NAME.match(ref):
        for routine in client.list_routines():
            if routine.name == ref:
                return routine
        raise CliError(f"no routine named {ref!r}", EXIT_NOT_FOUND)
    return client.get_routine(ref)


def resolve_id(client: RoutinesClient, ref: str) -> str:
    if NAME.match(ref):
        routine_id = resolve(client, ref).id
        assert routine_id is not None
        return routine_id
    return ref


def parse_input(text: str | None) -> Any:
    """``--input``: a JSON object or JSON string as written; any other text as a plain string."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict | str) else text


def _take(items: Any, limit: int) -> Iterator[Any]:
    for index, item in enumerate(items):
        if limit and index >= limit:
            return
        yield item


def exit_code(exc: RoutinesError) -> int:
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, ConflictError | PreconditionFailedError):
        return EXIT_CONFLICT
    if isinstance(exc, ValidationError):
        return EXIT_USAGE
    return EXIT_ERROR


def unreachable_reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words, from the chain of errors under azure-core's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, ssl.SSLError):
            return f"TLS error ({current.reason or current})"
        if isinstance(current, TimeoutError | socket.timeout):
            return "timed out"
        nested = getattr(current, "inner_exception", None)
        current = nested if isinstance(nested, BaseException) else (current.__cause__ or current.__context__)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "timed out" in text.lower():
        return "timed out"
    if "refused" in text.lower():
        return "connection refused"
    return text[:200]


# --- parser ---------------------------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Callable[[Any], Any] = (lambda _: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument(
        "--endpoint",
        default=default(None),
        help=f"the app's base URL (env ROUTINES_ENDPOINT; default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument("--key", default=default(None), help="function key (env ROUTINES_KEY)")
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="JSON output for programs"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routines",
        description="Manage Routines (agent schedules) over its HTTP API, and apply routines as code.",
        epilog=EXIT_CODES + "\nROUTINE is a routine id (rt_...) or its name.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"routines-client {VERSION}")
    _options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("list", cmd_list, "list routines")
    p.add_argument("--state", choices=["enabled", "disabled", "completed"])
    p = command("get", cmd_get, "show a routine (YAML, or JSON with --json)")
    p.add_argument("routine", metavar="ROUTINE")
    p = command("create", cmd_create, "create the routine(s) of a YAML or JSON file")
    p.add_argument("-f", "--file", required=True, metavar="FILE")
    p = command(
        "apply",
        cmd_apply,
        "make the routines match YAML/JSON files (matched by name): prints the changes, then creates "
        "and updates; all files are checked first, and a run applies all its changes or none",
    )
    p.add_argument("-f", "--file", required=True, action="append", metavar="FILE|DIR", help="repeatable")
    p.add_argument("--prune", action="store_true", help="also delete routines that no file names")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask before --prune deletes")
    p.add_argument("--dry-run", action="store_true", help="print the changes, change nothing")
    p = command("delete", cmd_delete, "delete a routine (its runs stay until the retention)")
    p.add_argument("routine", metavar="ROUTINE")
    for name, text in (("enable", "resume a routine"), ("disable", "pause a routine")):
        command(name, cmd_state, text).add_argument("routine", metavar="ROUTINE")
    p = command("dispatch", cmd_dispatch, "start a manual run now")
    p.add_argument("routine", metavar="ROUTINE")
    p.add_argument(
        "--input", metavar="JSON", help="replaces the input: a JSON object or string, or plain text"
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for the run to end (exit 6 if it did not succeed)"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, metavar="SECONDS", help="with --wait (default 600)"
    )
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)
    p = command("runs", cmd_runs, "list a routine's runs, newest first")
    p.add_argument("routine", metavar="ROUTINE")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20; 0: all)")
    p.add_argument("--follow", action="store_true", help="keep printing new runs and status changes")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="--follow poll interval")
    p = command("run", cmd_run, "show one run and its steps")
    p.add_argument("routine", metavar="ROUTINE")
    p.add_argument("run_id", metavar="RUN_ID")
    for name, text in (
        ("approve", "approve a waiting approval step"),
        ("reject", "reject a waiting approval step"),
    ):
        p = command(name, cmd_decide, text)
        p.add_argument("routine", metavar="ROUTINE")
        p.add_argument("run_id", metavar="RUN_ID")
        p.add_argument("step", metavar="STEP")
        p.add_argument("--comment")
    p = command("preview", cmd_preview, "show the next fires of a cron expression")
    p.add_argument("cron", metavar="CRON")
    p.add_argument("--tz", default="UTC", help="IANA time zone (default UTC)")
    p.add_argument("-n", type=int, default=10, help="how many fires (default 10, at most 100)")
    p.add_argument("--after", help="RFC 3339 start (default now)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    endpoint = args.endpoint or os.environ.get("ROUTINES_ENDPOINT") or DEFAULT_ENDPOINT
    key = args.key or os.environ.get("ROUTINES_KEY") or None
    try:
        client = RoutinesClient(
            endpoint,
            AzureKeyCredential(key) if key else None,
            retry_connect=1,
            connection_timeout=10,
            read_timeout=60,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        with client:
            code: int = args.handler(client, args, out)
            return code
    except InputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {len(exc.problems)} problem(s) found; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except RoutinesError as exc:
        return _fail(exc.message, exit_code(exc))
    except (ServiceRequestError, ServiceResponseError) as exc:
        return _fail(f"cannot reach {client.endpoint}: {unreachable_reason(exc)}", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code
