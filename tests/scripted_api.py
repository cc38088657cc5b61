"""A scripted stand-in for the Routines API: answers what the real one rarely does (503, 429, 500)
and records every request, for the client's retry and credential tests."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ScriptedServer:
    """Answers each request with the next scripted ``(status, headers)`` (then ``200``), with a body
    fitting the route; records what it was sent."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                owner.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else None,
                    )
                )
                status, headers = owner.script.pop(0) if owner.script else (200, {})
                if status >= 400:
                    body: Any = {
                        "type": "about:blank",
                        "title": "Busy",
                        "status": status,
                        "detail": "try later",
                    }
                elif "/dispatch" in self.path:
                    status, body = 202, RUN
                elif self.path.startswith("/api/routines?"):
                    body = {"items": [ROUTINE], "continuation": None}
                else:
                    body = ROUTINE
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


ROUTINE = {
    "id": "rt_0f3c2a9d6b1e4c7a",
    "name": "scripted",
    "trigger": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "UTC"},
    "actions": [{"type": "invocation", "agent_id": "echo", "input": "x"}],
    "state": "enabled",
    "version": 7,
    "some_future_field": {"kept": True},
}
RUN = {"id": "run_1", "routine_id": ROUTINE["id"], "status": "queued", "trigger": "manual"}
