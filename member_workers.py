"""An archive's members as checked event lines, read on the window's thread or, under field rules, on workers.

Field rules cost a Python loop over every event (decode it, hash its IDs, write it back), which takes a day of events
seconds on one core, on top of reading and checking it. With two cores, the members are shared out: of the members in
hour order, worker k reads members k, k+N, ... from the downloaded zip itself, checks their lines, applies the rules,
and answers with batches of lines, joined as the output file joins them, and their event types. The exporter takes
each member's batches in hour order and writes them as they come: the file is the same, byte for byte, as when it
does all the work on its own thread. A thread per worker reads its answers as they come: the first AHEAD_BYTES in
memory, the rest in a spill file, so that both workers keep busy while memory stays flat, whatever the archive holds.

Run as `python member_workers.py` (MemberWorkers does that): the rules come first on standard input, so the hash key
never appears in a command line or an environment, then one archive a line,
`[path, [member indices], max bytes, separator]`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import struct
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import simdjson

from archive import (
    BadEvent,
    CorruptArchive,
    allow_checked_nesting,
    check_events,
    damage_is_corrupt,
    members_in_order,
    read_member,
)
from errors import ExportError
from field_rules import FieldRules, Pseudonymiser
from processes import end_processes, first_error, one_that_ended, start_process, widen_pipe, worker_count
from windows import Window

WORKER = Path(__file__).resolve()
WORKER_NAME = "a field rules worker"
AHEAD_BYTES = 4 << 20  # a worker's answers held in memory ahead of the writing: a few batches of a megabyte
FRAME = struct.Struct("<cQQ")  # kind, the length of its pickled value, the length of the block of lines after it
LINES, MEMBER_END, BAD_EVENT, DAMAGED, GONE = b"L", b"E", b"B", b"D", b"G"

log = logging.getLogger("fetch_data")


class WorkerFailed(ExportError):
    """A worker ended without finishing (killed, or out of memory): the window fails, the next run exports it."""


class SpillFailed(OSError):
    """A worker's lines could not wait in the spill file (a full disk): its window fails."""


class ArchiveReader:
    """How one window's archives become checked event lines, with the field rules applied: one per window thread."""

    def __init__(self, rules: Pseudonymiser | None, max_event_bytes: int, workers: MemberWorkers | None = None):
        self.parser = simdjson.Parser()
        self.rules = rules
        self.max_event_bytes = max_event_bytes
        self.workers = workers

    def batches(self, zip_path: Path, span: Window, separator: bytes):
        """(member name, the block of its event lines, their event types) in hour order; BadEvent for a line that is
        not an event, CorruptArchive for a damaged archive (see damage_is_corrupt).

        A batch's lines come joined by `separator`, as the output file joins them (EventWriter.separator): a worker's
        batch then crosses the pipe and reaches the file as one block, never a line at a time.
        """
        with damage_is_corrupt(), zipfile.ZipFile(zip_path) as archive:
            members = members_in_order(archive, span)
            workers = self.workers
            if workers is None or len(members) < 2 or not workers.take():  # or another window has them: read here
                for member in members:
                    for name, events, types in checked_batches(archive, member, self.max_event_bytes, self.parser,
                                                               self.rules):
                        yield name, separator.join(events), types
                return
            index = {id(info): number for number, info in enumerate(archive.infolist())}
        try:  # the workers open the archive themselves
            for position, block, types in workers.batches(zip_path, [index[id(member)] for member in members],
                                                          self.max_event_bytes, separator):
                yield members[position].filename, block, types
        finally:
            workers.give_back()


def checked_batches(archive: zipfile.ZipFile, member: zipfile.ZipInfo, max_event_bytes: int, parser,
                    rules: Pseudonymiser | None):
    """(member name, its event lines with the rules applied, their event types) of one member, batch by batch."""
    for name, first_line_number, lines in read_member(archive, member, max_event_bytes):
        events, types = check_events(lines, name, first_line_number, parser)
        if rules:
            events, types = rules.apply(events), rules.counted_types(types)
        yield name, events, types


