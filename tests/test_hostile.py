"""Hostile servers, odd archives and stray files: no hour lost, no night hung, nothing touched outside the data folder.

Each test runs fetch_data.py as a subprocess against the stand-in over a real socket, as a user would.
"""

import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
import zlib

import pytest

import archive
import writer
from amplitude_standin import NOT_FOUND_TEXT, build_archive, member_name
from tests.conftest import as_array, hour, wait_for

DAY = ("--date", "2025-11-01")
DAY_START, DAY_END = hour("20251101T00"), hour("20251101T23")
TWO_DAYS = ("--start", "2025-11-01", "--end", "2025-11-02")


def packed(hour_text: str, part: int, content: bytes, compress=True) -> tuple[str, bytes]:
    return member_name(hour(hour_text), part), gzip.compress(content) if compress else content


def only_output(cli):
    outputs = cli.outputs()
    assert len(outputs) == 1, outputs
    return outputs[0]


# 1. A 404 that is not Amplitude's "no data"


@pytest.mark.parametrize(
    "body",
    ["<html><head><title>404 Not Found</title></head><body>nginx</body></html>", '{"message":"Not Found"}', ""],
)
def test_a_404_that_is_not_no_data_fails_and_the_next_run_exports_the_hours(cli, standin, body):
    standin.add_fault(404, body=body)
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert f"HTTP 404 for {standin.base_url}/api/2/export is not Amplitude's 'no data' answer" in result.stderr
    assert "check --base-url (AMP_BASE_URL) and --region" in result.stderr
    assert cli.manifest() == [] and cli.outputs() == []
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))


def test_a_wrong_base_url_path_is_never_an_empty_export(cli, standin):
    result = cli.run(*DAY, AMP_BASE_URL=standin.base_url + "/v1")
    assert result.returncode == 1
    assert f"HTTP 404 for {standin.base_url}/v1/api/2/export is not Amplitude's 'no data' answer" in result.stderr
    assert cli.manifest() == []


def test_a_base_url_that_already_ends_in_the_export_path_is_taken_as_the_host(cli, standin):
    result = cli.run(*DAY, AMP_BASE_URL=standin.base_url + "/api/2/export/")
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in standin.requests] == ["/api/2/export"]


def test_amplitudes_own_404_is_still_an_empty_window(cli, standin):
    standin.add_fault(404, body=NOT_FOUND_TEXT)
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == b"[]\n"


# 2. Bounded lines


def test_a_line_longer_than_max_event_bytes_fails_naming_member_and_line(cli, standin):
    long_line = b'{"event_type":"x","blob":"' + b"a" * 5000 + b'"}'
    standin.add_fault("members", members=[packed("20251101T03", 0, b'{"a":1}\n{"b":2}\n' + long_line + b"\n")])
    result = cli.run(*DAY, "--max-event-bytes", "4096")
    assert result.returncode == 1
    assert f"{member_name(hour('20251101T03'), 0)} line 3: longer than 4096 bytes (--max-event-bytes)" in result.stderr
    assert len(standin.requests) == 1  # not retried: the same archive would fail the same way
    assert cli.outputs() == [] and cli.leftovers() == []


def test_a_line_at_the_limit_passes(cli, standin):
    line = b'{"blob":"' + b"a" * (4096 - 11) + b'"}'
    assert len(line) == 4096
    standin.add_fault("members", members=[packed("20251101T03", 0, line + b"\n")])
    result = cli.run(*DAY, AMP_MAX_EVENT_BYTES="4096")
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == as_array([line])


class CountingStream:
    """A member that never ends a line: counts what the reader takes from it."""

    def __init__(self, limit=10**9):
        self.taken = 0
        self.limit = limit

    def read(self, size):
        size = min(size, self.limit - self.taken)
        self.taken += size
        return b"a" * size


def test_a_line_that_never_ends_is_refused_after_reading_at_most_the_limit():
    stream = CountingStream()
    with pytest.raises(archive.BadEvent, match="m.json.gz line 1: longer than 3000000 bytes"):
        list(archive.read_lines(stream, "m.json.gz", 3_000_000))
    assert stream.taken == 3_000_001


