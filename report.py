"""The completeness report (`--report`): is every hour there, and does any look wrong?

Reads the manifest (and, with --verify, each file's sha256), then writes one self-contained HTML page (styles,
script and data inline, so it opens offline from a file:// URL) and returns a per-day table for stdout. The page is
rendered by Jinja2 with autoescaping: every event type, file name and manifest value reaches it as text, never as
markup.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import statistics
from pathlib import Path

from store import Export, Upload, file_state
from windows import HOUR, format_hour, hours_between

HISTORY_DAYS = 7  # the same hour on up to this many days before is an hour's expectation
MIN_HISTORY = 3  # days of history the collapse rule needs; with fewer, only empty hours are flagged
COLLAPSE_SHARE = 0.2  # below this share of the expected count an hour has collapsed
MIN_EXPECTED = 20  # expectations smaller than this are noise: no collapse is flagged against them
STOPPED_MIN = 5  # a type with at least this many events the day before, and none on a day, has stopped
TYPE_COLUMNS = 12  # event types with a column of their own on the page; the rest are summed
TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclasses.dataclass
class Hour:
    moment: dt.datetime
    count: int | None = None  # None when missing, or exported by a window without per-hour counts
    missing: str = ""  # why the hour is missing: never exported, file gone, file changed
    flag: str = ""  # empty, collapsed

    @property
    def exported(self) -> bool:
        return not self.missing


@dataclasses.dataclass
class Day:
    day: dt.date
    hours: list[Hour]
    events: int = 0
    by_window_only: bool = False  # some of its events are known per window only
    types: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    type_flags: list[str] = dataclasses.field(default_factory=list)

    @property
    def exported(self) -> int:
        return sum(hour.exported for hour in self.hours)

    @property
    def missing(self) -> int:
        return len(self.hours) - self.exported

    @property
    def flags(self) -> list[str]:
        flagged = [f"{hour.flag} {hour.moment:T%H}" for hour in self.hours if hour.flag]
        return flagged + self.type_flags + (["counts by window only"] if self.by_window_only else [])


@dataclasses.dataclass
class FileRow:
    window: str
    file: str
    events: int
    size: int
    sha256: str
    uploaded: bool
    state: str


@dataclasses.dataclass
class Report:
    start: dt.datetime
    end: dt.datetime
    hours: list[Hour]
    days: list[Day]
    files: list[FileRow]
    verified: bool

    @property
    def missing(self) -> int:
        return sum(not hour.exported for hour in self.hours)

    @property
    def flagged(self) -> int:
        return sum(bool(hour.flag) for hour in self.hours)

    @property
    def events(self) -> int:
        return sum(day.events for day in self.days)


def manifest_range(records) -> tuple[dt.datetime, dt.datetime] | None:
    """The first and last hour any export line covers; None when there is none."""
    windows = [record.window for record in records if isinstance(record, Export)]
    if not windows:
        return None
    return min(w.start for w in windows), max(w.end for w in windows)


def build_report(records, data_dir: Path, start: dt.datetime, end: dt.datetime, verify: bool) -> Report:
    exports = [r for r in records if isinstance(r, Export) and r.window.start <= end and r.window.end >= start]
    uploaded = {(r.file, r.sha256) for r in records if isinstance(r, Upload)}
    state = {r.file: file_state(r, data_dir, verify) for r in exports}
    hours = {moment: Hour(moment, missing="never exported") for moment in hours_between(start, end)}
    owner: dict[dt.datetime, Export] = {}  # the export each hour is counted from: the last intact one
    for record in exports:
        window = record.window
        for moment in hours_between(max(window.start, start), min(window.end, end)):
            if state[record.file] == "intact":
                hours[moment] = Hour(moment, (record.hours or {}).get(format_hour(moment)))
                owner[moment] = record
            elif hours[moment].missing:
                hours[moment].missing = f"file {state[record.file]}"
    flag_hours(hours)
    current = list({id(record): record for record in owner.values()}.values())
    days = build_days(list(hours.values()), current)
    files = [FileRow(f"{r.start}-{r.end}", r.file, r.events, r.size, r.sha256, (r.file, r.sha256) in uploaded,
                     state[r.file]) for r in exports]
    return Report(start, end, list(hours.values()), days, files, verify)


def flag_hours(hours: dict[dt.datetime, Hour]) -> None:
    """Empty and collapsed hours, each against the same hour of the day on the days before (see the page's rule)."""
    for moment, hour in hours.items():
        if hour.count is None:
            continue
        history = [hours[earlier].count for earlier in same_hour_before(moment) if earlier in hours]
        history = [count for count in history if count is not None]
        expected = statistics.median(history) if len(history) >= MIN_HISTORY else None
        if hour.count == 0 and (expected is None or expected > 0):
            hour.flag = "empty"
        elif expected is not None and expected >= MIN_EXPECTED and hour.count < COLLAPSE_SHARE * expected:
            hour.flag = "collapsed"


def same_hour_before(moment: dt.datetime):
    return (moment - dt.timedelta(days=days) for days in range(1, HISTORY_DAYS + 1))


def build_days(hours: list[Hour], current: list[Export]) -> list[Day]:
    by_day: dict[dt.date, Day] = {}
    for hour in hours:
        by_day.setdefault(hour.moment.date(), Day(hour.moment.date(), [])).hours.append(hour)
        if hour.count is not None:
            by_day[hour.moment.date()].events += hour.count
    for record in current:
        day = by_day.get(record.window.start.date())
        if day is None:
            continue
        day.types.update(record.event_types)
        if record.hours is None:  # never invent hours: its events go to its first day, and the day says so
            day.events += record.events
            day.by_window_only = True
    days = sorted(by_day.values(), key=lambda d: d.day)
    for before, day in zip(days, days[1:], strict=False):
        if before.missing or day.missing:
            continue  # a missing hour explains a type's absence better than tracking does
        for name in sorted(set(before.types) | set(day.types)):
            if before.types[name] >= STOPPED_MIN and not day.types[name]:
                day.type_flags.append(f"{name} stopped")
            elif day.types[name] and not before.types[name]:
                day.type_flags.append(f"{name} appeared")
    return days


# Output: the table on stdout and the page.


def render_table(report: Report, target: Path) -> str:
    rows = [("day", "events", "hours exported", "hours missing", "flags")]
    for day in report.days:
        events = f"{day.events}" + ("*" if day.by_window_only else "")
        rows.append((f"{day.day}", events, f"{day.exported}", f"{day.missing}", "; ".join(day.flags) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    hours = len(report.hours)
    lines.append(
        f"{hours} hour(s) from {format_hour(report.start)} to {format_hour(report.end)}: "
        f"{hours - report.missing} exported and intact, {report.missing} missing, {report.flagged} flagged. "
        f"Report: {target}"
    )
    return "\n".join(lines)


def render_html(report: Report) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    return environment.get_template("report.html").render(
        title=f"Amplitude export {format_hour(report.start)} to {format_hour(report.end)}",
        report=report,
        payload=chart_data(report),
        stretches=problem_stretches(report),
        types=types_table(report),
        rule={"history_days": HISTORY_DAYS, "min_history": MIN_HISTORY, "min_expected": MIN_EXPECTED,
              "collapse_percent": round(COLLAPSE_SHARE * 100), "stopped_min": STOPPED_MIN},
    )


def chart_data(report: Report) -> dict:
    """The hours for the page's script: a count each, and one letter each for their state and flag."""
    return {
        "start": format_hour(report.start),
        "counts": [hour.count for hour in report.hours],
        "states": "".join("m" if hour.missing else "w" if hour.count is None else "e" for hour in report.hours),
        "flags": "".join({"": "-", "empty": "z", "collapsed": "c"}[hour.flag] for hour in report.hours),
    }


def problem_stretches(report: Report) -> list[dict]:
    """Missing and flagged hours as stretches, so a year's view still names every one."""
    stretches: list[list] = []
    for hour in report.hours:
        kind = f"missing: {hour.missing}" if hour.missing else hour.flag
        if not kind:
            continue
        if stretches and stretches[-1][2] == kind and stretches[-1][1] + HOUR == hour.moment:
            stretches[-1][1] = hour.moment
        else:
            stretches.append([hour.moment, hour.moment, kind])
    return [
        {"css": "missing" if kind.startswith("missing") else "flagged",
         "text": f"{format_hour(first)}{'' if first == last else ' to ' + format_hour(last)}: {kind}"}
        for first, last, kind in stretches
    ]


def types_table(report: Report) -> dict:
    """The most frequent event types as columns, the rest summed, with each day's changes marked."""
    totals = collections.Counter()
    for day in report.days:
        totals.update(day.types)
    names = [name for name, _ in totals.most_common(TYPE_COLUMNS)]
    rows = []
    for day in report.days:
        stopped = {flag.removesuffix(" stopped") for flag in day.type_flags if flag.endswith(" stopped")}
        appeared = {flag.removesuffix(" appeared") for flag in day.type_flags if flag.endswith(" appeared")}
        cells = [{"count": day.types[name],
                  "css": " stopped" if name in stopped else " appeared" if name in appeared else ""} for name in names]
        others = sum(day.types.values()) - sum(day.types[name] for name in names)
        rows.append({"day": day.day, "cells": cells, "others": others, "changes": "; ".join(day.type_flags)})
    return {"names": names, "others": len(totals) > len(names), "rows": rows}