class MemberWorkers:
    """The run's worker processes for the field rules, started once, serving one archive at a time.

    An archive not read to its end (a failure, or a reader that stopped) costs the processes: the next archive starts
    new ones. A window that finds them busy with another window's archive reads its own on its thread.
    """

    def __init__(self, rules: Pseudonymiser, count: int):
        self.rules = rules
        self.count = count
        self.processes: list = []
        self.answers: list[Answers] = []
        self.readers: list[threading.Thread] = []
        self._in_use = threading.Lock()

    @classmethod
    def for_run(cls, rules: Pseudonymiser | None) -> MemberWorkers | None:
        """Workers when field rules are asked for and the machine has the cores, started at once (the interpreters
        start while the first archive downloads); None otherwise."""
        count = worker_count() if rules else 1
        if count < 2:
            return None
        workers = cls(rules, count)
        workers.start()
        return workers

    def take(self) -> bool:
        """Whether this archive may use the workers (started now if need be); give_back() when done."""
        if not self._in_use.acquire(blocking=False):
            return False
        self.start()
        if not self.processes:
            self._in_use.release()
            return False
        return True

    def give_back(self) -> None:
        self._in_use.release()

    def start(self) -> None:
        """Start the processes, unless they run already or could not start before."""
        if self.processes or self.count < 2:
            return
        try:
            self._start()
        except OSError as exc:  # no process to be had (a limit on processes, a missing interpreter)
            log.warning("Field rules: no worker process could start (%s); the download threads apply them", exc)
            self.close()
            self.count = 1

    def _start(self) -> None:
        rules = self.rules.rules
        first_line = json.dumps({"dropped": rules.dropped, "hashed": rules.hashed,
                                 "key": rules.key.decode("utf-8")}).encode() + b"\n"
        for _ in range(self.count):
            process = start_process(WORKER)
            self.processes.append(process)
            widen_pipe(process.stdout)
            answers = Answers()
            reader = threading.Thread(target=read_answers, args=(process.stdout, answers), daemon=True,
                                      name="rules-worker-answers")
            reader.start()
            self.answers.append(answers)
            self.readers.append(reader)
            process.stdin.write(first_line)
            process.stdin.flush()

    def batches(self, zip_path: Path, indices: list[int], max_event_bytes: int, separator: bytes):
        """(position in `indices`, the block of its event lines, their event types) of each member, in that order."""
        whole = False
        for answers in self.answers:
            answers.spill_dir = zip_path.parent  # beside the output, on disk: a /tmp in memory would cost memory
        try:
            for number, process in enumerate(self.processes):
                job = json.dumps([str(zip_path), indices[number::self.count], max_event_bytes,
                                  separator.decode("latin-1")]).encode() + b"\n"
                process.stdin.write(job)
                process.stdin.flush()
            for position in range(len(indices)):
                yield from self._member(position)
            whole = True
        except OSError:  # a worker gone before it read the archive
            raise WorkerFailed(f"field rules: {first_error(one_that_ended(self.processes), WORKER_NAME)}") from None
        finally:
            if not whole:
                self.close()

    def _member(self, position: int):
        number = position % self.count
        while True:
            kind, value = self.answers[number].get()
            if kind == LINES:
                yield (position, *value)
            elif kind == MEMBER_END:
                self.rules.count(*value)
                return
            elif kind == BAD_EVENT:
                raise BadEvent(*value)
            elif kind == DAMAGED:
                raise CorruptArchive(value)
            else:  # GONE, with the reader's own failure, if any
                raise WorkerFailed(f"field rules: {value or first_error(self.processes[number], WORKER_NAME)}")

    def close(self) -> None:
        """End the processes at once; their answers not taken are dropped, so that their readers end too."""
        end_processes(self.processes)
        for answers in self.answers:
            answers.close()
        for reader in self.readers:
            reader.join()  # at the end of its pipe, now its process is gone
        self.processes, self.answers, self.readers = [], [], []


