"""An exported file's events as typed Arrow record batches, converted by worker processes side by side.

Converting JSON into typed columns is Python at heart and takes a day of events seconds on one core, so the file is
shared out. It is cut into chunks of CHUNK_BYTES of its (decompressed) text; a line belongs to the chunk its first
byte is in. With N workers (lake_worker.py), worker k converts chunks k, k+N, k+2N, ... and writes one record batch
for each to its standard output, as an Arrow IPC stream. The exporter reads the streams in turn, which gives the
batches in the file's order. A worker whose pipe is full waits: memory stays bounded whatever the size of the file.
A file of one chunk, or a machine of one core, is converted in the exporter, the same way.

A window exported alone is converted while it is written instead (Feed): the writer hands each block of lines over as
it writes it, and every CHUNK_BYTES of them go to the next worker in turn, as a frame on its standard input.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

from processes import end_processes, first_error, one_that_ended, start_process, widen_pipe

CHUNK_BYTES = 2 << 20  # a few thousand events: a worker then holds about 100 MB, Python and pyarrow included
WORKER = Path(__file__).resolve().with_name("lake_worker.py")
WORKER_NAME = "a conversion worker"

log = logging.getLogger("fetch_data")


class ConversionFailed(Exception):
    """A worker could not convert its part of the file (it was changed, or the worker was killed)."""


def workers_for(path: Path, workers: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The processes that convert the file: 1 (this one) for a file of one chunk."""
    return 1 if path.stat().st_size <= chunk_bytes else max(1, workers)


class Workers:
    """Worker processes, started once and given file after file: the interpreter and pyarrow start while the export
    runs, and a refill of many files pays for them once.

    A worker takes a file's path on its standard input and answers with one Arrow IPC stream of its chunks, ended by
    an empty batch that says so. A file not read to that end (a failure, or a reader that stopped) costs the
    processes: the next file starts new ones.
    """

    def __init__(self, count: int, chunk_bytes: int = CHUNK_BYTES):
        self.count = count
        self.chunk_bytes = chunk_bytes
        self.processes: list[subprocess.Popen] = []
        self.used = 0  # the processes that converted the last file

    def start(self) -> None:
        """Start the processes now, if the machine has the cores for them and they are not running."""
        if self.count > 1 and not self.processes:
            try:
                for number in range(self.count):
                    self.processes.append(start_worker(number, self.count))
            except OSError as exc:  # no process to be had (a limit on processes, a missing interpreter)
                log.warning("Lake: no conversion worker could start (%s); this process converts alone", exc)
                self.close()
                self.count = 1

    def converted(self, path: Path):
        """(record batch without the export hour, its misfits) for each chunk of the file, in order."""
        alone = workers_for(path, self.count, self.chunk_bytes) == 1
        if not alone:
            self.start()
        if alone or not self.processes:
            from lake_worker import owned_batches  # loads Arrow's compute functions: only when converting here

            self.used = 1
            yield from owned_batches(path, 0, 1, self.chunk_bytes)
            return
        self.used = self.count
        whole = False
        try:
            job = json.dumps([os.fsdecode(path), self.chunk_bytes]).encode() + b"\n"
            for process in self.processes:
                process.stdin.write(job)
                process.stdin.flush()
            readers = [reader_of(process) for process in self.processes]
            turn = 0
            while (found := next_batch(readers[turn % self.count], self.processes[turn % self.count])) is not None:
                yield found
                turn += 1
            # The chunks go round: once one worker has none left, the others must have none either.
            for number in range(self.count):
                if number != turn % self.count and next_batch(readers[number], self.processes[number]) is not None:
                    raise ConversionFailed("the workers disagree on where the file ends (it changed meanwhile)")
            whole = True
        except OSError:  # a worker gone before it read the path
            raise ConversionFailed(first_error(one_that_ended(self.processes), WORKER_NAME)) from None
        finally:
            if not whole:
                self.close()

    def feed(self, separator: bytes) -> Feed | None:
        """A Feed of text whose lines are joined by `separator` (the output file's); None without processes."""
        self.start()
        if not self.processes:
            return None
        job = json.dumps([None, separator == b"\n"]).encode() + b"\n"
        try:
            for process in self.processes:
                process.stdin.write(job)
                process.stdin.flush()
        except OSError:
            self.close()
            return None
        self.used = self.count
        return Feed(self, separator)

    def close(self) -> None:
        """End the processes, at once: between files they hold nothing (and one still starting need not finish)."""
        end_processes(self.processes)
        self.processes = []


