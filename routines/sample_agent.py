"""A tiny local agent for trying Routines with the HTTP backend (README, Agents): stdlib only.

    python -m routines.sample_agent [--port 7072] [--token T] [--signing-secret S]

``POST /agents/{agent}/invocations`` answers ``200 {"output": "echo: <input>", "thread_id": ...}``, keeping
the ``thread_id`` it was given or making a new one. The agent named ``slow`` shows the asynchronous
flow instead: it answers ``202`` with a ``Location`` to poll, and that run completes after
``--slow-seconds`` (5 by default), so Routines' polling shows in the run history; ``DELETE`` on that
location cancels it.

Credentials are the ones Routines sends: ``--token`` (default: ``ROUTINES_AGENT_TOKEN``) and
``--signing-secret`` (default: ``ROUTINES_AGENT_SIGNING_SECRET``), so ``make run`` configures both sides
alike. Every configured one is checked on every request, in constant time: the bearer token, and the
``X-Routines-Signature`` (timestamp within 5 minutes, method, path and body; ``routines.agents.signature``).
A request that fails a check gets ``401``. With neither configured it accepts every request: keep it on
127.0.0.1 then.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from routines.agents.signature import SIGNATURE_HEADER, verify

SLOW_AGENT = "slow"


class SampleAgent(BaseHTTPRequestHandler):
    slow_seconds = 5.0
    token: str | None = None
    signing_secret: str | None = None
    runs: dict[str, tuple[float, dict[str, Any]]] = {}  # run id -> (done at, answer)

    def do_POST(self) -> None:
        body = self._authorized_body()
        if body is None:
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 3 or parts[0] != "agents" or parts[2] != "invocations":
            return self._send(404, {"error": f"no route for POST {self.path}"})
        try:
            request = json.loads(body)
            text = request["input"] if isinstance(request["input"], str) else json.dumps(request["input"])
        except (ValueError, KeyError, TypeError):
            return self._send(400, {"error": "expected a JSON object with an input"})
        answer = {
            "output": f"echo: {text}",
            "thread_id": request.get("thread_id") or f"thread_{uuid.uuid4().hex}",
        }
        if unquote(parts[1]) != SLOW_AGENT:
            return self._send(200, answer)
        run_id = uuid.uuid4().hex
        self.runs[run_id] = (time.monotonic() + self.slow_seconds, answer)
        self._send(
            202, {"id": run_id, "status": "running"}, {"Location": f"/runs/{run_id}", "Retry-After": "1"}
        )

    def do_GET(self) -> None:
        if self._authorized_body() is None:
            return
        run = self.runs.get(self.path.removeprefix("/runs/"))
        if run is None:
            return self._send(404, {"error": f"no run at {self.path}"})
        done_at, answer = run
        if time.monotonic() < done_at:
            return self._send(202, {"status": "running"}, {"Retry-After": "1"})
        self._send(200, answer)

    def do_DELETE(self) -> None:
        if self._authorized_body() is None:
            return
        if self.runs.pop(self.path.removeprefix("/runs/"), None) is None:
            return self._send(404, {"error": f"no run at {self.path}"})
        self._send(200, {"status": "cancelled"})

    def _authorized_body(self) -> bytes | None:
        """The request body when every configured credential checks out; else answers 401 and None."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.token is not None:
            given = (self.headers.get("Authorization") or "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                self._send(401, {"error": "missing or wrong bearer token"})
                return None
        if self.signing_secret is not None:
            header = self.headers.get(SIGNATURE_HEADER)
            if not verify(self.signing_secret, header, self.command, self.path, body, now=time.time()):
                self._send(401, {"error": f"missing, stale or wrong {SIGNATURE_HEADER}"})
                return None
        return body

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        print("sample agent:", format % args, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local echo agent for Routines' HTTP backend.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7072, help="0 picks a free port")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="how long the 'slow' agent runs")
    parser.add_argument("--token", default=os.environ.get("ROUTINES_AGENT_TOKEN"))
    parser.add_argument("--signing-secret", default=os.environ.get("ROUTINES_AGENT_SIGNING_SECRET"))
    args = parser.parse_args(argv)
    SampleAgent.slow_seconds = args.slow_seconds
    SampleAgent.token = args.token or None
    SampleAgent.signing_secret = args.signing_secret or None
    server = ThreadingHTTPServer((args.host, args.port), SampleAgent)
    checks = [name for name, on in (("token", args.token), ("signature", args.signing_secret)) if on]
    print(f"sample agent ready on http://{args.host}:{server.server_address[1]}", flush=True)
    print(f"sample agent checks: {', '.join(checks) or 'nothing (keep it on 127.0.0.1)'}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
