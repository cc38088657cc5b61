"""Start and stop Azurite (the Azure Storage emulator, from npm) for local runs and tests.

``Azurite`` runs ``node_modules/.bin/azurite`` of the checkout on free ports of 127.0.0.1 (it never
assumes 10000-10002 are free), waits until the blob, queue and table ports accept connections, and
gives the connection string for them. It can be restarted on the same ports and data directory.

CLI: ``python -m routines.azurite --location .azurite [--env-file PATH]`` starts it, prints the
connection string and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

from routines.config import DEV_ACCOUNT, DEV_KEY

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_FILE_NAME = "azurite.log"


class AzuriteError(RuntimeError):
    """Azurite could not be started (the message carries the end of its output)."""


def free_ports(count: int, host: str = HOST) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is chosen, so the ports differ from one another.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = HOST) -> str:
    """The development-account connection string for Azurite listening on the given ports."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT};"
    )


class Azurite:
    """One Azurite process serving blob, queue and table on 127.0.0.1.

    ``location=None`` keeps all data in memory (lost on stop); otherwise data lives in that folder
    and survives ``restart()``. Ports left at 0 are chosen when first started and kept for restarts.
    Azurite's own output goes to ``azurite.log`` in the location (a temporary folder when in memory);
    ``silent`` turns off its per-request access log.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | None = None,
        *,
        blob_port: int = 0,
        queue_port: int = 0,
        table_port: int = 0,
        silent: bool = True,
        startup_timeout: float = 30.0,
        executable: str | os.PathLike[str] | None = None,
    ) -> None:
        self.location = Path(location).resolve() if location is not None else None
        self.blob_port = blob_port
        self.queue_port = queue_port
        self.table_port = table_port
        self.silent = silent
        self.startup_timeout = startup_timeout
        self.executable = Path(executable) if executable else REPO_ROOT / "node_modules" / ".bin" / "azurite"
        self._requested_ports = (blob_port, queue_port, table_port)
        self._ports_chosen = all(self._requested_ports)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._scratch: str | None = None  # working folder when in memory

    # -- public interface -------------------------------------------------------------------------

    @property
    def connection_string(self) -> str:
        if not self._ports_chosen:
            raise AzuriteError("Azurite has no ports yet: call start() first")
        return connection_string(self.blob_port, self.queue_port, self.table_port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self._workdir() / LOG_FILE_NAME

    def start(self) -> Self:
        """Start Azurite and wait until its three ports accept connections.

        Raises ``AzuriteError`` when the executable is missing, the process exits, or the ports do not
        open within ``startup_timeout`` seconds.
        """
        if self.running:
            return self
        if not self.executable.exists():
            raise AzuriteError(
                f"{self.executable} not found: run `npm ci` (or `npm install`) in {REPO_ROOT} first"
            )
        # Freshly chosen ports can be taken by someone else before Azurite binds them: try again
        # with new ones. Ports fixed by the caller (or by an earlier start) are never changed.
        attempts = 1 if self._ports_chosen else 3
        for attempt in range(1, attempts + 1):
            if not self._ports_chosen:
                fresh = iter(free_ports(3))
                self.blob_port, self.queue_port, self.table_port = (
                    port or next(fresh) for port in self._requested_ports
                )
            try:
                self._launch()
                self._wait_until_listening()
            except AzuriteError:
                self._terminate()
                if attempt == attempts:
                    raise
                continue
            self._ports_chosen = True
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Azurite (its whole process group) and wait for it; kill it after ``timeout`` s."""
        self._terminate(timeout)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def restart(self) -> Self:
        """Stop and start again on the same ports and data folder."""
        self._terminate()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def output_tail(self, max_chars: int = 4000) -> str:
        """The end of Azurite's output so far (for error messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]

    # -- internals --------------------------------------------------------------------------------

    def _workdir(self) -> Path:
        if self.location is not None:
            return self.location
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="azurite-")
        return Path(self._scratch)

    def command(self) -> list[str]:
        """The Azurite command line for the current ports and storage mode."""
        args = [
            str(self.executable),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--loose",
            *("--blobHost", HOST, "--blobPort", str(self.blob_port)),
            *("--queueHost", HOST, "--queuePort", str(self.queue_port)),
            *("--tableHost", HOST, "--tablePort", str(self.table_port)),
        ]
        if self.location is None:
            args.append("--inMemoryPersistence")
        else:
            args += ["--location", str(self.location)]
        if self.silent:
            args.append("--silent")
        return args

    def _launch(self) -> None:
        workdir = self._workdir()
        workdir.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = open(workdir / LOG_FILE_NAME, "ab")  # noqa: SIM115 - open while Azurite runs
        self._log.write(f"\n--- starting: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            self.command(),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: stop() ends node and anything it spawned, and a Ctrl-C in the
            # terminal reaches only us, so we decide when Azurite stops.
            start_new_session=True,
        )

    def _wait_until_listening(self) -> None:
        ports = (self.blob_port, self.queue_port, self.table_port)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise AzuriteError(
                    f"Azurite exited with code {code} before listening on ports {ports}.\n"
                    f"Its output ({self.log_path}):\n{self.output_tail()}"
                )
            if all(port_open(port) for port in ports):
                return
            if time.monotonic() > deadline:
                raise AzuriteError(
                    f"Azurite did not listen on {HOST} ports {ports} within {self.startup_timeout:.0f} s.\n"
                    f"Its output ({self.log_path}):\n{self.output_tail()}"
                )
            time.sleep(0.05)

    def _terminate(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def write_env_setting(path: Path, name: str, value: str) -> None:
    """Set ``name=value`` in a dotenv-style file, keeping its other lines."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if not line.startswith(f"{name}=")]
    kept.append(f"{name}={value}")
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m routines.azurite", description="Run Azurite for local development."
    )
    parser.add_argument("--location", default=".azurite", help="data folder (default: .azurite)")
    parser.add_argument("--in-memory", action="store_true", help="keep data in memory instead")
    parser.add_argument("--blob-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--queue-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--table-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--env-file", type=Path, help="write AzureWebJobsStorage=<connection string> here")
    parser.add_argument("--access-log", action="store_true", help="log every request to azurite.log")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    azurite = Azurite(
        None if args.in_memory else args.location,
        blob_port=args.blob_port,
        queue_port=args.queue_port,
        table_port=args.table_port,
        silent=not args.access_log,
    )
    try:
        azurite.start()
    except AzuriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.env_file is not None:
            write_env_setting(args.env_file, "AzureWebJobsStorage", azurite.connection_string)
        print(azurite.connection_string, flush=True)
        print(
            f"azurite ready: blob {azurite.blob_port}, queue {azurite.queue_port}, "
            f"table {azurite.table_port}; log {azurite.log_path}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            if not azurite.running:
                print(f"error: Azurite exited unexpectedly:\n{azurite.output_tail()}", file=sys.stderr)
                return 1
    finally:
        azurite.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
