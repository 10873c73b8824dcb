"""The store: what is in the data folder and how it gets there.

The manifest (`manifest.jsonl`) is the record of every file put in place (an Export line), every file uploaded
(an Upload line) and every file loaded into the lake (a LakeLoad line); lines are typed records, validated here and
only here. A file is written beside its final name, fsynced, its manifest line journaled, then linked under its
final name and recorded. The lock keeps one run per folder. The exporter's own files are never opened through a
link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import itertools
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import msgspec

from errors import ExportError, UsageError, first_text_line
from own_files import NotOwnFile, fsync_folder, open_own_file, open_regular, write_durably
from windows import FIRST_YEAR, LAST_YEAR, Window, format_hour, hours_between, iso_utc

log = logging.getLogger("fetch_data")

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".lock"
JOURNAL_NAME = ".ampl-commit.json"  # the manifest line of the file being put in place, until it is appended
READ_BYTES = 1 << 20
# The longest manifest line read: a record of the longest window (a year of hours) takes well under a megabyte, and
# a longer line (hand-made, or a file that is not a manifest) must not be read whole into memory.
MAX_LINE_BYTES = 16 << 20

Count = Annotated[int, msgspec.Meta(ge=0)]
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
HourText = Annotated[str, msgspec.Meta(pattern=r"^\d{8}T\d{2}$")]


class Line(msgspec.Struct):
    """What every manifest line has: a window of real hours, and a file in the data folder (checked on decoding)."""

    def __post_init__(self):
        check_window(self.start, self.end)
        check_plain_name(self.file)

    @property
    def window(self) -> Window:
        return Window(hour_of(self.start), hour_of(self.end))


class Export(Line, omit_defaults=True):
    """A file put in place: the hours it holds, its size and sha256, and what it counts."""

    start: HourText
    end: HourText
    file: str
    events: Count
    size: Count = msgspec.field(name="bytes")
    sha256: Sha256
    finished_at: str
    hours: dict[HourText, Count] | None = None  # per hour of the window; absent when some member named no hour
    # The member hour of each run of lines in file order, when that order is not simply `hours` sorted (a member
    # that named no hour, or a stray hour written out of order); the lake reads it.
    runs: list[tuple[HourText | None, Count]] | None = None
    event_types: dict[str, Count] = {}
    policy: dict | None = None  # the field rules the file was written under

    def __post_init__(self):
        super().__post_init__()
        for hour in (*(self.hours or ()), *(hour for hour, _ in self.runs or () if hour)):
            check_hour(hour)  # the report and the lake take these as real hours
        for name, counts in (("hours", (self.hours or {}).values()), ("runs", [n for _, n in self.runs or ()])):
            if counts and sum(counts) != self.events:  # the lake gives each line the hour of its run
                raise ValueError(f"its {name} count {sum(counts)} events, not the {self.events} it records")


class Upload(Line):
    """A file sent to Azure Blob Storage, with the sha256 of the bytes sent."""

    start: HourText
    end: HourText
    file: str
    blob: str
    sha256: Sha256
    uploaded_at: str


class LakeLoad(Line):
    """A file loaded into the Delta table at `lake`: the table's id and the version of the commit."""

    start: HourText
    end: HourText
    file: str
    sha256: Sha256
    lake: str
    table_id: str
    version: Count
    loaded_at: str


class Head(Line):
    """What every manifest line is judged by, decoded without its counts: a manifest of a million lines is scanned
    in seconds, and only the lines a run needs are decoded whole."""

    start: HourText
    end: HourText
    file: str
    sha256: Sha256
    size: Count | None = msgspec.field(default=None, name="bytes")
    blob: str | None = None
    table_id: str | None = None

    @property
    def is_upload(self) -> bool:
        return self.blob is not None

    @property
    def is_export(self) -> bool:
        return self.blob is None and self.table_id is None


def file_key(record) -> bytes:
    """A record's file and sha256 as 16 bytes: a set of a million of them stays small."""
    return hashlib.blake2b(f"{record.file}\0{record.sha256}".encode(), digest_size=16).digest()


DECODE_HEAD = msgspec.json.Decoder(Head).decode
DECODE_EXPORT = msgspec.json.Decoder(Export).decode
DECODE_UPLOAD = msgspec.json.Decoder(Upload).decode
DECODE_LAKE = msgspec.json.Decoder(LakeLoad).decode
ENCODE = msgspec.json.Encoder().encode


