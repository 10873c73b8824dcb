"""An exported file's events as typed Arrow record batches, converted by worker processes side by side.

Converting JSON into typed columns is Python at heart and takes a day of events seconds on one core, so the file is
shared out. It is cut into chunks of CHUNK_BYTES of its (decompressed) text; a line belongs to the chunk its first
byte is in. With N workers (lake_worker.py), worker k converts chunks k, k+N, k+2N, ... and writes one record batch
for each to its standard output, as an Arrow IPC stream. The exporter reads the streams in turn, which gives the
batches in the file's order. A worker whose pipe is full waits: memory stays bounded whatever the size of the file.
A file of one chunk, or a machine of one core, is converted in the exporter, the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
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

    def close(self) -> None:
        """End the processes, at once: between files they hold nothing (and one still starting need not finish)."""
        end_processes(self.processes)
        self.processes = []


def start_worker(number: int, count: int) -> subprocess.Popen:
    process = start_process(WORKER, str(number), str(count))
    widen_pipe(process.stdout)  # a record batch of megabytes then crosses in one or two turns, not dozens
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
