"""Schedule math (docs/api.md#triggers). Every expected instant is written out by hand, in UTC.

Transition instants used below (2026 unless noted), as "UTC instant: local before -> local after":
    America/New_York     spring 03-08 07:00Z: 02:00 -05 -> 03:00 -04
                         autumn 11-01 06:00Z: 02:00 -04 -> 01:00 -05
    Europe/Paris         spring 03-29 01:00Z: 02:00 +01 -> 03:00 +02
                         autumn 10-25 01:00Z: 03:00 +02 -> 02:00 +01
    Australia/Sydney     spring 10-03 16:00Z: 02:00 +10 -> 03:00 +11
                         autumn 04-04 16:00Z: 03:00 +11 -> 02:00 +10
    Australia/Lord_Howe  spring 10-03 15:30Z: 02:00 +10:30 -> 02:30 +11
                         autumn 04-04 15:00Z: 02:00 +11 -> 01:30 +10:30
    Pacific/Apia         2011-12-30 10:00Z: 2011-12-29 24:00 -10 -> 2011-12-31 00:00 +14 (Dec 30 skipped)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from routines.schedule import CronSchedule, ScheduleError, next_fire_after, parse_cron, validate_cron


def utc(text: str) -> datetime:
    """'2026-03-08T07:00:00Z' -> aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def chain(schedule: CronSchedule, after: datetime, count: int) -> list[datetime]:
    out = []
    for _ in range(count):
        after = schedule.next_after(after)
        out.append(after)
    return out


