"""Import hygiene: the Functions entry module (``function_app.py``) loads no optional heavy SDK.

Each of these is imported only when a setting asks for it, so a cold start of the default app (HTTP
agent backend, no telemetry exporter, no run archive) does not pay for them (docs/benchmarks.md,
"Cold start", has the times). Checked in a fresh interpreter, since this test session has imported
most of them already."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# module -> what imports it, lazily
OPTIONAL_SDKS = {
    "routines.agents.foundry": "runtime.build_backend, when ROUTINES_AGENT_BACKEND is foundry",
    "azure.ai.projects": "routines.agents.foundry (agents by name)",
    "azure.ai.agents": "routines.agents.foundry (classic agents)",
    "openai": "routines.agents.foundry (the Responses API client)",
    "azure.identity": "runtime._credential and foundry.credential_for, for identity-based access",
    "azure.monitor.opentelemetry": "observability, with APPLICATIONINSIGHTS_CONNECTION_STRING",
    "opentelemetry.sdk": "observability, with an exporter configured",
    "opentelemetry.exporter": "observability, with OTEL_EXPORTER_OTLP_ENDPOINT",
    "azure.storage.blob": "purge, with ROUTINES_RUN_ARCHIVE_CONTAINER",
}

IMPORT_APP = "import function_app"
# what the queue trigger builds on its first message with the default (HTTP) agent backend
BUILD_HTTP_BACKEND = """
import function_app
from routines.config import Settings, StorageTarget
from routines.runtime import build_backend
build_backend(Settings(StorageTarget("UseDevelopmentStorage=true"), agent_backend="http",
                       agent_endpoint="http://127.0.0.1:9"))
"""


def loaded_modules(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter in the repository root after running ``code``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ROUTINES_", "OTEL_", "APPLICATIONINSIGHTS"))
    }
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == s or m.startswith(f"{s}.") for s in OPTIONAL_SDKS))


def test_the_optional_sdks_are_installed() -> None:
    """Each name is a real module of the app's environment (a misspelt one would always be absent)."""
    missing = [name for name in OPTIONAL_SDKS if importlib.util.find_spec(name) is None]
    assert not missing


@pytest.mark.parametrize(
    ("code", "ran"),
    [
        pytest.param(IMPORT_APP, "function_app", id="import"),
        pytest.param(BUILD_HTTP_BACKEND, "routines.agents.http", id="http_backend"),
    ],
)
def test_function_app_loads_no_optional_heavy_sdk(code: str, ran: str) -> None:
    modules = loaded_modules(code)
    assert {ran, "routines.api", "routines.dispatcher", "azure.functions"} <= modules
    assert heavy(modules) == [], "imported eagerly; import it where it is used instead"
