"""The store: manifest lines as typed records validated in one place, and files put in place without overwriting."""

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re

import pytest

import own_files
import store
from store import Export, Finished, Upload, parse_line, read_manifest, save_window
from tests.conftest import hour
from windows import Window

SHA = "a" * 64
GOOD = {"start": "20251101T00", "end": "20251101T23", "file": "a.json", "events": 3, "bytes": 10, "sha256": SHA,
        "finished_at": "2025-11-02T03:30:00Z"}
UPLOAD = {"start": "20251101T00", "end": "20251101T23", "file": "a.json", "blob": "p/a.json", "sha256": SHA,
          "uploaded_at": "2025-11-02T03:31:00Z"}


def line(record: dict) -> bytes:
    return json.dumps(record).encode()


def test_an_export_line_and_an_upload_line_are_their_records():
    export = parse_line(line(GOOD | {"hours": {"20251101T00": 3}, "event_types": {"a": 3}, "policy": {"x": 1}}))
    assert isinstance(export, Export) and export.size == 10 and export.hours == {"20251101T00": 3}
    assert export.window == Window(hour("20251101T00"), hour("20251101T23"))
    assert isinstance(parse_line(line(UPLOAD)), Upload)
    # A field a later version adds does not make the line unreadable.
    assert parse_line(line(GOOD | {"lake_version": 4})).file == "a.json"


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"events": "x"}, "Expected `int`, got `str` - at `$.events`"),
        ({"bytes": -1}, "Expected `int` >= 0"),
        ({"sha256": "zz"}, "at `$.sha256`"),
        ({"file": "../etc/passwd"}, "is not a file name in the data folder"),
        ({"file": "sub/a.json"}, "is not a file name in the data folder"),
        ({"start": "00010101T00"}, "the year is outside 2000 to 2100"),
        ({"end": "99991231T23"}, "the year is outside 2000 to 2100"),
        ({"start": "20251301T00"}, "20251301T00: no such hour"),
        ({"start": "20250229T00"}, "20250229T00: no such hour"),
        ({"end": "20251101T24"}, "20251101T24: no such hour"),
        ({"start": "2025-11-01"}, "at `$.start`"),
        ({"end": "20251031T23"}, "end 20251031T23 is before start 20251101T00"),
        ({"hours": {"20251101T00": "many"}}, "at `$.hours"),
        # The report and the lake read these as hours: a damaged one would stop them later, in the middle of a run.
        ({"hours": {"garbage": 5}}, "at `key` in `$.hours`"),
        ({"hours": {"20251101T00": 3, "20251399T99": 5}}, "20251399T99: no such hour"),
        ({"runs": [["20251101T00", 2], ["20250230T01", 1]]}, "20250230T01: no such hour"),
        ({"runs": [["2025110100", 2]]}, "at `$.runs"),
        ({"hours": {"20251101T00": 3, "20250101T00": 10**18}}, "its hours count 1000000000000000003 events, not the 3"),
        ({"runs": [[None, 2], ["20251101T00", 2]]}, "its runs count 4 events, not the 3 it records"),
        ({"event_types": []}, "at `$.event_types`"),
    ],
)
def test_a_damaged_line_says_what_is_wrong(changes, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_line(line(GOOD | changes))


@pytest.mark.parametrize("text", [b"not json", b"[1, 2]", b'"text"', b"{}", b'{"start": "20251101T00"}', b"\xff\xfe"])
def test_foreign_lines_are_not_records(text):
    with pytest.raises(ValueError):
        parse_line(text)


def test_read_manifest_names_each_bad_line_by_file_and_number_and_keeps_the_rest(tmp_path, caplog):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b"\n".join([line(GOOD), line(GOOD | {"events": "x"}), b"", b"garbage", line(UPLOAD)]) + b"\n")
    with caplog.at_level(logging.WARNING):
        records = read_manifest(manifest)
    assert [type(r).__name__ for r in records] == ["Export", "Upload"]
    warnings = [r.getMessage() for r in caplog.records]
    assert [w.split(" is not")[0] for w in warnings] == [f"{manifest} line {n}" for n in (2, 3, 4)]
    assert all(w.endswith("; ignored") for w in warnings)


