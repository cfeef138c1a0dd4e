"""A useful subset of systemd.time(7) calendar events, for ``calendar = "..."`` schedules.

Supported: the shorthands (``minutely`` .. ``yearly``), ``[WEEKDAYS] [[YYYY-]MM-DD] [HH:MM[:SS]]
[UTC]`` with ``*``, lists ``a,b``, ranges ``a..b`` and repetitions ``a/step`` in every field.
Not supported (refused with a reason, never misread): ``~`` last-day syntax, fractional seconds and
time zones other than UTC. Times are local unless the expression ends in ``UTC``, as in systemd.
"""

from __future__ import annotations

import calendar as _cal
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
}
_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
_WEEKDAY_FULL = {"monday": 0, "tuesday": 1, "wednesday": 2, "thursday": 3, "friday": 4,
                 "saturday": 5, "sunday": 6}
_SEARCH_YEARS = 8  # an expression with no match this soon (e.g. Feb 30) never fires


def _values(field: str, lo: int, hi: int, what: str) -> frozenset[int]:
    """The set of integers a systemd calendar component matches within [lo, hi]."""
    out: set[int] = set()
    for part in field.split(","):
        m = re.fullmatch(r"(\*|\d+)(?:\.\.(\d+))?(?:/(\d+))?", part)
        if not m:
            raise ValueError(f"bad {what} {part!r}")
        start = lo if m.group(1) == "*" else int(m.group(1))
        open_ended = m.group(1) == "*" or m.group(3)
        end = int(m.group(2)) if m.group(2) else (hi if open_ended else start)
        step = int(m.group(3)) if m.group(3) else 1
        if step <= 0 or not (lo <= start <= hi) or not (lo <= end <= hi) or end < start:
            raise ValueError(f"{what} {part!r} is out of range {lo}..{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)


def _weekdays(field: str) -> frozenset[int]:
    out: set[int] = set()
    for part in field.lower().split(","):
        ends = part.split("..")
        nums = [_WEEKDAYS.get(e, _WEEKDAY_FULL.get(e)) for e in ends]
        if len(ends) > 2 or any(n is None for n in nums):
            raise ValueError(f"bad weekday {part!r}")
        a, b = nums[0], nums[-1]
        assert a is not None and b is not None
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


@dataclass(frozen=True)
class CalendarSpec:
    text: str
    weekdays: frozenset[int]
    years: frozenset[int]
    months: frozenset[int]
    days: frozenset[int]
    hours: frozenset[int]
    minutes: frozenset[int]
    seconds: frozenset[int]
    utc: bool

    def next_after(self, after: float) -> float | None:
        """The first matching time strictly after ``after`` (a Unix time), or None."""
        tz = UTC if self.utc else None
        start = datetime.fromtimestamp(int(after) + 1, tz)
        if self.utc:
            start = start.replace(tzinfo=None)
        for year in range(start.year, start.year + _SEARCH_YEARS):
            if year not in self.years:
                continue
            for month in sorted(self.months):
                if (year, month) < (start.year, start.month):
                    continue
                last = _cal.monthrange(year, month)[1]
                for day in sorted(self.days):
                    if day > last or (year, month, day) < (start.year, start.month, start.day):
                        continue
                    if datetime(year, month, day).weekday() not in self.weekdays:
                        continue
                    same_day = (year, month, day) == (start.year, start.month, start.day)
                    found = self._first_time(start if same_day else None)
                    if found is None:
                        continue
                    when = datetime(year, month, day, *found)
                    if self.utc:
                        return when.replace(tzinfo=UTC).timestamp()
                    return time.mktime(when.timetuple())
        return None

    def _first_time(self, start: datetime | None) -> tuple[int, int, int] | None:
        floor = (start.hour, start.minute, start.second) if start else (0, 0, 0)
        for h in sorted(self.hours):
            if h < floor[0]:
                continue
            for mi in sorted(self.minutes):
                if (h, mi) < floor[:2]:
                    continue
                for s in sorted(self.seconds):
                    if (h, mi, s) >= floor:
                        return h, mi, s
        return None


def parse_calendar(text: str) -> CalendarSpec:
    """Parse a calendar expression; ValueError with the reason when unsupported or invalid."""
    original = text
    parts = text.split()
    utc = False
    if parts and parts[-1].upper() == "UTC":
        utc = True
        parts.pop()
    s = " ".join(parts)
    s = SHORTHANDS.get(s.lower(), s)
    if "~" in s:
        raise ValueError("the '~' (days from the end of the month) syntax is not supported")
    parts = s.split(" ") if s else []
    weekdays = frozenset(range(7))
    if parts and re.match(r"^[A-Za-z]", parts[0]):
        weekdays = _weekdays(parts.pop(0))
    date, clock = "*-*-*", "00:00:00"
    for part in parts:
        if ":" in part and clock == "00:00:00" and part is parts[-1]:
            clock = part
        elif "-" in part and date == "*-*-*":
            date = part
        else:
            raise ValueError(f"cannot read {part!r} in calendar expression {original!r}")
    d = date.split("-")
    if len(d) == 2:
        d = ["*", *d]
    if len(d) != 3:
        raise ValueError(f"bad date {date!r}")
    t = clock.split(":")
    if len(t) == 2:
        t.append("00")
    if len(t) != 3 or "." in t[2]:
        raise ValueError(f"bad time {clock!r} (fractional seconds are not supported)")
    return CalendarSpec(
        text=original,
        weekdays=weekdays,
        years=_values(d[0], 1970, 2199, "year"),
        months=_values(d[1], 1, 12, "month"),
        days=_values(d[2], 1, 31, "day"),
        hours=_values(t[0], 0, 23, "hour"),
        minutes=_values(t[1], 0, 59, "minute"),
        seconds=_values(t[2], 0, 59, "second"),
        utc=utc,
    )

