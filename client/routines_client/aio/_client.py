"""``RoutinesClient`` for asyncio: the same calls as ``routines_client.RoutinesClient``, awaited.

Lists return ``AsyncItemPaged`` (``async for``). The transport is aiohttp (the ``aio`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from azure.core import AsyncPipelineClient, MatchConditions
from azure.core.async_paging import AsyncItemPaged, AsyncList
from azure.core.rest import AsyncHttpResponse, HttpRequest

from routines_client import _operations as ops
from routines_client._models import (
    Routine,
    RoutineAction,
    RoutineRetryPolicy,
    RoutineRun,
    RoutineTrigger,
)
from routines_client._policies import build_policies, normalize_endpoint


def _default_transport(kwargs: dict[str, Any]) -> Any:
    try:
        import aiohttp  # noqa: F401  (azure-core imports it only on the first request)
        from azure.core.pipeline.transport import AioHttpTransport
    except ImportError:
        raise ImportError("routines_client.aio needs aiohttp: pip install 'routines-client[aio]'") from None
    return AioHttpTransport(**kwargs)


class RoutinesClient:
    """The asyncio twin of ``routines_client.RoutinesClient``: same arguments, same calls, same errors.
    ``credential`` may also be an ``AsyncTokenCredential`` (``azure.identity.aio``). Use it as
    ``async with RoutinesClient(...) as client:`` or ``await client.close()``."""

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
            self._endpoint, credential, is_async=True, credential_scopes=credential_scopes, **kwargs
        )
        transport = kwargs.pop("transport", None) or _default_transport(kwargs)
        self._client: AsyncPipelineClient[Any, Any] = AsyncPipelineClient(
            self._endpoint, policies=policies, transport=transport, **kwargs
        )

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def agents(self) -> RoutinesClient:
        """This client (``client.agents.create_routine(...)``, as Foundry Routines' article writes it)."""
        return self

    async def __aenter__(self) -> RoutinesClient:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_details: Any) -> None:
        await self._client.__aexit__(*exc_details)

    async def close(self) -> None:
        await self._client.close()

    async def _send(self, request: HttpRequest, **kwargs: Any) -> AsyncHttpResponse:
        request.url = self._endpoint + request.url
        return ops.check(await self._client.send_request(request, **kwargs))  # type: ignore[no-any-return]

    # --- routines ----------------------------------------------------------------------------------

    async def create_routine(
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
        return ops.read_routine(await self._send(ops.create_routine(body), **kwargs))

    async def get_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        return ops.read_routine(await self._send(ops.get_routine(routine_id), **kwargs))

    def list_routines(
        self, *, state: str | None = None, results_per_page: int | None = None, **kwargs: Any
    ) -> AsyncItemPaged[Routine]:
        async def get_next(continuation: str | None) -> AsyncHttpResponse:
            return await self._send(ops.list_routines(state, results_per_page, continuation), **kwargs)

        return AsyncItemPaged(get_next, _async_page(ops.routine_page))

    async def update_routine(
        self,
        routine: Routine | str,
        patch: Mapping[str, Any] | None = None,
        *,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> Routine:
        fields, kwargs = ops.split_fields(kwargs)
        routine_id, body, headers = ops.update_args(routine, patch, fields, etag, match_condition)
        return ops.read_routine(await self._send(ops.update_routine(routine_id, body, headers), **kwargs))

    async def delete_routine(self, routine_id: str, **kwargs: Any) -> None:
        await self._send(ops.delete_routine(routine_id), **kwargs)

    async def enable_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        return ops.read_routine(await self._send(ops.set_state(routine_id, "enable"), **kwargs))

    async def disable_routine(self, routine_id: str, **kwargs: Any) -> Routine:
        return ops.read_routine(await self._send(ops.set_state(routine_id, "disable"), **kwargs))

    # --- runs --------------------------------------------------------------------------------------

    async def dispatch_routine(self, routine_id: str, input: Any = None, **kwargs: Any) -> RoutineRun:
        return ops.read_run(await self._send(ops.dispatch_routine(routine_id, input), **kwargs))

    def list_routine_runs(
        self,
        routine_id: str,
        *,
        status: str | None = None,
        results_per_page: int | None = None,
        **kwargs: Any,
    ) -> AsyncItemPaged[RoutineRun]:
        async def get_next(continuation: str | None) -> AsyncHttpResponse:
            request = ops.list_routine_runs(routine_id, status, results_per_page, continuation)
            return await self._send(request, **kwargs)

        return AsyncItemPaged(get_next, _async_page(ops.run_page))

    async def get_routine_run(self, routine_id: str, run_id: str, **kwargs: Any) -> RoutineRun:
        return ops.read_run(await self._send(ops.get_routine_run(routine_id, run_id), **kwargs))

    async def approve_step(
        self, routine_id: str, run_id: str, step_id: str, *, comment: str | None = None, **kwargs: Any
    ) -> RoutineRun:
        request = ops.decide_step(routine_id, run_id, step_id, "approve", comment)
        return ops.read_run(await self._send(request, **kwargs))

    async def reject_step(
        self, routine_id: str, run_id: str, step_id: str, *, comment: str | None = None, **kwargs: Any
    ) -> RoutineRun:
        request = ops.decide_step(routine_id, run_id, step_id, "reject", comment)
        return ops.read_run(await self._send(request, **kwargs))

    async def preview_fires(
        self,
        trigger: RoutineTrigger | Mapping[str, Any],
        *,
        after: datetime | str | None = None,
        count: int | None = None,
        **kwargs: Any,
    ) -> list[datetime]:
        return ops.read_fires(await self._send(ops.preview_fires(trigger, after, count), **kwargs))


def _async_page(extract: Any) -> Any:
    async def extract_data(response: AsyncHttpResponse) -> tuple[str | None, AsyncList[Any]]:
        continuation, items = extract(response)
        return continuation, AsyncList(list(items))

    return extract_data
