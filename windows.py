"""Hours and windows: the UTC time arithmetic of the export, pure and without I/O.

The Export API counts hours in UTC as `YYYYMMDDTHH`, and its `end` is the last hour included: a day is T00 to T23.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from errors import UsageError

HOUR = dt.timedelta(hours=1)
HOUR_FORMAT = "%Y%m%dT%H"
FRESHNESS = dt.timedelta(hours=2)  # Amplitude makes events exportable about 2 hours after upload.
FIRST_YEAR, LAST_YEAR = 2000, 2100  # Amplitude was founded in 2012; anything outside these is a typo


@dataclasses.dataclass(frozen=True, order=True)
class Window:
    """Consecutive UTC hours from `start` to `end`, both included, as the Export API counts them."""

    start: dt.datetime
    end: dt.datetime

    @property
    def hours(self) -> int:
        return int((self.end - self.start) / HOUR) + 1

    @property
    def label(self) -> str:
        return f"{format_hour(self.start)}-{format_hour(self.end)}"

    def halves(self) -> tuple[Window, Window]:
        middle = self.start + (self.hours // 2) * HOUR
        return Window(self.start, middle - HOUR), Window(middle, self.end)

    def __str__(self) -> str:
        return self.label


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def yesterday(now: dt.datetime) -> Window:
    day = floor_hour(now).replace(hour=0) - dt.timedelta(days=1)
    return Window(day, day + 23 * HOUR)


def last_finished_hour(now: dt.datetime) -> dt.datetime:
    return floor_hour(now) - HOUR


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def parse_hour(text: str, source: str, last_hour: bool) -> dt.datetime:
    """YYYY-MM-DD (its first hour, or its last when `last_hour`) or YYYYMMDDTHH, in UTC, years 2000 to 2100."""
    text = str(text).strip()
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            moment = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            moment += 23 * HOUR if last_hour else dt.timedelta(0)
        elif re.fullmatch(r"[0-9]{8}T[0-9]{2}", text):
            moment = dt.datetime.strptime(text, HOUR_FORMAT).replace(tzinfo=dt.UTC)
        else:
            raise UsageError(f"{source} {text!r}: expected YYYY-MM-DD or YYYYMMDDTHH (UTC)")
    except ValueError:
        raise UsageError(f"{source} {text}: no such date or hour") from None
    if not FIRST_YEAR <= moment.year <= LAST_YEAR:
        raise UsageError(f"{source} {text}: the year must be between {FIRST_YEAR} and {LAST_YEAR}")
    return moment


def format_hour(moment: dt.datetime) -> str:
    return moment.strftime(HOUR_FORMAT)


def hours_between(start: dt.datetime, end: dt.datetime):
    return (start + n * HOUR for n in range(int((end - start) / HOUR) + 1))


def plan_windows(start: dt.datetime, end: dt.datetime, window_hours: int):
    """Consecutive, non-overlapping windows of `window_hours` from `start`, the last one maybe shorter, one at a
    time: a range of decades plans in constant memory."""
    while start <= end:
        last = min(start + (window_hours - 1) * HOUR, end)
        yield Window(start, last)
        start = last + HOUR


def plan_missing(windows, covered) -> list[Window]:
    """The parts of `windows` not in `covered` (a set of hours), as windows of consecutive missing hours."""
    missing = []
    for window in windows:
        run_start = None
        for hour in hours_between(window.start, window.end):
            if hour in covered:
                if run_start is not None:
                    missing.append(Window(run_start, hour - HOUR))
                    run_start = None
            elif run_start is None:
                run_start = hour
        if run_start is not None:
            missing.append(Window(run_start, window.end))
    return missing


def fresh_windows(windows: list[Window], now: dt.datetime) -> list[Window]:
    """Windows ending less than FRESHNESS ago: Amplitude may not have made their last hours exportable yet."""
    return [window for window in windows if window.end + HOUR > now - FRESHNESS]
