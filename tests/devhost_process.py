"""The devhost as a real process (``python -m routines.devhost``), for tests that drive it over HTTP."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from routines.azurite import free_ports

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def devhost_process(
    settings: Mapping[str, str], *, args: Sequence[str] = (), ready_timeout: float = 60.0
) -> Iterator[str]:
    """Start the devhost with ``settings`` on top of the environment (and extra command-line ``args``);
    yields its base URL (``http://127.0.0.1:<port>``) once it prints its ready line, and stops it after."""
    port = free_ports(1)[0]
    env = {**os.environ, **settings, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "routines.devhost", "--port", str(port), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output = process.stdout
    deadline = time.monotonic() + ready_timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "ready" in line or process.poll() is not None:
            break
    # Keep reading its output, or a full pipe would block the host mid-request.
    drain = threading.Thread(target=lambda: collections.deque(output, maxlen=200), daemon=True)
    try:
        assert process.poll() is None and "ready" in lines[-1], "".join(lines)
        drain.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        drain.join(10) if drain.is_alive() else None
        process.stdout.close()
