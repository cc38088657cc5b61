"""Azure Functions entry points (v2 model). Thin: decode, call one function of ``routines``, answer.

All logic lives in the ``routines`` package (docs/architecture.md). The devhost runs these same triggers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import timedelta

import azure.functions as func

from routines import openapi, telemetry, ui
from routines.api import Api, Request, Response
from routines.dispatcher import PoisonMessage
from routines.foundry_api import FoundryApi
from routines.models import now_utc
from routines.purge import purge
from routines.repair import repair as run_repair
from routines.runtime import get_runtime
from routines.scheduler import tick as run_tick

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger("routines.functions")
# The queue binding needs the connection's *name* at indexing time; a setting may rename it (README).
STORAGE_CONNECTION = os.environ.get("ROUTINES_STORAGE_CONNECTION", "AzureWebJobsStorage")
# `%ROUTINES_QUEUE_NAME%` must resolve; the Bicep always sets it, and this default serves local hosts.
os.environ.setdefault("ROUTINES_QUEUE_NAME", "routine-dispatch")


def _request(req: func.HttpRequest) -> Request:
    return Request(
        method=req.method,
        route_params=dict(req.route_params),
        query=dict(req.params),
        headers={k.lower(): v for k, v in req.headers.items()},
        body=req.get_body() or b"",
    )


def _serve(
    handler: Callable[[Api], Callable[[Request], Response]], req: func.HttpRequest
) -> func.HttpResponse:
    api = get_runtime().api
    return _http_response(api.handle(handler(api), _request(req)))


def _http_response(response: Response) -> func.HttpResponse:
    headers = {k: v for k, v in response.headers.items() if k != "Content-Type"}
    return func.HttpResponse(
        response.encoded() if response.body is not None else None,
        status_code=response.status,
        headers=headers,
        mimetype=response.content_type if response.body is not None else None,
    )


@app.route(route="routines", methods=["GET", "POST"])
def routines_collection(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.create_routine if req.method == "POST" else api.list_routines, req)


@app.route(route="routines/{id}", methods=["GET", "PATCH", "DELETE"])
def routine_item(req: func.HttpRequest) -> func.HttpResponse:
    handlers = {"GET": "get_routine", "PATCH": "patch_routine", "DELETE": "delete_routine"}
    return _serve(lambda api: getattr(api, handlers[req.method]), req)


@app.route(route="routines/{id}/enable", methods=["POST"])
def routine_enable(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.enable_routine, req)


@app.route(route="routines/{id}/disable", methods=["POST"])
def routine_disable(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.disable_routine, req)


@app.route(route="routines/{id}/dispatch", methods=["POST"])
def routine_dispatch(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.dispatch_routine, req)


@app.route(route="routines/{id}/runs", methods=["GET"])
def routine_runs(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.list_runs, req)


@app.route(route="routines/{id}/runs/{run_id}", methods=["GET"])
def routine_run(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.get_run, req)


# Anonymous at the Functions level: the delivery's signature (Standard Webhooks or GitHub's) is its
# authentication, checked against the secret the routine's secret_setting names.
@app.route(route="hooks/{key}", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def hook(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.receive_hook, req)


@app.route(route="routines/{id}/runs/{run_id}/steps/{step_id}/approve", methods=["POST"])
def step_approve(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.approve_step, req)


@app.route(route="routines/{id}/runs/{run_id}/steps/{step_id}/reject", methods=["POST"])
def step_reject(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.reject_step, req)


@app.route(route="preview", methods=["POST"])
def preview(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.preview, req)


@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(lambda api: api.health, req)


@app.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(openapi.document()), mimetype="application/json")


@app.route(route="ui/{*path}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def dashboard(req: func.HttpRequest) -> func.HttpResponse:
    # The page and its files are public; the API calls the page makes carry the user's function key.
    asset = ui.serve(req.route_params.get("path") or "", req.url, req.headers.get("if-none-match"))
    return func.HttpResponse(
        asset.body, status_code=asset.status, headers=asset.headers, mimetype=asset.content_type
    )


# /api/foundry: Foundry Routines' SDK (beta.routines) unchanged but for its endpoint. Anonymous at
# the Functions level (the SDK sends an Entra bearer token, never a function key); the surface is
# off unless ROUTINES_FOUNDRY_API is set, and "entra" needs App Service Authentication (README).
# Actions (`{name}:enable`) come in on routines/{name}: a colon is no route separator.
def _serve_foundry(
    handler: Callable[[FoundryApi], Callable[[Request], Response]], req: func.HttpRequest
) -> func.HttpResponse:
    runtime = get_runtime()
    foundry = FoundryApi(runtime.api.service, runtime.settings)
    return _http_response(foundry.handle(handler(foundry), _request(req)))


@app.route(route="foundry/routines", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def foundry_routines(req: func.HttpRequest) -> func.HttpResponse:
    return _serve_foundry(lambda f: f.list_routines, req)


@app.route(
    route="foundry/routines/{name}",
    methods=["GET", "PUT", "DELETE", "POST"],
    auth_level=func.AuthLevel.ANONYMOUS,
)
def foundry_routine(req: func.HttpRequest) -> func.HttpResponse:
    return _serve_foundry(lambda f: f.routine, req)


@app.route(route="foundry/routines/{name}/runs", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def foundry_routine_runs(req: func.HttpRequest) -> func.HttpResponse:
    return _serve_foundry(lambda f: f.list_runs, req)


@app.timer_trigger(schedule="0 * * * * *", arg_name="timer", run_on_startup=False, use_monitor=False)
def tick(timer: func.TimerRequest) -> None:
    runtime = get_runtime()
    run_tick(runtime.store, runtime.queue, now_utc())


@app.queue_trigger(arg_name="msg", queue_name="%ROUTINES_QUEUE_NAME%", connection=STORAGE_CONNECTION)
def dispatch(msg: func.QueueMessage) -> None:
    runtime = get_runtime()
    try:
        runtime.dispatcher.deliver(msg.get_body(), msg.dequeue_count or 1, runtime.queue.poison)
    except PoisonMessage as exc:
        # docs/guarantees.md #7: straight to the poison queue, with a log line; the worker carries on.
        log.error("moving message %s to %s: %s", msg.id, runtime.settings.poison_queue_name, exc)
        telemetry.record_poison()
        runtime.queue.poison(msg.get_body().decode(errors="replace"))


@app.timer_trigger(schedule="*/15 * * * * *", arg_name="timer", run_on_startup=False, use_monitor=False)
def repair(timer: func.TimerRequest) -> None:
    runtime = get_runtime()
    run_repair(
        runtime.store, runtime.queue, now_utc(), timedelta(seconds=runtime.settings.repair_after_seconds)
    )


@app.timer_trigger(schedule="0 30 3 * * *", arg_name="timer", run_on_startup=False, use_monitor=False)
def purge_runs(timer: func.TimerRequest) -> None:
    runtime = get_runtime()
    purge(runtime.store, runtime.settings, now_utc())
