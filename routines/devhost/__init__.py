"""A local host for ``function_app.py``: its HTTP routes, timers and queue triggers, without Core Tools.

``python -m routines.devhost [--port 7071] [--app-dir .] [--no-timers]``

The triggers come from the app's own decorators (``app.get_functions()``), so a route, schedule or
queue name changed in ``function_app.py`` is what runs here. Settings come from the environment,
then ``local.settings.json`` ``Values``; binding expressions ``%NAME%`` resolve against them. The
queue trigger follows ``host.json`` ``extensions.queues`` (batch size, new-batch threshold, polling
back-off, visibility timeout, ``maxDequeueCount`` then ``<queue>-poison``, base64 or plain messages).

With ``--function-key KEY``, routes whose ``auth_level`` is not anonymous need that key (header
``x-functions-key`` or query ``code``) as in Azure, else ``401``; without it every route is open.
What it does not do (see ``DevHost``): per-function and host keys, timer schedule monitoring and singleton
locks, output and input bindings, other trigger types.

One module per job: ``settings`` (``local.settings.json``, binding expressions, ``host.json``),
``functions`` (the app's triggers), ``http`` (routes and the server), ``timers``, ``queues``, and
``host`` (``DevHost`` and the command line). What other code uses is re-exported here.
"""

from routines.devhost.functions import (
    SUPPORTED_TRIGGERS,
    FunctionSpec,
    discover_functions,
    find_function_app,
    load_app_module,
)
from routines.devhost.host import DEFAULT_PORT, SHUTDOWN_GRACE_SECONDS, DevHost, main
from routines.devhost.http import (
    HTTP_METHODS,
    LOOPBACK_NAMES,
    MAX_REQUEST_BODY,
    HttpRoute,
    HttpRouter,
    RouteTemplate,
)
from routines.devhost.queues import PROCESSING_VISIBILITY_SECONDS, QUEUE_NAME_RE, QueuePoller
from routines.devhost.settings import (
    MIN_POLLING_INTERVAL,
    DevHostError,
    HostConfig,
    QueueOptions,
    apply_local_settings,
    parse_timespan,
    resolve_setting_expressions,
)
from routines.devhost.timers import PAST_DUE_AFTER, Schedule, TimerRunner

__all__ = [
    "DEFAULT_PORT",
    "HTTP_METHODS",
    "LOOPBACK_NAMES",
    "MAX_REQUEST_BODY",
    "MIN_POLLING_INTERVAL",
    "PAST_DUE_AFTER",
    "PROCESSING_VISIBILITY_SECONDS",
    "QUEUE_NAME_RE",
    "SHUTDOWN_GRACE_SECONDS",
    "SUPPORTED_TRIGGERS",
    "DevHost",
    "DevHostError",
    "FunctionSpec",
    "HostConfig",
    "HttpRoute",
    "HttpRouter",
    "QueueOptions",
    "QueuePoller",
    "RouteTemplate",
    "Schedule",
    "TimerRunner",
    "apply_local_settings",
    "discover_functions",
    "find_function_app",
    "load_app_module",
    "main",
    "parse_timespan",
    "resolve_setting_expressions",
]
