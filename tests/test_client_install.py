"""``pip install ./client`` into a fresh virtual environment: the client installs without the app.

Needs the package index (or pip's cache) for azure-core and friends; takes some seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

CHECK = """
import importlib.util
import routines_client, routines_client.aio
from routines_client import RoutinesClient, RoutineScheduleTrigger, RoutineInvocationAction

def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False

assert RoutinesClient("http://127.0.0.1:7071/api").endpoint == "http://127.0.0.1:7071"
assert installed("azure.core") and installed("yaml") and installed("rich")
app_only = ["routines", "azure.functions", "azure.data.tables", "azure.storage.queue", "azure.identity",
            "pydantic", "aiohttp"]
assert not [m for m in app_only if installed(m)], [m for m in app_only if installed(m)]
try:  # the asyncio client says which extra it needs
    routines_client.aio.RoutinesClient("http://127.0.0.1:7071")
    raise SystemExit("the aio client was made without aiohttp")
except ImportError as exc:
    assert "routines-client[aio]" in str(exc), exc
print("ok", routines_client.__version__)
"""


def test_pip_install_client_into_a_fresh_venv(tmp_path: Path) -> None:
    # Built from a copy, so the build leaves nothing in the checkout.
    source = tmp_path / "client"
    shutil.copytree(
        ROOT / "client", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    check = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert check.returncode == 0 and check.stdout.startswith("ok 0."), check.stdout + check.stderr

    helped = subprocess.run(
        [str(env_dir / "bin" / "routines"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "apply" in helped.stdout and "exit status:" in helped.stdout
