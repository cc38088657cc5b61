"""Cold start: ``import function_app`` and the first answered request, in fresh processes.

Each run is a new interpreter in the repository root (5 runs, after one not counted that warms the
disk cache and Azurite; median and max):

- **In the app's process**, as the Functions Python worker does it: ``import function_app`` (the
  worker loads the entry module), ``app.get_functions()`` (it indexes the functions), then the
  ``health`` function called with an ``azure.functions.HttpRequest`` (the first invocation builds the
  runtime: settings, storage clients, tables and queues created if missing, then a storage ping),
  and a second call for comparison. Also the interpreter's own start (spawn to the first line).
- **The devhost** (``python -m routines.devhost``, the local host of ``make run``): spawn to the first
  ``200`` of ``GET /api/health``, polled every 5 ms.

In two environments: the development venv (``.venv``) and the app's own (``bench/out/app-venv``,
``requirements.txt`` only, as the Functions build installs it; made on first use). Storage is Azurite.
The optional heavy SDKs the import must not load are the ones ``tests/test_import_hygiene.py`` checks;
each run reports those it found loaded after the first request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import common
from common import ROOT, say

from tests.test_import_hygiene import OPTIONAL_SDKS

RUNS = 5
APP_VENV = common.OUT / "app-venv"

CHILD = """
import json, sys, time
started = time.time()
t0 = time.perf_counter()
import function_app
t1 = time.perf_counter()
functions = {
    f.get_function_name() or f.get_user_function().__name__: f.get_user_function()
    for f in function_app.app.get_functions()
}
t2 = time.perf_counter()
import azure.functions as func
request = func.HttpRequest(
    "GET", "http://127.0.0.1/api/health", headers={}, params={}, route_params={}, body=b""
)
first = functions["health"](request)
t3 = time.perf_counter()
second = functions["health"](request)
t4 = time.perf_counter()
optional = json.loads(sys.argv[1])
heavy = sorted({s for s in optional for m in sys.modules if m == s or m.startswith(s + ".")})
print(json.dumps({
    "started": started, "import": t1 - t0, "index": t2 - t1, "first": t3 - t2, "second": t4 - t3,
    "status": [first.status_code, second.status_code], "modules": len(sys.modules), "heavy": heavy,
}))
"""


def app_venv() -> str:
    """The interpreter of a venv holding only ``requirements.txt`` (what Azure installs), made once
    per version of that file."""
    requirements = ROOT / "requirements.txt"
    stamp = APP_VENV / "requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = APP_VENV / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
        say(f"making {APP_VENV.relative_to(ROOT)} from requirements.txt ...")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(APP_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(requirements)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stamp.write_text(digest)
    return str(python)


def in_process(python: str, env: dict[str, str]) -> dict[str, Any]:
    spawned = time.time()
    done = subprocess.run(
        [python, "-c", CHILD, json.dumps(sorted(OPTIONAL_SDKS))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode:
        raise RuntimeError(f"the child failed: {done.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert data["status"] == [200, 200], data
    data["startup"] = data["started"] - spawned
    data["total"] = data["startup"] + data["import"] + data["index"] + data["first"]
    return data


def devhost_first(python: str, env: dict[str, str]) -> dict[str, Any]:
    host = common.Devhost(env, common.OUT / "cold_start_devhost.log", timers=True, python=python)
    spawned = time.monotonic()
    host.start(wait=False)
    try:
        while time.monotonic() - spawned < 120:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", host.port, timeout=5)
                connection.request("GET", "/api/health")
                status = connection.getresponse().status
                connection.close()
                if status == 200:
                    return {"total": time.monotonic() - spawned}
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError("the devhost did not answer /api/health within 120 s")
    finally:
        host.stop()


LAZY_COST = {  # what an eager import would add, after function_app
    "routines.agents.foundry": "the Foundry backend (azure-ai-projects, azure-ai-agents, openai)",
    "azure.monitor.opentelemetry": "the Azure Monitor distro",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "the OTLP exporter",
    "azure.identity": "identity credentials",
}
LAZY_CHILD = """
import sys, time, json
import function_app
before = len(sys.modules)
t0 = time.perf_counter()
__import__(sys.argv[1])
print(json.dumps([time.perf_counter() - t0, len(sys.modules) - before]))
"""


def lazy_cost(python: str, env: dict[str, str], module: str) -> tuple[float, int]:
    """Seconds and modules that importing ``module`` adds after ``function_app`` (a fresh process)."""
    done = subprocess.run(
        [python, "-c", LAZY_CHILD, module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    if done.returncode:
        raise RuntimeError(f"importing {module} failed: {done.stderr[-2000:]}")
    seconds, modules = json.loads(done.stdout.splitlines()[-1])
    return float(seconds), int(modules)


def import_profile(python: str, env: dict[str, str], top: int = 8) -> list[tuple[str, float]]:
    """Where ``import function_app`` spends its time (``-X importtime``): self time summed by package
    (``azure.<name>.<name>``, ``routines.<module>``, else the top-level name), largest first, after
    the sum over all packages as ``("in all", seconds)``."""
    done = subprocess.run(
        [python, "-X", "importtime", "-c", "import function_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    totals: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = (part.strip() for part in line.replace("import time:", "", 1).split("|", 2))
        if not self_us.isdigit():
            continue
        parts = name.split(".")
        depth = 3 if parts[0] == "azure" else 2 if parts[0] == "routines" else 1
        totals[".".join(parts[:depth])] += int(self_us) / 1e6
    return [("in all", sum(totals.values())), *sorted(totals.items(), key=lambda item: -item[1])[:top]]


def cell(values: list[float]) -> str:
    return f"{common.median(values) * 1000:.0f} ms ({max(values) * 1000:.0f})"


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: p.add_argument(
            "--dev-only", action="store_true", help="skip the app venv (requirements.txt only)"
        ),
    )
    runs = 3 if args.quick else RUNS
    say(f"cold start: {runs} fresh processes per case")
    say(common.machine_line())
    environments = {"dev venv (.venv)": sys.executable}
    if not args.dev_only:
        environments["app venv (requirements.txt)"] = app_venv()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"in process": [], "devhost": []} for name in environments
    }
    profiles = {}
    with common.azurite() as emulator:
        app = common.app_env(emulator.connection_string, "cold", "cold-q", "http://127.0.0.1:9")
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ROUTINES_", "OTEL_", "APPLICATIONINSIGHTS"))
        }
        env = {**base, **app}
        for name, python in environments.items():  # not counted: disk cache, tables and queues made
            in_process(python, env)
            devhost_first(python, env)
            profiles[name] = import_profile(python, env)
            for module in LAZY_COST:
                lazy_cost(python, env, module)
        for run in range(runs):
            for name, python in environments.items():
                results[name]["in process"].append(in_process(python, env))
                results[name]["devhost"].append(devhost_first(python, env))
                last, host = results[name]["in process"][-1], results[name]["devhost"][-1]
                say(
                    f"run {run + 1}, {name}: import {last['import'] * 1000:.0f} ms, first request in "
                    f"process {last['first'] * 1000:.0f} ms, devhost {host['total'] * 1000:.0f} ms"
                )
        lazy = {
            name: {module: [lazy_cost(python, env, module) for _ in range(runs)] for module in LAZY_COST}
            for name, python in environments.items()
        }
    common.save_json("cold_start", {"results": results, "profiles": profiles, "lazy": lazy})
    lazy_headers = ("environment", *(f"`{module}`: {what}" for module, what in LAZY_COST.items()))
    lazy_rows = [
        (
            name,
            *(
                f"{cell([t for t, _ in costs[module]])}, {max(n for _, n in costs[module])} modules"
                for module in LAZY_COST
            ),
        )
        for name, costs in lazy.items()
    ]

    headers = (
        "environment",
        "interpreter start",
        "`import function_app`",
        "`get_functions()`",
        "first request (`health`)",
        "second request",
        "spawn to first answer",
        "modules loaded then",
        "optional SDKs loaded after the first request",
    )
    rows = []
    devhost_rows = []
    for name, cases in results.items():
        runs_in = cases["in process"]
        rows.append(
            (
                name,
                *(
                    cell([r[key] for r in runs_in])
                    for key in ("startup", "import", "index", "first", "second")
                ),
                f"**{cell([r['total'] for r in runs_in])}**",
                max(r["modules"] for r in runs_in),
                ", ".join(sorted({h for r in runs_in for h in r["heavy"]})) or "none",
            )
        )
        devhost_rows.append((name, f"**{cell([r['total'] for r in cases['devhost']])}**"))
    profile_lines = "\n".join(
        f"- {name}: {profile[0][1] * 1000:.0f} ms in all; "
        + ", ".join(f"{package} {seconds * 1000:.0f} ms" for package, seconds in profile[1:])
        for name, profile in profiles.items()
    )
    say()
    say(common.table(headers, rows))
    say()
    say(common.table(("environment", "devhost: spawn to first 200 of GET /api/health"), devhost_rows))
    say()
    say("import time by package (-X importtime, self time):")
    say(profile_lines)
    say()
    say(common.table(lazy_headers, lazy_rows))
    if args.no_doc:
        return
    optional = ", ".join(f"`{name}`" for name in OPTIONAL_SDKS)
    common.write_section(
        "cold_start",
        f"""
