"""Signature verification of both webhook schemes, against signatures made by independent code: the
Standard Webhooks reference library (``standardwebhooks``), GitHub's published test vector and the
``openssl`` command line. Time is passed in, never read."""

from __future__ import annotations

import base64
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from routines.webhooks import signatures
from routines.webhooks.signatures import SignatureError, verify_github, verify_standard

NOW = datetime(2026, 12, 4, 21, 0, 0, tzinfo=UTC)
SECRET = "whsec_" + base64.b64encode(b"a 24-byte secret for tests").decode()
OTHER = "whsec_" + base64.b64encode(b"the key before the rotation").decode()
BODY = b'{"action":"opened","number":7}'


def signed(
    body: bytes = BODY, *, secret: str = SECRET, at: datetime = NOW, msg_id: str = "msg_2Lq1"
) -> dict[str, str]:
    """Headers as a Standard Webhooks sender makes them, signed by the reference library."""
    signature = Webhook(secret).sign(msg_id, at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


# --- Standard Webhooks ----------------------------------------------------------------------------


def test_a_delivery_signed_by_the_reference_library_verifies_and_gives_its_id() -> None:
    assert verify_standard(SECRET, signed(), BODY, NOW) == "msg_2Lq1"


def test_the_secret_works_without_its_prefix_as_in_the_reference_library() -> None:
    assert verify_standard(SECRET.removeprefix("whsec_"), signed(), BODY, NOW) == "msg_2Lq1"


@pytest.mark.parametrize(
    "listed",
    [
        pytest.param(lambda new, old: f"{old} {new}", id="new_key_listed_second"),
        pytest.param(lambda new, old: f"{new} {old}", id="new_key_listed_first"),
        pytest.param(lambda new, old: f"v1a,{'A' * 88} {new}", id="unknown_version_skipped"),
        pytest.param(lambda new, old: f"v1,!!notbase64!! {new}", id="malformed_entry_skipped"),
        pytest.param(lambda new, old: f"garbage   {new}", id="entry_without_comma_skipped"),
    ],
)
def test_rotation_any_listed_signature_may_match(listed: object) -> None:
    headers = signed()
    old = signed(secret=OTHER)["webhook-signature"]
    headers["webhook-signature"] = listed(headers["webhook-signature"], old)  # type: ignore[operator]
    assert verify_standard(SECRET, headers, BODY, NOW) == "msg_2Lq1"


def test_during_a_rotation_the_old_secret_verifies_a_delivery_signed_with_both() -> None:
    headers = signed()
    headers["webhook-signature"] += " " + signed(secret=OTHER)["webhook-signature"]
    assert verify_standard(OTHER, headers, BODY, NOW) == "msg_2Lq1"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        pytest.param(-600, False, id="ten_minutes_old"),
        pytest.param(-301, False, id="just_past_tolerance"),
        pytest.param(-300, True, id="at_tolerance"),
        pytest.param(0, True, id="now"),
        pytest.param(299, True, id="slightly_ahead"),
        pytest.param(600, False, id="ten_minutes_in_the_future"),
    ],
)
def test_timestamps_more_than_300_s_away_are_refused(offset: int, accepted: bool) -> None:
    headers = signed(at=NOW + timedelta(seconds=offset))
    if accepted:
        assert verify_standard(SECRET, headers, BODY, NOW) == "msg_2Lq1"
    else:
        with pytest.raises(SignatureError, match="webhook-timestamp"):
            verify_standard(SECRET, headers, BODY, NOW)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, b: (h, b + b" "), id="body_changed"),
        pytest.param(lambda h, b: (h, b.replace(b"7", b"8")), id="body_digit_changed"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_other"}, b), id="id_changed"),
        pytest.param(
            lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
            id="timestamp_changed",
        ),
        pytest.param(
            lambda h, b: ({**h, "webhook-signature": signed(secret=OTHER)["webhook-signature"]}, b),
            id="other_secret",
        ),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), id="no_signature"
        ),
        pytest.param(lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), id="no_id"),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "webhook-timestamp"}, b), id="no_timestamp"
        ),
        pytest.param(lambda h, b: ({**h, "webhook-timestamp": "1.7e9"}, b), id="timestamp_not_integer"),
        pytest.param(lambda h, b: ({**h, "webhook-signature": "v1,"}, b), id="empty_signature"),
        pytest.param(
            lambda h, b: ({**h, "webhook-id": "msg id with spaces"}, b), id="id_not_printable_ascii"
        ),
    ],
)
def test_tampered_or_incomplete_deliveries_are_refused(tamper: object) -> None:
    headers, body = tamper(signed(), BODY)  # type: ignore[operator]
    with pytest.raises(SignatureError):
        verify_standard(SECRET, headers, body, NOW)


