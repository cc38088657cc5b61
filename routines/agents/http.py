"""The HTTP agent backend (README, Agents): portable webhook agents.

The protocol, as an agent sees it:

* ``POST {endpoint}/agents/{agent}/invocations`` with the JSON body
  ``{"routine_id", "run_id", "idempotency_key", "scheduled_for", "attempt", "type", "thread_id", "input"}``
  and the headers ``Idempotency-Key`` (stable across attempts and redeliveries of one fire: dedupe on
  it), ``traceparent`` (W3C, when tracing is on), ``Authorization: Bearer <token>`` when a token is set
  and ``X-Routines-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<METHOD>.<path and
  query>.<body>">`` when a signing secret is set (both when both are set; see ``signature``).
* ``200 {"output": ..., "thread_id": ..., "id": ...}``: done. An ``output`` that is not a string is
  kept JSON-encoded; ``thread_id`` and ``id`` (or ``run_id``: the agent's own run id) are optional.
* ``202`` with a ``Location`` header (absolute, or relative to the request URL): the run goes on.
  Routines polls ``GET <location>`` from a delayed queue message after ``Retry-After`` seconds
  (default 1) until it answers ``200`` (done, same body as above) or an error. A ``202`` to a poll may
  carry a new ``Location``. GET and DELETE requests carry the same credentials, signed over their own
  method and target with an empty body, so no signature is valid for another request.
* ``DELETE <location>``: sent once, best effort, when the run's timeout expires; an agent may implement
  it to cancel the run. Its answer is ignored.
* ``408``, ``429``, ``5xx``, timeouts and connection errors are retriable (``Retry-After`` honoured, in
  seconds or as an HTTP date); any other status fails the attempt.

Polls and cancels go only to the endpoint's own origin (scheme, host, port): a ``Location`` elsewhere
fails the attempt (not retriable), so an agent cannot point Routines at another host (an internal
service, a metadata endpoint) and have its answer stored as the run's output, nor draw the credentials
there. Error messages hold the status
and the start of the answer's body, never the credentials, the request headers or a URL's query string.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.signature import SIGNATURE_HEADER, sign
from routines.agents.wire import is_retriable_status, parse_retry_after
from routines.errors import AgentError
from routines.models import utc_text

__all__ = ["HttpAgentBackend"]

logger = logging.getLogger(__name__)

DEFAULT_POLL_AFTER_SECONDS = 1.0
DEFAULT_TIMEOUT_SECONDS = 300.0  # a request with no deadline, or a deadline further away than this
MIN_TIMEOUT_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 10.0
CANCEL_TIMEOUT_SECONDS = 5.0
BODY_EXCERPT_CHARS = 300
MAX_LOCATION_CHARS = 900  # the handle must stay under 1 KiB
MAX_RESPONSE_BYTES = 1024 * 1024  # an answer's body; outputs are cut far below this anyway
_BODY_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpAgentBackend:
    """Starts, polls and cancels agent runs over the HTTP protocol above.

    One ``httpx.Client`` per backend, so connections are pooled across calls; a ``client`` passed in is
    used as is and not closed by ``close()``. ``timeout`` caps one request, the whole answer included;
    a call's ``deadline`` lowers it further. ``clock`` is read for signature timestamps and deadlines.
    Raises ``ValueError`` for an endpoint that is not an http(s) URL.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        signing_secret: str | None = None,
        client: httpx.Client | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        try:
            url = httpx.URL(endpoint)
        except httpx.InvalidURL as exc:
            raise ValueError(f"agent endpoint is not a valid URL: {exc}") from None
        if url.scheme not in _DEFAULT_PORTS or not url.host:
            raise ValueError(f"agent endpoint must be an http(s) URL, got {_display(url)!r}")
        self._endpoint = url
        self._origin = _origin(url)
        self._token = token or None
        self._secret = signing_secret or None
        self._secrets = [s for s in (token, signing_secret) if s]
        self._timeout = timeout
        self._clock = clock
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(follow_redirects=False)

    # -- AgentBackend -------------------------------------------------------------------------------

    def start(self, call: AgentCall) -> AgentOutcome:
        """POST the invocation. Returns a done or a pending outcome; raises ``AgentError``."""
        body = json.dumps(invocation_body(call), separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": call.idempotency_key}
        response = self._send(call, "POST", self._invocation_url(call.agent), body=body, headers=headers)
        if response.status_code == 202 and "location" not in response.headers:
            raise AgentError(
                f"{self._describe(call, response)}: 202 without a Location header to poll "
                "(protocol violation)",
                retriable=False,
            )
        return self._outcome(call, response, previous=None)

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        """GET the run's location. Returns a done or a pending outcome; raises ``AgentError``."""
        location = handle.get("location")
        if not isinstance(location, str) or not location:
            raise AgentError(f"agent {call.agent!r}: handle has no location to poll", retriable=False)
        try:
            url = httpx.URL(location)
        except httpx.InvalidURL:
            raise AgentError(f"agent {call.agent!r}: handle location is not a URL", retriable=False) from None
        if _origin(url) != self._origin:
            raise AgentError(
                f"agent {call.agent!r}: the run's location {_display(url)} is not on the agent endpoint's "
                f"origin {_display_origin(self._origin)}",
                retriable=False,
            )
        response = self._send(call, "GET", url)
        return self._outcome(call, response, previous=location)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        """DELETE the run's location, best effort: every error is logged and swallowed."""
        location = handle.get("location")
        if not isinstance(location, str) or not location:
            return
        try:
            url = httpx.URL(location)
            if _origin(url) != self._origin:
                logger.warning("not cancelling agent run at %s: not the endpoint's origin", _display(url))
                return
            headers = self._headers(call, "DELETE", url, b"")
            response = self._client.request("DELETE", url, headers=headers, timeout=CANCEL_TIMEOUT_SECONDS)
            logger.info("cancelled agent run at %s: %s", _display(url), response.status_code)
        except Exception as exc:  # best effort: the run counts as timed out whatever happens here
            logger.info("could not cancel agent run of %s: %s", call.agent, type(exc).__name__)

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HttpAgentBackend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _invocation_url(self, agent: str) -> httpx.URL:
        if not agent:
            raise AgentError("the action names no agent", retriable=False)
        path = f"{self._endpoint.path.rstrip('/')}/agents/{quote(agent, safe='')}/invocations"
        return self._endpoint.copy_with(path=path)

    def _headers(self, call: AgentCall, method: str, url: httpx.URL, body: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._secret is not None:
            target = url.raw_path.decode("ascii")  # the request line's target: path and query as sent
            now = int(self._clock().timestamp())
            headers[SIGNATURE_HEADER] = sign(self._secret, now, method, target, body)
        return headers

    def _timeout_for(self, call: AgentCall, method: str, url: httpx.URL) -> float:
        seconds = self._timeout
        if call.deadline is not None:
            remaining = (call.deadline - self._clock()).total_seconds()
            if remaining <= 0:
                raise AgentError(
                    f"agent {call.agent!r} timed out: the run's deadline passed before {method} "
                    f"{_display(url)}",
                    retriable=True,
                )
            seconds = min(seconds, max(MIN_TIMEOUT_SECONDS, remaining))
        return seconds

    def _send(
        self,
        call: AgentCall,
        method: str,
        url: httpx.URL,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        seconds = self._timeout_for(call, method, url)
        timeout = httpx.Timeout(seconds, connect=min(CONNECT_TIMEOUT_SECONDS, seconds))
        all_headers = {**(headers or {}), **self._headers(call, method, url, body)}
        where = f"{method} {_display(url)}"
        request = self._client.build_request(
            method, url, content=body or None, headers=all_headers, timeout=timeout
        )
        ends = time.monotonic() + seconds
        try:
            streamed = self._client.send(request, stream=True)
            try:
                content = self._read(call, streamed, ends, where)
            finally:
                streamed.close()
        except httpx.TimeoutException as exc:
            raise AgentError(
                f"agent {call.agent!r} timed out after {seconds:.1f}s on {where} ({type(exc).__name__})",
                retriable=True,
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise AgentError(f"agent {call.agent!r}: cannot call {where}: {exc}", retriable=False) from exc
        except httpx.HTTPError as exc:
            raise AgentError(
                f"agent {call.agent!r} could not be reached on {where}: "
                f"{type(exc).__name__}: {self._scrub(str(exc))}",
                retriable=True,
            ) from exc
        # The body is whole and decoded: a plain response from here on.
        kept = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() not in _BODY_FRAMING]
        return httpx.Response(streamed.status_code, headers=kept, content=content, request=request)

    def _read(self, call: AgentCall, response: httpx.Response, ends: float, where: str) -> bytes:
        """The whole body, by ``ends`` (monotonic) and at most ``MAX_RESPONSE_BYTES``: the socket timeout
        bounds each read, this bounds the answer (an agent trickling bytes cannot hold the call open)."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise AgentError(
                    f"agent {call.agent!r} answered {where} with more than {MAX_RESPONSE_BYTES} bytes",
                    retriable=False,
                )
            if time.monotonic() > ends:
                raise AgentError(
                    f"agent {call.agent!r} timed out on {where}: the answer was still arriving at the "
                    "call's deadline",
                    retriable=True,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _outcome(self, call: AgentCall, response: httpx.Response, *, previous: str | None) -> AgentOutcome:
        status = response.status_code
        if status == 200:
            return self._done(call, response)
        if status == 202:
            return self._pending(call, response, previous)
        retriable = is_retriable_status(status)
        retry_after = parse_retry_after(response.headers.get("retry-after")) if retriable else None
        raise AgentError(
            f"{self._describe(call, response)}: {self._excerpt(response)}",
            retriable=retriable,
            retry_after=retry_after,
        )

    def _done(self, call: AgentCall, response: httpx.Response) -> AgentOutcome:
        try:
            payload = response.json()
        except ValueError:
            raise AgentError(
                f"{self._describe(call, response)} with a body that is not JSON: {self._excerpt(response)}",
                retriable=False,
            ) from None
        if not isinstance(payload, dict):
            raise AgentError(
                f"{self._describe(call, response)} with a body that is not a JSON object: "
                f"{self._excerpt(response)}",
                retriable=False,
            )
        output = payload.get("output")
        if output is not None and not isinstance(output, str):
            output = json.dumps(output, ensure_ascii=False)
        return AgentOutcome(
            done=True,
            output=output,
            thread_id=_text(payload.get("thread_id")) or call.thread_id,
            agent_run_id=_agent_run_id(payload),
        )

    def _pending(self, call: AgentCall, response: httpx.Response, previous: str | None) -> AgentOutcome:
        header = response.headers.get("location")
        location = str(response.url.join(header)) if header else previous
        if location is None:  # start() rejects a 202 without Location before we get here
            raise AgentError(f"{self._describe(call, response)} without a Location header", retriable=False)
        url = httpx.URL(location)
        if url.scheme not in _DEFAULT_PORTS or len(location) > MAX_LOCATION_CHARS:
            raise AgentError(
                f"{self._describe(call, response)} with a Location that is not an http(s) URL of at most "
                f"{MAX_LOCATION_CHARS} characters",
                retriable=False,
            )
        if _origin(url) != self._origin:
            raise AgentError(
                f"{self._describe(call, response)} with a Location ({_display(url)}) that is not on the "
                f"agent endpoint's origin {_display_origin(self._origin)}: polls go only there",
                retriable=False,
            )
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        payload = _json_object(response)
        return AgentOutcome(
            done=False,
            handle={"location": location},
            poll_after=DEFAULT_POLL_AFTER_SECONDS if retry_after is None else retry_after,
            thread_id=_text(payload.get("thread_id")) or call.thread_id,
            agent_run_id=_agent_run_id(payload),
        )

    def _describe(self, call: AgentCall, response: httpx.Response) -> str:
        request = response.request
        return (
            f"agent {call.agent!r} answered {response.status_code} {response.reason_phrase} "
            f"to {request.method} {_display(request.url)}"
        )

    def _excerpt(self, response: httpx.Response) -> str:
        text = response.text.strip()
        excerpt = text[:BODY_EXCERPT_CHARS] + ("…" if len(text) > BODY_EXCERPT_CHARS else "")
        return self._scrub(excerpt) or "(empty body)"

    def _scrub(self, text: str) -> str:
        # An agent may echo the request back in an error body: never let a credential reach a message.
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def invocation_body(call: AgentCall) -> dict[str, Any]:
    """The JSON body of ``POST .../invocations`` for ``call`` (README, Agents)."""
    return {
        "routine_id": call.routine_id,
        "run_id": call.run_id,
        "idempotency_key": call.idempotency_key,
        "scheduled_for": utc_text(call.scheduled_for),
        "attempt": call.attempt,
        "type": call.action_type,
        "thread_id": call.thread_id,
        "input": call.input,
    }


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _display_origin(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _display(url: httpx.URL) -> str:
    """The URL without credentials or query string (an Azure function key, a SAS token...)."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{host}{port}{url.path}"


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _agent_run_id(payload: dict[str, Any]) -> str | None:
    return _text(payload.get("run_id")) or _text(payload.get("id"))
