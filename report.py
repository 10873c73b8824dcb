"""The completeness report (`--report`): is every hour there, and does any look wrong?

Reads the manifest (and, with --verify, each file's sha256), then writes one self-contained HTML page (styles,
script and data inline, so it opens offline from a file:// URL) and returns a per-day table for stdout. The page is
rendered by Jinja2 with autoescaping: every event type, file name and manifest value reaches it as text, never as
markup.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime as dt
import statistics
import sys
from pathlib import Path

from errors import EXIT_FAILED, EXIT_OK, ExportError, UsageError
from logging_config import print_for_reader, printable
from own_files import not_regular, write_atomically
from store import (
    JOURNAL_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    Export,
    file_key,
    file_state,
    hour_of,
    iterate_exports,
    scan_manifest,
    uploaded_keys,
)
from summary import Outcome
from temp_files import TEMP_PREFIX
from windows import HOUR, format_hour

HISTORY_DAYS = 7  # the same hour on up to this many days before is an hour's expectation
MIN_HISTORY = 3  # days of history the collapse rule needs; with fewer, only empty hours are flagged
COLLAPSE_SHARE = 0.2  # below this share of the expected count an hour has collapsed
MIN_EXPECTED = 20  # expectations smaller than this are noise: no collapse is flagged against them
STOPPED_MIN = 5  # a type with at least this many events the day before, and none on a day, has stopped
TYPE_COLUMNS = 12  # event types with a column of their own on the page; the rest are summed
TYPE_FLAGS_NAMED = 5  # event types named as stopped, and as appeared, in a day's flags; the rest are counted
TEMPLATES = Path(__file__).resolve().parent / "templates"


MISSING = {0: "never exported", 2: "file gone", 3: "file changed"}  # hour states but 1, exported
FLAGS = {0: "", 1: "empty", 2: "collapsed"}
MAX_FILE_ROWS = 2_000  # the files table lists the newest this many; the page says how many more there are


@dataclasses.dataclass(frozen=True, slots=True)
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
    """Every hour of start..end in compact arrays (a century of hours is 876,600 of them), the days built from
    them, and the newest files."""

    start: dt.datetime
    end: dt.datetime
    counts: array.array  # events per hour; -1 for none known
    states: bytearray  # 1 exported, else a key of MISSING
    flags: bytearray  # a key of FLAGS
    days: list[Day]
    files: list[FileRow]
    files_total: int
    verified: bool

    @property
    def hours(self) -> list[Hour]:
        return [hour_at(self, index) for index in range(len(self.counts))]

    @property
    def missing(self) -> int:
        return len(self.states) - self.states.count(1)

    @property
    def flagged(self) -> int:
        return len(self.flags) - self.flags.count(0)

    @property
    def events(self) -> int:
        return sum(day.events for day in self.days)


def hour_at(report: Report, index: int) -> Hour:
    state, count = report.states[index], report.counts[index]
    return Hour(report.start + index * HOUR, None if state != 1 or count < 0 else count, MISSING.get(state, ""),
                FLAGS[report.flags[index]])


def run(settings, outcome: Outcome) -> int:
    """--report: the page and the table for the range asked for, or the manifest's whole range; exit code 1 when an
    hour is missing. The table goes to stdout, or with --json to stderr (stdout then holds the summary alone)."""
    data_dir = settings.data_dir
    manifest = data_dir / MANIFEST_NAME  # read, never repaired: an export may be appending right now
    if settings.explicit_range:
        start, end = settings.windows[0].start, settings.windows[-1].end
    elif found := manifest_range(manifest):
        start, end = found
    else:
        name_damaged_lines(manifest)  # lines that are not records may be why none is found
        raise UsageError(f"{manifest} records no export: give a range with --date or --start/--end")
    target = settings.report_file or data_dir / "report.html"
    refuse_own_file(target, data_dir, manifest)
    built = build_report(manifest, data_dir, start, end, settings.verify)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, render_html(built).encode("utf-8", "backslashreplace"))
    except OSError as exc:
        raise ExportError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    table = render_table(built, target)
    print_for_reader("\n".join(printable(line) for line in table.split("\n")), sys.stderr if settings.json else sys.stdout)
    outcome.start, outcome.end = format_hour(start), format_hour(end)
    outcome.hours_already, outcome.hours_missing = len(built.counts) - built.missing, built.missing
    outcome.events, outcome.files = built.events, [str(target)]
    return EXIT_FAILED if built.missing else EXIT_OK


def refuse_own_file(target: Path, data_dir: Path, manifest: Path) -> None:
    """The report never replaces the manifest, the exporter's own files, an export file, a folder, a link or a
    device."""
    kind = not_regular(target)
    if kind:
        raise UsageError(f"{target} is {kind}, not a file the report can be written to; remove it, or name another "
                         "file with --report-file")
    if target.resolve().parent != data_dir.resolve():
        return
    own = {MANIFEST_NAME, LOCK_NAME, JOURNAL_NAME}
    if target.name in own or target.name.startswith(TEMP_PREFIX) or any(
            head.file == target.name for head, _, _ in scan_manifest(manifest, repair=False, warn=False)):
        raise UsageError(f"--report-file {target}: that is one of the exporter's own files; choose another name")


def manifest_range(manifest: Path) -> tuple[dt.datetime, dt.datetime] | None:
    """The first and last hour any export line covers; None when there is none."""
    first = last = None
    for head, _, _ in scan_manifest(manifest, repair=False, warn=False):
        if head.is_export:
            first = head.start if first is None or head.start < first else first
            last = head.end if last is None or head.end > last else last
    return (hour_of(first), hour_of(last)) if first else None


def name_damaged_lines(manifest: Path) -> None:
    collections.deque(scan_manifest(manifest, repair=False), maxlen=0)


def build_report(manifest: Path, data_dir: Path, start: dt.datetime, end: dt.datetime, verify: bool) -> Report:
    """The report of start..end from two streaming passes over the manifest: the hours, then the event types of
    the exports the hours are counted from (the last intact one of each hour)."""
    size = int((end - start) / HOUR) + 1
    counts, states, owner = array.array("q", [-1]) * size, bytearray(size), array.array("q", [-1]) * size
    uploaded = uploaded_keys(manifest)
    files: collections.deque = collections.deque(maxlen=MAX_FILE_ROWS)
    current: dict[int, list] = {}  # position -> [record, hours it still counts]: only exports some hour counts from
    total = 0
    for position, (head, record) in enumerate(iterate_exports(manifest, start, end, repair=False)):
        state = file_state(record, data_dir, verify)
        files.append(FileRow(f"{record.start}-{record.end}", record.file, record.events, record.size, record.sha256,
                             file_key(head) in uploaded, state))
        total += 1
        first, last = index_of(record.window.start, start, size), index_of(record.window.end, start, size)
        if state == "intact":
            current[position] = [record, last - first + 1]
        for index in range(first, last + 1):
            if state == "intact":
                hour_count = (record.hours or {}).get(format_hour(start + index * HOUR))
                forgo(current, owner[index])
                counts[index], states[index], owner[index] = -1 if hour_count is None else hour_count, 1, position
            elif states[index] != 1:
                states[index] = 2 if state == "gone" else 3
    report = Report(start, end, counts, states, flag_hours(counts, states), [], list(files), total, verify)
    report.days = build_days(report, [record for record, _ in current.values()])
    return report


def forgo(current: dict[int, list], position: int) -> None:
    """An hour is now counted from a later export: the earlier one is forgotten once it counts no hour."""
    if position >= 0:
        current[position][1] -= 1
        if not current[position][1]:
            del current[position]


def index_of(moment: dt.datetime, start: dt.datetime, size: int) -> int:
    return min(max(int((moment - start) / HOUR), 0), size - 1)


def flag_hours(counts: array.array, states: bytearray) -> bytearray:
    """Empty and collapsed hours, each against the same hour of the day on the days before (see the page's rule)."""
    flags = bytearray(len(counts))
    for index, count in enumerate(counts):
        if count < 0 or states[index] != 1:
            continue
        history = [counts[index - 24 * days] for days in range(1, HISTORY_DAYS + 1)
                   if index - 24 * days >= 0 and states[index - 24 * days] == 1 and counts[index - 24 * days] >= 0]
        expected = statistics.median(history) if len(history) >= MIN_HISTORY else None
        if count == 0 and (expected is None or expected > 0):
            flags[index] = 1
        elif expected is not None and expected >= MIN_EXPECTED and count < COLLAPSE_SHARE * expected:
            flags[index] = 2
    return flags


def build_days(report: Report, current: list[Export]) -> list[Day]:
    by_day: dict[dt.date, Day] = {}
    for index in range(len(report.counts)):
        hour = hour_at(report, index)
        day = by_day.setdefault(hour.moment.date(), Day(hour.moment.date(), []))
        day.hours.append(hour)
        if hour.count is not None:
            day.events += hour.count
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
        stopped = sorted(name for name, count in before.types.items() if count >= STOPPED_MIN and not day.types[name])
        appeared = sorted(name for name, count in day.types.items() if count and not before.types[name])
        day.type_flags = named_flags(stopped, "stopped") + named_flags(appeared, "appeared")
    return days


def named_flags(names: list[str], change: str) -> list[str]:
    """A flag for each name, up to TYPE_FLAGS_NAMED; the rest counted in one. A client that puts an ID into its
    event names makes thousands of types appear and stop every day, which would bury the other flags."""
    flags = [f"{name} {change}" for name in names[:TYPE_FLAGS_NAMED]]
    if len(names) > TYPE_FLAGS_NAMED:
        flags.append(f"{len(names) - TYPE_FLAGS_NAMED:,} more types {change}")
    return flags


# Output: the table on stdout and the page.


def render_table(report: Report, target: Path) -> str:
    rows = [("day", "events", "hours exported", "hours missing", "flags")]
    for day in report.days:
        events = f"{day.events}" + ("*" if day.by_window_only else "")
        rows.append((f"{day.day}", events, f"{day.exported}", f"{day.missing}", "; ".join(day.flags) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    hours = len(report.counts)
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
    pairs = list(zip(report.counts, report.states, strict=True))
    return {
        "start": format_hour(report.start),
        "counts": [count if state == 1 and count >= 0 else None for count, state in pairs],
        "states": "".join("e" if state == 1 and count >= 0 else "w" if state == 1 else "m" for count, state in pairs),
        "flags": report.flags.translate(FLAG_LETTERS).decode("ascii"),
    }


FLAG_LETTERS = bytes.maketrans(b"\x00\x01\x02", b"-zc")


def problem_stretches(report: Report) -> list[dict]:
    """Missing and flagged hours as stretches, so a year's view still names every one."""
    stretches: list[list] = []
    for index in range(len(report.counts)):
        if report.states[index] == 1 and not report.flags[index]:
            continue
        hour = hour_at(report, index)
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