def parse_line(line: bytes) -> Export | Upload | LakeLoad:
    """One manifest line as its record; a ValueError saying what is wrong with it otherwise."""
    try:
        return DECODE_EXPORT(line)
    except msgspec.ValidationError as export_problem:
        other = DECODE_UPLOAD if b'"blob"' in line else DECODE_LAKE if b'"table_id"' in line else None
        if other is None:
            raise ValueError(str(export_problem)) from None
        try:
            return other(line)
        except msgspec.ValidationError:
            raise ValueError(str(export_problem)) from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None


def check_window(start: str, end: str) -> None:
    """A window of real hours, years 2000 to 2100, end not before start; checked on text (YYYYMMDDTHH sorts as
    time does), so that a manifest of a million lines is read in seconds."""
    check_hour(start)
    check_hour(end)
    if end < start:
        raise ValueError(f"end {end} is before start {start}")


def check_hour(text: str) -> None:
    if not is_real_day(text[:8]) or text[9:11] > "23":
        if not FIRST_YEAR <= int(text[:4]) <= LAST_YEAR:
            raise ValueError(f"{text}: the year is outside {FIRST_YEAR} to {LAST_YEAR}")
        raise ValueError(f"{text}: no such hour")


@functools.lru_cache(maxsize=1 << 16)
def is_real_day(digits: str) -> bool:
    """YYYYMMDD is a real day of FIRST_YEAR to LAST_YEAR; remembered, as a manifest names few days many times."""
    try:
        day = dt.date(int(digits[0:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return False
    return FIRST_YEAR <= day.year <= LAST_YEAR and f"{day:%Y%m%d}" == digits


@functools.lru_cache(maxsize=1 << 16)
def hour_of(text: str) -> dt.datetime:
    """YYYYMMDDTHH, already checked by check_hour, as a UTC hour."""
    return dt.datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[9:11]), tzinfo=dt.UTC)


def check_plain_name(name: str) -> None:
    if not is_plain_name(name):
        raise ValueError(f"{name!r} is not a file name in the data folder")


def is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


# The manifest.


def read_manifest(manifest: Path, repair: bool = True) -> list[Export | Upload | LakeLoad]:
    """Every record of the manifest, decoded whole (for a manifest of ordinary length; a run scans instead)."""
    return [record for _, record in records_of(scan_manifest(manifest, repair), manifest)]


def scan_manifest(manifest: Path, repair: bool = True, warn: bool = True,
                  between: tuple[str, str] | None = None) -> Iterator[tuple[Head, bytes, int]]:
    """(head, line, line number) of each line, streamed; a line torn by a crash mid-append is cut off so the next
    append starts clean. With `between` (first and last hour as text), lines written by this program whose window
    lies outside are passed over before they are decoded.

    Only a run holding the lock may `repair`: for a reader without it (the report), the last line may be one an
    export is appending right now. A line that is not a record is named, by file and line number, and skipped.
    """
    for number, line in manifest_lines(manifest, repair, warn):
        if between and (found := OWN_WINDOW.match(line)) and (
                found.group(1).decode() > between[1] or found.group(2).decode() < between[0]):
            continue
        try:
            yield DECODE_HEAD(line), line, number
        except (msgspec.DecodeError, ValueError) as exc:
            if warn:
                warn_of_line(manifest, number, exc)


# How this program begins every line it writes: the window, read without decoding the line.
OWN_WINDOW = re.compile(rb'\{"start":"(\d{8}T\d{2})","end":"(\d{8}T\d{2})"')


def manifest_lines(manifest: Path, repair: bool, warn: bool = False) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of each complete line; a line longer than MAX_LINE_BYTES is skipped, named if `warn`."""
    try:
        source = open_own_file(manifest, os.O_RDONLY, "rb")
    except FileNotFoundError:
        return
    with source:
        complete = complete_length(source)
        if complete < os.fstat(source.fileno()).st_size:
            cut_torn_line(manifest, complete, repair)
        source.seek(0)
        remaining, number = complete, 0
        while remaining > 0 and (line := source.readline(min(remaining, MAX_LINE_BYTES + 1))):
            number += 1
            remaining -= len(line)
            if len(line) <= MAX_LINE_BYTES:
                yield number, line
                continue
            if not line.endswith(b"\n"):
                remaining -= skip_line(source)
            if warn:
                warn_of_line(manifest, number, ValueError(f"longer than {MAX_LINE_BYTES} bytes"))


def skip_line(source) -> int:
    """Read past the rest of a line, a block at a time; the bytes passed."""
    passed = 0
    while block := source.readline(READ_BYTES):
        passed += len(block)
        if block.endswith(b"\n"):
            break
    return passed


def records_of(scanned: Iterator[tuple[Head, bytes, int]], manifest: Path | None = None):
    """(head, whole record) for the scanned lines that decode whole; the others are named and skipped."""
    for head, line, number in scanned:
        try:
            yield head, parse_line(line)
        except ValueError as exc:
            if manifest is not None:
                warn_of_line(manifest, number, exc)


def warn_of_line(manifest: Path, number: int, exc: Exception) -> None:
    log.warning("%s line %d is not a manifest record (%s); ignored", manifest, number, first_text_line(exc))


def exports_between(manifest: Path, first: dt.datetime, last: dt.datetime, repair: bool = True) -> list[Export]:
    """The export records whose window meets first..last, from one streaming pass."""
    return [record for _, record in iterate_exports(manifest, first, last, repair)]


def iterate_exports(manifest: Path, first: dt.datetime, last: dt.datetime, repair: bool = True):
    """(head, export record) of each export line whose window meets first..last, in manifest order, streamed."""
    first_text, last_text = format_hour(first), format_hour(last)
    wanted = (item for item in scan_manifest(manifest, repair, between=(first_text, last_text))
              if item[0].start <= last_text and item[0].end >= first_text and item[0].is_export)
    return ((head, record) for head, record in records_of(wanted, manifest) if isinstance(record, Export))


def uploaded_keys(manifest: Path) -> set[bytes]:
    """The key of every (file, sha256) an upload line records."""
    return {file_key(head) for head in marked_lines(manifest, b'"blob"', DECODE_HEAD) if head.is_upload}


def marked_lines(manifest: Path, marker: bytes, decode):
    """The lines holding `marker`, decoded by `decode`; other lines are not even decoded, damaged ones passed over."""
    for _, line in manifest_lines(manifest, repair=False):
        if marker in line:
            with contextlib.suppress(msgspec.DecodeError, ValueError):  # msgspec's ValidationError is a ValueError
                yield decode(line)


def complete_length(source) -> int:
    """The length of the file up to its last newline."""
    size = os.fstat(source.fileno()).st_size
    position = size
    while position > 0:
        step = min(READ_BYTES, position)
        source.seek(position - step)
        block = source.read(step)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return position - step + newline + 1
        position -= step
    return 0


def cut_torn_line(manifest: Path, complete: int, repair: bool) -> None:
    if not repair:
        return
    log.warning("%s: removing an incomplete last line left by an interrupted run", manifest)
    with open_own_file(manifest, os.O_RDWR, "r+b") as fix:
        fix.truncate(complete)
        os.fsync(fix.fileno())


def append_manifest(manifest: Path, record: Export | Upload | LakeLoad) -> None:
    with open_own_file(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab") as out:
        out.write(ENCODE(record) + b"\n")
        out.flush()
        os.fsync(out.fileno())


# Which hours are exported.


def exported_hours(records, data_dir: Path, policy: dict | None, verify: bool, first: dt.datetime,
                   last: dt.datetime) -> set[dt.datetime]:
    """Hours from `first` to `last` exported under `policy` whose file is still there with the recorded size (and,
    with `verify`, the recorded sha256).

    Hours exported under other field rules do not count: their files hold other fields than asked for now.
    """
    covered = set()
    for record in records:
        if not isinstance(record, Export):
            continue
        window = record.window
        if window.start > last or window.end < first or record.policy != policy:
            continue
        state = file_state(record, data_dir, verify)
        if state == "changed" and verify:
            log.warning("%s: its bytes changed since it was exported; its hours are exported again", record.file)
        if state == "intact":
            covered.update(hours_between(max(window.start, first), min(window.end, last)))
    return covered


def file_state(record: Export, data_dir: Path, verify: bool) -> str:
    """'intact', 'gone' or 'changed': by size and type, and with `verify` by sha256 as well."""
    path = os.path.join(data_dir, record.file)
    try:
        found = os.lstat(path)
    except OSError:
        return "gone"
    if not (stat.S_ISREG(found.st_mode) and found.st_size == record.size):
        return "changed"
    if verify and file_sha256(Path(path)) != record.sha256:
        return "changed"
    return "intact"


def is_intact(record: Export, data_dir: Path) -> bool:
    """A file still in the data folder, a regular file (no link) of the recorded size."""
    return file_state(record, data_dir, verify=False) == "intact"


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, read a megabyte at a time; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as source:
            while chunk := source.read(READ_BYTES):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


# Putting a finished window in place.


@dataclasses.dataclass(frozen=True)
class Finished:
    """A window's events, complete and fsynced in a temporary file, waiting to be put in place."""

    window: Window
    temp_path: Path
    events: int
    size: int
    sha256: str
    seconds: float
    hours: dict[str, int] | None
    event_types: dict[str, int]
    runs: list[tuple[str | None, int]] | None = None


def save_window(finished: Finished, data_dir: Path, names, policy: dict | None, now: dt.datetime) -> Export:
    """Put a finished window under the first free name of `names` (never over another file), then record it.

    The record is journaled before the rename, so a run killed between the rename and the manifest append is
    completed by the next run (finish_interrupted_save) instead of leaving a file the manifest does not know.
    """
    journal = data_dir / JOURNAL_NAME
    try:
        for name in names:
            record = export_record(finished, name, now, policy)
            if (data_dir / name).exists():
                continue
            write_durably(journal, ENCODE(record))
            if put_in_place(finished.temp_path, data_dir / name):
                break
        fsync_folder(data_dir)
        append_manifest(data_dir / MANIFEST_NAME, record)
        journal.unlink()
    except NotOwnFile:  # a link planted where the journal goes
        finished.temp_path.unlink(missing_ok=True)
        raise
    except OSError as exc:
        finished.temp_path.unlink(missing_ok=True)
        raise ExportError(f"cannot save {finished.window} in {data_dir}: {exc.strerror or exc}") from None
    return record


def export_record(finished: Finished, name: str, now: dt.datetime, policy: dict | None) -> Export:
    return Export(
        start=format_hour(finished.window.start), end=format_hour(finished.window.end), file=name,
        events=finished.events, size=finished.size, sha256=finished.sha256, finished_at=iso_utc(now),
        hours=finished.hours, runs=finished.runs, event_types=dict(sorted(finished.event_types.items())),
        policy=policy or None,
    )


def output_names(started: dt.datetime, stem: str, extension: str, window: Window, several: bool):
    """Candidate file names, best first: the nightly name, then with the window, then with a counter."""
    base = f"{started:%Y%m%d_%H%M}_{stem}"
    if not several:
        yield base + extension
    yield f"{base}_{window.label}{extension}"
    for counter in itertools.count(2):
        yield f"{base}_{window.label}_{counter}{extension}"


def put_in_place(temp_path: Path, target: Path) -> bool:
    """Rename `temp_path` to `target` unless `target` exists; a hard link makes the check and the rename one step."""
    try:
        os.link(temp_path, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A filesystem without hard links: the run lock keeps this check and rename free of races.
        if target.exists():
            return False
        os.replace(temp_path, target)
        return True
    temp_path.unlink()
    return True


def finish_interrupted_save(data_dir: Path) -> None:
    """Record the file a killed run put in place without recording it."""
    journal = data_dir / JOURNAL_NAME
    content = read_own_file(journal)
    if content is None:
        return
    try:
        record = parse_line(content)
    except ValueError:
        record = None
    manifest = data_dir / MANIFEST_NAME
    if not isinstance(record, Export):
        # Torn while written (its rename never happened), or not written by this program at all.
        log.warning("%s does not describe a file in the data folder; ignored", journal)
    elif is_intact(record, data_dir) and not any(
        head.is_export and head.file == record.file and head.sha256 == record.sha256
        for head, _, _ in scan_manifest(manifest, warn=False)
    ):
        log.warning("Recording %s, put in place by a run that stopped before recording it", record.file)
        append_manifest(manifest, record)
    journal.unlink()


# The folder, the lock and the exporter's own files.


def ensure_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file stands at its path, or no permission: the setting is for the user to fix
        raise UsageError(f"cannot create the data folder {path}: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def hold_lock(data_dir: Path):
    """One run per data folder; the kernel drops the lock when a run dies, so a crash never blocks the next."""
    lock_path = data_dir / LOCK_NAME
    with open_own_file(lock_path, os.O_RDWR | os.O_CREAT, "r+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise ExportError(f"another export is running in {data_dir} (pid {holder}); try again when it ends") from None
        lock_file.truncate(0)
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        yield


def read_own_file(path: Path) -> bytes | None:
    """The content of one of the exporter's own files (at most a record's longest and a byte, so that a huge file
    put there is never read whole), or None when there is none."""
    try:
        with open_own_file(path, os.O_RDONLY, "rb") as source:
            return source.read(MAX_LINE_BYTES + 1)
    except FileNotFoundError:
        return None