def test_our_verifier_agrees_with_the_reference_library() -> None:
    """On a table of deliveries, at the real current time (the library reads the clock itself)."""
    now = datetime.now(UTC)
    cases = [
        (signed(at=now), BODY),
        (signed(at=now), BODY + b"x"),
        (signed(at=now - timedelta(minutes=10)), BODY),
        ({**signed(at=now), "webhook-signature": "v1,AAAA " + signed(at=now)["webhook-signature"]}, BODY),
        ({**signed(at=now), "webhook-signature": signed(secret=OTHER, at=now)["webhook-signature"]}, BODY),
        (signed(body=b'{"emoji":"\xf0\x9f\x99\x82"}', at=now), b'{"emoji":"\xf0\x9f\x99\x82"}'),
    ]
    for headers, body in cases:
        try:
            Webhook(SECRET).verify(body, headers)
            reference = True
        except WebhookVerificationError:
            reference = False
        try:
            verify_standard(SECRET, headers, body, now)
            ours = True
        except SignatureError:
            ours = False
        assert ours == reference, headers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_a_signature_made_with_openssl_as_the_readme_shows_verifies() -> None:
    key_hex = base64.b64decode(SECRET.removeprefix("whsec_")).hex()
    stamp = str(int(NOW.timestamp()))
    content = b"msg_cli." + stamp.encode() + b"." + BODY
    mac = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{key_hex}", "-binary"],
        input=content,
        capture_output=True,
        check=True,
    ).stdout
    headers = {
        "webhook-id": "msg_cli",
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }
    assert verify_standard(SECRET, headers, BODY, NOW) == "msg_cli"


# --- GitHub ---------------------------------------------------------------------------------------

# GitHub's documented example ("Validating webhook deliveries"): this secret and payload give this
# signature.
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def github_headers(signature: str = GITHUB_SIGNATURE) -> dict[str, str]:
    return {"x-hub-signature-256": signature, "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def test_githubs_published_example_verifies() -> None:
    assert (
        verify_github(GITHUB_SECRET, github_headers(), GITHUB_BODY) == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    )


def test_github_hex_digits_may_be_upper_case() -> None:
    assert verify_github(
        GITHUB_SECRET, github_headers(GITHUB_SIGNATURE.upper().replace("SHA256", "sha256")), GITHUB_BODY
    )


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param(github_headers(), b"Hello, World?", id="body_changed"),
        pytest.param(github_headers(GITHUB_SIGNATURE[:-1] + "0"), GITHUB_BODY, id="signature_changed"),
        pytest.param(github_headers("sha1=" + "0" * 40), GITHUB_BODY, id="sha1_only"),
        pytest.param(github_headers(GITHUB_SIGNATURE[len("sha256=") :]), GITHUB_BODY, id="no_prefix"),
        pytest.param({"x-github-delivery": "d1"}, GITHUB_BODY, id="no_signature"),
        pytest.param({"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, id="no_delivery_id"),
    ],
)
def test_github_bad_deliveries_are_refused(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(SignatureError):
        verify_github(GITHUB_SECRET, headers, body)


def test_github_with_the_wrong_secret_is_refused() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify_github("another secret", github_headers(), GITHUB_BODY)


# --- secrets and stored headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "value", "problem"),
    [
        pytest.param("standard-webhooks", None, "not defined", id="unset"),
        pytest.param("github", "  ", "not defined", id="blank"),
        pytest.param(
            "github", "@Microsoft.KeyVault(SecretUri=https://v/secrets/s)", "Key Vault", id="kv_unresolved"
        ),
        pytest.param("standard-webhooks", "whsec_not base64!", "whsec_", id="not_base64"),
        pytest.param("standard-webhooks", "whsec_", "empty", id="empty_key"),
        pytest.param("standard-webhooks", SECRET, None, id="standard_ok"),
        pytest.param("github", "any text will do", None, id="github_ok"),
    ],
)
def test_secret_problems_are_named_without_the_value(
    scheme: str, value: str | None, problem: str | None
) -> None:
    found = signatures.secret_problem(scheme, value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert value is None or not value.strip() or value not in found


def test_stored_headers_drop_the_signature_and_credentials() -> None:
    kept = signatures.event_headers(
        {
            "webhook-signature": "v1,abc",
            "x-hub-signature-256": "sha256=00",
            "x-hub-signature": "sha1=00",
            "authorization": "Bearer t",
            "cookie": "c=1",
            "x-functions-key": "k",
            "x-github-event": "push",
            "webhook-id": "msg_1",
        }
    )
    assert kept == {"x-github-event": "push", "webhook-id": "msg_1"}
