"""A conversion worker: its chunks of an exported file, or frames of a file's text being written, as typed Arrow
record batches (see lake_convert).

A batch of lines is decoded at C speed (msgspec) into structs whose fields already have their column's Python
type, with the property maps kept as the raw JSON text Amplitude sent. A line that does not fit (a string where a
number belongs, a key the schema does not name, a lone surrogate) is decoded leniently on its own: what does not
fit its column stays, as JSON text under its key, in `other_fields`. A documented key the event does not have is
listed in `absent_fields`.

Run as `python lake_worker.py WORKER WORKERS`, then one job a line on standard input (lake_convert does that; see
serve). The exporter imports it too, to convert a small file itself.
"""

from __future__ import annotations

import array
import contextlib
import datetime as dt
import gc
import itertools
import json
import sys
from pathlib import Path
from typing import Annotated

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from archive import UTF8_BOM, allow_checked_nesting, mask_surrogates, unmask_surrogates, without_boms
from lake_schema import (
    ABSENT_FIELDS,
    ARROW_TYPE,
    DOCUMENTED,
    END,
    EVENT_SCHEMA,
    FRAME,
    KIND_OF,
    MISFITS,
    OTHER_FIELDS,
    TIME_FORMAT,
    UTC_MICROS,
    column_of,
)
from own_files import open_regular

TIME_TEXT = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$"  # how Amplitude writes its times, and only that
TIME_BYTES, TIME_SPACE = 26, 10  # the length of that text, and where its one space is
YEAR_ONE = -62_135_596_800_000_000  # 0001-01-01 00:00:00 UTC in microseconds since 1970
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A float column takes JSON integers too, decoded exactly: one a double cannot hold (past 2**53) must not be rounded.
PYTHON_TYPE = {"timestamp": str, "integer": Int64, "float": int | float, "boolean": bool, "string": str}
EXACT_DOUBLE_INTEGER = 2**53  # pyarrow converts integers up to this into doubles, and refuses the others
UNSET = msgspec.UNSET
NO_TEXT = msgspec.Raw(b"")  # what a property map the event does not have decodes to
JSON_NULL = msgspec.Raw(b"null")
EVERY_ROW = "every row"  # typed_column's word for a key no row of the batch has
# Keys outside the schema learnt as fields: Amplitude adds a few; a file of events that each bring new keys must
# not grow the decoder without bound (past this, such keys go to other_fields line by line).
MAX_LEARNT_KEYS = 256
RAW_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
ENCODE = msgspec.json.Encoder().encode
NEWLINE, COMMA = ord("\n"), ord(",")


def serve(worker: int, workers: int) -> None:
    """A worker: for each job read on standard input, its record batches on standard output.

    A job is `["path", chunk_bytes]`, a file whose owned chunks it converts, or `[null, lines_file]`, text streamed
    after it in frames (see lake_convert.Feed) until an empty one.
    """
    allow_checked_nesting()
    source, out = sys.stdin.buffer, sys.stdout.buffer
    for job in iter(source.readline, b""):
        path, detail = json.loads(job)
        batches = framed_batches(source, detail) if path is None else owned_batches(Path(path), worker, workers, detail)
        sink = pa.ipc.new_stream(out, EVENT_SCHEMA)  # not closed on a failure: the stream then ends unfinished
        for batch, misfits in batches:
            sink.write_batch(batch, custom_metadata={MISFITS: str(misfits)})
            out.flush()
        sink.write_batch(pa.RecordBatch.from_pylist([], EVENT_SCHEMA), custom_metadata={END: b"1"})
        sink.close()
        out.flush()


def owned_batches(path: Path, worker: int, workers: int, chunk_bytes: int):
    """(record batch, misfits) of each chunk this worker owns, in order."""
    converter = Converter()
    lines_file = ".jsonl" in path.name
    for text in owned_chunks(path, worker, workers, chunk_bytes):
        yield converted(converter, text, lines_file)


def framed_batches(source, lines_file: bool):
    """(record batch, misfits) of each frame of text read from `source`, until an empty frame."""
    converter = Converter()
    while size := FRAME.unpack(read_fully(source, FRAME.size) or FRAME.pack(0))[0]:
        text = read_fully(source, size)
        if len(text) != size:
            raise EOFError(f"a frame of {size} bytes ended after {len(text)}")
        yield converted(converter, text, lines_file)


def converted(converter: Converter, text: bytes, lines_file: bool) -> tuple[pa.RecordBatch, int]:
    """Some lines of an exported file as a record batch, decoded whole where they allow it, and its misfits."""
    before = converter.misfits
    array, count = array_of(text, lines_file)
    batch = converter.events_of_array(array, count) if array else None
    if batch is None:
        batch = converter.events(event_lines_of(text))
    return batch, converter.misfits - before


