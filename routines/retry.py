"""Retry decisions as a pure value: given the policy, the failed attempt and the error, what next."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from routines.models import RetryPolicy

MAX_RETRY_DELAY_SECONDS = 7 * 86400  # Azure Queues refuse a longer visibility delay


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_seconds: float = 0.0
    reason: str = ""


def backoff_delay(policy: RetryPolicy, failed_attempt: int, rng: random.Random | None = None) -> float:
    """The policy's delay after attempt ``failed_attempt`` (1-based) failed."""
    if policy.backoff == "exponential":
        initial = float(policy.initial_delay_seconds or 0)
        ceiling = float(policy.max_delay_seconds or 3600)
        delay = min(ceiling, initial * 2 ** (failed_attempt - 1))
        if policy.jitter:  # "equal jitter": keeps at least half the delay, spreads the rest
            delay = delay / 2 + (rng or random).uniform(0, delay / 2)
        return float(delay)
    delays = policy.delays_seconds or [0]
    return float(delays[min(failed_attempt - 1, len(delays) - 1)])


def decide(
    policy: RetryPolicy,
    failed_attempt: int,
    retriable: bool,
    retry_after: float | None,
    scheduled_for: datetime,
    now: datetime,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry when the error is retriable, attempts remain and the next attempt would start within
    ``max_age_seconds`` of the scheduled time. The delay honours ``Retry-After`` (the larger wins),
    which is capped at 7 days (the queue's limit; ``max_age_seconds`` bounds it further), and a
    hint that is not a finite number is ignored."""
    if not retriable:
        return RetryDecision(False, reason="not retriable")
    if failed_attempt >= policy.max_attempts:
        return RetryDecision(False, reason=f"all {policy.max_attempts} attempts used")
    hint = retry_after if retry_after is not None and math.isfinite(retry_after) else 0.0
    delay = min(MAX_RETRY_DELAY_SECONDS, max(backoff_delay(policy, failed_attempt, rng), hint, 0.0))
    if policy.max_age_seconds is not None:
        deadline = scheduled_for + timedelta(seconds=policy.max_age_seconds)
        if now + timedelta(seconds=delay) > deadline:
            return RetryDecision(
                False,
                reason=f"the next attempt would start after max_age_seconds ({policy.max_age_seconds}s)",
            )
    return RetryDecision(True, delay)