def test_long_lines_are_joined_once_and_alone_in_their_batch():
    long_line = b'{"k":"' + b"x" * (3 * archive.CHUNK_BYTES) + b'"}'
    content = b'{"a":1}\n' + long_line + b'\n{"b":2}\n{"c":3}'
    batches = list(archive.read_lines(io.BytesIO(content), "m", 10 * archive.CHUNK_BYTES))
    assert [line for _, _, lines in batches for line in lines] == [b'{"a":1}', long_line, b'{"b":2}', b'{"c":3}']
    assert ("m", 2, [long_line]) in batches
    assert archive.check_events([long_line], "m", 2, None) == ([long_line], ["(no event_type)"])
    typed = b'{"event_type":"big one","blob":"' + b"x" * (2 * archive.CHUNK_BYTES) + b'"}'
    assert archive.check_events([typed], "m", 2, None) == ([typed], ["big one"])
    with pytest.raises(archive.BadEvent, match="m line 2: not a JSON object in UTF-8"):
        archive.check_events([long_line[:-1]], "m", 2, None)
    with pytest.raises(archive.BadEvent, match="m line 2: not a JSON object in UTF-8"):
        archive.check_events([long_line[:100] + b"\xff" + long_line[100:]], "m", 2, None)


# 3. A damaged archive never stops the run


def patched_archive(name: str, flag_bits=0, method=None, raw_name: bytes | None = None) -> bytes:
    """A one-member zip with its header fields set as a broken or exotic zip tool would set them."""
    body = build_archive([(name, gzip.compress(b'{"a":1}\n'))])
    central = body.rindex(b"PK\x01\x02")
    # Local header: flags at offset 6, method at 8; central directory entry: flags at 8, method at 10.
    for local_offset, central_offset, value in ((6, 8, flag_bits or None), (8, 10, method)):
        if value is not None:
            for offset in (local_offset, central + central_offset):
                body = body[:offset] + value.to_bytes(2, "little") + body[offset + 2 :]
    if raw_name is not None:
        body = body.replace(name.encode(), raw_name)
    return body


@pytest.mark.parametrize(
    "body, reason",
    [
        (patched_archive(member_name(hour("20251101T01"), 0), flag_bits=0x1), "encrypted"),
        (patched_archive(member_name(hour("20251101T01"), 0), method=99), "NotImplementedError"),
        (patched_archive("187520/187520_2025-11-01_1#0.json.gz", flag_bits=0x800,
                         raw_name=b"187520/187520_2025-11-01_\xff#0.json.gz"), "UnicodeDecodeError"),
    ],
    ids=["encrypted", "unknown-compression", "undecodable-name"],
)
def test_a_damaged_archive_is_retried_then_fails_its_window_and_the_others_go_on(cli, standin, body, reason):
    standin.add_fault("body", start="20251101T00", body=body, times=3)
    result = cli.run(*TWO_DAYS, "--max-attempts", "3")
    assert result.returncode == 1
    assert result.stderr.count("the archive is damaged") >= 3
    assert result.stderr.count("; waiting 0s before attempt") == 2
    assert re.search(rf"Window 20251101T00-20251101T23 failed: Max fetch attempts reached .*{reason}", result.stderr)
    assert "1 window(s) exported" in result.stderr and "1 failed" in result.stderr
    assert [r["start"] for r in cli.manifest()] == ["20251102T00"]
    assert "Traceback" not in result.stderr
    assert cli.leftovers() == []


# 4. Members


