"""The event writer: one output file streamed as a JSON array or JSON lines, optionally gzipped, hashed as written,
with the per-hour and per-event-type counts of what it holds."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import os
import queue
import threading
from pathlib import Path

from isal import isal_zlib

from temp_files import create_temp_file
from windows import Window, format_hour, hours_between

GZIP_LEVEL = isal_zlib.ISAL_DEFAULT_COMPRESSION
MAX_TYPES = 10_000  # event types counted by name per window; the rest together under OTHER_TYPES
OTHER_TYPES = "(other types)"
# Event types are counted by name in memory, the manifest and the report. A longer name is counted under its first
# MAX_TYPE_CHARS and an ellipsis: MAX_TYPES names of control characters, six bytes each in JSON, then fill 12 MB,
# within the longest manifest line a run reads back (store.MAX_LINE_BYTES). Longer names, or an archive of a few
# kilobytes naming each event by a megabyte of text, would make a line no run can read, and the window be exported
# again every night.
MAX_TYPE_CHARS = 200


class EventWriter:
    """Streams events into one file as a JSON array or JSON lines, optionally gzipped, hashing as it writes.

    A mark/rollback pair undoes the events of a download that turned out damaged; with --gzip a mark closes
    the current gzip member so the file can be cut there (a gzip file may hold several members).

    A follower (the lake's lake_convert.Feed) is handed every batch as it is written, and told when the file is
    complete; a rollback or a discard makes it give up, as it cannot take events back.
    """

    def __init__(self, path: Path, file_format: str, gzip: bool):
        self.path = path
        self.events = 0
        self.size = 0
        self._array = file_format == "json"
        self._gzip = gzip
        self._compressor = new_compressor() if gzip else None
        self._member_open = False
        self.tally = Tally()  # the counts of what is written, undone with it by rollback
        self._sink = Sink(create_temp_file(path))  # the writer owns it until finish() or discard()
        self.follower = None  # see the class's description

    @property
    def separator(self) -> bytes:
        """What goes between two events of a batch: see write_block."""
        return b",\n" if self._array else b"\n"

    def write_events(self, lines: list[bytes]) -> None:
        self.write_block(self.separator.join(lines), len(lines))

    def write_batch(self, block: bytes, hour: dt.datetime | None, types: list[str]) -> None:
        """A batch of one archive member's events (see write_block), counted under the member's hour."""
        self.write_block(block, len(types))
        self.tally.add(hour, types)
        if self.follower:
            self.follower.put(block, len(types), hour)

    def write_block(self, block: bytes, count: int) -> None:
        """`count` events, joined by `separator` (a batch of one is its line itself: a long line is not copied)."""
        if not count:
            return
        # Separators go apart from the block: a block of one long line is then never copied into a larger buffer.
        if self._array:
            self._encode(self.separator if self.events else b"[\n")
        self._encode(block)
        if not self._array:
            self._encode(b"\n")
        self.events += count

    def mark(self) -> tuple:
        self._close_member()
        return self.size, self.events, self._sink.hash_copy(), self.tally.copy()

    def rollback(self, mark: tuple) -> None:
        self._give_up_following()
        self.size, self.events, hash_copy, tally = mark
        self.tally = tally.copy()
        self._sink.truncate(self.size, hash_copy)
        if self._gzip:
            self._compressor = new_compressor()
            self._member_open = False

    def finish(self) -> None:
        if self._array:
            self._encode(b"\n]\n" if self.events else b"[]\n")
        if self._gzip and (self._member_open or self.size == 0):
            self._raw(self._compressor.flush())
        self._sink.finish()
        if self.follower:
            self.follower.end()

    def discard(self) -> None:
        self._give_up_following()
        self._sink.close()
        self.path.unlink(missing_ok=True)

    def _give_up_following(self) -> None:
        if self.follower:
            self.follower.abort()
            self.follower = None

    def sha256(self) -> str:
        return self._sink.hash_copy().hexdigest()

    def _encode(self, data: bytes) -> None:
        if self._gzip:
            self._member_open = True
            data = self._compressor.compress(data)
        self._raw(data)

    def _close_member(self) -> None:
        if self._gzip and self._member_open:
            self._raw(self._compressor.flush())
            self._compressor = new_compressor()
            self._member_open = False

    def _raw(self, data: bytes) -> None:
        if data:
            self._sink.put(data)
            self.size += len(data)


class Sink:
    """A file and the sha256 of its bytes, written and hashed on a thread of its own.

    Both release the GIL for blocks this size, so a window's bytes are hashed and written while the next lines are
    checked. The queue is short: memory stays flat however far the checking runs ahead.
    """

    QUEUED = 2
    GATHER_BYTES = 256 << 10  # small writes (an archive of tiny members) are gathered to this before handing over
    # Written bytes are synced to disk as they pile up, on this thread while the export goes on, so that finish()
    # waits for the last few megabytes only, not for the whole file (a tenth of a second for 250 MB here).
    SYNC_BYTES = 8 << 20

    def __init__(self, file):
        self._file = file
        self._gathered = bytearray()
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(self.QUEUED)
        self._failure: OSError | None = None
        self._thread = threading.Thread(target=self._drain, name="writer", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        self._raise_failure()
        if len(data) < self.GATHER_BYTES:
            self._gathered += data
            if len(self._gathered) < self.GATHER_BYTES:
                return
            data, self._gathered = bytes(self._gathered), bytearray()
        elif self._gathered:
            self._queue.put(bytes(self._gathered))
            self._gathered = bytearray()
        self._queue.put(data)

    def hash_copy(self):
        self._settle()
        return self._hash.copy()

    def truncate(self, size: int, hash_copy) -> None:
        self._settle()
        self._hash = hash_copy.copy()
        self._file.seek(size)
        self._file.truncate()

    def finish(self) -> None:
        """Everything written, flushed and fsynced, and the file closed."""
        self._settle()
        self._stop()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        self._stop()
        self._file.close()

    def _drain(self) -> None:
        unsynced = 0
        while (data := self._queue.get()) is not None:
            try:
                if self._failure is None:
                    self._file.write(data)
                    self._hash.update(data)
                    unsynced += len(data)
                    if unsynced >= self.SYNC_BYTES:
                        self._file.flush()
                        os.fdatasync(self._file.fileno())
                        unsynced = 0
            except OSError as exc:  # a full disk: said on the writer's next call
                self._failure = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _settle(self) -> None:
        if self._gathered:
            self._queue.put(bytes(self._gathered))
            self._gathered = bytearray()
        self._queue.join()
        self._raise_failure()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class Tally:
    """Events per hour (the archive member's hour, which is how the Export API groups events) and per event type."""

    def __init__(self, hours=None, types=None, unplaced=0, runs=None):
        self.hours: collections.Counter = collections.Counter(hours or {})
        self.types: collections.Counter = collections.Counter(types or {})
        self.unplaced = unplaced  # events of members whose name gives no hour
        self.runs: list[list] = [list(run) for run in runs or []]  # [hour or None, events] in the file's order

    def add(self, hour: dt.datetime | None, types: list[str]) -> None:
        if types and max(map(len, types)) > MAX_TYPE_CHARS:
            types = [name if len(name) <= MAX_TYPE_CHARS else f"{name[:MAX_TYPE_CHARS]}…" for name in types]
        if hour is None:
            self.unplaced += len(types)
        else:
            self.hours[hour] += len(types)
        if self.runs and self.runs[-1][0] == hour:
            self.runs[-1][1] += len(types)
        elif types:
            self.runs.append([hour, len(types)])
        self.types.update(types)
        if len(self.types) > MAX_TYPES:
            self._fold_rare_types()

    def _fold_rare_types(self) -> None:
        """Past MAX_TYPES names a window keeps the most frequent and counts the rest under one key: a client that
        sends a new event type with every event (an ID in the name) must not grow memory and the manifest without
        bound. A type folded once and seen again counts under its name from then on, until folded again."""
        other = self.types.pop(OTHER_TYPES, 0)
        kept = collections.Counter(dict(self.types.most_common(MAX_TYPES - 1)))
        kept[OTHER_TYPES] = other + sum(self.types.values()) - sum(kept.values())
        self.types = kept

    def copy(self) -> Tally:
        return Tally(self.hours, self.types, self.unplaced, self.runs)

    def by_hour(self, window: Window) -> dict[str, int] | None:
        """Every hour of the window (zeros included) and any stray hour; None if some events have no hour."""
        if self.unplaced:
            return None
        hours = {hour: 0 for hour in hours_between(window.start, window.end)} | dict(self.hours)
        return {format_hour(hour): hours[hour] for hour in sorted(hours)}

    def runs_out_of_order(self) -> list[tuple[str | None, int]] | None:
        """The hour of each run of lines in file order, when sorting the hours would not give it; else None."""
        if not self.unplaced and [hour for hour, _ in self.runs] == sorted(h for h, n in self.hours.items() if n):
            return None
        return [(format_hour(hour) if hour else None, count) for hour, count in self.runs]


def new_compressor():
    return isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)
