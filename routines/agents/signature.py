"""Request signatures of the HTTP agent protocol: ``X-Routines-Signature: t=<unix seconds>,v1=<hex>``.

``v1`` is the HMAC-SHA256, keyed with the UTF-8 bytes of the signing secret, of
``<t>.<METHOD>.<path and query>.<body>``: the timestamp, the request method in upper case, the request
target exactly as sent on the request line (``/agents/a/invocations?code=x``), and the raw body bytes
(empty for GET and DELETE). Binding the method and target means a captured request cannot be replayed
against another run or another route; binding the time means it cannot be replayed after
``MAX_AGE_SECONDS``. Standard library only, so the sample agent (and any Python agent) can use it.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MAX_AGE_SECONDS", "SIGNATURE_HEADER", "sign", "verify"]

SIGNATURE_HEADER = "X-Routines-Signature"
MAX_AGE_SECONDS = 300  # how far a signature's timestamp may be from the verifier's clock, either way
_MAX_HEADER_CHARS = 512


def sign(secret: str, timestamp: int, method: str, target: str, body: bytes) -> str:
    """The ``X-Routines-Signature`` value for one request."""
    return f"t={timestamp},v1={_digest(secret, timestamp, method, target, body)}"


def verify(
    secret: str,
    header: str | None,
    method: str,
    target: str,
    body: bytes,
    *,
    now: float,
    max_age: float = MAX_AGE_SECONDS,
) -> bool:
    """Whether ``header`` signs this request with ``secret`` at a time within ``max_age`` s of ``now``.

    The digest is compared in constant time. A malformed or absent header is simply not valid.
    """
    if not header or len(header) > _MAX_HEADER_CHARS:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    stamps, digests = fields.get("t", []), fields.get("v1", [])
    if len(stamps) != 1 or not stamps[0].isdigit() or not digests:
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > max_age:
        return False
    expected = _digest(secret, timestamp, method, target, body)
    # Every v1 is compared (a sender may list several while it rotates secrets): no early exit.
    matches = [hmac.compare_digest(expected.encode(), digest.encode()) for digest in digests]
    return any(matches)


def _digest(secret: str, timestamp: int, method: str, target: str, body: bytes) -> str:
    message = f"{timestamp}.{method.upper()}.{target}.".encode() + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