def test_plain_members_are_read_odd_members_skipped_and_stray_hours_flagged(cli, standin):
    plain = packed("20251101T02", 0, b'{"n":2}\n', compress=False)
    plain_named_json = ("187520/187520_2025-11-01_3#0.json", b'{"n":3}\n')
    stray = packed("20251105T07", 0, b'{"n":9}\n')
    members = [
        packed("20251101T01", 0, b'{"n":1}\n'), plain, plain_named_json, stray,
        ("readme.txt", b"not data"), ("__MACOSX/187520/._187520_2025-11-01_1#0.json.gz", b"\x00\x05\x16\x07"),
    ]
    standin.add_fault("members", members=members)
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == as_array([b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":9}'])
    assert "skipping archive member readme.txt, not a data file" in result.stderr
    assert "skipping archive member __MACOSX/187520/._187520_2025-11-01_1#0.json.gz" in result.stderr
    assert f"archive member {stray[0]} is named for an hour outside the window; exporting it" in result.stderr


def test_members_named_for_no_hour_a_window_can_hold_are_exported_and_counted_by_window(cli, standin):
    names = ["187520/187520_1970-01-01_0#0.json.gz", "187520/187520_9999-12-31_23#0.json.gz",
             "187520/187520_2025-02-30_5#0.json.gz", "events.json.gz"]
    members = [(name, gzip.compress(b'{"n":%d}\n' % number)) for number, name in enumerate(names)]
    standin.add_fault("members", members=[packed("20251101T03", 0, b'{"n":9}\n'), *members], times=2)
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    for name in names:
        assert (f"archive member {name} names no hour from 2000 to 2100; the window's events are counted by window, "
                "not by hour") in result.stderr
    (record,) = cli.manifest()
    assert record["events"] == 5 and "hours" not in record
    standin.requests.clear()
    assert cli.run(*DAY).returncode == 0 and standin.requests == []


@pytest.mark.parametrize("members", [[], [("readme.txt", b"not data")]])
def test_a_200_without_data_is_recorded_as_empty_with_a_warning(cli, standin, members):
    """Amplitude says "no data" with a 404; a zip without data may come from something between, so it is said."""
    standin.add_fault("members", members=members)
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == b"[]\n"
    assert ("20251101T00-20251101T23: the archive holds no data member; recorded as 0 events (if events were "
            "expected, export these hours again with --refetch)") in result.stderr


def test_an_archive_listing_more_members_than_any_export_has_is_split_before_its_directory_is_read(cli, standin):
    listed = archive.MAX_MEMBERS + 1
    standin.add_fault("members", members=[packed("20251101T05", part, b"") for part in range(listed)])
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert (f"the archive lists {listed:,} members, more than {archive.MAX_MEMBERS:,}; "
            "splitting into 20251101T00-20251101T11 and 20251101T12-20251101T23") in result.stderr
    assert [(r["start"], r["end"]) for r in standin.requests] == [
        ("20251101T00", "20251101T23"), ("20251101T00", "20251101T11"), ("20251101T12", "20251101T23")]
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))
    assert cli.leftovers() == []


def bomb(events_mb: int) -> bytes:
    """A zip deflating a gzip of repeated events: each layer multiplies the other's expansion."""
    line = b'{"event_type":"a","user_id":"someone@example.com"}\n'
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = line * ((1 << 20) // len(line))
    member = b"".join(compressor.compress(block) for _ in range(events_mb)) + compressor.flush()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        out.writestr(member_name(hour("20251101T04"), 0), member)
    return buffer.getvalue()


@pytest.mark.parametrize("extra", [(), ("--hash-fields", "user_id"), ("--lake", "lake")])
def test_a_decompression_bomb_fails_its_window_at_once_before_it_fills_the_disk(cli, standin, extra):
    body = bomb(200)
    assert len(body) < 10_000  # 200 MB of events in a few kilobytes
    standin.add_fault("body", body=body, times=5)
    result = cli.run(*DAY, *extra, AMP_HASH_KEY="k" * 32)
    assert result.returncode == 1
    assert re.search(r"_4#0\.json\.gz line \d+: expands to more than \d+ bytes, over 1100 times its size in the "
                     r"archive: a decompression bomb, not an export", result.stderr), result.stderr
    assert len(standin.requests) == 1  # the same archive again would not help
    assert cli.outputs() == [] and cli.leftovers() == []
    assert "someone@example.com" not in result.stderr


def test_the_most_one_layer_of_deflate_can_expand_is_an_export(tmp_path):
    """A gzip at its highest ratio (about 1,030 to 1) stays under the cap, which only a second layer over repeated
    bytes, or bzip2 and lzma members, can pass."""
    content = b"{}\n" * 3_000_000
    packed_member = gzip.compress(content, 9)
    assert len(content) / len(packed_member) > 1000
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_STORED) as out:
        out.writestr(member_name(hour("20251101T04"), 0), packed_member)
    with zipfile.ZipFile(tmp_path / "a.zip") as export:
        batches = archive.read_member(export, export.infolist()[0], 1 << 20)
        assert sum(len(lines) for _, _, lines in batches) == 3_000_000


def test_a_member_over_its_byte_budget_fails_once_that_much_is_read():
    stream = io.BytesIO(b'{"event_type":"a"}\n' * 200_000)
    with pytest.raises(archive.BadEvent, match=r"^m line \d+: expands to more than 1000000 bytes"):
        for _ in archive.read_lines(stream, "m", 1 << 20, 1_000_000):
            pass
    assert stream.tell() <= 1_000_000 + archive.CHUNK_BYTES


