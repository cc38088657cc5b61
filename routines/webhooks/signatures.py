"""Signature verification of webhook deliveries: Standard Webhooks and GitHub's ``X-Hub-Signature-256``.

Pure functions of (secret, headers, body, ``now``): the clock is read by the caller. Every comparison
of a signature is constant-time (``hmac.compare_digest``). A failure raises ``SignatureError`` with a
reason that is safe to show the sender (it never holds the secret or the expected signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import datetime

from routines.errors import Unauthorized

STANDARD = "standard-webhooks"
GITHUB = "github"
TOLERANCE_SECONDS = 300  # Standard Webhooks: timestamps further than this from now are refused
SECRET_PREFIX = "whsec_"
MAX_DELIVERY_ID = 128
# The headers a delivery is signed with (dropped from the stored event), and credentials a proxy or
# the Functions front end may carry (never stored either).
SIGNATURE_HEADERS = frozenset({"webhook-signature", "x-hub-signature-256", "x-hub-signature"})
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-functions-key"})
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_DELIVERY_ID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_DELIVERY_ID}}}$")
_GITHUB_SIGNATURE = re.compile(r"^sha256=([0-9a-fA-F]{64})$")


class SignatureError(Unauthorized):
    """The delivery is not authentic (or not verifiable): answered ``401``."""


def standard_secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>`` (the prefix is optional, as in
    the scheme's reference libraries). Raises ``ValueError`` for anything else."""
    text = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not a Standard Webhooks secret (whsec_ followed by base64)") from None
    if not key:
        raise ValueError("is an empty Standard Webhooks secret")
    return key


def secret_problem(scheme: object, value: str | None) -> str | None:
    """Why the app setting ``value`` cannot serve as the secret of ``scheme``, or ``None``. The answer
    never quotes the value."""
    if value is None or not value.strip():
        return "is not defined (set it in the app settings; in Azure, as a Key Vault reference)"
    if value.startswith("@Microsoft.KeyVault("):
        return "is a Key Vault reference the platform has not resolved (check the app's access to the vault)"
    if scheme == STANDARD:
        try:
            standard_secret_key(value)
        except ValueError as exc:
            return str(exc)
    return None


def delivery_id(value: str | None, header: str) -> str:
    if not value:
        raise SignatureError(f"missing {header} header")
    if not _DELIVERY_ID.fullmatch(value):
        raise SignatureError(f"{header} must be 1-{MAX_DELIVERY_ID} printable ASCII characters")
    return value


def verify_standard(secret: str, headers: Mapping[str, str], body: bytes, now: datetime) -> str:
    """Verify a Standard Webhooks delivery; returns its ``webhook-id``. ``headers``: lower-case names.

    Signed content: ``<webhook-id>.<webhook-timestamp>.<body>``, HMAC-SHA256 with the decoded secret;
    ``webhook-signature`` is a space-separated list of ``v1,<base64>`` (several during a key
    rotation; other versions are ignored). Raises ``SignatureError``."""
    message_id = delivery_id(headers.get("webhook-id"), "webhook-id")
    stamp = headers.get("webhook-timestamp") or ""
    if not _TIMESTAMP.fullmatch(stamp):
        raise SignatureError("missing or malformed webhook-timestamp header (Unix seconds)")
    offset = int(stamp) - now.timestamp()
    if abs(offset) > TOLERANCE_SECONDS:
        direction = "old" if offset < 0 else "far in the future"
        raise SignatureError(f"webhook-timestamp is too {direction} (over {TOLERANCE_SECONDS} s from now)")
    signatures = (headers.get("webhook-signature") or "").split()
    if not signatures:
        raise SignatureError("missing webhook-signature header")
    expected = hmac.new(
        standard_secret_key(secret), f"{message_id}.{stamp}.".encode() + body, hashlib.sha256
    ).digest()
    matched = False
    for item in signatures:
        version, _, encoded = item.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # No early exit: every listed signature costs the same, whichever matches.
        matched = hmac.compare_digest(expected, given) or matched
    if not matched:
        raise SignatureError("no webhook-signature matches the body")
    return message_id


def verify_github(secret: str, headers: Mapping[str, str], body: bytes) -> str:
    """Verify a GitHub delivery (``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``, the
    secret's UTF-8 bytes as the key); returns its ``X-GitHub-Delivery``. Raises ``SignatureError``."""
    match = _GITHUB_SIGNATURE.fullmatch(headers.get("x-hub-signature-256") or "")
    if not match:
        raise SignatureError("missing or malformed X-Hub-Signature-256 header (sha256=<hex>)")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match.group(1).lower()):
        raise SignatureError("X-Hub-Signature-256 does not match the body")
    return delivery_id(headers.get("x-github-delivery"), "X-GitHub-Delivery")


def verify(scheme: str, secret: str, headers: Mapping[str, str], body: bytes, now: datetime) -> str:
    """Verify a delivery under ``scheme``; returns its delivery id. Raises ``SignatureError``."""
    if scheme == STANDARD:
        return verify_standard(secret, headers, body, now)
    if scheme == GITHUB:
        return verify_github(secret, headers, body)
    raise SignatureError(f"unknown signature scheme {scheme!r}")


def event_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers kept with the event: lower-cased, without the signature and credentials."""
    return {
        name.lower(): value
        for name, value in sorted(headers.items())
        if name.lower() not in SIGNATURE_HEADERS | CREDENTIAL_HEADERS
    }
