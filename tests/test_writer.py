"""EventWriter: the file layouts, gzip members, rollback of a damaged download, the hash of what is on disk."""

import errno
import gzip
import hashlib
import json
import os

import msgspec
import pytest

import store
import writer
from tests.conftest import as_array, as_jsonl
from writer import EventWriter, Sink

LINES = [b'{"a":1}', b'{"b":"\xc3\xa9","big":18446744073709551616}', b'{"c":"\\u00e9"}']


def written(tmp_path, file_format, use_gzip, batches):
    out = EventWriter(tmp_path / "out.part", file_format, use_gzip)
    for batch in batches:
        out.write_events(batch)
    out.finish()
    content = (tmp_path / "out.part").read_bytes()
    assert out.size == len(content)
    assert out.sha256() == hashlib.sha256(content).hexdigest()
    return out, gzip.decompress(content) if use_gzip else content


@pytest.mark.parametrize("use_gzip", [False, True])
@pytest.mark.parametrize("file_format, layout", [("json", as_array), ("jsonl", as_jsonl)])
def test_layouts(tmp_path, file_format, layout, use_gzip):
    writer, content = written(tmp_path, file_format, use_gzip, [LINES[:1], [], LINES[1:]])
    assert content == layout(LINES)
    assert writer.events == 3


@pytest.mark.parametrize("use_gzip", [False, True])
@pytest.mark.parametrize("file_format", ["json", "jsonl"])
def test_a_block_joined_by_the_separator_is_written_as_its_lines_would_be(tmp_path, file_format, use_gzip):
    _, expected = written(tmp_path, file_format, use_gzip, [LINES[:1], LINES[1:]])
    blocks = EventWriter(tmp_path / "blocks.part", file_format, use_gzip)
    blocks.write_block(blocks.separator.join(LINES[:1]), 1)
    blocks.write_block(b"", 0)  # a batch of blank lines only: nothing, not even a separator
    blocks.write_block(blocks.separator.join(LINES[1:]), 2)
    blocks.finish()
    content = (tmp_path / "blocks.part").read_bytes()
    assert (gzip.decompress(content) if use_gzip else content) == expected
    assert blocks.events == 3 and blocks.sha256() == hashlib.sha256(content).hexdigest()


class Follower:
    """What the lake's feed is told, in order."""

    def __init__(self):
        self.told = []

    def put(self, block, count, hour):
        self.told.append(("put", block, count, hour))

    def end(self):
        self.told.append(("end",))

    def abort(self):
        self.told.append(("abort",))


@pytest.mark.parametrize("use_gzip", [False, True])
def test_a_follower_gets_each_batch_as_the_file_does_and_the_end_once_the_file_is_complete(tmp_path, use_gzip):
    out = EventWriter(tmp_path / "out.part", "json", use_gzip)
    out.follower = follower = Follower()
    out.write_batch(out.separator.join(LINES[:2]), "T00", ["a", "b"])
    out.write_batch(b"", None, [])  # blank lines only
    out.write_batch(LINES[2], None, ["c"])
    assert follower.told == [("put", b'{"a":1},\n' + LINES[1], 2, "T00"), ("put", b"", 0, None), ("put", LINES[2], 1, None)]
    out.finish()
    assert follower.told[-1] == ("end",) and len(follower.told) == 4
    assert dict(out.tally.hours) == {"T00": 2} and out.tally.unplaced == 1 and out.tally.runs == [["T00", 2], [None, 1]]


@pytest.mark.parametrize("undo", ["rollback", "discard"])
def test_a_follower_gives_up_when_written_events_are_taken_back(tmp_path, undo):
    out = EventWriter(tmp_path / "out.part", "jsonl", False)
    out.follower = follower = Follower()
    mark = out.mark()
    out.write_batch(LINES[0], "T00", ["a"])
    out.rollback(mark) if undo == "rollback" else out.discard()
    assert follower.told[-1] == ("abort",) and out.follower is None
    if undo == "rollback":  # the events fetched again go to the file only
        out.write_batch(LINES[0], "T00", ["a"])
        out.finish()
        assert follower.told == [("put", LINES[0], 1, "T00"), ("abort",)]