def test_a_window_of_ten_thousand_long_odd_event_types_is_recorded_and_resumed(cli, standin):
    """Each type's name counted whole, escaped in JSON, made a manifest line no run could read back: the window was
    exported again every night."""
    count = writer.MAX_TYPES + 1
    lines = b"".join(b'{"event_type":"%d%s"}\n' % (number, b"\\u0001" * 1100) for number in range(count))
    standin.add_fault("members", members=[packed("20251101T00", 0, lines)], times=2)
    assert cli.run(*DAY).returncode == 0
    (record,) = cli.manifest()
    assert record["events"] == count and len(record["event_types"]) == writer.MAX_TYPES
    standin.requests.clear()
    again = cli.run(*DAY)
    assert again.returncode == 0 and standin.requests == [] and len(cli.outputs()) == 1
    assert "damaged" not in again.stderr


@pytest.mark.parametrize("extra", [(), ("--hash-fields", "user_id", "--drop-fields", "p"), ("--lake", "lake")])
def test_nesting_the_check_accepts_is_an_event_in_every_mode_and_deeper_is_refused_at_once(cli, standin, extra):
    """The check (simdjson) takes 1,024 levels; the decoders of the field rules and the lake go as deep, so a line
    the plain export takes never fails them as a RecursionError (a damaged archive, fetched again and again)."""
    def nested(levels: int) -> bytes:  # the event's object is the first level
        return b'{"event_type":"a","user_id":"u","p":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}\n"

    standin.add_fault("members", members=[packed("20251101T03", 0, nested(archive.MAX_NESTING))])
    taken = cli.run(*DAY, *extra, AMP_HASH_KEY="k" * 32)
    assert taken.returncode == 0, taken.stderr
    standin.add_fault("members", members=[packed("20251101T03", 0, nested(archive.MAX_NESTING + 1))])
    refused = cli.run(*DAY, "--refetch", *extra, AMP_HASH_KEY="k" * 32)
    assert refused.returncode == 1
    assert "_3#0.json.gz line 1: nested deeper than 1024 levels" in refused.stderr
    assert len(standin.requests) == 2  # refused at once: fetching the archive again would not help


# 5. Valid JSON out, always


def test_byte_order_marks_are_dropped_and_the_output_parses(cli, standin):
    bom = b"\xef\xbb\xbf"
    standin.add_fault("members", members=[
        packed("20251101T01", 0, bom + b'{"n":1}\n' + bom + b'{"n":2}\n{"n":"\xef\xbb\xbf kept inside"}\n'),
        packed("20251101T02", 0, bom + b'{"n":3}\n', compress=False),
    ])
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    content = only_output(cli).read_bytes()
    assert content == as_array([b'{"n":1}', b'{"n":2}', b'{"n":"\xef\xbb\xbf kept inside"}', b'{"n":3}'])
    assert [event["n"] for event in json.loads(content)][:2] == [1, 2]


@pytest.mark.parametrize(
    "line",
    [
        '{"city":"München"}'.encode("utf-16"),
        '{"city":"München"}'.encode("utf-16-le"),
        '{"city":"München"}'.encode("utf-32"),
        b'{"city":"M\xfcnchen"}',  # latin-1
        b'{"a":"\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "latin-1", "surrogate"],
)
def test_a_line_that_is_not_utf8_json_fails_naming_member_and_line(cli, standin, line):
    standin.add_fault("members", members=[packed("20251101T04", 1, b'{"ok":1}\n' + line + b"\n")])
    result = cli.run(*DAY, "--format", "jsonl")
    assert result.returncode == 1
    assert f"{member_name(hour('20251101T04'), 1)} line 2: not a JSON object in UTF-8" in result.stderr
    assert cli.outputs() == []


# 6. A deadline for every attempt


@pytest.mark.slow
def test_a_server_that_trickles_is_abandoned_at_the_attempt_timeout_and_retried(cli, standin):
    standin.add_fault("trickle", seconds=0.05)
    began = time.monotonic()
    result = cli.run(*DAY, "--attempt-timeout", "1.5", "--read-timeout", "1")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 20
    assert "no whole answer within 1.5s (--attempt-timeout); attempt abandoned; waiting 0s before attempt 2" in result.stderr
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))
    assert cli.leftovers() == []
    assert cli.run(*DAY, "--refetch").returncode == 0  # the lock was released


