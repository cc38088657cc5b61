"""The azure-core pipeline of both clients: which policies, and the retry rule."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AzureKeyCredential
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import (
    AsyncBearerTokenCredentialPolicy,
    AsyncRetryPolicy,
    AzureKeyCredentialPolicy,
    BearerTokenCredentialPolicy,
    ContentDecodePolicy,
    CustomHookPolicy,
    DistributedTracingPolicy,
    HeadersPolicy,
    HttpLoggingPolicy,
    ProxyPolicy,
    RequestIdPolicy,
    RetryPolicy,
    SansIOHTTPPolicy,
    UserAgentPolicy,
)

from routines_client._version import VERSION

FUNCTION_KEY_HEADER = "x-functions-key"
# The API answers 429 when throttled and 503 when its storage does not answer: both mean the request
# was not carried out, so every method may retry them. Other 5xx are not retried: a POST that failed
# half-way (a dispatch) must not be sent twice.
RETRY_STATUSES = frozenset({429, 503})


class _RetryOn429And503:
    """Retry only ``RETRY_STATUSES`` (any method), with azure-core's exponential back-off and its
    ``Retry-After`` handling; connection errors are retried by azure-core as usual."""

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        return bool(settings["total"]) and response.http_response.status_code in RETRY_STATUSES


class RoutinesRetryPolicy(_RetryOn429And503, RetryPolicy[Any, Any]):
    pass


class AsyncRoutinesRetryPolicy(_RetryOn429And503, AsyncRetryPolicy[Any, Any]):
    pass


class _AllowLoopbackHttp(SansIOHTTPPolicy[Any, Any]):
    """Bearer tokens over plain http only to this machine (a local host or proxy); azure-core refuses
    them on any non-TLS URL otherwise."""

    def on_request(self, request: PipelineRequest[Any]) -> None:
        request.context["enforce_https"] = False


def normalize_endpoint(endpoint: str) -> str:
    """The app's base URL without a trailing ``/`` or ``/api``: ``http://127.0.0.1:7071/api/`` and
    ``http://127.0.0.1:7071`` are the same endpoint."""
    base = endpoint.strip().rstrip("/")
    if base.endswith("/api"):
        base = base[: -len("/api")]
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint must be an http(s) URL such as http://127.0.0.1:7071, not {endpoint!r}")
    return base


def _is_loopback(endpoint: str) -> bool:
    return (urlsplit(endpoint).hostname or "") in ("127.0.0.1", "localhost", "::1")


def build_policies(
    endpoint: str, credential: Any, *, is_async: bool, credential_scopes: list[str] | None, **kwargs: Any
) -> list[Any]:
    """azure-core's standard policy list, with the Routines retry rule and the credential's policy.

    ``credential``: an ``AzureKeyCredential`` (a function key, sent as ``x-functions-key``), a
    ``TokenCredential`` / ``AsyncTokenCredential`` (an Entra token for ``credential_scopes``, by default
    ``<endpoint>/.default``), or None (the local host needs no key).
    """
    auth: Any = None
    loopback: list[Any] = []
    if isinstance(credential, AzureKeyCredential):
        auth = AzureKeyCredentialPolicy(credential, FUNCTION_KEY_HEADER)
    elif credential is not None:
        if not hasattr(credential, "get_token"):
            raise TypeError(
                "credential must be an AzureKeyCredential (function key), a TokenCredential, or None"
            )
        scopes = credential_scopes or [f"{endpoint}/.default"]
        policy = AsyncBearerTokenCredentialPolicy if is_async else BearerTokenCredentialPolicy
        auth = policy(credential, *scopes)
        if endpoint.startswith("http://") and _is_loopback(endpoint):
            loopback = [_AllowLoopbackHttp()]
    retry = (AsyncRoutinesRetryPolicy if is_async else RoutinesRetryPolicy)(**kwargs)
    policies = [
        RequestIdPolicy(**kwargs),
        HeadersPolicy(**kwargs),
        UserAgentPolicy(sdk_moniker=f"routines-client/{VERSION}", **kwargs),
        ProxyPolicy(**kwargs),
        ContentDecodePolicy(**kwargs),
        *loopback,
        retry,
        auth,
        CustomHookPolicy(**kwargs),
        DistributedTracingPolicy(**kwargs),
        # Logs method, URL and status, with header values and query parameters redacted (the function
        # key never reaches a log). azure-core's NetworkTraceLoggingPolicy is left out on purpose: it
        # logs header values verbatim.
        HttpLoggingPolicy(**kwargs),
    ]
    return [p for p in policies if p is not None]
