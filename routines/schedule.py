"""Schedule math: cron parsing, next fire, fire counting (docs/api.md, triggers). Pure, no clock reads.

Cron dialect
    5 fields ``minute hour day month weekday`` or 6 fields with a leading ``second`` field. Items are
    ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S``, ``A/S`` (A through the field's maximum) and comma lists of
    them; month and weekday accept names (``JAN``, ``mon``; any case). Weekday 0 and 7 are Sunday;
    ``FRI-SUN`` is read as 5-7. ``?`` is accepted as ``*`` in the two day fields. Macros ``@yearly``,
    ``@annually``, ``@monthly``, ``@weekly``, ``@daily``, ``@midnight`` and ``@hourly`` are accepted.
    ``L``, ``W``, ``#``, ``@reboot`` and a year field are rejected. Expressions that can never fire
    (``0 0 30 2 *``) are rejected.

Day of month and day of week (Vixie cron / cronie rule, as crontab.guru and cronsim read it)
    A day field whose text starts with ``*`` (or is ``?``) is *unrestricted*. When both day fields are
    restricted a day matches if EITHER matches (``0 0 1,15 * MON``: the 1st, the 15th and every Monday);
    otherwise both must match (``0 0 */2 * MON``: odd days that are Mondays). croniter reads ``*/2`` as
    restricted and would OR here.

DST, with ``time_zone`` the schedule's IANA zone (wall clock = local time in that zone)
    * "Elapsed-time" schedules are those whose hour field covers all 24 hours (``*``, ``*/1``, ``0-23``).
      They fire at every real instant whose local wall clock matches the fields: in a repeated (fall-back)
      period they fire in both copies (``*/30 * * * *`` in New York on 2026-11-01: 01:00 EDT, 01:30 EDT,
      01:00 EST, 01:30 EST, 02:00 EST); wall times skipped by a spring-forward do not exist and produce
      no fire (``0 * * * *`` has no 02:00 fire on 2026-03-08; ``0 * * * *`` at Lord Howe, whose gap is
      02:00-02:30, is not moved to 02:30).
    * All other schedules have fixed wall-clock hours. A matching wall time skipped by a spring-forward
      fires once, at the first instant after the gap (``30 2 * * *`` in New York on 2026-03-08 fires at
      03:00 EDT); several skipped times in one gap fire once together. A matching wall time repeated by a
      fall-back fires once, in the first (summer-time) copy; this holds for minute/second steps too
      (``*/10 1 * * *`` fires 01:00-01:50 EDT only, not again in EST).
    * ``min_interval_seconds`` is computed in wall-clock terms from the field sets (cron frequency).
      Real gaps can differ once around a transition: a daily schedule may be 23 or 25 hours apart, gap
      merging can bring one fire closer to the next (``1,59 2,3 * * *`` merges 02:01 and 02:59 into 03:00,
      one minute before 03:01), and at zones with a 30-minute shift an elapsed-time schedule can fire
      closer in the repeated half hour (``35,55 * * * *`` at Lord Howe: 01:55 then 01:35 ten minutes later).
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import itertools
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from routines.errors import RoutinesError

__all__ = [
    "CronSchedule",
    "ScheduleError",
    "jitter_offset",
    "next_fire_after",
    "parse_cron",
    "validate_cron",
]

_ONE_SECOND = timedelta(seconds=1)
_MAX_EXPRESSION_LENGTH = 1024
_LAST_YEAR = 9998  # searches stop here; datetime cannot go past 9999
# Offset transitions in tzdata since 1900 are at least ~7 days apart (checked on tzdata 2026.6); probing
# every day therefore finds every one of them.
_PROBE_STEP = 86_400
_GREGORIAN_CYCLE_DAYS = 146_097  # the calendar (dates and weekdays) repeats every 400 years

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTH_NAMES = {n.upper(): i for i, n in enumerate(calendar.month_abbr) if n}
_WEEKDAY_NAMES = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
_ITEM = re.compile(
    r"^(?:(?P<star>\*)|(?P<start>[0-9A-Za-z]+)(?:-(?P<end>[0-9A-Za-z]+))?)(?:/(?P<step>[0-9]+))?$"
)


class ScheduleError(RoutinesError, ValueError):
    """A trigger cannot be scheduled. The message is a user-facing sentence.

    ``field`` names the offending trigger attribute: ``cron_expression`` or ``time_zone``.
    """

    def __init__(self, message: str, *, field: str = "cron_expression") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int  # highest value accepted in the text (7 for weekday)
    star_high: int  # upper end of ``*`` and of ``A/S`` (6 for weekday)
    names: dict[str, int]


_SECOND = _FieldSpec("second", 0, 59, 59, {})
_MINUTE = _FieldSpec("minute", 0, 59, 59, {})
_HOUR = _FieldSpec("hour", 0, 23, 23, {})
_DAY = _FieldSpec("day of month", 1, 31, 31, {})
_MONTH = _FieldSpec("month", 1, 12, 12, _MONTH_NAMES)
_WEEKDAY = _FieldSpec("day of week", 0, 7, 6, _WEEKDAY_NAMES)


def _value(token: str, spec: _FieldSpec, item: str) -> int:
    if token.isascii() and token.isdigit():
        number = int(token)
    elif token.upper() in spec.names:
        return spec.names[token.upper()]
    elif spec.names and token.isalpha():
        raise ScheduleError(f"Cron {spec.name} field has an unknown name '{token}' in '{item}'.")
    else:
        raise ScheduleError(_bad_item(item, spec))
    if not spec.low <= number <= spec.high:
        raise ScheduleError(
            f"Cron {spec.name} field value {number} is out of range ({spec.low}-{spec.high})."
        )
    return number


def _bad_item(item: str, spec: _FieldSpec) -> str:
    hint = ""
    if any(c in item.upper() for c in "LW#"):
        hint = " ('L', 'W' and '#' are not supported)"
    return f"Cron {spec.name} field has an invalid item '{item}'{hint}."


def _parse_field(text: str, spec: _FieldSpec) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if item == "?" and spec in (_DAY, _WEEKDAY):
            item = "*"
        match = _ITEM.match(item)
        if match is None:
            raise ScheduleError(_bad_item(item, spec))
        if match["star"]:
            first, last = spec.low, spec.star_high
        else:
            first = _value(match["start"], spec, item)
            if match["end"] is not None:
                last = _value(match["end"], spec, item)
                if spec is _WEEKDAY and last == 0 and first > 0:
                    last = 7  # FRI-SUN
                if last < first:
                    raise ScheduleError(
                        f"Cron {spec.name} field range '{item}' runs backwards; write the lower bound first."
                    )
            elif match["step"] is not None:
                last = spec.star_high if first <= spec.star_high else first
            else:
                last = first
        step = 1
        if match["step"] is not None:
            step = int(match["step"])
            if step == 0:
                raise ScheduleError(f"Cron {spec.name} field step in '{item}' must be at least 1.")
        values.update(range(first, last + 1, step))
    if spec is _WEEKDAY and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


@functools.lru_cache(maxsize=16384)
def _days_of_month(
    days: frozenset[int], weekdays: frozenset[int], either: bool, first_weekday: int, length: int
) -> tuple[int, ...]:
    """Matching days of a month of ``length`` days whose 1st falls on ``first_weekday`` (0 = Sunday)."""
    out = []
    for day in range(1, length + 1):
        in_days = day in days
        in_weekdays = (first_weekday + day - 1) % 7 in weekdays
        if (in_days or in_weekdays) if either else (in_days and in_weekdays):
            out.append(day)
    return tuple(out)


def _month_shape(year: int, month: int) -> tuple[int, int]:
    monday_based, length = calendar.monthrange(year, month)
    return (monday_based + 1) % 7, length


def _offset(zone: ZoneInfo, ts: int) -> int:
    offset = datetime.fromtimestamp(ts, zone).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


def _transition(zone: ZoneInfo, low: int, high: int) -> int:
    """The instant (epoch seconds) in ``(low, high]`` where the offset changes to the one at ``high``."""
    target = _offset(zone, high)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(zone, middle) == target:
            high = middle
        else:
            low = middle
    return high


def _epoch(wall_minus_offset: datetime) -> int:
    return int(wall_minus_offset.replace(tzinfo=UTC).timestamp())


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class CronSchedule:
    """A validated cron expression in an IANA time zone. Construction raises ``ScheduleError``.

    All methods take aware datetimes (``ValueError`` on naive ones) and return aware UTC datetimes with
    microsecond 0. See the module docstring for the dialect and the DST rules.
    """

    expression: str
    time_zone: str = "UTC"
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _seconds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _minutes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _hours: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _months: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _days: frozenset[int] = field(init=False, repr=False, compare=False)
    _weekdays: frozenset[int] = field(init=False, repr=False, compare=False)
    _either_day: bool = field(init=False, repr=False, compare=False)
    _elapsed: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str):
            raise ScheduleError("The cron expression must be a string.")
        if len(self.expression) > _MAX_EXPRESSION_LENGTH:
            raise ScheduleError(f"The cron expression is longer than {_MAX_EXPRESSION_LENGTH} characters.")
        text = self.expression.strip()
        if text.startswith("@"):
            if text.lower() not in _MACROS:
                raise ScheduleError(
                    f"Unsupported cron macro '{text}'; use one of {', '.join(sorted(_MACROS))}."
                )
            text = _MACROS[text.lower()]
        parts = text.split()
        if len(parts) == 5:
            parts.insert(0, "0")
        elif len(parts) != 6:
            raise ScheduleError(
                "A cron expression has 5 fields (minute hour day month weekday) or 6 fields "
                f"(second minute hour day month weekday); '{self.expression}' has {len(parts)}."
            )
        specs = (_SECOND, _MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY)
        seconds, minutes, hours, days, months, weekdays = (
            _parse_field(part, spec) for part, spec in zip(parts, specs, strict=True)
        )
        if not isinstance(self.time_zone, str) or not self.time_zone:
            raise ScheduleError(
                "The time zone must be an IANA name such as 'Europe/Paris'.", field="time_zone"
            )
        try:
            zone = ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ScheduleError(
                f"Unknown time zone '{self.time_zone}'; use an IANA name such as 'Europe/Paris' or 'UTC'.",
                field="time_zone",
            ) from None
        days_restricted = not parts[3].startswith(("*", "?"))
        weekdays_restricted = not parts[5].startswith(("*", "?"))
        values: dict[str, Any] = {
            "_zone": zone,
            "_seconds": tuple(sorted(seconds)),
            "_minutes": tuple(sorted(minutes)),
            "_hours": tuple(sorted(hours)),
            "_months": tuple(sorted(months)),
            "_days": days,
            "_weekdays": weekdays,
            "_either_day": days_restricted and weekdays_restricted,
            "_elapsed": len(hours) == 24,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        lengths = {2: (28, 29), 4: (30,), 6: (30,), 9: (30,), 11: (30,)}
        if not any(
            self._month_days(first, length)
            for month in self._months
            for length in lengths.get(month, (31,))
            for first in range(7)
        ):
            raise ScheduleError(
                f"Cron expression '{self.expression}' can never fire: "
                "no date matches its day and month fields."
            )

    # -- calendar helpers -------------------------------------------------------------------------

    def _month_days(self, first_weekday: int, length: int) -> tuple[int, ...]:
        return _days_of_month(self._days, self._weekdays, self._either_day, first_weekday, length)

    def _days_in(self, year: int, month: int) -> tuple[int, ...]:
        return self._month_days(*_month_shape(year, month))

    def _next_wall(self, wall: datetime) -> datetime | None:
        """The first matching wall-clock time at or after ``wall`` (naive, whole seconds)."""
        year, month, day = wall.year, wall.month, wall.day
        hour, minute, second = wall.hour, wall.minute, wall.second
        months, hours, minutes, seconds = self._months, self._hours, self._minutes, self._seconds
        while year <= _LAST_YEAR:
            i = bisect_left(months, month)
            if i == len(months):
                year, month, day, hour, minute, second = year + 1, months[0], 1, 0, 0, 0
                continue
            if months[i] != month:
                month, day, hour, minute, second = months[i], 1, 0, 0, 0
            days = self._days_in(year, month)
            i = bisect_left(days, day)
            if i == len(days):
                month, day, hour, minute, second = month + 1, 1, 0, 0, 0
                continue
            if days[i] != day:
                day, hour, minute, second = days[i], 0, 0, 0
            i = bisect_left(hours, hour)
            if i == len(hours):
                day, hour, minute, second = day + 1, 0, 0, 0
                continue
            if hours[i] != hour:
                hour, minute, second = hours[i], 0, 0
            i = bisect_left(minutes, minute)
            if i == len(minutes):
                hour, minute, second = hour + 1, 0, 0
                continue
            if minutes[i] != minute:
                minute, second = minutes[i], 0
            i = bisect_left(seconds, second)
            if i == len(seconds):
                minute, second = minute + 1, 0
                continue
            return datetime(year, month, day, hour, minute, seconds[i])
        return None

    def _matches(self, wall: datetime) -> bool:
        return self._next_wall(wall) == wall

    def _offsets(self, wall: datetime) -> tuple[timedelta, timedelta]:
        """UTC offsets of ``wall`` read as its first (fold=0) and second (fold=1) occurrence.

        Equal: an ordinary time. First > second: repeated by a fall-back. First < second: skipped by
        a spring-forward (PEP 495 gives the offsets before and after the gap).
        """
        first = wall.replace(tzinfo=self._zone, fold=0).utcoffset()
        second = wall.replace(tzinfo=self._zone, fold=1).utcoffset()
        assert first is not None and second is not None
        return first, second

    # -- public API ---------------------------------------------------------------------------------

    def next_after(self, after: datetime) -> datetime:
        """The first fire strictly after ``after``. Raises ``ScheduleError`` if none before year 9999."""
        after_utc = _require_aware(after, "after")
        try:
            found = self._next_after(after_utc)
        except OverflowError:  # a wall clock or instant past 9999-12-31, where ``datetime`` ends
            found = None
        if found is None:
            raise ScheduleError(f"Cron expression '{self.expression}' has no fire before the year 9999.")
        return found

    def _next_after(self, after_utc: datetime) -> datetime | None:
        local = after_utc.astimezone(self._zone)
        wall = local.replace(tzinfo=None)
        start = wall.replace(microsecond=0)
        best: datetime | None = None
        first, second = self._offsets(wall)
        if first > second:  # `after` lies in a wall-clock period that a fall-back repeats
            size = first - second
            now_ts = int(after_utc.timestamp())
            if local.fold == 0:
                change = _transition(self._zone, now_ts, now_ts + int(size.total_seconds()))
            else:
                change = _transition(self._zone, now_ts - int(size.total_seconds()), now_ts)
            repeat_start = _utc(change).astimezone(self._zone).replace(tzinfo=None, fold=0)
            repeat_end = repeat_start + size
            if self._elapsed:  # second-copy fires, in order; all of them lie after the change
                candidate = self._next_wall(start if local.fold else repeat_start)
                while candidate is not None and candidate < repeat_end:
                    instant = (candidate - second).replace(tzinfo=UTC)
                    if instant > after_utc:
                        best = instant
                        break
                    candidate = self._next_wall(candidate + _ONE_SECOND)
            if local.fold:
                start = repeat_end  # first copies of this period are all in the past
        found = self._first_occurrence_after(start, after_utc)
        if found is None:
            found = best
        elif best is not None:
            found = min(found, best)
        return found

    def _first_occurrence_after(self, start: datetime, after_utc: datetime) -> datetime | None:
        """First fire after ``after_utc`` among first occurrences and gap fires of walls >= ``start``.

        These instants never decrease as the wall time increases, so the first one past ``after_utc``
        is the smallest.
        """
        candidate = self._next_wall(start)
        while candidate is not None:
            first, second = self._offsets(candidate)
            if first < second:  # skipped by a spring-forward
                change = _transition(self._zone, _epoch(candidate - second), _epoch(candidate - first))
                if not self._elapsed and change > after_utc.timestamp():
                    return _utc(change)
                gap_end = _utc(change).astimezone(self._zone).replace(tzinfo=None, fold=0)
                candidate = self._next_wall(max(gap_end, candidate + _ONE_SECOND))
                continue
            instant = (candidate - first).replace(tzinfo=UTC)
            if instant > after_utc:
                return instant
            candidate = self._next_wall(candidate + _ONE_SECOND)
        return None

    def fires(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Fires in ``(after, until]``, in order, at most ``limit`` of them."""
        until_utc = _require_aware(until, "until")
        out: list[datetime] = []
        current = _require_aware(after, "after")
        while len(out) < limit and current < until_utc:
            try:
                current = self.next_after(current)
            except ScheduleError:
                break
            if current > until_utc:
                break
            out.append(current)
        return out

    def count_fires(self, after: datetime, until: datetime, cap: int) -> int:
        """Number of fires in ``(after, until]``, counting no further than ``cap``.

        Counts whole days and hours arithmetically: a per-second schedule over a day costs about as
        much as an hourly one.
        """
        after_utc = _require_aware(after, "after")
        until_utc = _require_aware(until, "until")
        if cap <= 0:
            return 0
        # Fires are whole seconds: (after, until] is [begin, end) in epoch seconds.
        begin = int(after_utc.replace(microsecond=0).timestamp()) + 1
        end = int(until_utc.replace(microsecond=0).timestamp()) + 1
        if end <= begin:
            return 0
        # Split [begin, end) where the UTC offset changes; count each piece as it is found, so a
        # reached cap ends the walk early.
        total = 0
        low = probe = begin
        offset = _offset(self._zone, begin)
        while probe < end:
            nxt = min(probe + _PROBE_STEP, end)
            nxt_offset = _offset(self._zone, nxt)
            if nxt_offset != offset:
                change = _transition(self._zone, probe, nxt)
                total += self._count_segment(low, change, cap - total)
                if total >= cap:
                    return cap
                low = change
            probe, offset = nxt, nxt_offset
        total += self._count_segment(low, end, cap - total)
        return min(total, cap)

    def _count_segment(self, low: int, high: int, cap: int) -> int:
        """Fires in ``[low, high)`` (epoch seconds), an interval with one UTC offset."""
        if low >= high:
            return 0
        offset = timedelta(seconds=_offset(self._zone, low))
        wall_low = _utc(low).replace(tzinfo=None) + offset
        wall_high = _utc(high).replace(tzinfo=None) + offset
        extra = 0
        if not self._elapsed:
            first, second = self._offsets(wall_low)
            if first > second and _utc(low).astimezone(self._zone).fold == 1:
                # Second copy of a repeated period: its walls fired in the first copy already.
                size = first - second
                change = _transition(self._zone, low - int(size.total_seconds()), low)
                repeat_end = _utc(change).replace(tzinfo=None) + offset + size
                wall_low = min(max(wall_low, repeat_end), wall_high)
            before = _offset(self._zone, low - 1)
            if before < offset.total_seconds():  # `low` ends a spring-forward gap
                gap_start = wall_low - offset + timedelta(seconds=before)
                if self._count_walls(gap_start, wall_low, 1) and not self._matches(wall_low):
                    extra = 1
        return extra + self._count_walls(wall_low, wall_high, cap - extra)

    def _count_walls(self, low: datetime, high: datetime, cap: int) -> int:
        """Matching wall times in ``[low, high)``, ignoring DST; stops once ``cap`` is reached."""
        total = 0
        day = low.date()
        while day <= high.date() and total < cap:
            if day.month in self._months and day.day in self._days_in(day.year, day.month):
                start = self._time_of_day(low) if day == low.date() else 0
                stop = self._time_of_day(high) if day == high.date() else 86_400
                if stop > start:
                    total += self._count_times_below(stop) - self._count_times_below(start)
            day += timedelta(days=1)
        return total

    @staticmethod
    def _time_of_day(wall: datetime) -> int:
        return wall.hour * 3600 + wall.minute * 60 + wall.second

    def _count_times_below(self, limit: int) -> int:
        """Matching times of day (in seconds since midnight) below ``limit``."""
        hour, rest = divmod(limit, 3600)
        minute, second = divmod(rest, 60)
        per_minute = len(self._seconds)
        count = bisect_left(self._hours, hour) * len(self._minutes) * per_minute
        if hour in self._hours:
            count += bisect_left(self._minutes, minute) * per_minute
            if minute in self._minutes:
                count += bisect_left(self._seconds, second)
        return count

    def min_interval_seconds(self) -> float:
        """The smallest gap between two consecutive fires, in wall-clock terms (exact, not sampled).

        Consecutive fires differ in the second, minute, hour or date; each case's smallest gap follows
        from the sorted field sets, and the smallest gap between matching dates from one 400-year
        Gregorian cycle. DST can shift single real gaps (module docstring).
        """
        return float(_min_interval(self))


