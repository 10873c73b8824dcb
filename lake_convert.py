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
import sys
import tempfile
from pathlib import Path

CHUNK_BYTES = 2 << 20  # a few thousand events: a worker then holds about 100 MB, Python and pyarrow included
MAX_WORKERS = 2  # see worker_count
WORKER = Path(__file__).resolve().with_name("lake_worker.py")
CGROUP = Path("/sys/fs/cgroup")

log = logging.getLogger("fetch_data")


class ConversionFailed(Exception):
    """A worker could not convert its part of the file (it was changed, or the worker was killed)."""


def worker_count(cgroup: Path = CGROUP) -> int:
    """One worker a core this process may use, up to MAX_WORKERS; one means the parent converts alone.

    The cores it may run on, less any CPU quota of its control group (a container or a Kubernetes pod limited to one
    CPU sees every core of its host, and two workers would then only share that one CPU, with 100 MB more each).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, min(MAX_WORKERS, cores))


def cpu_quota(cgroup: Path) -> float | None:
    """The CPUs the control group may use (cgroup v2's cpu.max, or v1's CFS quota), None when unlimited or unknown."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


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
            gone = next((process for process in self.processes if process.poll() is not None), self.processes[0])
            raise ConversionFailed(first_error(gone)) from None
        finally:
            if not whole:
                self.close()

    def close(self) -> None:
        """End the processes, at once: between files they hold nothing (and one still starting need not finish)."""
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.kill()
        for process in self.processes:
            process.wait()
            for stream in (process.stdin, process.stdout, process.errors):
                with contextlib.suppress(OSError):
                    stream.close()
        self.processes = []


def start_worker(number: int, count: int) -> subprocess.Popen:
    # Standard error goes to a file (unlinked at once): a pipe nobody reads could fill and stop the worker.
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Workers.close
    # A session of its own: Ctrl-C in a terminal reaches the exporter, which ends its workers itself.
    process = subprocess.Popen([sys.executable, str(WORKER), str(number), str(count)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    process.errors = errors
    return process


def reader_of(process: subprocess.Popen):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(process.stdout)
    except (OSError, pa.ArrowException):  # it ended before its first word: its own message says why
        raise ConversionFailed(first_error(process)) from None


def next_batch(reader, process: subprocess.Popen):
    """(the next record batch, its misfits), or None after the batch that ends the file; ConversionFailed when the
    worker failed."""
    import pyarrow as pa

    from lake_schema import END, MISFITS

    try:
        batch, metadata = reader.read_next_batch_with_custom_metadata()
    except (StopIteration, OSError, pa.ArrowException):  # the stream broke off before its end: the worker failed
        raise ConversionFailed(first_error(process)) from None
    if END in metadata:
        with contextlib.suppress(StopIteration):
            reader.read_next_batch()  # the stream's own end, so that the next file's stream starts clean
        return None
    return batch, int(metadata[MISFITS])


def first_error(process: subprocess.Popen) -> str:
    """The last line the worker wrote on standard error, once it has ended (a worker whose stream broke off is
    ending: it is given a few seconds to say why)."""
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.errors.seek(0)
    lines = process.errors.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"a conversion worker ended with code {process.returncode}"