@pytest.mark.parametrize("use_gzip", [False, True])
def test_an_empty_export_is_an_empty_array_or_an_empty_file(tmp_path, use_gzip):
    _, array = written(tmp_path, "json", use_gzip, [])
    assert array == b"[]\n" and json.loads(array) == []
    (tmp_path / "out.part").unlink()
    _, lines = written(tmp_path, "jsonl", use_gzip, [])
    assert lines == b""


@pytest.mark.parametrize("file_format", ["json", "jsonl"])
@pytest.mark.parametrize("use_gzip", [False, True])
def test_rollback_undoes_exactly_the_events_since_the_mark(tmp_path, file_format, use_gzip):
    writer = EventWriter(tmp_path / "out.part", file_format, use_gzip)
    writer.write_events(LINES[:1])
    mark = writer.mark()
    writer.write_events([b'{"damaged":1}', b'{"damaged":2}'])
    writer.rollback(mark)
    second = writer.mark()
    writer.write_events(LINES[1:])
    writer.rollback(second)
    writer.write_events(LINES[1:])
    writer.finish()
    content = (tmp_path / "out.part").read_bytes()
    assert writer.sha256() == hashlib.sha256(content).hexdigest()
    assert writer.events == 3
    plain = gzip.decompress(content) if use_gzip else content
    assert plain == (as_array if file_format == "json" else as_jsonl)(LINES)


def test_discard_leaves_nothing(tmp_path):
    writer = EventWriter(tmp_path / "out.part", "json", False)
    writer.write_events(LINES)
    writer.discard()
    assert not list(tmp_path.iterdir())


def test_the_writer_never_overwrites(tmp_path):
    (tmp_path / "out.part").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        EventWriter(tmp_path / "out.part", "json", False)
    assert (tmp_path / "out.part").read_bytes() == b"keep"


def big_lines(count: int) -> list[bytes]:
    """Lines past the writer's gathering size, so each batch goes to its thread as it is."""
    return [b'{"n":%d,"pad":"%b"}' % (n, b"x" * Sink.GATHER_BYTES) for n in range(count)]


def test_written_bytes_are_synced_while_writing_goes_on(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(Sink, "SYNC_BYTES", Sink.GATHER_BYTES)
    monkeypatch.setattr(writer.os, "fdatasync", lambda fd: synced.append(os.fstat(fd).st_size))
    out = EventWriter(tmp_path / "out.part", "jsonl", False)
    for line in big_lines(3):
        out.write_events([line])
    out.mark()  # waits for the writer's thread
    # Each sync came after a flush (what it synced was in the file already), and before finish() only the
    # newline after the last line is left to sync.
    assert len(synced) == 3 and synced == sorted(synced) and out.size - synced[-1] == 1
    out.finish()
    content = (tmp_path / "out.part").read_bytes()
    assert content == as_jsonl(big_lines(3)) and out.sha256() == hashlib.sha256(content).hexdigest()


def test_a_failed_sync_fails_the_file(tmp_path, monkeypatch):
    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Sink, "SYNC_BYTES", Sink.GATHER_BYTES)
    monkeypatch.setattr(writer.os, "fdatasync", broken)
    out = EventWriter(tmp_path / "out.part", "jsonl", False)
    with pytest.raises(OSError, match="Input/output error"):
        for line in big_lines(3):
            out.write_events([line])
        out.finish()


def test_a_long_event_type_is_counted_under_its_first_200_characters():
    tally = writer.Tally()
    long_name = "x" * 5000
    tally.add(None, ["short", long_name, long_name + "y", "z" * 200])
    assert tally.types == {"short": 1, f"{'x' * 200}…": 2, "z" * 200: 1}


def test_the_most_event_types_a_window_counts_fit_a_manifest_line_a_run_reads_back():
    names = {f"{number:05d}{chr(1) * writer.MAX_TYPE_CHARS}": 1 for number in range(writer.MAX_TYPES)}
    tally = writer.Tally()
    tally.add(None, list(names))
    worst = msgspec.json.encode(dict(tally.types))
    assert len(tally.types) == writer.MAX_TYPES and len(worst) > 10 * writer.MAX_TYPES * writer.MAX_TYPE_CHARS // 2
    assert len(worst) + (1 << 20) < store.MAX_LINE_BYTES  # a megabyte left for the rest: a year of hours is 200 KB
