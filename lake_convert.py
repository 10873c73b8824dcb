"""An exported file's events as typed Arrow record batches, converted by worker processes side by side.

Converting JSON into typed columns is Python at heart and takes a day of events seconds on one core, so the file is
shared out. It is cut into chunks of CHUNK_BYTES of its (decompressed) text; a line belongs to the chunk its first
byte is in. With N workers, worker k converts chunks k, k+N, k+2N, ... and writes one record batch for each to its
standard output, as an Arrow IPC stream. The parent reads the streams in turn, which gives the batches in the file's
order. A worker whose pipe is full waits: memory stays bounded whatever the size of the file. A file of one chunk,
or a machine of one core, is converted in the parent, the same way.

Run as a worker: `python lake_convert.py WORKER WORKERS`, then one `["path", chunk_bytes]` a line on standard input
(the parent does that).
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

from archive import UTF8_BOM, without_boms

CHUNK_BYTES = 2 << 20  # a few thousand events: a worker then holds about 100 MB, Python and pyarrow included
MAX_WORKERS = 2  # see worker_count
NEWLINE, COMMA = ord("\n"), ord(",")
MISFITS = b"misfits"  # the batch metadata that counts values kept in other_fields
END = b"end"  # the metadata of the empty batch that ends a file
WORKER = Path(__file__).resolve()

log = logging.getLogger("fetch_data")


class ConversionFailed(Exception):
    """A worker could not convert its part of the file (it was changed, or the worker was killed)."""


def worker_count() -> int:
    """One worker a core this process may run on, up to MAX_WORKERS; one means the parent converts alone."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def workers_for(path: Path, workers: int, chunk_bytes: int | None = None) -> int:
    """The processes that convert the file: 1 (this one) for a file of one chunk."""
    return 1 if path.stat().st_size <= (chunk_bytes or CHUNK_BYTES) else max(1, workers)


def converted(path: Path, workers: int, chunk_bytes: int | None = None):
    """(record batch without the export hour, its misfits) for each chunk of the file, in order, by workers of
    their own that end with it."""
    pool = Workers(workers, chunk_bytes)
    try:
        yield from pool.converted(path)
    finally:
        pool.close()


class Workers:
    """Worker processes, started once and given file after file: the interpreter and pyarrow start while the export
    runs, and a refill of many files pays for them once.

    A worker takes a file's path on its standard input and answers with one Arrow IPC stream of its chunks, ended by
    an empty batch that says so. A file not read to that end (a failure, or a reader that stopped) costs the
    processes: the next file starts new ones.
    """

    def __init__(self, count: int, chunk_bytes: int | None = None):
        self.count = count
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES
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
    """The last line the worker wrote on standard error, once it has ended."""
    with contextlib.suppress(OSError):
        process.kill()
    process.wait()
    process.errors.seek(0)
    lines = process.errors.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"a conversion worker ended with code {process.returncode}"


def owned_batches(path: Path, worker: int, workers: int, chunk_bytes: int):
    """(record batch, misfits) of each chunk this worker owns, in order."""
    from lake_schema import Converter

    converter = Converter()
    lines_file = ".jsonl" in path.name
    for text in owned_chunks(path, worker, workers, chunk_bytes):
        before = converter.misfits
        array, count = array_of(text, lines_file)
        batch = converter.events_of_array(array, count) if array else None
        if batch is None:
            batch = converter.events(event_lines_of(text))
        yield batch, converter.misfits - before


def owned_lines(path: Path, worker: int, workers: int, chunk_bytes: int):
    """The event lines of each chunk this worker owns, in order; an empty list for an owned chunk where no line
    starts (inside a long line), so that the parent's turns stay in step."""
    for text in owned_chunks(path, worker, workers, chunk_bytes):
        yield event_lines_of(text)


def owned_chunks(path: Path, worker: int, workers: int, chunk_bytes: int):
    with open(path, "rb") as raw:
        source = raw
        if path.name.endswith(".gz"):
            from isal import igzip

            source = igzip.IGzipFile(fileobj=raw, mode="rb")
        yield from owned_texts(source, worker, workers, chunk_bytes)


