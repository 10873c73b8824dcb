"""The fetch stage against mocked HTTP (responses): requests sent, retries and their waits, each status, archives."""

import base64
import dataclasses
import datetime as dt
import gzip
import json

import pytest
import requests
import responses
import simdjson

import archive
import export_api
import fetch_data as fd
from amplitude_standin import build_archive, member_name
from errors import ExportError
from export_api import CONNECT_TIMEOUT, TooLarge, fetch
from member_workers import ArchiveReader
from settings import parse_settings
from tests.conftest import as_array, hour
from windows import Window
from writer import EventWriter

URL = "https://analytics.eu.amplitude.com/api/2/export"
SPAN = Window(hour("20251101T00"), hour("20251101T23"))


def member(hour_text: str, part: int, lines: list[bytes]) -> tuple[str, bytes]:
    return member_name(hour(hour_text), part), gzip.compress(b"\n".join(lines) + b"\n")


ARCHIVE_LINES = [b'{"n":1}', b'{"n":2,"city":"M\xc3\xbcnchen"}', b'{"n":3,"big":123456789012345678901234567890}']
ARCHIVE = build_archive([member("20251101T10", 0, ARCHIVE_LINES[2:]), member("20251101T09", 0, ARCHIVE_LINES[:2])])


@pytest.fixture
def settings(tmp_path):
    base = parse_settings(["--date", "2025-11-01"], {"AMP_API_KEY": "key", "AMP_SECRET_KEY": "secret"},
                             dt.datetime(2025, 11, 7, tzinfo=dt.UTC))
    return dataclasses.replace(base, data_dir=tmp_path)


@pytest.fixture
def session():
    with requests.Session() as s:
        s.auth = ("key", "secret")
        yield s


def fetch_into(writer, span, session, settings, sleep):
    """The fetch stage as the pipeline wires it: each downloaded archive written by write_to_local."""
    reader = ArchiveReader(settings.field_rules, settings.max_event_bytes)
    fetch(span, session, settings.api, lambda zip_path: fd.write_to_local(zip_path, writer, settings, reader, span),
          settings.data_dir, sleep=sleep)


def run_fetch(settings, session, tmp_path, span=SPAN):
    waits = []
    writer = EventWriter(tmp_path / "out.part", "json", gzip=False)
    try:
        fetch_into(writer, span, session, settings, waits.append)
        writer.finish()
    except BaseException:
        writer.discard()
        raise
    return (tmp_path / "out.part").read_bytes(), waits


@responses.activate
def test_request_carries_window_basic_auth_and_timeouts(settings, session, tmp_path):
    responses.get(URL, body=ARCHIVE, status=200)
    content, waits = run_fetch(settings, session, tmp_path)
    request = responses.calls[0].request
    assert request.params == {"start": "20251101T00", "end": "20251101T23"}
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"key:secret").decode()
    assert request.req_kwargs["timeout"] == (CONNECT_TIMEOUT, 300)
    assert request.req_kwargs["stream"] is True
    assert content == as_array(ARCHIVE_LINES)
    assert waits == []


@responses.activate
def test_server_errors_and_rate_limits_are_retried_with_the_seeds_waits(settings, session, tmp_path):
    for status in (500, 429, 503):
        responses.get(URL, status=status)
    responses.get(URL, status=429, headers={"Retry-After": "5"})
    responses.get(URL, body=ARCHIVE, status=200)
    content, waits = run_fetch(settings, session, tmp_path)
    assert waits == [1, 2, 1, 5]
    assert len(responses.calls) == 5
    assert json.loads(content)[0] == {"n": 1}


@responses.activate
def test_five_failures_end_in_max_fetch_attempts_reached(settings, session, tmp_path, caplog):
    responses.get(URL, status=502)
    with pytest.raises(ExportError, match="Max fetch attempts reached"):
        run_fetch(settings, session, tmp_path)
    assert len(responses.calls) == 5
    # The stage raises it; the pipeline logs it once, with its window.
    assert "Max fetch attempts reached" not in caplog.text
    assert not list(tmp_path.iterdir())