# (id, expression, time zone, after, expected next fires)
NEXT_CASES = [
    (
        "daily_utc",
        "0 6 * * *",
        "UTC",
        "2026-11-29T20:00:00Z",
        ["2026-11-30T06:00:00Z", "2026-12-01T06:00:00Z"],
    ),
    ("strictly_after_a_fire", "0 6 * * *", "UTC", "2026-11-30T06:00:00Z", ["2026-12-01T06:00:00Z"]),
    (
        "after_with_microseconds",
        "* * * * * *",
        "UTC",
        "2026-01-01T00:00:00.500000Z",
        ["2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"],
    ),
    (
        "year_rollover",
        "0 0 1 1 *",
        "UTC",
        "2026-12-31T23:59:59Z",
        ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
    ),
    # -- spring forward ------------------------------------------------------------------------------
    (
        "spring_skip_fixed_time",
        "30 2 * * *",
        "America/New_York",
        "2026-03-07T12:00:00Z",
        ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"],
    ),
    (
        "spring_skip_several_times_fire_once",
        "*/10 2 * * *",
        "America/New_York",
        "2026-03-08T00:00:00Z",
        ["2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z", "2026-03-09T06:10:00Z"],
    ),
    (
        "spring_skip_merges_with_fire_at_gap_end",
        "0 2,3 * * *",
        "America/New_York",
        "2026-03-08T05:00:00Z",
        ["2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z", "2026-03-09T07:00:00Z"],
    ),
    (
        "spring_hourly_has_no_fire_in_gap",
        "0 * * * *",
        "America/New_York",
        "2026-03-08T05:30:00Z",
        ["2026-03-08T06:00:00Z", "2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z"],
    ),
    (
        "spring_every_15_min_skips_missing_hour",
        "*/15 * * * *",
        "America/New_York",
        "2026-03-08T06:30:00Z",
        ["2026-03-08T06:45:00Z", "2026-03-08T07:00:00Z", "2026-03-08T07:15:00Z"],
    ),
    (
        "europe_paris_spring",
        "30 2 * * *",
        "Europe/Paris",
        "2026-03-28T12:00:00Z",
        ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"],
    ),
    (
        "whole_day_skipped_apia_2011",
        "0 12 * * *",
        "Pacific/Apia",
        "2011-12-29T12:00:00Z",
        ["2011-12-29T22:00:00Z", "2011-12-30T10:00:00Z", "2011-12-30T22:00:00Z"],
    ),
    # -- fall back -----------------------------------------------------------------------------------
    (
        "autumn_repeat_fixed_time_fires_once",
        "30 1 * * *",
        "America/New_York",
        "2026-10-31T12:00:00Z",
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
    ),
    (
        "autumn_repeat_after_in_second_copy",
        "30 1 * * *",
        "America/New_York",
        "2026-11-01T06:15:00Z",
        ["2026-11-02T06:30:00Z"],
    ),
    (
        "autumn_every_30_min_fires_in_both_copies",
        "*/30 * * * *",
        "America/New_York",
        "2026-11-01T04:45:00Z",
        [
            "2026-11-01T05:00:00Z",  # 01:00 EDT
            "2026-11-01T05:30:00Z",  # 01:30 EDT
            "2026-11-01T06:00:00Z",  # 01:00 EST
            "2026-11-01T06:30:00Z",  # 01:30 EST
            "2026-11-01T07:00:00Z",  # 02:00 EST
        ],
    ),
    (
        "autumn_every_10_min_from_inside_first_copy",
        "*/10 * * * *",
        "America/New_York",
        "2026-11-01T05:35:00Z",
        ["2026-11-01T05:40:00Z", "2026-11-01T05:50:00Z", "2026-11-01T06:00:00Z", "2026-11-01T06:10:00Z"],
    ),
    (
        "autumn_hourly_fires_twice_in_repeated_hour",
        "0 * * * *",
        "America/New_York",
        "2026-11-01T04:30:00Z",
        ["2026-11-01T05:00:00Z", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"],
    ),
    (
        "autumn_hourly_from_second_copy",
        "0 * * * *",
        "America/New_York",
        "2026-11-01T06:00:00Z",
        ["2026-11-01T07:00:00Z", "2026-11-01T08:00:00Z"],
    ),
    (
        "hour_restricted_steps_in_repeated_hour",
        "*/20 1 * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        ["2026-11-01T05:00:00Z", "2026-11-01T05:20:00Z", "2026-11-01T05:40:00Z", "2026-11-02T06:00:00Z"],
    ),
    (
        "hour_restricted_per_second_from_second_copy",
        "* * 1 * * *",
        "America/New_York",
        "2026-11-01T06:00:30Z",
        ["2026-11-02T06:00:00Z", "2026-11-02T06:00:01Z"],
    ),
    (
        "europe_paris_autumn",
        "30 2 * * *",
        "Europe/Paris",
        "2026-10-24T12:00:00Z",
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
    ),
    # -- 30-minute DST and the southern hemisphere ------------------------------------------------------
    (
        "australia_lord_howe_half_hour_dst",
        "15 2 * * *",
        "Australia/Lord_Howe",
        "2026-10-03T12:00:00Z",
        ["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"],
    ),
    (
        "lord_howe_hourly_not_moved_into_half_hour",
        "0 * * * *",
        "Australia/Lord_Howe",
        "2026-10-03T14:00:00Z",
        ["2026-10-03T14:30:00Z", "2026-10-03T16:00:00Z", "2026-10-03T17:00:00Z"],
    ),
    (
        "lord_howe_every_30_min_in_repeated_half_hour",
        "*/30 * * * *",
        "Australia/Lord_Howe",
        "2026-04-04T13:45:00Z",
        ["2026-04-04T14:00:00Z", "2026-04-04T14:30:00Z", "2026-04-04T15:00:00Z", "2026-04-04T15:30:00Z"],
    ),
    (
        "lord_howe_fixed_time_in_repeat_fires_once",
        "45 1 * * *",
        "Australia/Lord_Howe",
        "2026-04-04T12:00:00Z",
        ["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"],
    ),
    (
        "southern_hemisphere_sydney_spring",
        "30 2 * * *",
        "Australia/Sydney",
        "2026-10-03T00:00:00Z",
        ["2026-10-03T16:00:00Z", "2026-10-04T15:30:00Z"],
    ),
    (
        "southern_hemisphere_sydney_autumn",
        "30 2 * * *",
        "Australia/Sydney",
        "2026-04-04T00:00:00Z",
        ["2026-04-04T15:30:00Z", "2026-04-05T16:30:00Z"],
    ),
    (
        "half_hour_offset_kolkata",
        "0 9 * * *",
        "Asia/Kolkata",
        "2026-11-29T00:00:00Z",
        ["2026-11-29T03:30:00Z"],
    ),
    # -- calendar ------------------------------------------------------------------------------------
    (
        "month_end_31st_skips_short_months",
        "0 0 31 * *",
        "UTC",
        "2026-01-31T00:00:00Z",
        ["2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z", "2026-07-31T00:00:00Z", "2026-08-31T00:00:00Z"],
    ),
    (
        "leap_day_feb_29",
        "0 12 29 2 *",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2028-02-29T12:00:00Z", "2032-02-29T12:00:00Z"],
    ),
    ("leap_day_skips_2100", "0 12 29 2 *", "UTC", "2096-03-01T00:00:00Z", ["2104-02-29T12:00:00Z"]),
    (
        "sunday_as_0",
        "0 9 * * 0",
        "UTC",
        "2026-11-29T10:00:00Z",
        ["2026-12-06T09:00:00Z", "2026-12-13T09:00:00Z"],
    ),
    (
        "sunday_as_7",
        "0 9 * * 7",
        "UTC",
        "2026-11-29T10:00:00Z",
        ["2026-12-06T09:00:00Z", "2026-12-13T09:00:00Z"],
    ),
    (
        "weekday_range_ending_sunday",
        "0 9 * * FRI-SUN",
        "UTC",
        "2026-11-29T10:00:00Z",
        ["2026-12-04T09:00:00Z", "2026-12-05T09:00:00Z", "2026-12-06T09:00:00Z", "2026-12-11T09:00:00Z"],
    ),
    (
        "names_mon_jan",
        "0 8 * JAN MON",
        "UTC",
        "2026-11-29T00:00:00Z",
        ["2027-01-04T08:00:00Z", "2027-01-11T08:00:00Z"],
    ),
    ("names_any_case", "0 8 * jan Mon", "UTC", "2026-11-29T00:00:00Z", ["2027-01-04T08:00:00Z"]),
    (
        "day_fields_or_when_both_restricted",
        "0 0 1,15 * MON",
        "UTC",
        "2026-06-01T00:00:00Z",
        [
            "2026-06-08T00:00:00Z",
            "2026-06-15T00:00:00Z",
            "2026-06-22T00:00:00Z",
            "2026-06-29T00:00:00Z",
            "2026-07-01T00:00:00Z",
            "2026-07-06T00:00:00Z",
        ],
    ),
    (
        "day_fields_and_when_day_of_month_starts_with_star",
        "0 0 */2 * MON",
        "UTC",
        "2026-06-01T00:00:00Z",
        ["2026-06-15T00:00:00Z", "2026-06-29T00:00:00Z", "2026-07-13T00:00:00Z", "2026-07-27T00:00:00Z"],
    ),
    (
        "question_mark_day",
        "0 0 ? * MON",
        "UTC",
        "2026-06-01T00:00:00Z",
        ["2026-06-08T00:00:00Z", "2026-06-15T00:00:00Z"],
    ),
    # -- syntax --------------------------------------------------------------------------------------
    (
        "six_field_seconds",
        "*/15 * * * * *",
        "UTC",
        "2026-11-29T20:00:50Z",
        ["2026-11-29T20:01:00Z", "2026-11-29T20:01:15Z", "2026-11-29T20:01:30Z"],
    ),
    ("six_field_fixed_second", "30 0 12 * * *", "UTC", "2026-11-29T12:00:30Z", ["2026-11-30T12:00:30Z"]),
    (
        "range_with_step",
        "0 9-17/4 * * *",
        "UTC",
        "2026-11-29T10:00:00Z",
        ["2026-11-29T13:00:00Z", "2026-11-29T17:00:00Z", "2026-11-30T09:00:00Z"],
    ),
    (
        "start_with_step",
        "5/20 * * * *",
        "UTC",
        "2026-11-29T20:00:00Z",
        ["2026-11-29T20:05:00Z", "2026-11-29T20:25:00Z", "2026-11-29T20:45:00Z", "2026-11-29T21:05:00Z"],
    ),
    (
        "list_of_ranges",
        "0 0 1-2,20-21 * *",
        "UTC",
        "2026-11-29T00:00:00Z",
        ["2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z", "2026-12-20T00:00:00Z", "2026-12-21T00:00:00Z"],
    ),
    # -- the Functions host's NCRONTAB timer expressions (seconds first): function_app.py's, the docs' --
    (
        "ncrontab_tick",
        "0 * * * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-29T20:08:00Z", "2026-11-29T20:09:00Z"],
    ),
    (
        "ncrontab_repair",
        "*/15 * * * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-29T20:07:15Z", "2026-11-29T20:07:30Z"],
    ),
    (
        "ncrontab_purge",
        "0 30 3 * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-30T03:30:00Z", "2026-12-01T03:30:00Z"],
    ),
    (
        "ncrontab_every_five_minutes",
        "0 */5 * * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-29T20:10:00Z", "2026-11-29T20:15:00Z"],
    ),
    (
        "ncrontab_every_hour",
        "0 0 * * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-29T21:00:00Z", "2026-11-29T22:00:00Z"],
    ),
    (
        "ncrontab_every_two_hours",
        "0 0 */2 * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-29T22:00:00Z", "2026-11-30T00:00:00Z"],
    ),
    (
        "ncrontab_hourly_nine_to_five",
        "0 0 9-17 * * *",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-30T09:00:00Z", "2026-11-30T10:00:00Z"],
    ),
    (
        "ncrontab_weekdays",
        "0 30 9 * * 1-5",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2026-11-30T09:30:00Z", "2026-12-01T09:30:00Z"],
    ),
    (
        "ncrontab_mondays_in_january",
        "0 30 9 * Jan Mon",
        "UTC",
        "2026-11-29T20:07:00Z",
        ["2027-01-04T09:30:00Z", "2027-01-11T09:30:00Z"],
    ),
    ("macro_hourly", "@hourly", "UTC", "2026-11-29T20:00:00Z", ["2026-11-29T21:00:00Z"]),
    ("macro_daily", "@daily", "UTC", "2026-11-29T20:00:00Z", ["2026-11-30T00:00:00Z"]),
    ("macro_weekly_is_sunday", "@weekly", "UTC", "2026-11-29T20:00:00Z", ["2026-12-06T00:00:00Z"]),
    ("macro_monthly", "@monthly", "UTC", "2026-11-29T20:00:00Z", ["2026-12-01T00:00:00Z"]),
    ("macro_yearly_any_case", "@YEARLY", "UTC", "2026-11-29T20:00:00Z", ["2027-01-01T00:00:00Z"]),
]


