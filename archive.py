"""The unzip stage: an Export API archive in, checked event lines and their event types out.

Members are read in hour order, each decompressed as a stream by ISA-L on the reading thread; lines come in batches of
about a megabyte, a line costing about its own length however long it is; every line is checked to be one JSON
object in UTF-8, and its event type read for the counts. What the archive readers raise means a damaged archive
(download it again); a line that is not an event fails its window (downloading again would not help).
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import itertools
import json
import logging
import re
import struct
import sys
import zipfile

import msgspec
import simdjson
from isal import igzip

from errors import first_text_line
from logging_config import printable
from windows import FIRST_YEAR, HOUR, LAST_YEAR, Window

log = logging.getLogger("fetch_data")

CHUNK_BYTES = 1 << 20
MIN_READ_BYTES = 64 << 10
MAX_BATCH_LINES = 20_000
MAX_FAST_FAILURES = 16  # odd lines in a batch before the rest of it is checked line by line
UTF8_BOM = b"\xef\xbb\xbf"
SAMPLE_BYTES = 80  # the start of a refused line a message may show, when no field rules are asked for
NO_EVENT_TYPE = "(no event_type)"
GZIP_MAGIC = b"\x1f\x8b"
# Seen in Amplitude archives: <project>/<project>_<YYYY-MM-DD>_<H>#<N>.json.gz, the hour not zero-padded. A name
# without the part number (#N) still gives its hour, as part 0.
MEMBER_NAME = re.compile(r"_(\d{4}-\d{2}-\d{2})_(\d{1,2})(?:#(\d+))?\.json(?:\.gz)?$")
# Names of files that are not data: macOS resource forks and folders some zip tools add.
NOT_DATA_MEMBER = re.compile(r"(^|/)(__MACOSX/|\._)")
# Reading a zip's directory costs about 600 bytes of memory a member, and zipfile holds the directory itself while it
# reads it. Amplitude files an hour in one member or a few, each with a short name: an archive listing more, or with
# a larger directory, is split like one Amplitude finds too large, so that memory stays bounded.
MAX_MEMBERS = 50_000
MAX_DIRECTORY_BYTES = 8 << 20  # zipfile reads entries until this many bytes are read, whatever the count says
# Deflate cannot expand data more than 1,032 times, and a zip's compression barely shrinks a gzip of real events
# further, so no honest member holds more than about that many times its bytes in the archive. One that does is a
# decompression bomb (a zip of a gzip of repeated bytes multiplies both layers): it would fill the disk first.
MAX_EXPANSION = 1100
EXPANSION_SLACK_BYTES = 1 << 20  # a member of a few bytes may expand past the ratio and still be tiny
# simdjson, which checks every line, lets through nesting up to this deep. The decoders after it (msgspec under field
# rules and for the lake, json for a pseudonym's text) count each level against Python's recursion limit of 1,000.
MAX_NESTING = 1024
# A whole line checked for being one JSON object without building its values (see long_event_type).
LONG_EVENT = msgspec.json.Decoder(dict[str, msgspec.Raw])


class CorruptArchive(Exception):
    """The 200 body is not a readable zip of gzip members: download it again."""


class BadEvent(Exception):
    """A line that is not an event, or longer than allowed: the window fails, naming the member and line.

    The message names the member, the line, its length and the reason; `with_content` adds the line's first bytes,
    which the pipeline shows only when no field rules are asked for (they could hold personal data).
    """

    def __init__(self, member: str, number: int, reason: str, sample: bytes = b"", length: int | None = None):
        super().__init__(f"{printable(member)} line {number}: {reason}")
        self.member, self.number, self.reason = member, number, reason
        self.sample = sample
        self.length = length

    def with_content(self) -> str:
        if not self.sample:
            return str(self)
        return f"{self} ({self.length} bytes, starting {self.sample!r})"

    def without_content(self) -> str:
        return f"{self} ({self.length} bytes)" if self.length is not None else str(self)


@contextlib.contextmanager
def damage_is_corrupt():
    """Whatever zipfile, gzip or the decompressor raise (bad CRC, encryption, an unknown compression method, a name
    that cannot be decoded, ...) means the archive is damaged: the caller undoes it and downloads it again."""
    try:
        yield
    except (BadEvent, CorruptArchive):
        raise
    except Exception as exc:
        raise CorruptArchive(f"{type(exc).__name__}: {first_text_line(exc)}") from None


def allow_checked_nesting() -> None:
    """Let the decoders after the check go as deep as the check lets a line go, with the stack below them: under
    field rules or --lake an event the plain export accepts must not fail as a RecursionError."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), MAX_NESTING + 1000))


