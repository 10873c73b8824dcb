"""The rows of a lake commit: which hours it replaces, and its events as record batches with their export hours,
read back from a window's file or followed as the export writes them.

Every row's export hour is the hour of the archive member its event came in (the runs of lines a file's record
keeps), never a guess from the event's own times; a member that named no hour, or one outside the window, goes under
the window's first hour. What is read must add up to what the record says, or nothing is committed (FileChanged).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import threading
import time
from pathlib import Path

from lake_convert import Feed, Workers
from store import Export, file_sha256, hour_of
from windows import HOUR, Window, format_hour, hours_between

log = logging.getLogger("fetch_data")


@dataclasses.dataclass
class Followed:
    """A window converted while it is exported: where its commit stands."""

    window: Window
    file: str
    feed: Feed
    thread: threading.Thread | None = None
    began: float = dataclasses.field(default_factory=time.monotonic)
    version: int | None = None  # of its commit, once made
    misfits: int = 0  # values kept in other_fields
    failure: str | None = None  # why it was given up

    def give_up(self) -> None:
        """Nothing of it is committed: the workers are ended, and the lake's thread with them."""
        self.feed.abort()
        self.thread.join()


def followed_batches(followed: Followed):
    """The followed window's record batches with their export hours; at the end, once the file is in place (the
    feed's outcome), the file must be the one expected, with the events and hours converted, or nothing is
    committed."""
    from lake_schema import with_hours

    window, converted = followed.window, collections.Counter()
    for events, runs, misfits in followed.feed.batches():
        placed = [(hour if hour is not None and window.start <= hour <= window.end else window.start, count)
                  for hour, count in runs]
        for hour, count in placed:
            converted[hour] += count
        followed.misfits += misfits
        yield with_hours(events, placed)
    record = followed.feed.outcome()
    expected = collections.Counter()
    for hour, count in line_hours(record):
        expected[hour] += count
    if record.file != followed.file or record.window != window or converted != expected:
        raise FileChanged(f"{record.file} is not the file converted while exporting")


class FileChanged(Exception):
    """A file whose bytes are not the ones recorded: nothing of it is committed."""


def latest_hours(records: list[Export], skip: set[dt.datetime]) -> list[tuple[Export, set[dt.datetime]]]:
    """Each record with the hours it is the latest record of (manifest order), less `skip`; records left with no
    hour are left out. Pure: the files are checked by the caller."""
    latest: dict[dt.datetime, int] = {}
    for index, record in enumerate(records):
        for hour in hours_between(record.window.start, record.window.end):
            latest[hour] = index
    hours_of: dict[int, set] = {}
    for hour, index in latest.items():
        if hour not in skip:
            hours_of.setdefault(index, set()).add(hour)
    return [(records[index], hours_of[index]) for index in sorted(hours_of)]


def hours_predicate(hours: set[dt.datetime]) -> str:
    """The predicate of exactly these hours: export_date bounds (so untouched days are not even read), then each
    run of consecutive hours as a range of export_hour."""
    ordered = sorted(hours)
    runs, first = [], ordered[0]
    for previous, hour in zip(ordered, ordered[1:], strict=False):
        if hour - previous != HOUR:
            runs.append((first, previous))
            first = hour
    runs.append((first, ordered[-1]))
    ranges = " OR ".join(f"(export_hour >= '{start:%Y-%m-%dT%H}:00:00Z' AND export_hour <= '{end:%Y-%m-%dT%H}:00:00Z')"
                         for start, end in runs)
    return f"export_date >= '{ordered[0]:%Y-%m-%d}' AND export_date <= '{ordered[-1]:%Y-%m-%d}' AND ({ranges})"


def line_hours(record: Export) -> list[tuple[dt.datetime, int]]:
    """The export hour of each run of the file's lines, in order: the member's hour, or the window's first hour for
    a member that named none or named an hour outside the window."""
    window = record.window
    if record.runs is not None:
        runs = [(hour_of(text) if text else None, count) for text, count in record.runs]
    elif record.hours is not None:
        runs = [(hour_of(text), count) for text, count in sorted(record.hours.items()) if count]
    else:
        log.warning("Lake: %s does not record its events' hours; all of them go under %s", record.file,
                    format_hour(window.start))
        runs = [(window.start, record.events)]
    return [(hour if hour is not None and window.start <= hour <= window.end else window.start, count)
            for hour, count in runs]


def record_batches(path: Path, record: Export, hours: set[dt.datetime], check_sha256: bool, workers: Workers,
                   counts: dict):
    """The file's events as record batches of the hours wanted, values that did not fit their type counted in
    `counts`; FileChanged, before the commit, when the file's bytes are not the recorded ones or its lines do not
    add up to its events."""
    import pyarrow as pa

    from lake_schema import with_hours

    runs = line_hours(record)
    wanted = pa.array(sorted(hours), pa.timestamp("us", tz="UTC"))
    every_hour = set(hours) >= {hour for hour, _ in runs}
    before = stamp(path)
    if check_sha256 and file_sha256(path) != record.sha256:
        raise FileChanged(f"{record.file} is not the file recorded (its sha256 differs)")
    count = 0
    for events, misfits in workers.converted(path):
        batch_runs = take_runs(runs, events.num_rows)
        if batch_runs is None:
            raise FileChanged(f"{record.file} holds more events than the {record.events} recorded")
        batch = with_hours(events, batch_runs)
        count += events.num_rows
        counts["misfits"] = counts.get("misfits", 0) + misfits
        yield batch if every_hour else only_hours(batch, wanted)
    if count != record.events or stamp(path) != before:
        raise FileChanged(f"{record.file} is not the file recorded (its events differ, or it changed while read)")


def only_hours(batch, wanted):
    """The rows of the hours wanted (a file some of whose hours a later file holds)."""
    import pyarrow.compute as pc  # only here: Arrow's compute functions cost the exporter 11 MB

    return batch.filter(pc.is_in(batch.column("export_hour"), wanted))


def stamp(path: Path) -> tuple[int, int, int]:
    """What tells a file changed while it was read: its inode, size and time of change."""
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def take_runs(runs: list[tuple[dt.datetime, int]], lines: int) -> list[tuple[dt.datetime, int]] | None:
    """The runs of the next `lines` lines, taken off the front of `runs`; None when there are not enough."""
    taken = []
    while lines:
        if not runs:
            return None
        hour, count = runs[0]
        used = min(count, lines)
        taken.append((hour, used))
        lines -= used
        if used == count:
            runs.pop(0)
        else:
            runs[0] = (hour, count - used)
    return taken
