"""Run every benchmark in turn: ``.venv/bin/python bench/run_all.py [--quick] [--no-doc] [names...]``.

Each one is its own process (a fresh Azurite each), run one after another so they never compete for
the machine's cores; a failure is reported and the others still run. Without names, all run, in this
order: tick_cost, requests_per_fire, throughput, on_time, compute_per_fire, approval_wait, cold_start,
webhooks, flow_control, apscheduler_peer (the last waits ~11 minutes for killed in-flight fires to come
back unless ``--quick``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = (
    "tick_cost",
    "requests_per_fire",
    "throughput",
    "on_time",
    "compute_per_fire",
    "approval_wait",
    "cold_start",
    "webhooks",
    "flow_control",
    "apscheduler_peer",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("names", nargs="*", metavar="name", help=", ".join(ORDER))
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in ORDER]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    flags = [f for f, on in (("--quick", args.quick), ("--no-doc", args.no_doc)) if on]
    failed = []
    for name in args.names or ORDER:
        print(f"\n=== {name} {' '.join(flags)}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(BENCH / f"{name}.py"), *flags], cwd=BENCH.parent)
        print(
            f"=== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