## 9. Cold start (`bench/cold_start.py{" --quick" if args.quick else ""}`)

{common.machine_line()}

Fresh interpreters in the repository root, {runs} runs per case after one not counted (it warms the
disk cache and creates the tables and queues), interleaved; median (max). Storage is Azurite.

**In the app's process**, the steps the Functions Python worker takes on a cold start: the
interpreter starts, imports `function_app` (the worker loads the entry module), indexes it
(`app.get_functions()`), then runs the first invocation: here the `health` function called with an
`azure.functions.HttpRequest`. The first invocation builds the runtime (settings, the storage clients,
tables and queues created if missing, 409 on an account that has them) and pings storage; the second
call shows what a warm request costs. This is what "first request" means for the Functions host:
Routines' share of a cold start. The host's own start (the Functions runtime, starting the worker
process, routing the HTTP request to it) comes before and around it and cannot be measured here.

{common.table(headers, rows)}

"Spawn to first answer" is the sum of the four steps before it. `opentelemetry.sdk` comes with the
first request by design: with no exporter configured the runtime still installs an SDK tracer
provider (mode `none`, [observability](observability.md)), so runs get trace ids. The app venv holds only
`requirements.txt`, as the Functions build installs it; the dev venv also has the test tools, whose
`aiohttp` (a dependency of the client package) `azure-storage-queue` imports when it is installed.

**The devhost** (`python -m routines.devhost`, the local host `make run` starts), spawn to the first
`200` of `GET /api/health` polled every 5 ms: the same import and first invocation, plus its own
start (argument parsing, `host.json` and the timers and queue poller set up, the HTTP server).

{common.table(("environment", "devhost: spawn to first 200 of GET /api/health"), devhost_rows)}

Where `import function_app` spends its time (one run with `-X importtime`, self time summed by
package, largest first; the measurement itself slows imports down):

{profile_lines}

Optional heavy SDKs stay out of the import path: {optional} are imported only where they are used
(the Foundry backend when `ROUTINES_AGENT_BACKEND` is `foundry`, identity credentials when storage is
reached by identity, the OpenTelemetry SDK when the first invocation builds the runtime and the
exporters when telemetry is configured, blob storage for the purge's archive).
`tests/test_import_hygiene.py` checks it in a fresh interpreter, after importing `function_app` and
after building the HTTP agent backend. What importing each would add to a cold start, after
`function_app` (fresh processes, median (max)):

{common.table(lazy_headers, lazy_rows)}
""",
    )


if __name__ == "__main__":
    main()