def _smallest_step(values: tuple[int, ...]) -> int:
    return min(b - a for a, b in itertools.pairwise(values))


@functools.lru_cache(maxsize=1024)
def _min_interval(schedule: CronSchedule) -> int:
    s, m, h = schedule._seconds, schedule._minutes, schedule._hours
    gaps = []
    if len(s) > 1:
        gaps.append(_smallest_step(s))
    if len(m) > 1:
        gaps.append(_smallest_step(m) * 60 + s[0] - s[-1])
    if len(h) > 1:
        gaps.append(_smallest_step(h) * 3600 + (m[0] * 60 + s[0]) - (m[-1] * 60 + s[-1]))
    first_time = h[0] * 3600 + m[0] * 60 + s[0]
    last_time = h[-1] * 3600 + m[-1] * 60 + s[-1]
    gaps.append(_smallest_date_step(schedule) * 86_400 + first_time - last_time)
    return min(gaps)


def _smallest_date_step(schedule: CronSchedule) -> int:
    """Fewest days between two consecutive matching dates, over a whole 400-year cycle."""
    smallest = _GREGORIAN_CYCLE_DAYS
    first: int | None = None
    previous: int | None = None
    for year in range(2000, 2400):
        for month in schedule._months:
            days = schedule._days_in(year, month)
            if not days:
                continue
            base = date(year, month, 1).toordinal() - 1
            if previous is not None:
                smallest = min(smallest, base + days[0] - previous)
            else:
                first = base + days[0]
            if len(days) > 1:
                smallest = min(smallest, _smallest_step(days))
            if smallest == 1:
                return 1
            previous = base + days[-1]
    assert first is not None and previous is not None  # construction rejects never-firing expressions
    return min(smallest, first + _GREGORIAN_CYCLE_DAYS - previous)