def directory_of(zip_path) -> tuple[int, int] | None:
    """(entries, bytes) of a zip's directory, from its end record alone; None when it has none (not a zip).

    zipfile reads the end record the same way before it builds an object for every entry; the standard library
    offers no public way to read the count without building them all.
    """
    with open(zip_path, "rb") as zip_file:
        try:
            end = zipfile._EndRecData(zip_file)
        except zipfile.BadZipFile:  # a zip spread over several disks: reading it says so, as a damaged archive
            return None
    return (end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]) if end else None


def members_in_order(archive: zipfile.ZipFile, span: Window) -> list[zipfile.ZipInfo]:
    """The archive's data members in hour order, once it is checked; the others, and hours outside the window, warned
    of."""
    archive.NameToInfo = {}  # members are opened by their ZipInfo: a second index of 100,000 names is waste
    ensure_apart(archive)
    members, skipped = sort_members(archive.infolist())
    for name in skipped:
        log.warning("%s: skipping archive member %s, not a data file (.json or .json.gz)", span, name)
    outside, hourless = stray_members(members, span)
    for name in outside:
        log.warning("%s: archive member %s is named for an hour outside the window; exporting it", span, name)
    for name in hourless:
        log.warning("%s: archive member %s names no hour from %d to %d; the window's events are counted by window, "
                    "not by hour", span, name, FIRST_YEAR, LAST_YEAR)
    if not members:  # Amplitude says "no data" with a 404: a 200 without data may come from something between
        log.warning("%s: the archive holds no data member; recorded as 0 events (if events were expected, export "
                    "these hours again with --refetch)", span)
    return members


def read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, max_event_bytes: int):
    """(member, first line number, lines) of one member, decompressed as it is read."""
    max_bytes = member.compress_size * MAX_EXPANSION + EXPANSION_SLACK_BYTES
    with archive.open(member) as raw, open_member(raw) as events:
        yield from read_lines(events, member.filename, max_event_bytes, max_bytes)


def open_member(raw):
    """A gzip member is decompressed as it is read; a member of plain JSON lines is read as it is.

    Decompression stays on the reading thread: on isal's own thread it had to take the interpreter lock back from
    the thread checking lines for every block it handed over, and checking a 250 MB day took half as long again.
    """
    if raw.peek(2)[:2] != GZIP_MAGIC:
        return contextlib.nullcontext(raw)
    return igzip.IGzipFile(fileobj=raw, mode="rb")


