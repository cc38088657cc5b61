"""Shared pieces of the benchmarks in ``bench/``: Azurite, a storage request counter, routine seeding,
the fake agent and devhost as processes, percentiles, plots and the ``docs/benchmarks.md`` sections.

Every benchmark is one command, ``.venv/bin/python bench/<name>.py [--quick]``: it starts what it needs
on 127.0.0.1 (Azurite in memory, the fake agent, devhost workers), prints its figures and writes its
section of ``docs/benchmarks.md`` (``--no-doc`` leaves the document alone). Raw data and process logs
go to ``bench/out/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from azure.data.tables import TableClient  # noqa: E402

from routines.azurite import Azurite, free_ports  # noqa: E402
from routines.config import Settings  # noqa: E402
from routines.models import (  # noqa: E402
    InvocationAction,
    Routine,
    RoutineState,
    ScheduleTrigger,
    TimerTrigger,
)

__all__ = ["ROOT", "InvocationAction", "Routine", "RoutineState", "ScheduleTrigger", "TimerTrigger"]
from routines.store import codec  # noqa: E402

OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
PYTHON = sys.executable
AGENT_SCRIPT = ROOT / "tests" / "fake_agent.py"
ROWS_PER_TRANSACTION = 100  # the entity-group transaction limit of Azure Tables


# --- command line ----------------------------------------------------------------------------------


def arguments(
    description: str, extra: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a minute or two")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    if extra:
        extra(parser)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


# --- Azurite and settings --------------------------------------------------------------------------


@contextlib.contextmanager
def azurite() -> Iterator[Azurite]:
    """Azurite in memory on free ports of 127.0.0.1, stopped at the end."""
    emulator = Azurite(None).start()
    try:
        yield emulator
    finally:
        emulator.stop()


def app_env(connection: str, prefix: str, queue: str, agent_url: str | None = None) -> dict[str, str]:
    """The app settings of one benchmark app: its own tables and queue, the HTTP agent backend."""
    env = {
        "AzureWebJobsStorage": connection,
        "ROUTINES_TABLE_PREFIX": prefix,
        "ROUTINES_QUEUE_NAME": queue,
        "ROUTINES_AGENT_BACKEND": "http",
        "ROUTINES_MIN_INTERVAL_SECONDS": "1",
    }
    if agent_url:
        env["ROUTINES_AGENT_ENDPOINT"] = agent_url
    return env


def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


# --- counting storage requests ---------------------------------------------------------------------


def request_kind(method: str, url: str) -> str:
    """A short name for one storage request: ``table get``, ``table batch``, ``queue send`` ..."""
    path = url.split("?", 1)[0]
    query = url.split("?", 1)[1] if "?" in url else ""
    if "$batch" in path:
        return "table batch"
    if "/messages" in path:
        if method == "POST":
            return "queue send"
        if method == "GET":
            return "queue receive" if "peekonly" not in query else "queue peek"
        if method == "DELETE":
            return "queue delete"
        if method == "PUT":
            return "queue update"
        return f"queue {method}"
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    if tail.startswith("Tables") or tail == "Tables":
        return "table create-table"
    if "(PartitionKey=" in tail:
        return {
            "GET": "table get",
            "PUT": "table replace",
            "MERGE": "table merge",
            "PATCH": "table merge",
            "DELETE": "table delete",
        }.get(method, f"table {method}")
    if method == "GET":
        return "table query"
    if method == "POST":
        return "table insert" if "(" not in tail else "table POST"
    return f"{method} {tail[:40]}"


class RequestCounter:
    """A ``raw_request_hook`` (``storage_clients(settings, hook=...)``) that counts every storage HTTP
    request by phase (set with ``phase(...)``, process-wide: ThreadPoolExecutor threads see it too)
    and by kind (``request_kind``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = "other"
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, request: Any) -> None:
        http = request.http_request
        kind = request_kind(http.method, http.url)
        with self._lock:
            self.counts[(self.current, kind)] += 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def total(self, phase: str | None = None) -> int:
        with self._lock:
            return sum(n for (p, _), n in self.counts.items() if phase is None or p == phase)

    def by_kind(self, phase: str | None = None) -> dict[str, int]:
        out: Counter[str] = Counter()
        with self._lock:
            for (p, kind), n in self.counts.items():
                if phase is None or p == phase:
                    out[kind] += n
        return dict(sorted(out.items()))

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()


# --- routines --------------------------------------------------------------------------------------


def second_cron(when: datetime) -> ScheduleTrigger:
    """A schedule whose only fire of the year is ``when`` (whole seconds)."""
    return ScheduleTrigger(
        type="schedule", cron_expression=f"{when.second} {when.minute} {when.hour} {when.day} {when.month} *"
    )


