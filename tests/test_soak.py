"""A two-minute soak (``bench/soak.py``): two devhost workers on Azurite under faults, then the
guarantees of docs/guarantees.md checked from the run records and the agent's call log.

Faults: a worker SIGKILLed and restarted, Azurite restarted on its persistent data, duplicated and
redelivered queue messages, unreadable messages, and an agent that fails (500, 503, 429), answers too
late (past ``timeout_seconds``) or runs long (202 + polls). Asserted: no violation at all (no lost fire,
no open run, no second agent start of an attempt beyond a killed worker's takeover, nothing valid in
the poison queue). No timing is asserted; the table printed holds the figures.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("routines_bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_two_minute_soak_keeps_every_guarantee(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soak = _soak_module()
    with capsys.disabled():
        print("\nsoak: 2 min, 30 routines (logs and data in", tmp_path, ")")
        report = soak.run(minutes=2, routines=30, seed=7, workdir=tmp_path)
        print(soak.table(report))
        for line in report.details[:30]:
            print("   ", line)
    assert not report.violations, report.violations


def test_an_edit_in_flight_excuses_only_its_old_schedule_fires_due_meanwhile() -> None:
    soak = _soak_module()
    sent = datetime(2026, 12, 5, 1, 43, 59, 400000, tzinfo=UTC)
    every_4s = {"type": "schedule", "cron_expression": "*/4 * * * * *"}
    edits = [(sent, sent + timedelta(seconds=5), every_4s)]  # a PATCH storage kept retrying for 5 s
    assert soak.in_flight_fires(edits) == {
        datetime(2026, 12, 5, 1, 44, s, tzinfo=UTC) for s in (0, 4)
    }  # 01:43:56 was due before the edit was sent, 01:44:08 after its answer
    assert soak.in_flight_fires([(sent, sent + timedelta(seconds=5), None)]) == set()  # was disabled
