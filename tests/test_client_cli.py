"""The ``routines`` command (client/), run as a subprocess against the devhost process over HTTP.

Each test gets a devhost of its own on fresh tables (``apply --prune`` acts on the whole deployment).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from routines.azurite import free_ports
from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent
from tests.scripted_api import ROUTINE, ScriptedServer

pytestmark = [pytest.mark.e2e, pytest.mark.azurite]
ROOT = Path(__file__).resolve().parent.parent
ROUTINES = Path(sys.executable).parent / "routines"  # the console script, as `pip install` made it


@dataclass
class Cli:
    endpoint: str
    agent: FakeAgent

    def __call__(
        self, *args: str, stdin: str | None = None, endpoint: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ROUTINES_ENDPOINT": endpoint or self.endpoint, "COLUMNS": "200"}
        env.pop("ROUTINES_KEY", None)
        return subprocess.run(
            [str(ROUTINES), *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin or "",
            timeout=120,
            cwd=ROOT,
        )

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def routines(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.json("list")}


@pytest.fixture
def cli(storage_env: dict[str, str]) -> Iterator[Cli]:
    with (
        FakeAgent() as agent,
        devhost_process(
            {
                **storage_env,
                "ROUTINES_AGENT_BACKEND": "http",
                "ROUTINES_AGENT_ENDPOINT": agent.url,
                "ROUTINES_MIN_INTERVAL_SECONDS": "60",
            }
        ) as base,
    ):
        yield Cli(base, agent)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


SCAN = """
    name: scan
    trigger:
      type: schedule
      cron_expression: "0 6 * * *"
      time_zone: Europe/Paris
    actions:
      - type: invocation
        agent_id: echo
        input: {instructions: scan}
    """


def test_apply_examples_dry_run_then_apply_then_nothing_to_do(cli: Cli) -> None:
    dry = cli("apply", "-f", "examples/", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ create daily-compliance-scan" in dry.stdout and "nothing was changed" in dry.stdout
    assert cli.routines() == {}

    applied = cli("apply", "-f", "examples/")
    assert applied.returncode == 0, applied.stderr
    assert "applied: 4 created, 0 updated, 0 deleted, 0 unchanged" in applied.stdout
    assert "all or nothing" in applied.stderr
    before = cli.routines()
    assert set(before) == {"daily-compliance-scan", "weekly-summary", "hourly-ping", "month-end-report"}
    assert before["month-end-report"]["state"] == "disabled"  # `state` in a file is honoured
    assert before["daily-compliance-scan"]["trigger"]["time_zone"] == "Europe/Paris"

    again = cli("apply", "-f", "examples/")
    assert again.returncode == 0 and "no changes: 4 routine(s) up to date" in again.stdout
    assert cli.routines() == before  # no version moved
    summary = cli.json("apply", "-f", "examples/")
    assert summary["changes"] == [] and sorted(summary["unchanged"]) == sorted(before)


def test_apply_updates_what_changed_with_if_match(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, "scan.yaml", SCAN)
    assert cli("apply", "-f", str(path)).returncode == 0
    created = cli.routines()["scan"]
    path.write_text(
        path.read_text().replace('"0 6 * * *"', '"30 6 * * 1-5"') + "description: weekdays\nstate: disabled\n"
    )
    plan = cli("apply", "-f", str(tmp_path), "--dry-run")
    assert plan.returncode == 0
    assert f"~ update scan {created['id']}" in plan.stdout
    assert 'trigger.cron_expression: "0 6 * * *" -> "30 6 * * 1-5"' in plan.stdout
    assert 'description: "" -> "weekdays"' in plan.stdout and 'state: "enabled" -> "disabled"' in plan.stdout

    summary = cli.json("apply", "-f", str(tmp_path))
    assert summary["updated"] == ["scan"] and summary["created"] == []
    paths = {c["path"]: (c["old"], c["new"]) for c in summary["changes"][0]["changes"]}
    assert paths["trigger.cron_expression"] == ("0 6 * * *", "30 6 * * 1-5")
    updated = cli.routines()["scan"]
    assert updated["id"] == created["id"] and updated["version"] > created["version"]
    assert (updated["description"], updated["state"]) == ("weekdays", "disabled")
    assert updated["trigger"] == {
        "type": "schedule",
        "cron_expression": "30 6 * * 1-5",
        "time_zone": "Europe/Paris",
    }
    assert "no changes" in cli("apply", "-f", str(path)).stdout

    # A changed object is sent whole: fixed delays give way to exponential back-off, and a trigger
    # of another type replaces the old one.
    text = path.read_text().replace(
        "description: weekdays\n", "retry_policy: {max_attempts: 6, backoff: exponential}\n"
    )
    path.write_text(text)
    plan = cli("apply", "-f", str(path), "--dry-run")
    assert "retry_policy.delays_seconds: [60, 300, 900] -> (default)" in plan.stdout
    assert cli("apply", "-f", str(path)).returncode == 0
    policy = cli.routines()["scan"]["retry_policy"]
    assert policy["backoff"] == "exponential" and "delays_seconds" not in policy
    timer = {"type": "timer", "at": "2030-01-01T00:00:00Z"}
    path.write_text(
        text.split("trigger:")[0] + f"trigger: {json.dumps(timer)}\n" + "actions:" + text.split("actions:")[1]
    )
    applied = cli("apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert cli.routines()["scan"]["trigger"] == timer
    assert "no changes" in cli("apply", "-f", str(path)).stdout


def test_prune_asks_unless_yes_and_dry_run_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    assert cli("apply", "-f", "examples/").returncode == 0
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copy(ROOT / "examples" / "weekly-summary.yaml", keep)

    dry = cli("apply", "-f", str(keep), "--prune", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("- delete ") == 3
    refused = cli("apply", "-f", str(keep), "--prune")  # stdin is not a terminal: no one to ask
    assert refused.returncode == 2 and "--yes" in refused.stderr and "Nothing was changed" in refused.stderr
    assert len(cli.routines()) == 4

    pruned = cli.json("apply", "-f", str(keep), "--prune", "--yes")
    assert sorted(pruned["deleted"]) == ["daily-compliance-scan", "hourly-ping", "month-end-report"]
    assert set(cli.routines()) == {"weekly-summary"}
    assert "no changes" in cli("apply", "-f", str(keep), "--prune").stdout


def test_apply_checks_every_file_before_changing_anything(cli: Cli, tmp_path: Path) -> None:
    write(tmp_path, "a-good.yaml", SCAN)
    write(tmp_path, "b-broken.yaml", "name: broken\ntrigger:\n  type: schedule\n   cron_expression: x\n")
    write(
        tmp_path,
        "c-list.json",
        '[{"name": "Not_A_Name", "trigger": {"type": "schedule"}, "actions": [], "colour": 1}]',
    )
    write(tmp_path, "d-dup.yaml", SCAN)
    result = cli("apply", "-f", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    errors = result.stderr.splitlines()
    assert any(e.startswith(f"error: {tmp_path}/b-broken.yaml:4:") and "invalid YAML" in e for e in errors), (
        errors
    )
    assert any("c-list.json[0]: name:" in e for e in errors)
    assert any("c-list.json[0]: colour: unknown field" in e for e in errors)
    assert any("c-list.json[0]: actions: required" in e for e in errors)
    assert any("d-dup.yaml:1: name 'scan' is already used at" in e for e in errors)
    assert errors[-1].endswith("nothing was changed") and "Traceback" not in result.stderr
    assert cli.routines() == {}

    # A trigger only the server can judge (here: more often than the deployment's minimum interval).
    for extra in tmp_path.glob("[bcd]-*"):
        extra.unlink()
    write(tmp_path, "e-fast.yaml", SCAN.replace("scan", "fast").replace('"0 6 * * *"', '"* * * * * *"'))
    result = cli("apply", "-f", str(tmp_path))
    assert result.returncode == 2 and "e-fast.yaml:1: trigger.cron_expression:" in result.stderr
    assert cli.routines() == {}


def test_a_write_refused_mid_run_undoes_the_runs_changes(cli: Cli, tmp_path: Path) -> None:
    write(tmp_path, "a-old.yaml", SCAN.replace("scan", "old"))
    write(tmp_path, "c-bad.yaml", SCAN.replace("scan", "bad"))
    assert cli("apply", "-f", str(tmp_path)).returncode == 0
    before = cli.routines()
    # A create, an update, then an update that passes the CLI's checks and the trigger check but that
    # the server refuses (the agent id): the run stops there and undoes the first two.
    write(tmp_path, "a-old.yaml", SCAN.replace("scan", "old").replace('"0 6 * * *"', '"0 8 * * *"'))
    write(tmp_path, "b-new.yaml", SCAN.replace("scan", "new"))
    write(
        tmp_path,
        "c-bad.yaml",
        SCAN.replace("scan", "bad").replace("agent_id: echo", "agent_id: 'not an id!'"),
    )
    result = cli("apply", "-f", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "created new" in result.stderr and "updated old" in result.stderr
    assert "apply stopped (this run's changes were undone): 422" in result.stderr
    after = cli.routines()
    assert set(after) == {"old", "bad"}
    assert after["old"]["trigger"] == before["old"]["trigger"] and after["bad"] == before["bad"]


def test_commands_json_output_and_exit_codes(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, "scan.yaml", SCAN)
    created = cli.json("create", "-f", str(path))
    assert created["name"] == "scan" and created["id"].startswith("rt_")
    taken = cli("create", "-f", str(path))
    assert (
        taken.returncode == 4
        and taken.stderr.startswith("error: 409 Conflict")
        and len(taken.stderr.splitlines()) == 1
    )

    assert cli.json("get", "scan") == cli.json("get", created["id"])  # by name or by id
    human = cli("get", "scan")
    assert human.returncode == 0 and "cron_expression: 0 6 * * *" in human.stdout
    listed = cli("list")
    assert listed.returncode == 0 and "scan" in listed.stdout and created["id"] in listed.stdout

    assert cli.json("disable", "scan")["state"] == "disabled"
    assert cli.json("list", "--state", "disabled")[0]["id"] == created["id"]
    assert cli.json("enable", created["id"])["state"] == "enabled"

    fires = cli.json(
        "preview", "0 6 * * *", "--tz", "Europe/Paris", "-n", "2", "--after", "2026-07-01T00:00:00Z"
    )
    assert fires == ["2026-07-01T04:00:00Z", "2026-07-02T04:00:00Z"]
    table = cli("preview", "0 6 * * *", "--tz", "Europe/Paris", "-n", "1", "--after", "2026-07-01T00:00:00Z")
    assert "2026-07-01T04:00:00Z" in table.stdout and "2026-07-01 06:00:00 CEST" in table.stdout

    for args, code in [
        (("get", "nope"), 3),
        (("get", "rt_0000000000000000"), 3),
        (("run", "scan", "run_0000000000000_nothere000"), 3),
        (("approve", "scan", "run_0000000000000_nothere000", "review"), 3),
        (("reject", "scan", "run_0000000000000_nothere000", "review", "--comment", "no"), 3),
        (("preview", "61 * * * *"), 2),
        (("runs", "scan", "--status", "sleeping"), 2),
        (("bogus-command",), 2),
    ]:
        result = cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 or args == ("bogus-command",), result.stderr
        assert "Traceback" not in result.stderr

    assert cli("delete", "scan").returncode == 0
    assert cli("delete", created["id"]).returncode == 3


def test_unreachable_endpoint_is_one_line(cli: Cli) -> None:
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    result = cli("list", endpoint=endpoint + "/api")
    assert result.returncode == 5
    assert result.stderr.splitlines() == [f"error: cannot reach {endpoint}: connection refused"]
    bad = cli("list", endpoint="not a url")
    assert bad.returncode == 2 and bad.stderr.startswith("error: endpoint must be an http(s) URL")


def test_dispatch_wait_and_run(cli: Cli, tmp_path: Path) -> None:
    cli.agent.script("broken", [400])
    write(tmp_path, "ok.yaml", SCAN.replace("scan", "ok"))
    write(tmp_path, "ko.yaml", SCAN.replace("scan", "ko").replace("agent_id: echo", "agent_id: broken"))
    assert cli("apply", "-f", str(tmp_path)).returncode == 0

    done = cli("dispatch", "ok", "--input", '{"say": "now"}', "--wait", "--json")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded" and run["trigger"] == "manual"
    assert json.loads(run["actions"][0]["output"]) == {"say": "now"}
    shown = cli.json("run", "ok", run["id"])
    assert shown["id"] == run["id"] and shown["status"] == "succeeded"

    plain = cli("dispatch", "ok", "--input", "plain words", "--wait")
    assert plain.returncode == 0 and "succeeded" in plain.stdout
    assert "run " in plain.stderr and ": queued" in plain.stderr  # progress while waiting
    assert cli.agent.calls_for("echo")[-1].input == "plain words"

    failed = cli("dispatch", "ko", "--wait")
    assert failed.returncode == 6 and "failed" in failed.stdout

    runs = cli.json("runs", "ok")
    assert [r["id"] for r in runs][-1] == run["id"] and len(runs) == 2
    assert len(cli.json("runs", "ok", "--limit", "1")) == 1
    assert cli.json("runs", "ko", "--status", "succeeded") == []


def test_runs_follow_streams_new_runs(cli: Cli, tmp_path: Path) -> None:
    assert cli("apply", "-f", str(write(tmp_path, "scan.yaml", SCAN))).returncode == 0
    env = {**os.environ, "ROUTINES_ENDPOINT": cli.endpoint}
    follower = subprocess.Popen(
        [str(ROUTINES), "runs", "scan", "--follow", "--json", "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert follower.stdout is not None
        run = cli.json("dispatch", "scan")
        statuses: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "succeeded" not in statuses:
            line = follower.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["id"] == run["id"]:
                statuses.append(event["status"])
        assert statuses and statuses[-1] == "succeeded", statuses
        assert len(statuses) == len(set(statuses))  # each status change once
        follower.send_signal(signal.SIGINT)
        assert follower.wait(20) == 0  # Ctrl-C ends a follow normally
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
        follower.stdout.close() if follower.stdout else None
        follower.stderr.close() if follower.stderr else None


def test_key_from_flag_or_environment_is_sent_as_function_key() -> None:
    scripted = ScriptedServer()
    try:
        env = {**os.environ, "ROUTINES_ENDPOINT": scripted.url, "ROUTINES_KEY": "env-k3y"}
        command = [str(ROUTINES), "get", str(ROUTINE["id"]), "--json"]
        for extra, key in (([], "env-k3y"), (["--key", "flag-k3y"], "flag-k3y")):
            result = subprocess.run(command + extra, capture_output=True, text=True, env=env, timeout=60)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["id"] == ROUTINE["id"]
            assert scripted.seen[-1].headers["x-functions-key"] == key
    finally:
        scripted.close()