EVERY_SECOND = ScheduleTrigger(type="schedule", cron_expression="* * * * * *")


def routine_id(group: int, index: int) -> str:
    return f"rt_{group:04x}{index:012x}"


def make_routine(
    rid: str,
    trigger: ScheduleTrigger | TimerTrigger,
    due_at: datetime | None,
    now: datetime,
    *,
    agent: str = "noop",
    actions: Sequence[Any] | None = None,
    **fields: Any,
) -> Routine:
    return Routine(
        id=rid,
        name=f"b-{rid[3:]}",
        trigger=trigger,
        actions=list(actions or [InvocationAction(type="invocation", agent_id=agent, input={"n": rid})]),
        state=RoutineState.enabled,
        created_at=now,
        updated_at=now,
        version=1,
        next_fire_at=due_at,
        due_at=due_at,
        **fields,
    )


def seed(table: TableClient, routines: Sequence[Routine], threads: int = 4) -> float:
    """Insert routines with ``codec.create_routine_ops`` rows, many routines' rows per entity-group
    transaction (up to 100 rows, all in partition "r"), from a few threads. Returns the seconds taken."""
    batches: list[list[tuple[str, dict[str, Any]]]] = []
    batch: list[tuple[str, dict[str, Any]]] = []
    for routine in routines:
        rows = [("create", row) for kind, row, _ in codec.create_routine_ops(routine) if kind == "insert"]
        if len(batch) + len(rows) > ROWS_PER_TRANSACTION:
            batches.append(batch)
            batch = []
        batch.extend(rows)
    if batch:
        batches.append(batch)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(table.submit_transaction, batches))
    return time.monotonic() - started


# --- processes: the fake agent and devhost workers -------------------------------------------------


def _wait_for_line(process: subprocess.Popen[str], pattern: str, timeout: float, what: str) -> re.Match[str]:
    """Read the process's stdout until a line matches ``pattern``; raise if it exits or times out."""
    assert process.stdout is not None
    found: list[re.Match[str]] = []
    seen: list[str] = []

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                found.append(match)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        process.kill()
        raise RuntimeError(f"{what} did not start within {timeout:.0f} s: {''.join(seen)[-2000:]}")
    return found[0]


@dataclass
class AgentLine:
    t: float  # time.time() when the request arrived
    kind: str  # start | poll | cancel | other
    status: int
    idempotency_key: str | None
    attempt: int | None
    delay: float = 0.0  # seconds from the request's arrival to the whole answer sent

    @property
    def routine_id(self) -> str:
        return (self.idempotency_key or "").split(":", 1)[0]

    @property
    def scheduled_for(self) -> float:
        text = (self.idempotency_key or "").split(":", 1)[1]
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class AgentProcess:
    """The fake agent (``tests/fake_agent.py``) as its own process,
    echoing 200 at once, logging each request as a JSON line."""

    def __init__(self, log: Path, *extra: str) -> None:
        self.log = log
        log.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [PYTHON, str(AGENT_SCRIPT), "--port", "0", "--log", str(log), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.url = _wait_for_line(self.process, r"ready on (http://\S+)", 30, "fake agent").group(1)

    def lines(self) -> list[AgentLine]:
        out: list[AgentLine] = []
        if not self.log.exists():
            return out
        for raw in self.log.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(raw)
            except ValueError:
                continue  # a line being written
            out.append(
                AgentLine(
                    data["t"],
                    data["kind"],
                    data["status"],
                    data.get("idempotency_key"),
                    data.get("attempt"),
                    data.get("delay", 0.0),
                )
            )
        return out

    def starts(self) -> list[AgentLine]:
        return [line for line in self.lines() if line.kind == "start"]

    def stop(self) -> None:
        stop_process(self.process)


class Devhost:
    """``python -m routines.devhost --no-timers`` as a process: a dispatch worker polling one queue with
    the ``host.json`` settings (batch 16, new batch at 8 in flight, polling back-off up to 1 s)."""

    def __init__(self, env: dict[str, str], log: Path, timers: bool = False, python: str = PYTHON) -> None:
        self.env = env
        self.log = log
        self.timers = timers
        self.python = python
        self.port = 0  # the HTTP port of the last start
        self.process: subprocess.Popen[str] | None = None

    def start(self, wait: bool = True) -> Devhost:
        full_env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.port = free_ports(1)[0]
        args = [self.python, "-m", "routines.devhost", "--port", str(self.port)]
        if not self.timers:
            args.append("--no-timers")
        self._log_file = open(self.log, "a", encoding="utf-8")  # noqa: SIM115 - open while it runs
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.process is not None
        _wait_for_line(self.process, r"devhost ready on", timeout, "devhost")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing in flight is finished or released."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        with contextlib.suppress(Exception):
            self._log_file.close()


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL after ``timeout`` s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


# --- figures ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def lag_summary(lags: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(lags),
        "p50": percentile(lags, 50),
        "p95": percentile(lags, 95),
        "p99": percentile(lags, 99),
        "max": max(lags) if lags else float("nan"),
        "min": min(lags) if lags else float("nan"),
    }


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def wait_until(moment: float) -> None:
    """Sleep until ``time.time()`` reaches ``moment``."""
    while (left := moment - time.time()) > 0:
        time.sleep(min(left, 0.5))


