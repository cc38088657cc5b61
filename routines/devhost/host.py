"""``DevHost``: the HTTP server, timers and queue pollers of one app together, and the command line."""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from routines.devhost.functions import (
    FunctionSpec,
    _InFlight,
    discover_functions,
    find_function_app,
    load_app_module,
)
from routines.devhost.http import HttpRouter, _HttpServer, _method_name, _query_params, _RequestHandler
from routines.devhost.queues import QUEUE_NAME_RE, QueuePoller, _queue_connection
from routines.devhost.settings import (
    DevHostError,
    HostConfig,
    apply_local_settings,
    resolve_setting_expressions,
)
from routines.devhost.timers import Schedule, TimerRunner

log = logging.getLogger("routines.devhost")

DEFAULT_PORT = 7071
SHUTDOWN_GRACE_SECONDS = 30.0


class DevHost:
    """Hosts the app in ``app_dir``: HTTP on ``127.0.0.1:port`` (0: a free port), timers, queue pollers.

    ``start()`` applies ``local.settings.json`` to ``os.environ`` (the environment wins), imports
    ``function_app.py``, reads its triggers and starts serving; it raises ``DevHostError`` when the app
    cannot be hosted. ``stop()`` stops accepting work and waits up to ``grace`` seconds for what is in
    flight; it returns whether everything finished.

    Differences from the Functions host: one function key for every non-anonymous route, and only when
    ``function_key`` is given (otherwise every route is anonymous); timers keep no
    schedule status (no catch-up run for a schedule missed while down) and take no singleton lock, so
    run one timer-enabled host per storage account (``timers=False`` for the others); a queue message
    is not renewed past its 10-minute processing visibility; HEAD falls back to a GET function; a path
    that matches with another method gets ``405`` (the Functions host answers ``404``).
    """

    def __init__(
        self,
        app_dir: str | os.PathLike[str] = ".",
        port: int = DEFAULT_PORT,
        timers: bool = True,
        function_key: str | None = None,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.function_key = function_key
        self.requested_port = port
        self.timers_enabled = timers
        self.functions: list[FunctionSpec] = []
        self.config = HostConfig()
        self.router = HttpRouter("api", [])
        self.http_in_flight = _InFlight()
        self.stopping = False
        self._stop = threading.Event()
        self._server: _HttpServer | None = None
        self._server_thread: threading.Thread | None = None
        self._timers: list[TimerRunner] = []
        self._pollers: list[QueuePoller] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise DevHostError("the devhost is not started")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def route_url(self, function_name: str) -> str | None:
        """The URL of HTTP function ``function_name``'s route up to its first parameter, or None."""
        for route in self.router.routes:
            if route.spec.name == function_name:
                literal = route.template.template.split("{", 1)[0].rstrip("/")
                return "/".join([self.url, *self.router.prefix, *([literal] if literal else [])])
        return None

    def authorized(self, spec: FunctionSpec, header_key: str | None, query: str) -> bool:
        """Whether a request may call ``spec``: always when no key is set or the route is anonymous."""
        level = str(_method_name(spec.trigger.get("authLevel", "function"))).lower()
        if self.function_key is None or level == "anonymous":
            return True
        given = header_key or _query_params(query).get("code") or ""
        return hmac.compare_digest(given.encode(), self.function_key.encode())

    def start(self) -> None:
        applied = apply_local_settings(self.app_dir)
        if applied:
            log.info("applied local.settings.json values: %s", ", ".join(sorted(applied)))
        self.config = HostConfig.load(self.app_dir)
        app = find_function_app(load_app_module(self.app_dir))
        env = dict(os.environ)
        self.functions = discover_functions(app, env)
        http_specs = [s for s in self.functions if s.trigger_type == "httpTrigger"]
        self.router = HttpRouter(self.config.route_prefix, http_specs)
        # Build everything first, so a bad binding fails before any thread starts.
        timers = [self._timer_runner(s, env) for s in self.functions if s.trigger_type == "timerTrigger"]
        pollers = [self._queue_poller(s, env) for s in self.functions if s.trigger_type == "queueTrigger"]
        self._server = _HttpServer(("127.0.0.1", self.requested_port), _RequestHandler)
        self._server.host = self
        self._server_thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._server_thread.start()
        self._log_functions(timers, pollers)
        if self.timers_enabled:
            self._timers = timers
        elif timers:
            log.info("timers are disabled (--no-timers): %s", ", ".join(t.spec.name for t in timers))
        self._pollers = pollers
        for timer in self._timers:
            timer.start()
        for poller in self._pollers:
            poller.start()

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> bool:
        """Stop serving and wait up to ``grace`` s for in-flight work. True when all of it finished."""
        self.stopping = True
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        deadline = time.monotonic() + grace
        finished = self.http_in_flight.wait_at_most(0, timeout=grace)
        for poller in self._pollers:
            poller.thread.join(max(deadline - time.monotonic(), 0))
            finished = (
                poller.in_flight.wait_at_most(0, timeout=max(deadline - time.monotonic(), 0)) and finished
            )
        for timer in self._timers:
            timer.thread.join(max(deadline - time.monotonic(), 0))
            finished = not timer.thread.is_alive() and finished
        if not finished:
            log.warning("devhost stopped with work still in flight after %.0f s", grace)
        return finished

    def _timer_runner(self, spec: FunctionSpec, env: Mapping[str, str]) -> TimerRunner:
        where = f"function {spec.name}"
        expression = resolve_setting_expressions(str(spec.trigger.get("schedule", "")), env, where)
        run_on_startup = bool(spec.trigger.get("runOnStartup", spec.trigger.get("run_on_startup", False)))
        return TimerRunner(spec, Schedule(expression, where), run_on_startup, self._stop)

    def _queue_poller(self, spec: FunctionSpec, env: Mapping[str, str]) -> QueuePoller:
        where = f"function {spec.name}"
        queue_name = resolve_setting_expressions(str(spec.trigger.get("queueName", "")), env, where)
        if not QUEUE_NAME_RE.match(queue_name):
            raise DevHostError(
                f"{where}: queue name {queue_name!r} is invalid "
                "(3-63 lowercase letters, digits and single hyphens)"
            )
        return QueuePoller(spec, queue_name, _queue_connection(spec, env), self.config.queues, self._stop)

    def _log_functions(self, timers: list[TimerRunner], pollers: list[QueuePoller]) -> None:
        log.info("functions of %s:", self.app_dir / "function_app.py")
        prefix = "/".join(self.router.prefix)
        for route in self.router.routes:
            methods = ",".join(sorted(route.methods)) or "all methods"
            path = "/".join(p for p in (prefix, route.template.template) if p)
            log.info("  %s: [%s] %s/%s", route.spec.name, methods, self.url, path)
        for timer in timers:
            log.info("  %s: timer %s", timer.spec.name, timer.schedule.expression)
        for poller in pollers:
            log.info("  %s: queue %s", poller.spec.name, poller.queue_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m routines.devhost",
        description="Run function_app.py's HTTP routes, timers and queue triggers locally.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (0: a free one)")
    parser.add_argument("--app-dir", default=".", help="folder holding function_app.py and host.json")
    parser.add_argument("--no-timers", action="store_true", help="do not run timer triggers")
    parser.add_argument(
        "--function-key",
        help="require this key (x-functions-key or ?code=) on non-anonymous routes, as in Azure",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every request at INFO

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    host = DevHost(args.app_dir, port=args.port, timers=not args.no_timers, function_key=args.function_key)
    try:
        host.start()
    except DevHostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 2
    dashboard = host.route_url("dashboard")
    if dashboard:
        print(f"dashboard on {dashboard}", flush=True)
    print(f"devhost ready on {host.url}", flush=True)
    stop.wait()
    log.info("shutting down")
    host.stop()
    return 0