def read_lines(stream, member: str, max_event_bytes: int, max_bytes: int | None = None):
    """Batches of complete lines, about CHUNK_BYTES at a time, without the newline or a leading byte-order mark.

    A line that spans whole chunks is kept as a list of pieces, joined once when it ends, so it costs about its own
    length and linear time; it comes alone in its batch. A line over `max_event_bytes` fails once that much of it
    is read, and a member over `max_bytes` once that much of it is read.
    """
    tail = b""  # the unfinished end of the last chunk
    pieces: list[bytes] = []  # whole chunks without a newline that followed it
    held = 0  # bytes of the unfinished line: tail and pieces
    line_number = 1
    read_size = MIN_READ_BYTES  # grows to CHUNK_BYTES at once unless the lines are tiny
    budget = max_bytes
    while chunk := stream.read(min(read_size, max_event_bytes + 1 - held)):
        if budget is not None:
            budget -= len(chunk)
            if budget < 0:
                raise BadEvent(member, line_number, f"expands to more than {max_bytes} bytes, over {MAX_EXPANSION} "
                               "times its size in the archive: a decompression bomb, not an export")
        if b"\n" not in chunk:
            pieces.append(chunk)
            held += len(chunk)
            ensure_short(held, max_event_bytes, member, line_number)
            continue
        if pieces:
            first_end = chunk.index(b"\n")
            ensure_short(held + first_end, max_event_bytes, member, line_number)
            long_line = b"".join([tail, *pieces, chunk[:first_end]])
            tail, pieces = b"", []
            yield member, line_number, without_boms([long_line])
            line_number += 1
            chunk = chunk[first_end + 1 :]
        text_size = len(tail) + len(chunk)
        lines = chunk.split(b"\n")  # the tail joins the first line only: no copy of the whole chunk
        if tail:
            lines[0] = tail + lines[0]
        tail = lines.pop()
        held = len(tail)
        if text_size > max_event_bytes:
            for offset, line in enumerate(lines):
                ensure_short(len(line), max_event_bytes, member, line_number + offset)
        ensure_short(held, max_event_bytes, member, line_number + len(lines))
        if lines:
            # memchr finds the BOM's first byte about fifty times faster than a search for all three.
            has_bom = lines[0].startswith(UTF8_BOM) or (UTF8_BOM[:1] in chunk and UTF8_BOM in chunk)
            yield member, line_number, without_boms(lines) if has_bom else lines
            line_number += len(lines)
            # Each line is a Python object of 40 bytes or more: a megabyte of tiny lines would cost tens of megabytes.
            read_size = min(CHUNK_BYTES, max(MIN_READ_BYTES, text_size * MAX_BATCH_LINES // len(lines)))
    if tail or pieces:
        yield member, line_number, without_boms([b"".join([tail, *pieces])])


def ensure_short(size: int, max_event_bytes: int, member: str, line_number: int) -> None:
    if size > max_event_bytes:
        raise BadEvent(member, line_number, f"longer than {max_event_bytes} bytes (--max-event-bytes); "
                       "raise the limit if such events are expected")


def without_boms(lines: list[bytes]) -> list[bytes]:
    """A UTF-8 byte-order mark is an encoding marker, not part of the event that follows it."""
    return [line[len(UTF8_BOM):] if line.startswith(UTF8_BOM) else line for line in lines]


def check_events(lines: list[bytes], member: str, first_line_number: int, parser,
                 blanks_gone: bool = False) -> tuple[list[bytes], list[str]]:
    """The lines that are events, each checked to be one UTF-8 JSON object, and their event types; blank lines
    are dropped."""
    if len(lines) == 1 and len(lines[0]) > CHUNK_BYTES:
        return lines, [long_event_type(lines[0], member, first_line_number)]
    if b"" in lines and not blanks_gone:  # empty lines go at C speed, however many
        return without_blanks(lines, list(filter(None, lines)), member, first_line_number, parser)
    parse = parser.parse
    types: list = []
    blanks: list[int] = []
    failures = 0
    rest = iter(lines)
    while True:
        try:
            for line in rest:
                types.append(parse(line)["event_type"])
            break
        except Exception as exc:  # a blank line, an event without event_type, JSON simdjson refuses (big integers)
            failures += 1
            position = len(types) + len(blanks)
            if failures > MAX_FAST_FAILURES and not blanks_gone and not lines[position].strip():
                # A batch of lines of spaces: all of them go at C speed, and the rest is checked as usual.
                return without_blanks(lines, list(itertools.compress(lines, map(bytes.strip, lines))), member,
                                      first_line_number, parser)
            # An exception costs microseconds: after the first missing key, or many odd lines (a batch of lines of
            # spaces), the rest of the batch is looked at line by line.
            closely = isinstance(exc, KeyError) or failures > MAX_FAST_FAILURES
            careful = itertools.islice(lines, position, None) if closely else [lines[position]]
            for number, line in enumerate(careful, first_line_number + position):
                name = event_type_of(line, member, number, parser)
                if name is None:
                    blanks.append(number - first_line_number)
                else:
                    types.append(name)
            if closely:
                break
    if set(map(type, types)) - {str}:  # an event_type that is not text: its proxy is gone already
        return check_slowly(lines, member, first_line_number, parser)
    if blanks:
        dropped = set(blanks)
        lines = [line for position, line in enumerate(lines) if position not in dropped]
    return lines, types


def without_blanks(lines: list[bytes], kept: list[bytes], member: str, first_line_number: int, parser):
    """check_events of the batch without its blank lines; a bad line is then named from the whole batch."""
    try:
        return check_events(kept, member, first_line_number, parser, blanks_gone=True)
    except BadEvent:
        return check_slowly(lines, member, first_line_number, parser)


def check_slowly(lines: list[bytes], member: str, first_line_number: int, parser) -> tuple[list[bytes], list[str]]:
    events, types = [], []
    for number, line in enumerate(lines, first_line_number):
        name = event_type_of(line, member, number, parser)
        if name is not None:
            events.append(line)
            types.append(name)
    return events, types


def event_type_of(line: bytes, member: str, number: int, parser) -> str | None:
    """The event type of a line that is one JSON object; None for a blank line; a BadEvent for anything else."""
    if not line.strip():
        return None
    try:
        value = parser.parse(line)
        if type(value) is simdjson.Object:
            if b'"event_type"' not in line:  # no key by that name, unless written with escapes: json looks then
                if b"\\" not in line:
                    return NO_EVENT_TYPE
            else:
                name = value["event_type"]
                if type(name) is str:
                    return name
    except Exception as exc:
        if str(exc).startswith("DEPTH_ERROR"):  # json would go deeper, and the decoders after the check fail there
            raise BadEvent(member, number, f"nested deeper than {MAX_NESTING} levels", line[:SAMPLE_BYTES],
                           len(line)) from None
    try:
        # Decoded as UTF-8 first: json.loads would take UTF-16 and UTF-32 bytes too, which no JSON reader expects.
        value = json.loads(line.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        return type_name(value.get("event_type"))
    raise not_an_event(member, number, line)


def long_event_type(line: bytes, member: str, number: int) -> str:
    """A line of megabytes, checked without building its values: simdjson and json would need three times its size."""
    try:
        event = LONG_EVENT.decode(mask_surrogates(line) or line)
        decoder = codecs.getincrementaldecoder("utf-8")()
        view = memoryview(line)
        for offset in range(0, len(view), CHUNK_BYTES):
            decoder.decode(view[offset : offset + CHUNK_BYTES])
        decoder.decode(b"", final=True)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError, RecursionError):
        raise not_an_event(member, number, line) from None  # RecursionError: nested deeper than any decoder goes
    name = event.get("event_type")
    return type_name(None if name is None else json.loads(unmask_surrogates(bytes(name))))


def type_name(value) -> str:
    """An event type as the manifest counts it: its text, or its JSON when it is not text. A lone surrogate
    (valid JSON, which JavaScript writes for a cut emoji) is counted under its escape, `\\ud800`."""
    if not isinstance(value, str):
        return NO_EVENT_TYPE if value is None else json.dumps(value, ensure_ascii=False)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def not_an_event(member: str, number: int, line: bytes) -> BadEvent:
    return BadEvent(member, number, "not a JSON object in UTF-8", line[:SAMPLE_BYTES], len(line))


# Lone surrogates: `"\ud800"` is valid JSON that msgspec refuses to decode. Their escapes are masked (the escaping
# backslash doubled, so msgspec reads plain text) and unmasked after. A line that already holds the masked form as
# text would come back changed: such a line is refused rather than altered.
SURROGATE_ESCAPE = re.compile(rb"(\\+)(u[dD][89a-fA-F][0-9a-fA-F]{2})")
# Surrogate escapes, and pairs of them (an emoji written with escapes): fewer than two a pair means a lone one,
# which msgspec refuses. Two plain patterns: lookarounds would cost tens of microseconds a line.
ANY_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def mask_surrogates(line: bytes) -> bytes | None:
    """The line with every surrogate escape masked; None when it holds no lone one (pairs, an emoji written with
    escapes, msgspec reads as they are)."""
    if b"\\ud" not in line and b"\\uD" not in line:
        return None
    if len(ANY_SURROGATE.findall(line)) == 2 * len(SURROGATE_PAIR.findall(line)):
        return None
    escapes = text = False

    def mask(match):
        nonlocal escapes, text
        if len(match.group(1)) % 2 == 0:  # an escaped backslash, then the letters: text, not an escape
            text = True
            return match.group(0)
        escapes = True
        return match.group(1) + b"\\" + match.group(2)

    masked = SURROGATE_ESCAPE.sub(mask, line)
    if not escapes:
        return None
    if text:
        raise ValueError("holds both a lone surrogate and the text of one")
    return masked


def unmask_surrogates(data: bytes) -> bytes:
    """The inverse of mask_surrogates, for text that came out of a masked line."""
    if b"\\u" not in data:
        return data
    return SURROGATE_ESCAPE.sub(lambda m: m.group(1)[:-1] + m.group(2) if len(m.group(1)) % 2 == 0 else m.group(0), data)


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# Members: apart from each other, which are data, and their order.


LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, the fixed fields, then the name's and the extra field's lengths


def ensure_apart(archive: zipfile.ZipFile) -> None:
    """Entries whose bytes overlap (many names for one member: the same events many times over) are a damaged
    archive, never events to write twice."""
    end = 0
    for info in sorted(archive.infolist(), key=lambda entry: entry.header_offset):
        if info.header_offset < end:
            raise CorruptArchive(f"archive members overlap ({info.filename!r} starts inside the one before it)")
        archive.fp.seek(info.header_offset)
        signature, name_length, extra_length = LOCAL_HEADER.unpack(archive.fp.read(LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise CorruptArchive(f"no member where the directory says {info.filename!r} starts")
        end = info.header_offset + LOCAL_HEADER.size + name_length + extra_length + info.compress_size


def sort_members(members: list[zipfile.ZipInfo]) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """The data members in hour order, and the names of the others (folders excepted)."""
    named, unnamed, skipped = [], [], []
    for member in members:
        if member.is_dir():
            continue
        if not member.filename.lower().endswith((".json", ".json.gz")) or NOT_DATA_MEMBER.search(member.filename):
            skipped.append(member.filename)
        else:
            (named if MEMBER_NAME.search(member.filename) else unnamed).append(member)
    # One number a member as the key: an archive of 100,000 members sorts in a few megabytes. Equal hours and
    # parts keep the archive's order.
    named.sort(key=lambda m: member_order_key(m.filename))
    unnamed.sort(key=lambda m: m.filename)
    return named + unnamed, skipped


def stray_members(members: list[zipfile.ZipInfo], span: Window) -> tuple[list[str], list[str]]:
    """Names of members whose name gives an hour outside `span`, and of those whose name gives no hour."""
    outside, hourless = [], []
    for member in members:
        hour = member_hour(member.filename)
        if hour is None:
            hourless.append(member.filename)
        elif not span.start <= hour <= span.end:
            outside.append(member.filename)
    return outside, hourless


def member_hour(name: str) -> dt.datetime | None:
    """The hour a member's name gives; None for a name without one, or with a date or year no window can hold."""
    found = MEMBER_NAME.search(name)
    if not found:
        return None
    try:
        hour = dt.datetime.strptime(found.group(1), "%Y-%m-%d").replace(tzinfo=dt.UTC) + int(found.group(2)) * HOUR
    except (ValueError, OverflowError):
        return None
    return hour if FIRST_YEAR <= hour.year <= LAST_YEAR else None


def member_order_key(name: str) -> int:
    """Hour order for archive members named for their hour: date, hour, part number, as one number (the hour is not
    zero-padded in names)."""
    day, hour, part = MEMBER_NAME.search(name).groups()
    return (int(day.replace("-", "")) * 100 + int(hour)) << 64 | min(int(part or 0), (1 << 64) - 1)
