"""Retry decisions (docs/api.md, retry policy): policy, failed attempt, error, ``now`` -> what next."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from routines.models import RetryPolicy
from routines.retry import RetryDecision, backoff_delay, decide

SCHEDULED = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


def policy(**fields: Any) -> RetryPolicy:
    return RetryPolicy.model_validate(fields)


DEFAULT = policy()
FIXED_SHORT = policy(max_attempts=6, delays_seconds=[10, 20])
EXPONENTIAL = policy(
    max_attempts=10, backoff="exponential", initial_delay_seconds=30, max_delay_seconds=600, jitter=False
)


@pytest.mark.parametrize(
    ("retry_policy", "failed_attempt", "expected"),
    [
        pytest.param(DEFAULT, 1, 60.0, id="default_first_retry_1min"),
        pytest.param(DEFAULT, 2, 300.0, id="default_second_retry_5min"),
        pytest.param(DEFAULT, 3, 900.0, id="default_third_retry_15min"),
        pytest.param(FIXED_SHORT, 1, 10.0, id="fixed_first"),
        pytest.param(FIXED_SHORT, 2, 20.0, id="fixed_last_listed"),
        pytest.param(FIXED_SHORT, 3, 20.0, id="fixed_reuses_last_delay"),
        pytest.param(FIXED_SHORT, 5, 20.0, id="fixed_reuses_last_delay_again"),
        pytest.param(policy(max_attempts=3, delays_seconds=[0]), 2, 0.0, id="fixed_zero_delay"),
        pytest.param(EXPONENTIAL, 1, 30.0, id="exponential_initial"),
        pytest.param(EXPONENTIAL, 2, 60.0, id="exponential_doubles"),
        pytest.param(EXPONENTIAL, 3, 120.0, id="exponential_doubles_again"),
        pytest.param(EXPONENTIAL, 5, 480.0, id="exponential_below_cap"),
        pytest.param(EXPONENTIAL, 6, 600.0, id="exponential_capped"),
        pytest.param(EXPONENTIAL, 9, 600.0, id="exponential_stays_capped"),
        pytest.param(
            policy(max_attempts=50, backoff="exponential", jitter=False),
            49,
            3600.0,
            id="exponential_defaults_huge_attempt_capped_at_1h",
        ),
    ],
)
def test_backoff_delay(retry_policy: RetryPolicy, failed_attempt: int, expected: float) -> None:
    assert backoff_delay(retry_policy, failed_attempt) == expected


def test_exponential_defaults_are_filled_in() -> None:
    filled = policy(max_attempts=6, backoff="exponential")
    assert (filled.initial_delay_seconds, filled.max_delay_seconds, filled.jitter) == (30, 3600, True)


@pytest.mark.parametrize("failed_attempt", [1, 2, 3, 4, 5, 6, 7])
def test_exponential_jitter_keeps_half_and_stays_under_the_cap(failed_attempt: int) -> None:
    jittered = policy(
        max_attempts=10, backoff="exponential", initial_delay_seconds=30, max_delay_seconds=600, jitter=True
    )
    base = backoff_delay(EXPONENTIAL, failed_attempt)
    delays = [backoff_delay(jittered, failed_attempt, random.Random(seed)) for seed in range(50)]
    assert all(base / 2 <= d <= base for d in delays)
    assert len(set(delays)) > 40, "jitter spreads the delays"


def test_exponential_jitter_is_reproducible_with_a_seeded_rng() -> None:
    jittered = policy(max_attempts=10, backoff="exponential", initial_delay_seconds=30, jitter=True)
    first = [backoff_delay(jittered, n, random.Random(7)) for n in range(1, 6)]
    again = [backoff_delay(jittered, n, random.Random(7)) for n in range(1, 6)]
    assert first == again
    expected = [30 * 2 ** (n - 1) for n in range(1, 6)]
    expected = [d / 2 + random.Random(7).uniform(0, d / 2) for d in expected]
    assert first == pytest.approx(expected)


AT = SCHEDULED + timedelta(seconds=50)


@pytest.mark.parametrize(
    ("retry_policy", "failed_attempt", "retriable", "retry_after", "now", "expected"),
    [
        pytest.param(DEFAULT, 1, True, None, AT, RetryDecision(True, 60.0), id="retriable_first_failure"),
        pytest.param(DEFAULT, 3, True, None, AT, RetryDecision(True, 900.0), id="third_failure_last_retry"),
        pytest.param(
            DEFAULT,
            4,
            True,
            None,
            AT,
            RetryDecision(False, reason="all 4 attempts used"),
            id="last_attempt_failed",
        ),
        pytest.param(
            DEFAULT,
            7,
            True,
            None,
            AT,
            RetryDecision(False, reason="all 4 attempts used"),
            id="beyond_last_attempt",
        ),
        pytest.param(
            policy(max_attempts=1),
            1,
            True,
            None,
            AT,
            RetryDecision(False, reason="all 1 attempts used"),
            id="max_attempts_1_disables_retries",
        ),
        pytest.param(
            DEFAULT, 1, False, None, AT, RetryDecision(False, reason="not retriable"), id="not_retriable"
        ),
        pytest.param(
            DEFAULT,
            1,
            False,
            5.0,
            AT,
            RetryDecision(False, reason="not retriable"),
            id="not_retriable_even_with_retry_after",
        ),
        pytest.param(DEFAULT, 1, True, 120.0, AT, RetryDecision(True, 120.0), id="retry_after_larger_wins"),
        pytest.param(DEFAULT, 1, True, 30.0, AT, RetryDecision(True, 60.0), id="policy_delay_larger_wins"),
        pytest.param(DEFAULT, 1, True, 0.0, AT, RetryDecision(True, 60.0), id="retry_after_zero"),
        pytest.param(
            policy(max_attempts=4, delays_seconds=[60], max_age_seconds=120),
            1,
            True,
            None,
            AT,
            RetryDecision(True, 60.0),
            id="max_age_leaves_room",
        ),
        pytest.param(
            policy(max_attempts=4, delays_seconds=[70], max_age_seconds=120),
            1,
            True,
            None,
            AT,
            RetryDecision(True, 70.0),
            id="max_age_exactly_at_deadline",
        ),
        pytest.param(
            policy(max_attempts=4, delays_seconds=[71], max_age_seconds=120),
            1,
            True,
            None,
            AT,
            RetryDecision(False, reason="the next attempt would start after max_age_seconds (120s)"),
            id="max_age_one_second_past",
        ),
        pytest.param(
            policy(max_attempts=4, delays_seconds=[10], max_age_seconds=120),
            1,
            True,
            100.0,
            AT,
            RetryDecision(False, reason="the next attempt would start after max_age_seconds (120s)"),
            id="retry_after_pushes_past_max_age",
        ),
        pytest.param(
            policy(max_attempts=4, delays_seconds=[1], max_age_seconds=30),
            1,
            True,
            None,
            SCHEDULED + timedelta(seconds=40),
            RetryDecision(False, reason="the next attempt would start after max_age_seconds (30s)"),
            id="already_older_than_max_age",
        ),
        pytest.param(EXPONENTIAL, 4, True, None, AT, RetryDecision(True, 240.0), id="exponential_decision"),
    ],
)
def test_decide(
    retry_policy: RetryPolicy,
    failed_attempt: int,
    retriable: bool,
    retry_after: float | None,
    now: datetime,
    expected: RetryDecision,
) -> None:
    assert decide(retry_policy, failed_attempt, retriable, retry_after, SCHEDULED, now) == expected


def test_decide_passes_the_rng_to_the_jitter() -> None:
    jittered = policy(max_attempts=5, backoff="exponential", initial_delay_seconds=100, jitter=True)
    decision = decide(jittered, 2, True, None, SCHEDULED, AT, random.Random(3))
    assert decision.retry
    assert decision.delay_seconds == backoff_delay(jittered, 2, random.Random(3))
    assert 100 <= decision.delay_seconds <= 200