@pytest.mark.slow
def test_an_attempt_timeout_on_every_attempt_fails_the_window(cli, standin):
    standin.add_fault("trickle", seconds=0.05, times=2)
    result = cli.run(*DAY, "--max-attempts", "2", AMP_ATTEMPT_TIMEOUT="0.5")
    assert result.returncode == 1
    assert "Max fetch attempts reached" in result.stderr and "--attempt-timeout" in result.stderr
    assert cli.outputs() == [] and cli.leftovers() == []


# 7. Only the data folder


def exported_record(cli, **changes) -> dict:
    assert cli.run(*DAY).returncode == 0
    record = cli.manifest()[0]
    return {**record, **changes}


def test_a_journal_naming_a_file_outside_the_data_folder_is_ignored(cli, standin, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_bytes(b"[]\n")
    journal = {"start": "20251102T00", "end": "20251102T23", "file": str(outside), "events": 0, "bytes": 3,
               "sha256": hashlib.sha256(b"[]\n").hexdigest(), "finished_at": "2025-11-03T00:00:00Z"}
    cli.data.mkdir()
    (cli.data / ".ampl-commit.json").write_text(json.dumps(journal))
    result = cli.run(*TWO_DAYS)
    assert result.returncode == 0, result.stderr
    assert ".ampl-commit.json does not describe a file in the data folder; ignored" in result.stderr
    assert all(str(outside) not in json.dumps(r) for r in cli.manifest())
    assert [r["start"] for r in cli.manifest()] == ["20251101T00", "20251102T00"]
    assert outside.read_bytes() == b"[]\n"


@pytest.mark.parametrize("missing", ["sha256", "bytes", "file", "events"])
def test_a_journal_missing_a_field_is_ignored_without_a_traceback(cli, standin, missing):
    record = exported_record(cli)
    (cli.data / "manifest.jsonl").write_text("")
    del record[missing]
    (cli.data / ".ampl-commit.json").write_text(json.dumps(record))
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert "does not describe a file in the data folder; ignored" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", [".lock", "manifest.jsonl", ".ampl-commit.json"])
def test_a_symbolic_link_among_the_exporters_own_files_is_refused(cli, standin, tmp_path, name):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n")
    cli.data.mkdir()
    (cli.data / name).symlink_to(target)
    result = cli.run(*DAY)
    assert result.returncode == 2  # bad input: nothing is requested
    assert f"{name} is a symbolic link; remove it" in result.stderr
    assert standin.requests == []
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"do not touch\n"


@pytest.mark.parametrize("name, make, modes", [(".lock", os.mkfifo, [()]),  # a report takes no lock
                                               ("manifest.jsonl", os.mkfifo, [(), ("--report",)]),
                                               ("manifest.jsonl", os.mkdir, [(), ("--report",)])])
def test_a_special_file_among_the_exporters_own_files_is_refused_without_hanging(cli, standin, name, make, modes):
    cli.data.mkdir()
    make(cli.data / name)
    for mode in modes:
        result = cli.run(*DAY, *mode)
        assert result.returncode == 2, result.stderr
        assert f"{name} is not a regular file; remove it" in result.stderr
        assert "Traceback" not in result.stderr
    assert standin.requests == []


def test_only_regular_files_under_temporary_names_are_removed(cli, standin, tmp_path):
    """A folder, a link or a pipe named like a temporary file was put there by someone else: left alone."""
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n")
    cli.data.mkdir()
    (cli.data / ".ampl-folder.part").mkdir()
    (cli.data / ".ampl-folder.part" / "inner").write_bytes(b"kept")
    (cli.data / ".ampl-link.part").symlink_to(target)
    os.mkfifo(cli.data / ".ampl-pipe.part")
    (cli.data / ".ampl-stale.json.part").write_bytes(b"[\n{}")
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    for name in (".ampl-folder.part", ".ampl-link.part", ".ampl-pipe.part"):
        assert f"{cli.data / name} is not a file the exporter made; left alone" in result.stderr
    assert f"Removing {cli.data / '.ampl-stale.json.part'}, left by an interrupted run" in result.stderr
    assert not (cli.data / ".ampl-stale.json.part").exists()
    assert (cli.data / ".ampl-folder.part" / "inner").read_bytes() == b"kept"
    assert (cli.data / ".ampl-link.part").is_symlink() and target.read_bytes() == b"do not touch\n"
    assert len(cli.outputs()) == 1


def test_a_journal_link_is_refused_when_the_window_is_saved_too(cli, standin, tmp_path):
    """The journal is written just before the rename: a link planted there is never followed."""
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n")
    standin.gate = threading.Event()  # the answer waits until the link is planted
    process = cli.start(*DAY)
    wait_for(lambda: standin.arrived == 1)
    (cli.data / ".ampl-commit.json").symlink_to(target)
    standin.gate.set()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert ".ampl-commit.json is a symbolic link; remove it" in stderr
    assert target.read_bytes() == b"do not touch\n"
    assert cli.leftovers() == [cli.data / ".ampl-commit.json"]  # the link; no temporary file


@pytest.mark.parametrize("replacement", ["symlink", "directory"])
def test_a_data_file_replaced_by_a_link_or_a_folder_is_not_exported(cli, standin, tmp_path, replacement):
    record = exported_record(cli)
    path = cli.data / record["file"]
    copy = tmp_path / "copy.json"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    if replacement == "symlink":
        path.symlink_to(copy)
    else:
        path.mkdir()
        (path / "filler").write_bytes(b"x" * record["bytes"])
    standin.requests.clear()
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert len(standin.requests) == 1
    assert copy.read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))