class Answers:
    """A worker's answers in order: the blocks of lines of the first AHEAD_BYTES held in memory, those of later answers
    spilled to a file without a name in the archive's folder, so that the worker never waits for the writing.

    Output is written in member order, so a worker on the next member would otherwise wait for the member before
    it to be written, and the two would take turns rather than work side by side. The spill file holds at most what
    the output file gets anyway, is emptied whenever it has been read to its end, and vanishes with the process.
    """

    def __init__(self):
        self.spill_dir: Path | None = None  # where to spill: the archive's folder, set for each archive
        self._items: collections.deque = collections.deque()  # (kind, value, bytes held in memory, spilled)
        self._held = 0
        self._spill = None
        self._spilled = 0  # items waiting in the spill file
        self._spill_end = 0
        self._closed = False
        self._changed = threading.Condition()

    def put(self, kind: bytes, value, size: int = 0) -> None:
        with self._changed:
            if self._closed:  # the processes were ended: what their reader still had is dropped
                return
            spilled = kind == LINES and self._held > 0 and self._held + size > AHEAD_BYTES
            if spilled:
                value = self._spill_block(*value)
                self._spilled += 1
            else:
                self._held += size
            self._items.append((kind, value, 0 if spilled else size, spilled))
            self._changed.notify_all()

    def get(self) -> tuple[bytes, object]:
        with self._changed:
            self._changed.wait_for(lambda: self._items)
            kind, value, size, spilled = self._items.popleft()
            self._held -= size
            if spilled:
                value = self._unspill_block(*value)
                self._spilled -= 1
                if not self._spilled:  # read to its end: start again at its beginning
                    self._spill.truncate(0)
                    self._spill_end = 0
            return kind, value

    def close(self) -> None:
        """The answers not taken are dropped, with the spill file."""
        with self._changed:
            self._closed = True
            self._items.clear()
            self._held = self._spilled = self._spill_end = 0
            if self._spill is not None:
                self._spill.close()
                self._spill = None

    def _spill_block(self, block: bytes, types: list[str]) -> tuple:
        offset = self._spill_end
        data = memoryview(block)
        try:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115 - closed by close()
            while data:
                written = os.pwrite(self._spill.fileno(), data, self._spill_end)
                self._spill_end += written
                data = data[written:]
        except OSError as exc:
            raise SpillFailed(f"cannot keep a worker's lines in {self.spill_dir}: {exc.strerror or exc}") from None
        return offset, len(block), types

    def _unspill_block(self, offset: int, size: int, types: list[str]) -> tuple:
        block = os.pread(self._spill.fileno(), size, offset)
        while len(block) < size:  # a read returns at most about 2 GB
            more = os.pread(self._spill.fileno(), size - len(block), offset + len(block))
            if not more:
                raise OSError(f"the spill file of a field rules worker lost {size - len(block)} bytes")
            block += more
        return block, types


def read_answers(stream, answers: Answers) -> None:
    """A worker's answers, frame by frame, into `answers`; GONE at the end of its output, whatever ended it."""
    failure = None
    try:
        while len(header := stream.read(FRAME.size)) == FRAME.size:
            kind, value_size, lines_size = FRAME.unpack(header)
            value = stream.read(value_size)
            if len(value) < value_size:
                break
            value = pickle.loads(value)
            if kind == LINES:  # the event types, then their lines as one block, read in one go
                value = stream.read(lines_size), value
                if len(value[0]) != lines_size:
                    break
            answers.put(kind, value, lines_size)
    except SpillFailed as exc:
        failure = str(exc)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):  # the pipe closed: the processes were ended
        pass
    finally:
        answers.put(GONE, failure)


# The worker's side.


def serve() -> None:
    """Rules from the first line of standard input, then for each archive line its members' answers."""
    allow_checked_nesting()
    source, out = sys.stdin.buffer, sys.stdout.buffer
    given = json.loads(source.readline())
    rules = Pseudonymiser(FieldRules(tuple(given["dropped"]), tuple(given["hashed"]), given["key"].encode("utf-8")))
    parser = simdjson.Parser()
    for job in source:
        path, indices, max_event_bytes, separator = json.loads(job)
        separator = separator.encode("latin-1")
        for kind, value in answers_for(Path(path), indices, max_event_bytes, rules, parser):
            block = b""
            if kind == LINES:  # the lines follow their types as one block, not pickled (a copy less)
                lines, value = value
                block = separator.join(lines)
            pickled = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            out.write(FRAME.pack(kind, len(pickled), len(block)))
            out.write(pickled)
            out.write(block)
            out.flush()


def answers_for(path: Path, indices: list[int], max_event_bytes: int, rules: Pseudonymiser, parser):
    """(kind, value) for the members at `indices` of the archive: their batches, then the end of each member."""
    try:
        with damage_is_corrupt(), zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for index in indices:
                events_before = rules.events
                for _, events, types in checked_batches(archive, infos[index], max_event_bytes, parser, rules):
                    yield LINES, (events, types)
                yield MEMBER_END, (rules.events - events_before, rules.carried())
    except BadEvent as exc:  # its content stays here: under field rules a message shows no line
        yield BAD_EVENT, (exc.member, exc.number, exc.reason, b"", exc.length)
    except CorruptArchive as exc:
        yield DAMAGED, str(exc)


if __name__ == "__main__":
    try:
        serve()
    except (BrokenPipeError, KeyboardInterrupt):  # the exporter stopped reading: it has what it needs, or failed
        sys.exit(1)
    except Exception as exc:  # one line for the exporter's message
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        sys.exit(1)