@responses.activate
def test_max_attempts_and_delay_are_knobs(settings, session, tmp_path):
    responses.get(URL, status=500)
    tuned = dataclasses.replace(settings, api=dataclasses.replace(settings.api, max_attempts=3, delay_seconds=0.25))
    writer = EventWriter(tmp_path / "x.part", "json", False)
    waits = []
    with pytest.raises(ExportError):
        fetch_into(writer, SPAN, session, tuned, waits.append)
    assert waits == [0.25, 0.25]
    assert len(responses.calls) == 3


@pytest.mark.parametrize(
    "failure",
    [requests.ConnectionError("refused"), requests.ReadTimeout("slow"), requests.exceptions.ChunkedEncodingError("cut")],
)
@responses.activate
def test_network_failures_are_retried(settings, session, tmp_path, failure):
    responses.get(URL, body=failure)
    responses.get(URL, body=ARCHIVE, status=200)
    content, waits = run_fetch(settings, session, tmp_path)
    assert waits == [1]
    assert content == as_array(ARCHIVE_LINES)


@pytest.mark.parametrize(
    "bad_body",
    [
        b"<html>edge error</html>",
        ARCHIVE[: len(ARCHIVE) // 2],
        build_archive([("p/p_2025-11-01_1#0.json.gz", b"\x1f\x8b\x08\x00broken")]),
    ],
    ids=["not-zip", "truncated", "bad-gzip"],
)
@responses.activate
def test_a_200_that_is_not_a_sound_archive_is_retried(settings, session, tmp_path, bad_body):
    responses.get(URL, body=bad_body, status=200)
    responses.get(URL, body=ARCHIVE, status=200)
    content, waits = run_fetch(settings, session, tmp_path)
    assert waits == [1]
    assert content == as_array(ARCHIVE_LINES)


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_rejected_credentials_fail_at_once(settings, session, tmp_path, status):
    responses.get(URL, status=status, body="Invalid API key")
    with pytest.raises(ExportError, match=r"rejected the credentials .*--region us"):
        run_fetch(settings, session, tmp_path)
    assert len(responses.calls) == 1


@responses.activate
def test_404_is_an_empty_window(settings, session, tmp_path):
    responses.get(URL, status=404, body="Raw data files were not found.")
    content, waits = run_fetch(settings, session, tmp_path)
    assert content == b"[]\n"
    assert waits == []


@responses.activate
def test_400_too_large_asks_for_a_split(settings, session, tmp_path):
    responses.get(URL, status=400, body="The file size of the exported data is too large.\nmore")
    with pytest.raises(TooLarge, match="HTTP 400: The file size of the exported data is too large.$"):
        run_fetch(settings, session, tmp_path)
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize("cap, splits", [(1, True), (2, False)])
def test_an_archive_listing_more_members_than_the_cap_asks_for_a_split(settings, session, tmp_path, monkeypatch,
                                                                      cap, splits):
    monkeypatch.setattr(export_api, "MAX_MEMBERS", cap)
    responses.get(URL, body=ARCHIVE, status=200)  # two members
    if splits:
        with pytest.raises(TooLarge, match="^the archive lists 2 members, more than 1$"):
            run_fetch(settings, session, tmp_path)
        assert not (tmp_path / "out.part").exists() and list(tmp_path.iterdir()) == []
    else:
        assert run_fetch(settings, session, tmp_path)[0] == as_array(ARCHIVE_LINES)
    assert len(responses.calls) == 1


@responses.activate
def test_an_archive_whose_directory_is_over_its_cap_asks_for_a_split(settings, session, tmp_path, monkeypatch):
    monkeypatch.setattr(export_api, "MAX_DIRECTORY_BYTES", 100)
    responses.get(URL, body=ARCHIVE, status=200)  # a directory of 165 bytes: two entries of 46 bytes and their names
    with pytest.raises(TooLarge, match=r"^the archive's directory takes 165 bytes, more than 100$"):
        run_fetch(settings, session, tmp_path)
    assert list(tmp_path.iterdir()) == []


@responses.activate
@pytest.mark.parametrize("announced", [True, False])
def test_an_answer_longer_than_any_export_asks_for_a_split_and_leaves_no_file(settings, session, tmp_path,
                                                                               monkeypatch, announced):
    monkeypatch.setattr(export_api, "MAX_ANSWER_BYTES", len(ARCHIVE) - 1)
    # Announced: refused before a byte is stored; not announced: refused once the bytes received pass the limit.
    responses.get(URL, body=ARCHIVE, status=200, headers={"Content-Length": str(len(ARCHIVE))} if announced else {})
    with pytest.raises(TooLarge, match=f"^the answer passed {len(ARCHIVE) - 1:,} bytes, more than Amplitude sends"):
        run_fetch(settings, session, tmp_path)
    assert list(tmp_path.iterdir()) == [] and len(responses.calls) == 1


@pytest.mark.parametrize("body, directory", [(ARCHIVE, (2, 2 * 46 + 37 + 36)), (b"", None), (b"PK\x05\x06", None),
                                             (b"<html>", None)])
def test_the_directory_of_an_archive_is_read_from_its_end_record(tmp_path, body, directory):
    (tmp_path / "a.zip").write_bytes(body)
    assert archive.directory_of(tmp_path / "a.zip") == directory


@responses.activate
def test_504_after_every_attempt_asks_for_a_split_of_a_long_window(settings, session, tmp_path):
    responses.get(URL, status=504)
    with pytest.raises(TooLarge, match="504"):
        run_fetch(settings, session, tmp_path)
    assert len(responses.calls) == 5


@responses.activate
def test_504_on_a_single_hour_is_a_plain_failure(settings, session, tmp_path):
    responses.get(URL, status=504)
    one_hour = Window(hour("20251101T03"), hour("20251101T03"))
    with pytest.raises(ExportError, match="Max fetch attempts reached"):
        run_fetch(settings, session, tmp_path, span=one_hour)


@responses.activate
def test_other_statuses_fail_with_the_status_and_first_body_line(settings, session, tmp_path):
    responses.get(URL, status=418, body="I'm a teapot\nsecond line")
    with pytest.raises(ExportError, match=r"^Amplitude answered HTTP 418: I'm a teapot$"):
        run_fetch(settings, session, tmp_path)


@responses.activate
def test_a_line_that_is_not_json_names_member_and_line(settings, session, tmp_path):
    bad = build_archive([member("20251101T04", 1, [b'{"ok":1}', b"", b'{"broken":'])])
    responses.get(URL, body=bad, status=200)
    with pytest.raises(ExportError, match=r"187520_2025-11-01_4#1\.json\.gz line 3: not a JSON object"):
        run_fetch(settings, session, tmp_path)
    assert len(responses.calls) == 1


@pytest.mark.parametrize("line", [b"[1, 2]", b'"text"', b"NaN", b'{"a": NaN}', b'{"a":"\xff"}', b'{"a":1} {"b":2}'])
def test_only_json_objects_pass_as_events(line):
    with pytest.raises(archive.BadEvent, match="m.json.gz line 8: not a JSON object"):
        archive.check_events([b'{"a":1}', line], "m.json.gz", 7, simdjson.Parser())


def test_events_are_kept_byte_for_byte_and_blank_lines_dropped():
    lines = [b'{"a":"\\u00fc","b":"\xc3\xbc"}', b"  ", b'{"big": 123456789012345678901234567890}', b'{ "spaced" : 1 }\r']
    assert archive.check_events(lines, "m", 1, simdjson.Parser()) == ([lines[0], lines[2], lines[3]], ["(no event_type)"] * 3)


@pytest.mark.parametrize(
    "lines, types",
    [
        ([b'{"event_type":"a"}', b'{"event_type":"b","n":1}'], ["a", "b"]),
        ([b'{"event_type":"a","big":123456789012345678901234567890}', b"", b'{"event_type":"b"}'], ["a", "b"]),
        ([b'{"event_type":{"nested":1}}', b'{"event_type":"x"}'], ['{"nested": 1}', "x"]),
        ([b'{"event_type":null}', b'{"event_type":7}', b"{}"], ["(no event_type)", "7", "(no event_type)"]),
        ([b'{"event_type":"Bestellung abgeschlossen"}', b'{"event_type":"\\u691c\\u7d22"}'],
         ["Bestellung abgeschlossen", "検索"]),
    ],
)
def test_event_types_are_read_from_every_event(lines, types):
    events, found = archive.check_events(lines, "m", 1, simdjson.Parser())
    assert found == types
    assert events == [line for line in lines if line.strip()]