def owned_chunks(path: Path, worker: int, workers: int, chunk_bytes: int):
    with open_regular(path) as raw:
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


class Converter:
    """Turns batches of event lines into record batches of SCHEMA.

    Keys outside the schema are learnt as they come and decoded as raw text from then on, so a field Amplitude
    adds tomorrow costs a slow line once, not on every line. `misfits` counts values kept in other_fields because
    they did not fit their column's type.
    """

    def __init__(self):
        self.extra_keys: list[str] = []
        self.misfits = 0
        self._define()

    def events(self, lines: list[bytes]) -> pa.RecordBatch:
        """The record batch of `lines`, in EVENT_SCHEMA."""
        with garbage_collection_paused():
            return self._columns(*self._decode(lines))

    def events_of_array(self, text: bytes, count: int) -> pa.RecordBatch | None:
        """The record batch of one JSON array text of `count` events that all fit the schema as they are; None when
        the text is not that (the caller then goes line by line). Saves splitting and joining the lines of a file."""
        with garbage_collection_paused():
            try:
                events = self._decode_all(text)
            except msgspec.MsgspecError:
                return None
            return self._columns(events, [None] * count) if len(events) == count else None

    def _columns(self, events: list, leftovers: list[str | None]) -> pa.RecordBatch:
        rows = len(leftovers)
        columns, absent, others = {}, [], []
        # One tuple an event (astuple reads the fields in order, with no lookup by name), then transposed.
        by_key = zip(*map(msgspec.structs.astuple, events), strict=True) if events else [()] * len(self._keys)
        for key, values in zip(self._keys, by_key, strict=True):
            if key in KIND_OF:
                typed, missing, misfit = typed_column(values, KIND_OF[key])
                columns[column_of(key)] = typed
                absent.append((key, missing))
                if misfit is not None:
                    self.misfits += len(misfit) - misfit.null_count
                    others.append(member_text(key, misfit))
            else:
                others.append(member_text(key, raw_text_column(values)))
        if any(leftovers):
            others.append(pa.array(leftovers, pa.string()))
        columns[OTHER_FIELDS] = enclosed(others, rows, "{", "}")
        columns[ABSENT_FIELDS] = absent_text(absent, rows)
        return pa.RecordBatch.from_arrays([columns[field.name] for field in EVENT_SCHEMA], schema=EVENT_SCHEMA)

    def _define(self) -> None:
        self._keys = list(DOCUMENTED) + self.extra_keys
        self._names = [f"f{number}" for number in range(len(self._keys))]
        fields = [(name, field_type(key), NO_TEXT if KIND_OF.get(key, "json") == "json" else UNSET)
                  for name, key in zip(self._names, self._keys, strict=True)]
        self._struct = msgspec.defstruct("Event", fields, rename=dict(zip(self._names, self._keys, strict=True)),
                                         forbid_unknown_fields=True, gc=False)
        self._decode_one = msgspec.json.Decoder(self._struct).decode
        self._decode_all = msgspec.json.Decoder(list[self._struct]).decode
        self._name_of = dict(zip(self._keys, self._names, strict=True))

    def _decode(self, lines: list[bytes]) -> tuple[list, list[str | None]]:
        """The structs of the lines, and for each the other_fields members a lenient decoding put aside."""
        try:
            return self._decode_all(b"[" + b",".join(lines) + b"]"), [None] * len(lines)
        except msgspec.MsgspecError:
            pass
        unknown = {key for line in lines for key in lenient_keys(line) if is_utf8(key)} - set(self._keys)
        room = MAX_LEARNT_KEYS - len(self.extra_keys)
        if unknown and room > 0:
            self.extra_keys += sorted(unknown)[:room]
            self._define()
        events, leftovers = [], []
        for line in lines:
            try:
                events.append(self._decode_one(line))
                leftovers.append(None)
            except msgspec.MsgspecError:
                event, leftover = self._decode_leniently(line)
                events.append(event)
                leftovers.append(leftover)
        return events, leftovers

    def _decode_leniently(self, line: bytes):
        """One line whose values do not all fit: those that do go to their columns, the others (as JSON text,
        unchanged) to other_fields, where their column is null."""
        fitting, leftover = {}, []
        for key, raw in lenient_items(line):
            name = self._name_of.get(key)
            if name is None:  # a key no field can be named after (a lone surrogate), or past MAX_LEARNT_KEYS
                leftover.append(json.dumps(key).encode() + b":" + raw + b",")
                continue
            kind = KIND_OF.get(key, "json")
            if kind == "json":
                fitting[name] = msgspec.Raw(raw)
                continue
            try:
                value = msgspec.json.decode(raw, type=PYTHON_TYPE[kind] | None)
                if isinstance(value, str):
                    value.encode("utf-8")
                fitting[name] = value
            except (msgspec.MsgspecError, UnicodeEncodeError):
                self.misfits += 1
                fitting[name] = None
                leftover.append(ENCODE(key) + b":" + raw + b",")
        return self._struct(**fitting), b"".join(leftover).decode("utf-8", "surrogatepass") or None


