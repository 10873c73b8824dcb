"""EventWriter: the file layouts, gzip members, rollback of a damaged download, the hash of what is on disk."""

import gzip
import hashlib
import json

import pytest

from tests.conftest import as_array, as_jsonl
from writer import EventWriter

LINES = [b'{"a":1}', b'{"b":"\xc3\xa9","big":18446744073709551616}', b'{"c":"\\u00e9"}']


def written(tmp_path, file_format, use_gzip, batches):
    writer = EventWriter(tmp_path / "out.part", file_format, use_gzip)
    for batch in batches:
        writer.write_events(batch)
    writer.finish()
    content = (tmp_path / "out.part").read_bytes()
    assert writer.size == len(content)
    assert writer.sha256() == hashlib.sha256(content).hexdigest()
    return writer, gzip.decompress(content) if use_gzip else content


@pytest.mark.parametrize("use_gzip", [False, True])
@pytest.mark.parametrize("file_format, layout", [("json", as_array), ("jsonl", as_jsonl)])
def test_layouts(tmp_path, file_format, layout, use_gzip):
    writer, content = written(tmp_path, file_format, use_gzip, [LINES[:1], [], LINES[1:]])
    assert content == layout(LINES)
    assert writer.events == 3


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