def owned_texts(stream, worker: int, workers: int, chunk_bytes: int):
    """The text of the lines starting in each owned chunk, the last one whole even where it runs past its chunk.

    The stream is read whole by every worker, one chunk at a time: a worker must see where lines end before its
    chunks, and a compressed file can only be read from its start.
    """
    ends_line = True  # whether the text so far ends a line: then the next chunk starts with a line
    pending: list[bytes] | None = None  # an owned chunk's text whose last line is still being read
    empties = 0  # owned chunks, after the pending one, where no line starts
    index = 0
    while chunk := read_fully(stream, chunk_bytes):
        newline = chunk.find(b"\n")
        start = 0 if ends_line else (newline + 1 if newline >= 0 else len(chunk))  # the first line starting here
        if pending is not None:
            pending.append(chunk[:start])
            if newline >= 0:
                yield b"".join(pending)
                yield from [b""] * empties
                pending, empties = None, 0
        if index % workers == worker:
            if start == len(chunk) and pending is not None:
                empties += 1
            elif start == len(chunk):
                yield b""
            elif chunk.endswith(b"\n"):
                yield chunk[start:]
            else:
                pending = [chunk[start:]]
        ends_line = chunk.endswith(b"\n")
        index += 1
    if pending is not None:
        yield b"".join(pending)
        yield from [b""] * empties


def read_fully(stream, size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the stream (a gzip stream may return less)."""
    data = stream.read(size)
    if len(data) in (0, size):
        return data
    parts, held = [data], len(data)
    while held < size and (more := stream.read(size - held)):
        parts.append(more)
        held += len(more)
    return b"".join(parts)


def event_lines_of(text: bytes) -> list[bytes]:
    """The events of some lines of an exported file (JSON array or JSON lines): brackets, blank lines and the commas
    between array items left out."""
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if UTF8_BOM in text:
        lines = without_boms(lines)
    return [line[:-1] if line.endswith(b",") else line for line in lines if line not in (b"[", b"]", b"[]", b"")]


def array_of(text: bytes, lines_file: bool) -> tuple[bytes | None, int]:
    """Some lines of an exported file as one JSON array text, and how many lines it holds, in one copy: JSON lines
    get commas, a JSON array's lines have them. (None, 0) for a chunk with no event."""
    start = 2 if text.startswith(b"[\n") else 0  # the array's opening line: no event starts with a bracket
    end = len(text)
    for closing in (b"\n]\n", b"\n]"):
        if text.endswith(closing):
            end -= len(closing) - 1
            break
    if end > start and text[end - 1] == NEWLINE:
        end -= 1
    if end - start <= 2 and text[start:end] in (b"", b"[]", b"[", b"]"):
        return None, 0
    count = text.count(b"\n", start, end) + 1
    if lines_file:  # the newlines between the lines, and any before them, become commas
        text = text.replace(b"\n", b",", count - 1 + text.count(b"\n", 0, start))
    elif text[end - 1] == COMMA:
        end -= 1
    return b"".join((b"[", memoryview(text)[start:end], b"]")), count


def serve(worker: int, workers: int) -> None:
    """A worker: for each path read on standard input, its owned chunks' record batches on standard output."""
    import pyarrow as pa

    from lake_schema import EVENT_SCHEMA

    out = sys.stdout.buffer
    for job in sys.stdin.buffer:
        path, chunk_bytes = json.loads(job)
        with pa.ipc.new_stream(out, EVENT_SCHEMA) as sink:
            for batch, misfits in owned_batches(Path(path), worker, workers, chunk_bytes):
                sink.write_batch(batch, custom_metadata={MISFITS: str(misfits)})
                out.flush()
            sink.write_batch(pa.RecordBatch.from_pylist([], EVENT_SCHEMA), custom_metadata={END: b"1"})
        out.flush()


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]))
    except (BrokenPipeError, KeyboardInterrupt):  # the parent stopped reading: it has what it needs, or failed
        sys.exit(1)
    except Exception as exc:  # one line for the parent's message
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        sys.exit(1)