@contextlib.contextmanager
def garbage_collection_paused():
    """No collection while a batch's hundred thousand tuples and values are built (they hold no cycles): the
    collector would walk them again and again, about a twentieth of the conversion."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def field_type(key: str):
    kind = KIND_OF.get(key, "json")
    return msgspec.Raw if kind == "json" else PYTHON_TYPE[kind] | None | msgspec.UnsetType


def lenient_items(line: bytes) -> list[tuple[str, bytes]]:
    """The top-level keys of one line and the raw bytes of their values, lone surrogate escapes and all."""
    masked = None
    try:
        items = RAW_OBJECT(line).items()
    except msgspec.DecodeError:
        masked = mask_surrogates(line)
        if masked is None:
            raise
        items = RAW_OBJECT(masked).items()
    if masked is None:
        return [(key, bytes(raw)) for key, raw in items]
    return [(json.loads(unmask_surrogates(ENCODE(key))), unmask_surrogates(bytes(raw))) for key, raw in items]


def lenient_keys(line: bytes) -> list[str]:
    try:
        return [key for key, _ in lenient_items(line)]
    except msgspec.DecodeError:
        return []


def typed_column(values: list, kind: str) -> tuple[pa.Array, pa.BooleanArray | str | None, pa.StringArray | None]:
    """(the column, which rows lack the key: None, EVERY_ROW or a mask, the JSON texts that did not fit or None).

    The common cases (every row has the key, or none has) are told by counting in Python: each Arrow compute call
    costs tens of microseconds whatever the batch, and a batch has fifty columns.
    """
    rows = len(values)
    if kind == "json":
        lacking = values.count(NO_TEXT)
        if lacking == rows:
            return pa.nulls(rows, pa.string()), EVERY_ROW, None
        texts = raw_text_column(values)
        if not lacking and not values.count(JSON_NULL):  # every row has a map: no copy
            return texts, None, None
        missing = pc.equal(texts, "")
        return pc.if_else(pc.or_(missing, pc.equal(texts, "null")), None, texts), missing if lacking else None, None
    unset = values.count(UNSET)
    if unset == rows:
        return pa.nulls(rows, ARROW_TYPE[kind]), EVERY_ROW, None
    missing = None
    if unset:
        missing = pa.array([value is UNSET for value in values])
        values = [None if value is UNSET else value for value in values]
    if kind == "timestamp":
        typed, misfit = timestamps(values)
        return typed, missing, misfit
    try:
        return pa.array(values, ARROW_TYPE[kind]), missing, None
    except (pa.ArrowInvalid, UnicodeEncodeError):  # kept as JSON text: see fits_column
        fits = [fits_column(value, kind) for value in values]
        typed = pa.array([value if ok else None for value, ok in zip(values, fits, strict=True)], ARROW_TYPE[kind])
        misfit = pa.array([None if ok else ENCODE(value).decode("utf-8", "surrogatepass")
                           for value, ok in zip(values, fits, strict=True)], pa.string())
        return typed, missing, misfit


def fits_column(value, kind: str) -> bool:
    """Whether a decoded value goes into its column as it is: text with a lone surrogate has no UTF-8, and an integer
    past 2**53 in a float column would be rounded."""
    if value is None:
        return True
    if kind == "float":
        return isinstance(value, float) or -EXACT_DOUBLE_INTEGER <= value <= EXACT_DOUBLE_INTEGER
    return is_utf8(value)


def timestamps(values: list) -> tuple[pa.TimestampArray, pa.StringArray | None]:
    """Amplitude's time texts as UTC microseconds; texts of another shape stay as JSON text."""
    texts = pa.array(values, pa.string())
    if all_time_shaped(texts):
        with contextlib.suppress(ValueError):  # a 31st of February, a letter for a digit: checked below
            return times_of(texts), None
    fits = pc.match_substring_regex(texts, TIME_TEXT)
    if texts.null_count:
        fits = pc.fill_null(fits, True)
    every_one = fits.true_count == len(fits)
    try:
        typed = times_of(texts if every_one else pc.if_else(fits, texts, None))
    except ValueError:  # the right shape, not a real time (a 31st of February): one by one
        parsed = [parse_time(text) if ok else None for text, ok in zip(values, fits.to_pylist(), strict=True)]
        fits = pc.and_(fits, pa.array([value is None or time is not None for value, time in zip(values, parsed, strict=True)]))
        typed = pa.array([time if ok else None for time, ok in zip(parsed, fits.to_pylist(), strict=True)], UTC_MICROS)
        every_one = fits.true_count == len(fits)
    if every_one:
        return typed, None
    misfit = [None if ok else ENCODE(value).decode() for value, ok in zip(values, fits.to_pylist(), strict=True)]
    return typed, pa.array(misfit, pa.string())