@functools.lru_cache(maxsize=1024)
def parse_cron(expression: str, time_zone: str = "UTC") -> CronSchedule:
    """Parse and validate a cron expression in an IANA time zone. Raises ``ScheduleError``. Cached."""
    return CronSchedule(expression, time_zone)


def validate_cron(expression: str, time_zone: str, min_interval_seconds: int) -> CronSchedule:
    """``parse_cron``, and reject schedules that can fire more often than ``min_interval_seconds``."""
    schedule = parse_cron(expression, time_zone)
    interval = schedule.min_interval_seconds()
    if interval < min_interval_seconds:
        raise ScheduleError(
            f"Cron expression '{expression}' can fire {interval:g} seconds apart; "
            f"the minimum allowed interval is {min_interval_seconds} seconds."
        )
    return schedule


def next_fire_after(trigger: Any, after: datetime) -> datetime | None:
    """Next fire of a trigger strictly after ``after`` (aware), as an aware UTC datetime, or None.

    ``trigger.type`` is ``"schedule"`` (with ``cron_expression`` and ``time_zone``) or ``"timer"``
    (with an aware ``at``, truncated to the second): a timer gives ``at`` while it is after ``after``;
    a ``"webhook"`` trigger has no fires in time (None).
    A schedule gives None only if it has no fire before the year 9999. Raises ``ScheduleError`` for an
    invalid schedule and ``ValueError`` for naive datetimes or an unknown trigger type.
    """
    after_utc = _require_aware(after, "after")
    kind = getattr(trigger.type, "value", trigger.type)
    if kind == "schedule":
        schedule = parse_cron(trigger.cron_expression, getattr(trigger, "time_zone", None) or "UTC")
        try:
            return schedule.next_after(after_utc)
        except ScheduleError:
            return None
    if kind == "timer":
        at = _require_aware(trigger.at, "trigger.at").replace(microsecond=0)
        return at if at > after_utc else None
    if kind == "webhook":
        return None  # fires come from deliveries, not the clock
    raise ValueError(f"unknown trigger type {kind!r}")


def jitter_offset(routine_id: str, fire: datetime, jitter_seconds: int) -> timedelta:
    """How long after ``fire`` it starts: a whole number of milliseconds in ``[0, jitter_seconds)``
    derived from the routine and the fire, so every worker, the API and the preview agree."""
    if jitter_seconds <= 0:
        return timedelta(0)
    stamp = _require_aware(fire, "fire").astimezone(UTC).isoformat()
    digest = hashlib.sha256(f"{routine_id}|{stamp}".encode()).digest()
    return timedelta(milliseconds=int.from_bytes(digest[:8], "big") % (jitter_seconds * 1000))
