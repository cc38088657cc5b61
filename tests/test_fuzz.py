"""Schemathesis against the OpenAPI document of a devhost process: no 5xx, and every response conforms
to the document (documented status codes, content types, headers and response schemas); requests that
violate the document are refused with a 4xx, and requests it allows are accepted.

The devhost runs on the session's Azurite with its own table prefix and queue. A few routines (and a
manual run) are created first, and about half of the generated requests address them instead of a
random id, so PATCH, enable, disable, dispatch and the run routes reach their real work, not only 404.
Generation is bounded (``MAX_EXAMPLES`` per operation) and derandomized, so a run is repeatable.

One built-in check is replaced, not dropped: ``positive_data_acceptance`` holds that every request the
document allows must be accepted. This API also applies rules JSON Schema cannot state, each answered
with a documented status whose problem names the field: cron grammar and the minimum interval, IANA
time zone names, a timer that must lie in the future, a webhook's secret_setting naming an app setting
that is defined, the 32 KiB / 64-level limits of an action's
input, opaque continuation tokens, ``If-Match`` against the routine's current version, and the rules
of a routine applied to the result of a merge patch (a 422 naming a field the patch sets), and the
rules of a step graph (unique ids, ``after`` and ``when`` naming steps that run before, no cycle, a
condition's fields going together, placeholders naming known values: a 422 at the step's ``id``,
``after``, ``when`` or ``input``).
``accepts_valid_data`` is the same check with exactly those rejections allowed, and nothing else.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from routines import openapi
from routines.azurite import free_ports
from tests.fake_agent import FakeAgent

ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 50

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Locations (the tail of a problem's ``errors[].loc``) of rules that JSON Schema cannot express.
# ``secret_setting``: a webhook's app setting must be defined on the host, which no schema can know.
# The flow controls: end_at ahead and not before start_at, jitter within the cron's interval and
# with a routine id in a preview, none of them on a webhook trigger.
SEMANTIC_FIELDS = {"cron_expression", "time_zone", "at", "after", "secret_setting"} | {
    "start_at", "end_at", "jitter_seconds", "max_fires", "routine_id"
}  # fmt: skip
KNOWN: dict[str, list[str]] = {"routines": [], "runs": []}  # filled by the ``api_base`` fixture
_turn = itertools.count()


def _request(base: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def api_base(azurite: Any) -> Iterator[str]:
    """A devhost process on its own tables and queue; yields ``http://127.0.0.1:<port>``."""
    with FakeAgent() as agent, tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        port = free_ports(1)[0]
        env = {
            **os.environ,
            "AzureWebJobsStorage": azurite.connection_string,
            "ROUTINES_TABLE_PREFIX": "f" + uuid.uuid4().hex[:12],
            "ROUTINES_QUEUE_NAME": "fz" + uuid.uuid4().hex[:16],
            "ROUTINES_AGENT_BACKEND": "http",
            "ROUTINES_AGENT_ENDPOINT": agent.url,
            "PYTHONUNBUFFERED": "1",
        }
        log_path = Path(scratch) / "devhost.log"
        # Output to a file, not a pipe nobody reads: a full pipe would block the host's logging.
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "routines.devhost", "--port", str(port), "--no-timers"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            deadline = time.monotonic() + 60
            while "devhost ready" not in log_path.read_text() and process.poll() is None:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            assert process.poll() is None, log_path.read_text()
            base = f"http://127.0.0.1:{port}"
            for index in range(3):
                created = _request(
                    base,
                    "POST",
                    "/api/routines",
                    {
                        "name": f"fuzz-known-{index}",
                        "trigger": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "UTC"},
                        "actions": [{"type": "invocation", "agent_id": "echo", "input": "hi"}],
                    },
                )
                KNOWN["routines"].append(created["id"])
                run = _request(base, "POST", f"/api/routines/{created['id']}/dispatch", {"input": "now"})
                KNOWN["runs"].append(run["id"])
            yield base
        finally:
            process.terminate()
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# The document is loaded in-process at collection time (``schemathesis.pytest.from_fixture``, the lazy
# loader, reads a private pytest attribute that pytest 9 removed);
# ``test_served_document_is_the_one_fuzzed`` checks that the devhost serves exactly this document.
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(openapi.document())))


def test_served_document_is_the_one_fuzzed(api_base: str) -> None:
    with urllib.request.urlopen(f"{api_base}/api/openapi.json", timeout=30) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "application/json"
        served = json.loads(response.read())
    assert served == json.loads(json.dumps(openapi.document()))


def _semantic_rejection(case: Any, response: Any) -> bool:
    """Whether a refusal of schema-valid data is one of the rules the document cannot state."""
    status = response.status_code
    if status == 412:
        return any(name.lower() == "if-match" for name in (case.headers or {}))
    try:
        problem = response.json()
    except ValueError:
        return False
    errors = problem.get("errors") if isinstance(problem, dict) else None
    if not errors:
        return False
    patched = case.body if case.method == "PATCH" and isinstance(case.body, dict) else {}
    for error in errors:
        loc = error.get("loc") or []
        if status == 422 and loc and loc[0] in patched:
            continue  # a merge patch is checked merged with the routine: its rules apply to the result
        if status == 400 and loc == ["query", "continuation"]:
            continue
        if status == 422 and loc and str(loc[-1]) in SEMANTIC_FIELDS:
            continue
        if status == 422 and "input" in loc and any(w in str(error.get("msg")) for w in ("bytes", "deeper")):
            continue
        if status == 422 and loc[:1] == ["actions"] and _graph_rule(loc, str(error.get("msg"))):
            continue
        return False
    return True


def _graph_rule(loc: list[Any], msg: str) -> bool:
    """A refusal by a rule between steps (``routines.graph``) or within a condition."""
    if "after" in loc or "when" in loc or loc[-1:] == ["id"]:
        return True
    return ("input" in loc and "placeholder" in msg) or "does not run before" in msg


def accepts_valid_data(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, allowing the refusals of ``_semantic_rejection``."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if 200 <= response.status_code < 300 or response.status_code in (404, 409):
        return None
    if _semantic_rejection(case, response):
        return None
    raise AssertionError(f"Schema-valid request rejected with {response.status_code}: {response.text[:1000]}")


def _address_known_resources(case: Any) -> None:
    """Every other case addresses a routine (and run) that exists, instead of a generated id."""
    params = case.path_parameters
    turn = next(_turn)
    if not params or "id" not in params or turn % 2:
        return
    index = turn // 2 % len(KNOWN["routines"])
    params["id"] = KNOWN["routines"][index]
    if "run_id" in params:
        params["run_id"] = KNOWN["runs"][index]


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi_document(case: Any, api_base: str) -> None:
    _address_known_resources(case)
    case.call_and_validate(
        base_url=api_base,
        timeout=30,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepts_valid_data],
    )
