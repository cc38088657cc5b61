"""Settings, read once from the environment into a frozen object (README, Configuration).

Nothing else in Routines reads ``os.environ``: the function app and the devhost build one
``Settings`` per process and pass it down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from routines.errors import RoutinesError

DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class SettingsError(RoutinesError, ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class StorageTarget:
    """How to reach storage: a connection string, or service URIs plus an identity."""

    connection_string: str | None = None
    table_endpoint: str | None = None
    queue_endpoint: str | None = None
    blob_endpoint: str | None = None
    client_id: str | None = None  # user-assigned managed identity, when set

    @property
    def uses_identity(self) -> bool:
        return self.connection_string is None


@dataclass(frozen=True)
class Settings:
    storage: StorageTarget
    queue_name: str = "routine-dispatch"
    table_prefix: str = "routines"
    agent_backend: str = "foundry"
    foundry_project_endpoint: str | None = None
    agent_endpoint: str | None = None
    agent_token: str | None = field(default=None, repr=False)
    agent_signing_secret: str | None = field(default=None, repr=False)
    min_interval_seconds: int = 60
    run_retention_days: int = 30
    repair_after_seconds: int = 90
    run_archive_container: str | None = None
    appinsights_connection_string: str | None = field(default=None, repr=False)
    otlp_endpoint: str | None = None
    azure_client_id: str | None = None
    log_format: str = "text"  # or "json": one JSON object per line, with trace and span ids
    # /api/foundry (the drop-in for Foundry Routines' SDK): off, entra (App Service
    # Authentication must vouch for every caller) or open (no check: local hosts only).
    foundry_api: str = "off"
    app_service_auth: bool = False  # WEBSITE_AUTH_ENABLED: the platform's authentication is on
    # Every app setting as read at start, for the ones users name (a webhook's ``secret_setting``).
    # In Azure a Key Vault reference is resolved by the platform before the process starts.
    app_settings: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    def app_setting(self, name: str) -> str | None:
        """The value of app setting ``name`` (``None`` when unset or blank). Secrets: never log it."""
        value = self.app_settings.get(name)
        return value if value and value.strip() else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``). Raises ``SettingsError``."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value and value.strip() else None

        backend = (get("ROUTINES_AGENT_BACKEND") or "foundry").lower()
        if backend not in ("foundry", "http"):
            raise SettingsError(f"ROUTINES_AGENT_BACKEND must be 'foundry' or 'http', not {backend!r}")
        prefix = get("ROUTINES_TABLE_PREFIX") or "routines"
        if not (prefix.isascii() and prefix.isalnum() and prefix[0].isalpha() and len(prefix) <= 40):
            raise SettingsError(
                "ROUTINES_TABLE_PREFIX must be 1-40 letters and digits, starting with a letter"
            )
        return cls(
            storage=_storage_target(env, get("ROUTINES_STORAGE_CONNECTION") or "AzureWebJobsStorage"),
            queue_name=get("ROUTINES_QUEUE_NAME") or "routine-dispatch",
            table_prefix=prefix,
            agent_backend=backend,
            foundry_project_endpoint=get("ROUTINES_FOUNDRY_PROJECT_ENDPOINT"),
            agent_endpoint=get("ROUTINES_AGENT_ENDPOINT"),
            agent_token=get("ROUTINES_AGENT_TOKEN"),
            agent_signing_secret=get("ROUTINES_AGENT_SIGNING_SECRET"),
            min_interval_seconds=_int(env, "ROUTINES_MIN_INTERVAL_SECONDS", 60, minimum=1),
            run_retention_days=_int(env, "ROUTINES_RUN_RETENTION_DAYS", 30, minimum=1),
            repair_after_seconds=_int(env, "ROUTINES_REPAIR_AFTER_SECONDS", 90, minimum=1),
            run_archive_container=get("ROUTINES_RUN_ARCHIVE_CONTAINER"),
            appinsights_connection_string=get("APPLICATIONINSIGHTS_CONNECTION_STRING"),
            otlp_endpoint=get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            azure_client_id=get("AZURE_CLIENT_ID"),
            log_format=_choice(env, "ROUTINES_LOG_FORMAT", ("text", "json")),
            foundry_api=_choice(env, "ROUTINES_FOUNDRY_API", ("off", "entra", "open")),
            app_service_auth=(get("WEBSITE_AUTH_ENABLED") or "").lower() == "true",
            app_settings=MappingProxyType(dict(env)),
        )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or "").strip().lower() or choices[0]
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {value}")
    return value


def _storage_target(env: Mapping[str, str], name: str) -> StorageTarget:
    """Resolve connection ``name`` the way the Functions host does: a connection string in ``name``,
    or identity-based ``name__*`` settings (``accountName`` or per-service URIs, ``credential``,
    ``clientId``)."""
    value = (env.get(name) or "").strip()
    if value:
        if value == "UseDevelopmentStorage=true":
            value = (
                f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
                f"BlobEndpoint=http://127.0.0.1:10000/{DEV_ACCOUNT};"
                f"QueueEndpoint=http://127.0.0.1:10001/{DEV_ACCOUNT};"
                f"TableEndpoint=http://127.0.0.1:10002/{DEV_ACCOUNT};"
            )
        return StorageTarget(connection_string=value)
    account = (env.get(f"{name}__accountName") or "").strip()

    def uri(service: str) -> str | None:
        explicit = (env.get(f"{name}__{service}ServiceUri") or "").strip()
        if explicit:
            return explicit
        return f"https://{account}.{service}.core.windows.net" if account else None

    table, queue, blob = uri("table"), uri("queue"), uri("blob")
    if not (table and queue):
        raise SettingsError(
            f"storage connection {name!r} is not set: give a connection string in {name}, or "
            f"{name}__accountName (or {name}__tableServiceUri and {name}__queueServiceUri) "
            "for a managed identity"
        )
    client_id = (env.get(f"{name}__clientId") or "").strip() or None
    return StorageTarget(table_endpoint=table, queue_endpoint=queue, blob_endpoint=blob, client_id=client_id)
