"""``RoutinesClient``: the synchronous client of the Routines HTTP API."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from azure.core import MatchConditions, PipelineClient
from azure.core.paging import ItemPaged
from azure.core.rest import HttpRequest, HttpResponse

from routines_client import _operations as ops
from routines_client._models import (
    Routine,
    RoutineAction,
    RoutineRetryPolicy,
    RoutineRun,
    RoutineTrigger,
)
from routines_client._policies import build_policies, normalize_endpoint


class RoutinesClient:
    """A client of one Routines deployment.

    :param endpoint: the app's base URL (``https://<app>.azurewebsites.net``, ``http://127.0.0.1:7071``);
        a trailing ``/api`` is accepted.
    :param credential: an ``AzureKeyCredential`` holding a function key (sent as ``x-functions-key``), a
        ``TokenCredential`` (an Entra token, e.g. ``DefaultAzureCredential`` from the ``identity`` extra,
        for ``credential_scopes``, default ``<endpoint>/.default``), or None for the local host.
    :keyword kwargs: azure-core's options, e.g. ``retry_total``, ``retry_backoff_factor``,
        ``connection_timeout``, ``transport``, ``logging_enable``.

    Every call raises ``NotFoundError``, ``ConflictError``, ``PreconditionFailedError``,
    ``ValidationError`` or their base ``RoutinesError`` for an error answer, and azure-core's
    ``ServiceRequestError`` when the endpoint cannot be reached. ``429`` and ``503`` answers are
    retried with exponential back-off (``Retry-After`` honoured).
    """

    def __init__(
        self,
        endpoint: str,
        credential: Any = None,
        *,
        credential_scopes: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._endpoint = normalize_endpoint(endpoint)
        policies = build_policies(
            self._endpoint, credential, is_async=False, credential_scopes=credential_scopes, **kwargs
        )
        self._client: PipelineClient[Any, Any] = PipelineClient(
            self._endpoint, policies=policies, transport=kwargs.pop("transport", None), **kwargs
        )

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def agents(self) -> RoutinesClient:
        """This client, so code written as Foundry Routines' article writes it
        (``client.agents.create_routine(...)``) runs unchanged."""
        return self

    def __enter__(self) -> RoutinesClient:
        self._client.__enter__()
        return self

    def __exit__(self, *exc_details: Any) -> None:
        self._client.__exit__(*exc_details)

    def close(self) -> None:
        self._client.close()

    def _send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:
        request.url = self._endpoint + request.url
        return ops.check(self._client.send_request(request, **kwargs))  # type: ignore[no-any-return]

    # --- routines ----------------------------------------------------------------------------------

    def create_routine(
        self,
        routine: Routine | Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        trigger: RoutineTrigger | Mapping[str, Any] | None = None,
        actions: list[RoutineAction] | list[Mapping[str, Any]] | None = None,
        description: str | None = None,
        retry_policy: RoutineRetryPolicy | Mapping[str, Any] | None = None,
        overlap_policy: str | None = None,
        catchup_window_seconds: int | None = None,
        timeout_seconds: int | None = None,
        state: str | None = None,
        **kwargs: Any,
    ) -> Routine:
        """Create a routine from a ``Routine``, a JSON mapping, or keyword fields (the article's form:
        ``create_routine(name=..., trigger=RoutineScheduleTrigger(...), actions=[...])``). Further API
        fields (``concurrency``, ``jitter_seconds``, ...) go as keywords too.

        :raises ConflictError: the name is taken. :raises ValidationError: the routine is invalid.
        """
        fields, kwargs = ops.split_fields(kwargs)
        fields.update(
            name=name,
            trigger=trigger,
            actions=actions,
            description=description,
            retry_policy=retry_policy,
            overlap_policy=overlap_policy,
            catchup_window_seconds=catchup_window_seconds,
            timeout_seconds=timeout_seconds,
            state=state,
        )
        body = ops.routine_body(routine, fields)
        return ops.read_routine(self._send(ops.create_routine(body), **kwargs))

    def get_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        """:raises NotFoundError: no routine has this id."""
        return ops.read_routine(self._send(ops.get_routine(routine_id), **kwargs))

    def list_routines(
        self, *, state: str | None = None, results_per_page: int | None = None, **kwargs: Any
    ) -> ItemPaged[Routine]:
        """Every routine (``state``: only ``enabled``, ``disabled`` or ``completed`` ones), read lazily a
        page at a time as the iterator advances; ``.by_page()`` walks the pages."""

        def get_next(continuation: str | None) -> HttpResponse:
            return self._send(ops.list_routines(state, results_per_page, continuation), **kwargs)

        return ItemPaged(get_next, ops.routine_page)

    def update_routine(
        self,
        routine: Routine | str,
        patch: Mapping[str, Any] | None = None,
        *,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> Routine:
        """Change a routine: pass a ``Routine`` (its settable fields are sent, ``state`` aside: use
        enable / disable), or an id with a JSON merge ``patch`` and/or keyword fields
        (``update_routine(rid, description="...")``).

        ``etag=`` makes the update conditional (``If-Match``); so does
        ``match_condition=MatchConditions.IfNotModified`` with a ``Routine``, on the etag it was read with.
        :raises PreconditionFailedError: the routine changed since.
        :raises NotFoundError, ValidationError, ConflictError: (a name taken).
        """
        fields, kwargs = ops.split_fields(kwargs)
        routine_id, body, headers = ops.update_args(routine, patch, fields, etag, match_condition)
        return ops.read_routine(self._send(ops.update_routine(routine_id, body, headers), **kwargs))

    def delete_routine(self, routine_id: str, **kwargs: Any) -> None:
        """Delete a routine (its runs stay until the retention). :raises NotFoundError:"""
        self._send(ops.delete_routine(routine_id), **kwargs)

    def enable_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        """Resume a routine; its next fire is computed from now.
        :raises NotFoundError: :raises ConflictError: a timer routine that has completed."""
        return ops.read_routine(self._send(ops.set_state(routine_id, "enable"), **kwargs))

    def disable_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        """Pause a routine (state ``disabled``, no fires). :raises NotFoundError:"""
        return ops.read_routine(self._send(ops.set_state(routine_id, "disable"), **kwargs))

    # --- runs --------------------------------------------------------------------------------------

    def dispatch_routine(self, routine_id: str, input: Any = None, **kwargs: Any) -> RoutineRun:
        """Start a manual run now; ``input`` (a string or a JSON object) replaces the input of the
        steps that start with the run. Returns the queued run. :raises NotFoundError:"""
        return ops.read_run(self._send(ops.dispatch_routine(routine_id, input), **kwargs))

    def list_routine_runs(
        self,
        routine_id: str,
        *,
        status: str | None = None,
        results_per_page: int | None = None,
        **kwargs: Any,
    ) -> ItemPaged[RoutineRun]:
        """A routine's runs, newest first, read lazily a page at a time. :raises NotFoundError:"""

        def get_next(continuation: str | None) -> HttpResponse:
            request = ops.list_routine_runs(routine_id, status, results_per_page, continuation)
            return self._send(request, **kwargs)

        return ItemPaged(get_next, ops.run_page)

    def get_routine_run(self, routine_id: str, run_id: str, **kwargs: Any) -> RoutineRun:
        """:raises NotFoundError:"""
        return ops.read_run(self._send(ops.get_routine_run(routine_id, run_id), **kwargs))

    def approve_step(
        self, routine_id: str, run_id: str, step_id: str, *, comment: str | None = None, **kwargs: Any
    ) -> RoutineRun:
        """Approve a waiting approval step. :raises NotFoundError: :raises ConflictError: not waiting."""
        request = ops.decide_step(routine_id, run_id, step_id, "approve", comment)
        return ops.read_run(self._send(request, **kwargs))

    def reject_step(
        self, routine_id: str, run_id: str, step_id: str, *, comment: str | None = None, **kwargs: Any
    ) -> RoutineRun:
        """Reject a waiting approval step (the step fails). :raises NotFoundError, ConflictError:"""
        request = ops.decide_step(routine_id, run_id, step_id, "reject", comment)
        return ops.read_run(self._send(request, **kwargs))

    def preview_fires(
        self,
        trigger: RoutineTrigger | Mapping[str, Any],
        *,
        after: datetime | str | None = None,
        count: int | None = None,
        **kwargs: Any,
    ) -> list[datetime]:
        """The next fires of a trigger (up to ``count``, default 10) after ``after`` (default now), as
        the server computes them. :raises ValidationError: an invalid trigger."""
        return ops.read_fires(self._send(ops.preview_fires(trigger, after, count), **kwargs))