def times_of(texts: pa.StringArray) -> pa.TimestampArray:
    """Time texts as UTC microseconds: a naive cast, then the same microseconds seen as UTC (no copy); ValueError
    when one is not a time, or one before year 1, which Arrow takes and no Python datetime holds."""
    typed = pc.cast(texts, pa.timestamp("us"))
    earliest = pc.min(typed).value
    if earliest is not None and earliest < YEAR_ONE:
        raise ValueError("a time before year 1")
    return typed.view(UTC_MICROS)


def all_time_shaped(texts: pa.StringArray) -> bool:
    """Whether every text that is not null has TIME_TEXT's length and its space where TIME_TEXT has it.

    If Arrow's ISO 8601 parser then takes every one (it checks each digit and separator, and refuses a zone for a
    timestamp without one), each is TIME_TEXT exactly: the length and the space leave no other shape it takes
    (tests/test_lake.py tries a thousand near misses). Two passes over the bytes cost a sixth of the regular
    expression.
    """
    if texts.null_count == len(texts):
        return False
    lengths = pc.min_max(pc.binary_length(texts))
    spaces = pc.min_max(pc.find_substring(texts, " "))
    return (lengths["min"].as_py() == lengths["max"].as_py() == TIME_BYTES
            and spaces["min"].as_py() == spaces["max"].as_py() == TIME_SPACE)


def parse_time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.UTC) if text else None
    except ValueError:
        return None


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def raw_text_column(raws: list) -> pa.StringArray:
    """Raw JSON values as one string array, built from their bytes in one piece ("" where there is none)."""
    offsets = array.array("i", itertools.accumulate(map(len, raws), initial=0))
    return pa.StringArray.from_buffers(len(raws), pa.py_buffer(offsets), pa.py_buffer(b"".join(raws)))


def member_text(key: str, texts: pa.StringArray) -> pa.StringArray:
    """`"key":<json>,` where the row has a value, else null."""
    present = pc.if_else(pc.equal(texts, ""), None, texts)
    return pc.binary_join_element_wise(json.dumps(key) + ":", present, ",", "")


def absent_text(columns: list[tuple[str, pa.BooleanArray | str | None]], rows: int) -> pa.StringArray:
    """A JSON array of the documented keys each row lacks; null where it has them all."""
    columns = [(key, missing) for key, missing in columns if missing is not None]
    if all(missing is EVERY_ROW or missing.true_count == rows for _, missing in columns):  # as a rule
        text = "[" + ",".join(json.dumps(key) for key, _ in columns) + "]"
        return pa.repeat(pa.scalar(text if columns else None, pa.string()), rows)
    parts = [pa.repeat(pa.scalar(json.dumps(key) + ",", pa.string()), rows) if missing is EVERY_ROW else
             pc.if_else(missing, json.dumps(key) + ",", None) for key, missing in columns]
    return enclosed(parts, rows, "[", "]")


def enclosed(parts: list[pa.StringArray], rows: int, opening: str, closing: str) -> pa.StringArray:
    """Each row's parts that are not null (each ending in a comma) joined between brackets; null if none.

    Nulls are replaced by "" rather than skipped: Arrow's "skip" drops whole rows when one array is joined.
    """
    if not parts:
        return pa.nulls(rows, pa.string())
    joined = pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="")
    inner = pc.utf8_slice_codeunits(joined, 0, -1)
    return pc.if_else(pc.equal(joined, ""), None, pc.binary_join_element_wise(opening, inner, closing, ""))


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]))
    except (BrokenPipeError, KeyboardInterrupt):  # the parent stopped reading: it has what it needs, or failed
        sys.exit(1)
    except Exception as exc:  # one line for the parent's message
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        sys.exit(1)