def next_second(after: float) -> datetime:
    return datetime.fromtimestamp(int(after) + 1, UTC)


def tick_window(lead: float = 15.0) -> datetime:
    """A whole second ``lead`` s ahead, that a tick run now schedules (the tick enqueues fires before the
    next minute plus 10 s): waits a little when now is too close to the end of a minute."""
    now = datetime.now(UTC)
    if now.second + lead > 55:
        wait_until((now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1)).timestamp())
        now = datetime.now(UTC)
    return (now + timedelta(seconds=lead)).replace(microsecond=0)


# --- machine and the document ----------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, str]:
    try:
        memory = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        mem_gib = f"{int(memory.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        mem_gib = "?"
    try:
        azurite_version = json.loads((ROOT / "node_modules" / "azurite" / "package.json").read_text())[
            "version"
        ]
    except (OSError, ValueError, KeyError):
        azurite_version = "?"
    try:
        node = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        node = "?"
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "memory": mem_gib,
        "load": load,
        "python": platform.python_version(),
        "node": node,
        "azurite": azurite_version,
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in (
                "azure-data-tables",
                "azure-storage-queue",
                "httpx",
                "pydantic",
                "apscheduler",
                "sqlalchemy",
            )
        ),
    }


def machine_line() -> str:
    m = machine()
    return (
        f"{m['date']} · {m['cpus']} CPUs (`nproc`), {m['memory']} · load before {m['load']} · Python "
        f"{m['python']}, Node {m['node']}, Azurite {m['azurite']} (in memory) · {m['packages']}"
    )


DOC_HEADER = """# Benchmarks

Measured on the project's development machine (2 cores, shared with whatever else runs there), against
Azurite in memory on 127.0.0.1, so figures are about Routines' own cost and shape, not Azure's.
Azurite is much slower than Azure Storage (one single-threaded Node process on the same 2 cores), which
is why most targets are ratios to a rate measured in the same run. Other sessions were running tests on
the machine at times (the load average is printed with each section): absolute times vary by ±30 %
between runs; the counts do not.

Each section is written by its script; run one with `.venv/bin/python bench/<name>.py` (`--quick` for
smaller sizes), or all of them with `.venv/bin/python bench/run_all.py [--quick]`. Raw data, process
logs and profiles go to `bench/out/` (git-ignored); `--profile` (tick_cost, throughput, on_time,
compute_per_fire) writes pyinstrument or py-spy profiles there. Dependencies:
`pip install -r requirements-bench.txt`. The agent is the tests' fake agent (`tests/fake_agent.py`).
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of ``docs/benchmarks.md``."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else DOC_HEADER
    begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        start = text.index(begin)
        stop = text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def save_json(name: str, data: Any) -> Path:
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return path


@dataclass
class Timer:
    """Wall and CPU (this thread) seconds of a block."""

    wall: float = 0.0
    cpu: float = 0.0
    _marks: list[float] = field(default_factory=list)

    def __enter__(self) -> Timer:
        self._marks = [time.perf_counter(), time.thread_time()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._marks[0]
        self.cpu += time.thread_time() - self._marks[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def azurite_pid(emulator: Azurite) -> int:
    process = emulator._process  # the node process (started in its own session)
    return process.pid if process is not None else 0


def py_spy(pid: int, out: Path, seconds: float, idle: bool = False) -> subprocess.Popen[bytes]:
    """Sample process ``pid`` for ``seconds`` with py-spy (``idle``: waiting threads too, else only
    threads on the CPU): writes ``out``.txt (collapsed stacks) in the background; wait on the returned
    process."""
    spy = Path(PYTHON).parent / "py-spy"
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            *(["--idle"] if idle else []),
            "--format",
            "raw",
            "--output",
            f"{out}.txt",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def top_frames(collapsed: Path, limit: int = 15, skip_idle: bool = False) -> list[tuple[str, float]]:
    """The functions most often on the stack (share of samples) in a py-spy collapsed-stack file."""
    totals: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        if skip_idle and any(
            w in stack for w in ("wait (threading.py", "select (selectors.py", "_recv_into")
        ):
            continue
        n = int(count)
        samples += n
        for frame in set(stack.split(";")):
            totals[frame] += n
    return [(frame, n / samples) for frame, n in totals.most_common(limit)] if samples else []