def test_a_line_longer_than_any_record_is_named_and_skipped_without_being_read_whole(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(store, "MAX_LINE_BYTES", 400)
    monkeypatch.setattr(store, "READ_BYTES", 64)
    exact = line(GOOD | {"note": ""})
    exact = line(GOOD | {"note": "x" * (400 - len(exact) - 1)})  # with its newline, as long as a line may be
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b"\n".join([line(GOOD), b"x" * 5000, exact, b"{" + b" " * 401, line(UPLOAD)]) + b"\n")
    with caplog.at_level(logging.WARNING):
        records = read_manifest(manifest)
    assert [type(r).__name__ for r in records] == ["Export", "Export", "Upload"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{manifest} line {n} is not a manifest record (longer than 400 bytes); ignored" for n in (2, 4)]


def test_a_huge_journal_is_not_read_whole(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(store, "MAX_LINE_BYTES", 400)
    huge = line(GOOD)[:-1] + b" " * 5000 + b"}"  # a record only when read whole
    (tmp_path / store.JOURNAL_NAME).write_bytes(huge)
    assert store.read_own_file(tmp_path / store.JOURNAL_NAME) == huge[:401]
    with caplog.at_level(logging.WARNING):
        store.finish_interrupted_save(tmp_path)
    assert "does not describe a file in the data folder; ignored" in caplog.text
    assert not (tmp_path / store.JOURNAL_NAME).exists() and not (tmp_path / store.MANIFEST_NAME).exists()


def test_a_data_file_is_read_only_if_it_is_still_a_regular_file(tmp_path):
    """Checked by type and size first, a file may be swapped meanwhile for a link to /dev/zero or a pipe, which
    would never end: such a file is not read."""
    (tmp_path / "a.json").write_bytes(b"[]\n")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.json")
    assert store.file_sha256(tmp_path / "a.json") == hashlib.sha256(b"[]\n").hexdigest()
    for name in ("zero.json", "pipe.json"):
        assert store.file_sha256(tmp_path / name) is None
        with pytest.raises(OSError):
            own_files.open_regular(tmp_path / name)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_folder_the_file_system_cannot_sync_is_no_failure_but_a_failing_disk_is(tmp_path, monkeypatch, code):
    """An SMB share (Azure Files) refuses to sync a folder with EINVAL: the export must not fail there, while an
    error of the disk itself still fails the save."""
    def fsync(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(own_files.os, "fsync", fsync)
    error = code
    own_files.fsync_folder(tmp_path)
    error = errno.EIO
    with pytest.raises(OSError, match="Input/output error"):
        own_files.fsync_folder(tmp_path)


def test_a_torn_last_line_is_cut_only_by_a_run_holding_the_lock(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(line(GOOD) + b"\n" + line(GOOD)[:20])
    assert len(read_manifest(manifest, repair=False)) == 1
    assert manifest.read_bytes().endswith(line(GOOD)[:20])
    assert len(read_manifest(manifest)) == 1
    assert manifest.read_bytes() == line(GOOD) + b"\n"


def test_records_are_written_as_they_are_read(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    record = parse_line(line(GOOD | {"hours": {"20251101T00": 3}, "event_types": {"a": 3}}))
    store.append_manifest(manifest, record)
    assert json.loads(manifest.read_bytes()) == GOOD | {"hours": {"20251101T00": 3}, "event_types": {"a": 3}}


def finished(tmp_path, content=b"[]\n") -> Finished:
    temp = tmp_path / ".ampl-x.part"
    temp.write_bytes(content)
    window = Window(hour("20251101T00"), hour("20251101T23"))
    return Finished(window, temp, 0, len(content), hashlib.sha256(content).hexdigest(), 0.1, None, {})


def test_a_second_file_in_the_same_minute_takes_the_name_with_its_window(tmp_path):
    started = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)
    now = started + dt.timedelta(seconds=5)

    def names(window):
        return store.output_names(started, "ampl_dump", ".json", window, several=False)

    first = finished(tmp_path, b"[]\n")
    one = save_window(first, tmp_path, names(first.window), None, now)
    second = finished(tmp_path, b"[\n{}\n]\n")
    two = save_window(second, tmp_path, names(second.window), None, now)
    third = finished(tmp_path, b"[\n{},{}\n]\n")
    three = save_window(third, tmp_path, names(third.window), None, now)
    assert [one.file, two.file, three.file] == [
        "20251107_0330_ampl_dump.json",
        "20251107_0330_ampl_dump_20251101T00-20251101T23.json",
        "20251107_0330_ampl_dump_20251101T00-20251101T23_2.json",
    ]
    assert (tmp_path / one.file).read_bytes() == b"[]\n"
    assert [r.file for r in read_manifest(tmp_path / "manifest.jsonl")] == [one.file, two.file, three.file]
    assert not list(tmp_path.glob(".ampl-*"))


# A damaged manifest line, end to end: one clear line in every mode, never a traceback.


def test_a_report_of_a_manifest_with_no_record_names_its_damaged_lines(cli):
    cli.data.mkdir(parents=True)
    (cli.data / "manifest.jsonl").write_bytes(b'\xff\xfe not json\n{"a":1}\n[1,2]\n')
    result = cli.run("--report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for number in (1, 2, 3):
        assert f"{cli.data / 'manifest.jsonl'} line {number} is not a manifest record (" in result.stderr
    assert "records no export: give a range with --date or --start/--end" in result.stderr


@pytest.mark.parametrize(
    "damage",
    [b'{"start":"20251101T00","end":"20251101T23","file":"x.json","events":"x","bytes":1,"sha256":"' + SHA.encode() +
     b'","finished_at":"z"}', b'{"start":"00010101T00","end":"99991231T23","file":"x.json","events":1,"bytes":1,'
     b'"sha256":"' + SHA.encode() + b'","finished_at":"z"}', b"\x00\xff not json at all", b"[]"],
)
@pytest.mark.parametrize("mode", [(), ("--verify",), ("--report",), ("--report", "--verify")])
def test_a_damaged_manifest_line_is_named_in_every_mode(cli, standin, damage, mode):
    assert cli.run("--date", "2025-11-01").returncode == 0
    with open(cli.data / "manifest.jsonl", "ab") as manifest:
        manifest.write(damage + b"\n")
    standin.requests.clear()
    result = cli.run("--date", "2025-11-01", *mode)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{cli.data / 'manifest.jsonl'} line 2 is not a manifest record (" in result.stderr
    assert standin.requests == []  # the intact line still counts: nothing is exported again


def test_a_temporary_file_gone_while_a_stop_signal_cleans_up_is_passed_over(tmp_path, monkeypatch):
    """A download thread may rename or remove its file between the listing and the look at each entry: the stop
    must go on, not fail the window being written with a FileNotFoundError."""
    import temp_files

    kept = tmp_path / f"{temp_files.TEMP_PREFIX}a{temp_files.TEMP_SUFFIX}"
    kept.write_bytes(b"x")
    gone = tmp_path / f"{temp_files.TEMP_PREFIX}b{temp_files.TEMP_SUFFIX}"
    listed = [gone, kept]
    monkeypatch.setattr(type(tmp_path), "glob", lambda self, pattern: iter(listed))
    temp_files.remove_temp_files(tmp_path, quiet=True)
    assert not kept.exists()
