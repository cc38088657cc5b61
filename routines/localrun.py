"""``make run``: Azurite, the local sample agent and the devhost, together, until Ctrl-C.

Azurite keeps its data in ``.azurite/`` on free ports; the app listens on ``PORT`` (default 7071) and
the sample agent on ``AGENT_PORT`` (default 7072). Settings come from the environment, then
``local.settings.json`` (if present), then these defaults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from routines.azurite import Azurite, AzuriteError

ROOT = Path(__file__).resolve().parent.parent


def _wait_ready(process: subprocess.Popen[str], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with code {process.returncode}")
            continue
        sys.stdout.write(line)
        if "ready" in line:
            return
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f}s")


def _drain(process: subprocess.Popen[str]) -> None:
    import threading

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    threading.Thread(target=pump, daemon=True).start()


def main() -> int:
    port = os.environ.get("PORT", "7071")
    agent_port = os.environ.get("AGENT_PORT", "7072")
    children: list[subprocess.Popen[str]] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        azurite = Azurite(ROOT / ".azurite").start()
    except AzuriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        env = {
            "ROUTINES_AGENT_BACKEND": "http",
            "ROUTINES_AGENT_ENDPOINT": f"http://127.0.0.1:{agent_port}",
            **os.environ,
            "AzureWebJobsStorage": azurite.connection_string,
            "PYTHONUNBUFFERED": "1",
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "routines.sample_agent", "--port", agent_port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(agent)
        _wait_ready(agent, "sample agent")
        host = subprocess.Popen(
            [sys.executable, "-m", "routines.devhost", "--port", port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(host)
        _wait_ready(host, "devhost")
        for child in children:  # after the ready lines, let their output flow to the terminal
            _drain(child)
        print(
            f"\nRoutines is running: dashboard on http://127.0.0.1:{port}/api/ui, API on "
            f"http://127.0.0.1:{port}/api, sample agent on http://127.0.0.1:{agent_port}, "
            "storage in .azurite/. Ctrl-C to stop.",
            flush=True,
        )
        while not stop and all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
        azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