# 8. HTTP


def test_plain_http_to_another_host_is_a_usage_error(cli, standin):
    result = cli.run(*DAY, AMP_BASE_URL="http://analytics.eu.amplitude.com")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: AMP_BASE_URL: the keys would travel unencrypted to analytics.eu.amplitude.com; "
        "use https:// (http:// is for 127.0.0.1 only)"
    ]
    assert standin.requests == []


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_fails_naming_where_it_pointed(cli, standin, status):
    standin.add_fault(status, headers={"Location": "https://collector.example.net/steal"})
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert f"HTTP {status}: {standin.base_url}/api/2/export redirects to collector.example.net" in result.stderr
    assert len(standin.requests) == 1
    assert cli.manifest() == []


def test_a_400_that_is_not_too_large_fails_at_once_without_splitting(cli, standin):
    standin.add_fault(400, body="Invalid parameter: start\nmore")
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert "Amplitude answered HTTP 400: Invalid parameter: start" in result.stderr
    assert len(standin.requests) == 1


@pytest.mark.slow
def test_retry_after_as_an_http_date_is_honoured(cli, standin):
    when = NOW + dt.timedelta(seconds=30)
    standin.add_fault(429, retry_after=when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    process = cli.start(*DAY, now=NOW)  # the run's clock stands at NOW: the date is exactly 30 s away
    log_file = cli.logs / "log_20251107_033012.log"
    wait_for(lambda: log_file.exists() and "waiting" in log_file.read_text())
    assert process.poll() is None  # still waiting: not the 2 x 0 s a missing Retry-After would give
    process.kill()
    process.communicate(timeout=10)
    assert "rate limit exceeded (HTTP 429); waiting 30s before attempt 2" in log_file.read_text()


# 10. A log file that cannot be written


NOW = dt.datetime(2025, 11, 7, 3, 30, 12, tzinfo=dt.UTC)


# A run makes its log file anew, passing over a name already taken: the full disk is given to it by name.
WITH_THE_LOG_ON_A_FULL_DISK = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); import logging_config; "
    "logging_config.new_log_file = lambda folder, now: folder / 'full.log'; "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_with_the_log_on_a_full_disk(cli, *args) -> subprocess.CompletedProcess:
    cli.logs.mkdir()
    (cli.logs / "full.log").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    command = [sys.executable, "-c", WITH_THE_LOG_ON_A_FULL_DISK, str(cli.project), str(cli.project / "fetch_data.py"),
               *args]
    return subprocess.run(command, cwd=cli.workdir, env=cli.env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_a_log_file_that_cannot_be_written_leaves_the_run_and_its_exit_code_alone(cli, standin):
    result = run_with_the_log_on_a_full_disk(cli, *DAY)
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("Cannot write the log file") == 1
    assert "No space left on device); logging to stderr only" in result.stderr
    assert "Summary:" in result.stderr
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))


def test_the_log_file_failing_does_not_change_a_failure_exit_code(cli, standin):
    standin.add_fault(418)
    result = run_with_the_log_on_a_full_disk(cli, *DAY)
    assert result.returncode == 1
    assert "Logging error" not in result.stderr
    assert result.stderr.count("Cannot write the log file") == 1
    assert "Amplitude answered HTTP 418" in result.stderr
