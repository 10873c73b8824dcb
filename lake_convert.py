"""An exported file's events as typed Arrow record batches, converted by worker processes side by side.

Converting JSON into typed columns is Python at heart and takes a day of events seconds on one core, so the file is
shared out. It is cut into chunks of CHUNK_BYTES of its (decompressed) text; a line belongs to the chunk its first
byte is in. With N workers, worker k converts chunks k, k+N, k+2N, ... and writes one record batch for each to its
standard output, as an Arrow IPC stream. The parent reads the streams in turn, which gives the batches in the file's
order. A worker whose pipe is full waits: memory stays bounded whatever the size of the file. A file of one chunk,
or a machine of one core, is converted in the parent, the same way.

Run as a worker: `python lake_convert.py FILE WORKER WORKERS CHUNK_BYTES` (the parent does that).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from archive import UTF8_BOM, without_boms

CHUNK_BYTES = 2 << 20  # a few thousand events: a worker then holds about 100 MB, Python and pyarrow included
MAX_WORKERS = 2  # see worker_count
NEWLINE, COMMA = ord("\n"), ord(",")
MISFITS = b"misfits"  # the batch metadata that counts values kept in other_fields
WORKER = Path(__file__).resolve()


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
    """(record batch without the export hour, its misfits) for each chunk of the file, in order."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if workers_for(path, workers, chunk_bytes) == 1:
        yield from owned_batches(path, 0, 1, chunk_bytes)
    else:
        yield from converted_by_workers(path, workers, chunk_bytes)


def converted_by_workers(path: Path, workers: int, chunk_bytes: int):
    processes = [subprocess.Popen([sys.executable, str(WORKER), os.fsdecode(path), str(number), str(workers),
                                   str(chunk_bytes)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for number in range(workers)]
    try:
        readers = [reader_of(process) for process in processes]
        turn = 0
        while (found := next_batch(readers[turn % workers], processes[turn % workers])) is not None:
            yield found
            turn += 1
        # The chunks go round: once one worker has none left, the others must have none either.
        for number in range(workers):
            if next_batch(readers[number], processes[number]) is not None:
                raise ConversionFailed("the workers disagree on where the file ends (it changed meanwhile)")
        for process in processes:
            if process.wait():
                raise ConversionFailed(first_error(process))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()


def reader_of(process: subprocess.Popen):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(process.stdout)
    except (OSError, pa.ArrowException):  # it ended before its first word: its own message says why
        process.wait()
        raise ConversionFailed(first_error(process)) from None


def next_batch(reader, process: subprocess.Popen):
    """(the next record batch, its misfits), or None at the end; ConversionFailed when the worker failed."""
    import pyarrow as pa

    try:
        batch, metadata = reader.read_next_batch_with_custom_metadata()
        return batch, int(metadata[MISFITS])
    except StopIteration:
        failed = process.wait() != 0
    except (OSError, pa.ArrowException):
        failed = True
        process.wait()
    if failed:
        raise ConversionFailed(first_error(process))
    return None


def first_error(process: subprocess.Popen) -> str:
    text = process.stderr.read().decode("utf-8", "replace").strip()
    lines = text.splitlines()
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


def serve(path: Path, worker: int, workers: int, chunk_bytes: int) -> None:
    """A worker: the owned chunks' record batches on standard output."""
    import pyarrow as pa

    from lake_schema import EVENT_SCHEMA

    with pa.ipc.new_stream(sys.stdout.buffer, EVENT_SCHEMA) as sink:
        for batch, misfits in owned_batches(path, worker, workers, chunk_bytes):
            sink.write_batch(batch, custom_metadata={MISFITS: str(misfits)})


if __name__ == "__main__":
    try:
        serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    except BrokenPipeError:  # the parent stopped reading: it has what it needs, or failed itself
        sys.exit(1)
    except Exception as exc:  # one line for the parent's message
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        sys.exit(1)