class Feed:
    """A window's events, converted by the workers while the exporter writes them.

    The window's thread puts each block of lines it writes; every `chunk_bytes` of them go to the next worker in
    turn as one frame, and the lake's thread reads the record batches back in the same turn (batches). Memory holds a
    chunk and what the pipes hold: a worker still busy holds up the window's thread. Either side may abort(): the
    workers are ended, the other side's next step fails, and the lake loads the file once it is in place instead.
    """

    def __init__(self, workers: Workers, separator: bytes):
        self.workers = workers
        self.processes = list(workers.processes)
        self.separator = separator
        self._chunk: list[bytes] = []
        self._chunk_size = 0
        self._chunk_runs: list[list] = []  # [hour, events] of the chunk being gathered, in order
        self._sent: list[list[list]] = []  # the runs of each chunk sent
        self._ended = False
        self._aborted = False
        self._outcome = None  # what finish() was given
        self._changed = threading.Condition()

    def put(self, block: bytes, count: int, hour) -> None:
        """`count` events joined by the separator, of one archive member's `hour` (None where it names none)."""
        if self._aborted or not count:
            return
        if self._chunk:
            self._chunk.append(self.separator)
        self._chunk.append(block)
        self._chunk_size += len(block)
        if self._chunk_runs and self._chunk_runs[-1][0] == hour:
            self._chunk_runs[-1][1] += count
        else:
            self._chunk_runs.append([hour, count])
        if self._chunk_size >= self.workers.chunk_bytes:
            self._send()

    def end(self) -> None:
        """Every event is put: the last chunk goes, then an empty frame to each worker, which ends its stream."""
        if self._aborted:
            return
        if self._chunk:
            self._send()
        from lake_schema import FRAME

        try:
            for process in self.processes:
                process.stdin.write(FRAME.pack(0))
                process.stdin.flush()
        except (OSError, ValueError):  # ended by an abort, or a worker gone: the batches say which
            self.abort()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def finish(self, outcome) -> None:
        """What the export came to (the lake's record of the file), for outcome()."""
        with self._changed:
            self._outcome = outcome
            self._changed.notify_all()

    def abort(self) -> None:
        """Give up, from either side: the workers are ended at once (a next file starts new ones)."""
        with self._changed:
            if self._aborted:
                return
            self._aborted = True
            self._changed.notify_all()
        end_processes(self.processes)
        if self.workers.processes == self.processes:
            self.workers.processes = []

    def batches(self):
        """(record batch, the [hour, events] runs of its rows, misfits) of each chunk, in order, until the end;
        ConversionFailed once the feed is aborted."""
        readers: list = [None] * len(self.processes)
        for index in itertools.count():
            with self._changed:
                self._changed.wait_for(lambda index=index: self._aborted or index < len(self._sent) or self._ended)
                self._check()
                if index == len(self._sent):
                    break
                runs = self._sent[index]
            number = index % len(self.processes)
            readers[number] = readers[number] or reader_of(self.processes[number])
            found = next_batch(readers[number], self.processes[number])
            if found is None:
                raise ConversionFailed("a worker ended its stream before its last chunk")
            yield found[0], runs, found[1]
        for number, process in enumerate(self.processes):
            if next_batch(readers[number] or reader_of(process), process) is not None:
                raise ConversionFailed("a worker sent more batches than it was given chunks")

    def outcome(self):
        """What finish() is given, once it is; ConversionFailed once the feed is aborted."""
        with self._changed:
            self._changed.wait_for(lambda: self._aborted or self._outcome is not None)
            self._check()
            return self._outcome

    def _check(self) -> None:
        if self._aborted:
            raise ConversionFailed("the conversion while exporting was given up")

    def _send(self) -> None:
        from lake_schema import FRAME

        process = self.processes[len(self._sent) % len(self.processes)]
        try:
            process.stdin.write(FRAME.pack(sum(map(len, self._chunk))))
            process.stdin.writelines(self._chunk)
            process.stdin.flush()
        except (OSError, ValueError):  # the workers were ended (an abort), or one died: the lake loads the file
            self.abort()
            return
        with self._changed:
            self._sent.append(self._chunk_runs)
            self._changed.notify_all()
        self._chunk, self._chunk_size, self._chunk_runs = [], 0, []


def start_worker(number: int, count: int) -> subprocess.Popen:
    process = start_process(WORKER, str(number), str(count))
    widen_pipe(process.stdout)  # a record batch of megabytes then crosses in one or two turns, not dozens
    widen_pipe(process.stdin)  # and so does a frame of text streamed to it
    return process


def reader_of(process: subprocess.Popen):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(process.stdout)
    except (OSError, pa.ArrowException):  # it ended before its first word: its own message says why
        raise ConversionFailed(first_error(process, WORKER_NAME)) from None


def next_batch(reader, process: subprocess.Popen):
    """(the next record batch, its misfits), or None after the batch that ends the file; ConversionFailed when the
    worker failed."""
    import pyarrow as pa

    from lake_schema import END, MISFITS

    try:
        batch, metadata = reader.read_next_batch_with_custom_metadata()
    except (StopIteration, OSError, pa.ArrowException):  # the stream broke off before its end: the worker failed
        raise ConversionFailed(first_error(process, WORKER_NAME)) from None
    if END in metadata:
        with contextlib.suppress(StopIteration):
            reader.read_next_batch()  # the stream's own end, so that the next file's stream starts clean
        return None
    return batch, int(metadata[MISFITS])