@pytest.mark.parametrize(
    ("expression", "time_zone", "after", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in NEXT_CASES],
)
def test_next_after(expression: str, time_zone: str, after: str, expected: list[str]) -> None:
    schedule = parse_cron(expression, time_zone)
    fires = chain(schedule, utc(after), len(expected))
    assert fires == [utc(text) for text in expected]
    for fire in fires:
        assert fire.tzinfo is UTC
        assert fire.microsecond == 0


def test_next_after_accepts_any_offset_and_returns_utc() -> None:
    after = datetime(2026, 11, 29, 21, 0, tzinfo=timezone(timedelta(hours=1)))  # 20:00Z
    fire = parse_cron("0 6 * * *").next_after(after)
    assert fire == utc("2026-11-30T06:00:00Z")
    assert fire.tzinfo is UTC


def test_next_after_rejects_naive_datetimes() -> None:
    schedule = parse_cron("0 6 * * *")
    naive = datetime(2026, 11, 29, 20, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.next_after(naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.fires(naive, utc("2026-12-01T00:00:00Z"), 10)
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.count_fires(utc("2026-11-29T00:00:00Z"), naive, 10)


def test_no_fire_before_the_year_9999() -> None:
    with pytest.raises(ScheduleError, match="no fire before"):
        parse_cron("0 0 1 1 *").next_after(utc("9998-06-01T00:00:00Z"))


# -- fires and count_fires --------------------------------------------------------------------------


def test_fires_honours_limit() -> None:
    fires = parse_cron("* * * * *").fires(utc("2026-11-29T00:00:00Z"), utc("2026-11-29T01:00:00Z"), 3)
    assert fires == [utc("2026-11-29T00:01:00Z"), utc("2026-11-29T00:02:00Z"), utc("2026-11-29T00:03:00Z")]


def test_fires_interval_is_open_then_closed() -> None:
    fires = parse_cron("* * * * *").fires(utc("2026-11-29T00:00:00Z"), utc("2026-11-29T01:00:00Z"), 100)
    assert len(fires) == 60
    assert fires[0] == utc("2026-11-29T00:01:00Z")
    assert fires[-1] == utc("2026-11-29T01:00:00Z")


def test_fires_across_autumn_repeat() -> None:
    fires = parse_cron("0 * * * *", "America/New_York").fires(
        utc("2026-11-01T04:00:00Z"), utc("2026-11-01T08:00:00Z"), 10
    )
    assert fires == [utc(f"2026-11-01T0{h}:00:00Z") for h in (5, 6, 7, 8)]


# (id, expression, time zone, after, until, cap, expected count)
COUNT_CASES = [
    (
        "per_second_one_day",
        "* * * * * *",
        "UTC",
        "2026-11-29T00:00:00Z",
        "2026-11-30T00:00:00Z",
        10**6,
        86400,
    ),
    (
        "per_second_one_day_capped",
        "* * * * * *",
        "UTC",
        "2026-11-29T00:00:00Z",
        "2026-11-30T00:00:00Z",
        100,
        100,
    ),
    (
        "per_second_autumn_day_is_25_hours",
        "* * * * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-02T05:00:00Z",
        10**6,
        90000,
    ),
    (
        "hourly_autumn_day_is_25_hours",
        "0 * * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-02T05:00:00Z",
        1000,
        25,
    ),
    (
        "hourly_spring_day_is_23_hours",
        "0 * * * *",
        "America/New_York",
        "2026-03-08T05:00:00Z",
        "2026-03-09T04:00:00Z",
        1000,
        23,
    ),
    (
        "fixed_time_autumn_day_once",
        "30 1 * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-02T05:00:00Z",
        1000,
        1,
    ),
    (
        "hour_restricted_steps_autumn_first_copy_only",
        "*/10 1 * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-02T05:00:00Z",
        1000,
        6,
    ),
    (
        "hour_restricted_per_second_autumn_first_copy_only",
        "* * 1 * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-02T05:00:00Z",
        10**6,
        3600,
    ),
    (
        "skipped_times_spring_day_once",
        "*/10 2 * * *",
        "America/New_York",
        "2026-03-08T05:00:00Z",
        "2026-03-09T04:00:00Z",
        1000,
        1,
    ),
    (
        "every_30_min_autumn_both_copies",
        "*/30 * * * *",
        "America/New_York",
        "2026-11-01T04:00:00Z",
        "2026-11-01T08:00:00Z",
        1000,
        8,
    ),
    (
        "leap_days_over_nine_years",
        "0 0 29 2 *",
        "UTC",
        "2024-01-01T00:00:00Z",
        "2032-12-31T00:00:00Z",
        1000,
        3,
    ),
    ("until_is_inclusive", "0 6 * * *", "UTC", "2026-11-29T06:00:00Z", "2026-11-30T06:00:00Z", 1000, 1),
    ("empty_interval", "* * * * * *", "UTC", "2026-11-29T00:00:00Z", "2026-11-29T00:00:00Z", 1000, 0),
    ("reversed_interval", "* * * * * *", "UTC", "2026-11-29T00:00:00Z", "2026-11-28T00:00:00Z", 1000, 0),
    ("cap_zero", "* * * * * *", "UTC", "2026-11-29T00:00:00Z", "2026-11-30T00:00:00Z", 0, 0),
    (
        "cap_ends_a_long_count",
        "* * * * * *",
        "Europe/Paris",
        "2026-01-01T00:00:00Z",
        "5000-01-01T00:00:00Z",
        10,
        10,
    ),
]


@pytest.mark.parametrize(
    ("expression", "time_zone", "after", "until", "cap", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in COUNT_CASES],
)
def test_count_fires(
    expression: str, time_zone: str, after: str, until: str, cap: int, expected: int
) -> None:
    assert parse_cron(expression, time_zone).count_fires(utc(after), utc(until), cap) == expected


# count_fires counts arithmetically and fires() steps with next_after: they must agree around transitions.
CONSISTENCY_CASES = [
    ("ny_spring", "America/New_York", "2026-03-08T03:17:00Z"),
    ("ny_autumn", "America/New_York", "2026-11-01T03:17:00Z"),
    ("paris_autumn", "Europe/Paris", "2026-10-24T21:59:59Z"),
    ("lord_howe_spring", "Australia/Lord_Howe", "2026-10-03T12:00:00Z"),
    ("lord_howe_autumn", "Australia/Lord_Howe", "2026-04-04T12:00:01Z"),
    ("apia_skipped_day", "Pacific/Apia", "2011-12-29T06:00:00Z"),
]
CONSISTENCY_EXPRESSIONS = ["*/7 * * * *", "15,45 1,2 * * *", "0 */2 * * *", "*/20 35,55 * * * *", "0 0 * * *"]


@pytest.mark.parametrize("expression", CONSISTENCY_EXPRESSIONS)
@pytest.mark.parametrize(("time_zone", "after"), [pytest.param(*c[1:], id=c[0]) for c in CONSISTENCY_CASES])
def test_count_fires_agrees_with_fires(expression: str, time_zone: str, after: str) -> None:
    schedule = parse_cron(expression, time_zone)
    start = utc(after)
    until = start + timedelta(hours=30)
    assert schedule.count_fires(start, until, 10**6) == len(schedule.fires(start, until, 10**6))


def test_count_fires_per_second_day_is_fast() -> None:
    schedule = parse_cron("* * * * * *", "Europe/Paris")
    began = time.perf_counter()
    assert schedule.count_fires(utc("2026-10-24T22:00:00Z"), utc("2026-10-25T23:00:00Z"), 10**9) == 25 * 3600
    assert time.perf_counter() - began < 0.05


# -- min interval -----------------------------------------------------------------------------------

MIN_INTERVAL_CASES = [
    ("twice_a_year_one_minute_apart", "0,1 0 1 1 *", 60),
    ("every_5_seconds", "*/5 * * * * *", 5),
    ("seconds_list_wraps_into_next_minute", "0,50 * * * * *", 10),
    ("every_minute", "* * * * *", 60),
    ("minutes_wrap_into_next_hour", "10,55 * * * *", 900),
    ("hours_wrap_into_next_day", "0 */7 * * *", 3 * 3600),
    ("daily", "0 6 * * *", 86400),
    ("last_second_to_first_of_next_day", "59 59 23 * * *", 86400),
    ("weekly", "0 9 * * MON", 7 * 86400),
    ("two_weekdays", "0 9 * * MON,TUE", 86400),
    ("hour_restricted_steps", "*/10 1 * * *", 600),
    ("monthly_31st", "0 0 31 * *", 31 * 86400),
    ("yearly", "0 0 1 1 *", 365 * 86400),
    ("leap_day", "0 0 29 2 *", 1461 * 86400),
    ("first_or_monday", "0 12 1 * MON", 86400),
    ("late_then_early_next_day", "0 0,23 * * *", 3600),
]


@pytest.mark.parametrize(
    ("expression", "expected"), [pytest.param(*c[1:], id=c[0]) for c in MIN_INTERVAL_CASES]
)
def test_min_interval_seconds(expression: str, expected: int) -> None:
    assert parse_cron(expression).min_interval_seconds() == expected


def test_validate_cron_accepts_at_the_minimum() -> None:
    assert validate_cron("* * * * *", "UTC", 60) == parse_cron("* * * * *", "UTC")
    assert validate_cron("* * * * * *", "Europe/Paris", 1).time_zone == "Europe/Paris"


def test_validate_cron_rejects_more_often_than_the_minimum() -> None:
    with pytest.raises(ScheduleError, match="30 seconds apart; the minimum allowed interval is 60 seconds"):
        validate_cron("*/30 * * * * *", "UTC", 60)
    with pytest.raises(ScheduleError, match="60 seconds apart; the minimum allowed interval is 300 seconds"):
        validate_cron("0,1 0 1 1 *", "UTC", 300)


# -- invalid input ----------------------------------------------------------------------------------

# (id, expression, time zone, expected message fragment)
INVALID_CASES = [
    ("empty", "", "UTC", "has 0"),
    ("four_fields", "* * * *", "UTC", "has 4"),
    ("seven_fields_year", "0 0 12 * * * 2026", "UTC", "has 7"),
    ("second_out_of_range", "60 * * * * *", "UTC", "second field value 60 is out of range (0-59)"),
    ("minute_out_of_range", "60 * * * *", "UTC", "minute field value 60 is out of range (0-59)"),
    ("hour_out_of_range", "* 24 * * *", "UTC", "hour field value 24 is out of range (0-23)"),
    ("day_zero", "* * 0 * *", "UTC", "day of month field value 0 is out of range (1-31)"),
    ("day_32", "* * 32 * *", "UTC", "day of month field value 32 is out of range (1-31)"),
    ("month_13", "* * * 13 *", "UTC", "month field value 13 is out of range (1-12)"),
    ("weekday_8", "* * * * 8", "UTC", "day of week field value 8 is out of range (0-7)"),
    ("bad_month_name", "* * * JANUARY *", "UTC", "unknown name 'JANUARY'"),
    ("bad_weekday_name", "* * * * FUN", "UTC", "unknown name 'FUN'"),
    ("name_in_hour_field", "* MON * * *", "UTC", "hour field has an invalid item 'MON'"),
    ("last_day_l", "0 0 L * *", "UTC", "'L', 'W' and '#' are not supported"),
    ("nth_weekday_hash", "0 0 * * 1#2", "UTC", "'L', 'W' and '#' are not supported"),
    ("nearest_weekday_w", "0 0 15W * *", "UTC", "'L', 'W' and '#' are not supported"),
    ("step_zero", "*/0 * * * *", "UTC", "step in '*/0' must be at least 1"),
    ("backwards_range", "5-1 * * * *", "UTC", "range '5-1' runs backwards"),
    ("empty_list_item", "1,,2 * * * *", "UTC", "minute field has an invalid item ''"),
    ("question_mark_outside_day_fields", "? * * * *", "UTC", "minute field has an invalid item '?'"),
    ("negative_number", "-5 * * * *", "UTC", "invalid item '-5'"),
    ("non_ascii_digit", "\u0663 * * * *", "UTC", "invalid item"),
    ("never_fires_feb_30", "0 0 30 2 *", "UTC", "can never fire"),
    ("never_fires_31st_of_short_months", "0 0 31 4,6,9,11 *", "UTC", "can never fire"),
    ("macro_reboot", "@reboot", "UTC", "Unsupported cron macro '@reboot'"),
    ("unknown_time_zone", "0 6 * * *", "Mars/Olympus_Mons", "Unknown time zone 'Mars/Olympus_Mons'"),
    ("path_as_time_zone", "0 6 * * *", "../../etc/passwd", "Unknown time zone '../../etc/passwd'"),
    ("empty_time_zone", "0 6 * * *", "", "must be an IANA name"),
]


@pytest.mark.parametrize(
    ("expression", "time_zone", "message"), [pytest.param(*c[1:], id=c[0]) for c in INVALID_CASES]
)
def test_invalid_expressions(expression: str, time_zone: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_cron(expression, time_zone)
    assert message in str(caught.value)
    assert caught.value.field == ("cron_expression" if time_zone == "UTC" else "time_zone")


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_parse_cron_is_cached_and_schedules_compare_by_text() -> None:
    assert parse_cron("0 6 * * *", "Europe/Paris") is parse_cron("0 6 * * *", "Europe/Paris")
    assert CronSchedule("0 6 * * *", "Europe/Paris") == parse_cron("0 6 * * *", "Europe/Paris")
    assert CronSchedule("0 6 * * *") != CronSchedule("0 6 * * *", "Europe/Paris")


# -- next_fire_after --------------------------------------------------------------------------------


@dataclass
class Timer:
    at: datetime
    type: str = "timer"


@dataclass
class Schedule:
    cron_expression: str
    time_zone: str = "UTC"
    type: str = "schedule"


class TriggerType(enum.Enum):
    schedule = "schedule"
    timer = "timer"


@dataclass
class EnumTyped:
    type: TriggerType
    cron_expression: str = "0 6 * * *"
    time_zone: str = "UTC"


TRIGGER_CASES = [
    ("timer_in_future", Timer(utc("2026-12-01T10:00:00Z")), "2026-11-29T20:00:00Z", "2026-12-01T10:00:00Z"),
    ("timer_in_past_returns_none", Timer(utc("2026-11-01T10:00:00Z")), "2026-11-29T20:00:00Z", None),
    ("timer_at_after_returns_none", Timer(utc("2026-11-29T20:00:00Z")), "2026-11-29T20:00:00Z", None),
    (
        "timer_with_offset_returned_as_utc",
        Timer(datetime(2026, 12, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))),
        "2026-11-29T20:00:00Z",
        "2026-12-01T08:00:00Z",
    ),
    (
        "timer_microseconds_truncated",
        Timer(utc("2026-12-01T10:00:00.750000Z")),
        "2026-11-29T20:00:00Z",
        "2026-12-01T10:00:00Z",
    ),
    (
        "schedule_in_time_zone",
        Schedule("30 2 * * *", "America/New_York"),
        "2026-03-07T12:00:00Z",
        "2026-03-08T07:00:00Z",
    ),
    (
        "schedule_with_enum_type",
        EnumTyped(TriggerType.schedule),
        "2026-11-29T20:00:00Z",
        "2026-11-30T06:00:00Z",
    ),
    # Past the end of the calendar there is no next fire, wherever the zone's wall clock is.
    ("calendar_end_utc", Schedule("0 * * * *", "UTC"), "9999-12-31T23:30:00Z", None),
    ("calendar_end_behind_utc", Schedule("0 * * * *", "America/New_York"), "9999-12-31T23:30:00Z", None),
    ("calendar_end_ahead_of_utc", Schedule("0 * * * *", "Pacific/Kiritimati"), "9999-12-31T23:00:00Z", None),
    ("calendar_end_seconds", Schedule("* * * * * *", "Pacific/Kiritimati"), "9999-12-31T23:00:00Z", None),
]


@pytest.mark.parametrize(
    ("trigger", "after", "expected"), [pytest.param(*c[1:], id=c[0]) for c in TRIGGER_CASES]
)
def test_next_fire_after(trigger: object, after: str, expected: str | None) -> None:
    fire = next_fire_after(trigger, utc(after))
    if expected is None:
        assert fire is None
    else:
        assert fire == utc(expected)
        assert fire is not None and fire.tzinfo is UTC


def test_next_fire_after_rejects_naive_and_unknown() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire_after(Timer(utc("2026-12-01T10:00:00Z")), datetime(2026, 11, 29))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire_after(Timer(datetime(2026, 12, 1)), utc("2026-11-29T20:00:00Z"))
    with pytest.raises(ValueError, match="unknown trigger type"):
        next_fire_after(Timer(utc("2026-12-01T10:00:00Z"), type="smoke-signal"), utc("2026-11-29T20:00:00Z"))
    # A webhook trigger is known, and has no fires in time.
    assert (
        next_fire_after(Timer(utc("2026-12-01T10:00:00Z"), type="webhook"), utc("2026-11-29T20:00:00Z"))
        is None
    )
    with pytest.raises(ScheduleError, match="Unknown time zone"):
        next_fire_after(Schedule("0 6 * * *", "Nowhere/Land"), utc("2026-11-29T20:00:00Z"))
