"""Wiring: the store, queue and agent backend of one process, built once from ``Settings``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
from azure.core.exceptions import AzureError, ResourceExistsError
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableServiceClient
from azure.storage.queue import ExponentialRetry, QueueClient, TextBase64EncodePolicy

from routines.agents.base import AgentBackend
from routines.api import Api
from routines.config import Settings, SettingsError
from routines.dispatcher import Dispatcher
from routines.errors import StorageUnavailable
from routines.messages import DispatchMessage, whole_seconds
from routines.store.tables import TableStore

log = logging.getLogger(__name__)
# One SDK retry layer, a few seconds long, so a refused request is retried past a short outage and
# an API call or a tick is never held for long (the layers above re-queue or answer 503). Table
# writes turn it off (TableStore._execute retries them; docs/architecture.md, storage retries). Table
# reads (azure-core's policy) wait 0, 0.8, 1.6 s. Queues use the storage SDK's own policy, which ignores
# ``retry_backoff_factor`` and whose default waits 15, 18 and 24 s (a minute inside one send); its
# ``initial_backoff + increment_base ** count`` +- jitter gives here 0-1, 1-3 and 3-5 s.
_RETRIES = {"retry_total": 3, "retry_backoff_factor": 0.4}


class AzureQueue:
    """The dispatch queue on Azure Storage Queues: base64 text, as the Functions host expects."""

    def __init__(self, client: QueueClient, poison: QueueClient) -> None:
        self.client, self.poison_client = client, poison

    def ensure(self) -> None:
        for client in (self.client, self.poison_client):
            try:
                client.create_queue()
            except ResourceExistsError:
                pass
            except AzureError as exc:
                raise StorageUnavailable(f"cannot create queue {client.queue_name}: {exc}") from exc

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        try:
            self.client.send_message(
                message.encode(), visibility_timeout=whole_seconds(delay_seconds) or None, time_to_live=-1
            )
        except AzureError as exc:
            raise StorageUnavailable(
                f"cannot enqueue to {self.client.queue_name}: {type(exc).__name__}"
            ) from exc

    def poison(self, text: str) -> None:
        try:
            self.poison_client.send_message(text, time_to_live=-1)
        except AzureError as exc:
            raise StorageUnavailable(f"cannot enqueue to {self.poison_client.queue_name}") from exc


def _credential(settings: Settings) -> Any:
    from azure.identity import DefaultAzureCredential

    client_id = settings.storage.client_id or settings.azure_client_id
    return (
        DefaultAzureCredential(managed_identity_client_id=client_id)
        if client_id
        else DefaultAzureCredential()
    )


def _session() -> requests.Session:
    """One connection pool sized for the host's concurrency (batch 16 + 8 more in flight), shared by
    the table and queue clients; requests' default of 10 would drop and reopen connections."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def queue_retry() -> ExponentialRetry:
    return ExponentialRetry(initial_backoff=0, increment_base=2, retry_total=3, random_jitter_range=1)


def storage_clients(
    settings: Settings, hook: Callable[[Any], None] | None = None
) -> tuple[TableServiceClient, AzureQueue]:
    """Table service and dispatch queue clients; ``hook`` sees every HTTP request (request counting)."""
    extra: dict[str, Any] = {
        **_RETRIES,
        "transport": RequestsTransport(session=_session(), session_owner=False),
    }
    if hook:
        extra["raw_request_hook"] = hook
    target = settings.storage
    encode = TextBase64EncodePolicy()
    credential = None if target.connection_string else _credential(settings)
    if target.connection_string:
        tables = TableServiceClient.from_connection_string(target.connection_string, **extra)
    else:
        tables = TableServiceClient(endpoint=target.table_endpoint or "", credential=credential, **extra)

    def make_queue(name: str) -> QueueClient:
        options = {**extra, "message_encode_policy": encode, "retry_policy": queue_retry()}
        if target.connection_string:
            return QueueClient.from_connection_string(target.connection_string, name, **options)
        return QueueClient(target.queue_endpoint or "", name, credential=credential, **options)

    return tables, AzureQueue(make_queue(settings.queue_name), make_queue(settings.poison_queue_name))


def build_backend(settings: Settings) -> AgentBackend:
    if settings.agent_backend == "http":
        from routines.agents.http import HttpAgentBackend

        if not settings.agent_endpoint:
            raise SettingsError("ROUTINES_AGENT_BACKEND=http needs ROUTINES_AGENT_ENDPOINT")
        return HttpAgentBackend(
            settings.agent_endpoint, token=settings.agent_token, signing_secret=settings.agent_signing_secret
        )
    from routines.agents.foundry import FoundryBackend, credential_for

    if not settings.foundry_project_endpoint:
        raise SettingsError("ROUTINES_AGENT_BACKEND=foundry needs ROUTINES_FOUNDRY_PROJECT_ENDPOINT")
    return FoundryBackend(settings.foundry_project_endpoint, credential_for(settings.azure_client_id))


@dataclass
class Runtime:
    settings: Settings
    store: TableStore
    queue: AzureQueue
    _backend: AgentBackend | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, hook: Callable[[Any], None] | None = None) -> Runtime:
        tables, queue = storage_clients(settings, hook)
        runtime = cls(settings, TableStore(tables, settings.table_prefix), queue)
        runtime.store.ensure_tables()
        queue.ensure()
        return runtime

    @property
    def backend(self) -> AgentBackend:
        with self._lock:
            if self._backend is None:
                self._backend = build_backend(self.settings)
            return self._backend

    @property
    def api(self) -> Api:
        return Api(self.store, self.queue, self.settings)

    @property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.store, self.queue, self.backend)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's runtime, built on first use (settings read once, tables and queues created)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from routines import observability

            settings = Settings.from_env()
            observability.configure(settings)
            _runtime = Runtime.from_settings(settings)
        return _runtime
