"""Nothing personal or secret escapes and no input explodes: each case runs fetch_data.py against the stand-in over a
socket, with data an attacker or a broken client could send."""

import datetime as dt
import gzip
import io
import json
import re
import socket
import struct
import zipfile

import pytest

from amplitude_standin import member_name
from tests.conftest import hour

DAY = ("--date", "2025-11-01")
KEY = "k" * 20 + "-a-secret-of-32+chars"
RULES = ("--drop-fields", "ip_address,event_properties.email", "--hash-fields", "device_id,user_id")
ESC = "\x1b"


def serve(standin, *lines: bytes, name: str | None = None) -> None:
    """The next answer: one member of these lines."""
    content = b"".join(line + b"\n" for line in lines)
    standin.add_fault("members", members=[(name or member_name(hour("20251101T03"), 0), gzip.compress(content))])


def written(cli) -> bytes:
    (output,) = cli.outputs()
    return output.read_bytes()


def everything_shown(result, cli) -> str:
    logs = "".join(path.read_text(errors="replace") for path in cli.logs.glob("*.log"))
    return result.stdout + result.stderr + logs


# 1. A key written twice


@pytest.mark.parametrize("filler", [b"", b',"blob":"' + b"x" * (2 << 20) + b'"'], ids=["short", "over 1 MiB"])
def test_a_key_written_twice_carries_nothing_past_the_rules(cli, standin, filler):
    serve(standin,
          b'{"event_type":"a","device_id":"LEAK-1","device_id":null' + filler + b"}",
          b'{"event_type":"b","event_properties":{"email":"LEAK-2"},"event_properties":{}' + filler + b"}",
          b'{"event_type":"c","user_id":"u","event_properties":{"email":"LEAK-3","email":null}}')
    result = cli.run(*DAY, *RULES, AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    content = written(cli)
    assert b"LEAK" not in content
    events = json.loads(content)
    assert events[0]["device_id"] is None and events[1]["event_properties"] == {}
    assert "LEAK" not in everything_shown(result, cli)


def test_without_rules_a_key_written_twice_stays_as_sent(cli, standin):
    line = b'{"event_type":"a","device_id":"x","device_id":null}'
    serve(standin, line)
    assert cli.run(*DAY).returncode == 0
    assert written(cli) == b"[\n" + line + b"\n]\n"


# 5. Lone surrogates


LONE = [b'{"event_type":"cut \\ud83d","user_id":"\\udfff","device_id":"d","note":"\\ud800 and \\ud83d\\ude80"}',
        b'{"event_type":"ok","user_id":"u","blob":"' + b"y" * (2 << 20) + b'\\ud800"}']


@pytest.mark.parametrize("rules", [(), RULES], ids=["as sent", "with field rules"])
def test_lone_surrogates_are_accepted_and_written_as_sent(cli, standin, rules):
    serve(standin, *LONE)
    result = cli.run(*DAY, *rules, AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    content = written(cli)
    if not rules:
        assert content == b"[\n" + b",\n".join(LONE) + b"\n]\n"
    assert b"\\ud83d\\ude80" in content and b"cut \\ud83d" in content
    (record,) = cli.manifest()
    assert record["event_types"] == {"cut \\ud83d": 1, "ok": 1}


def test_a_report_of_lone_surrogates_prints_on_a_terminal_that_knows_only_ascii(cli, standin):
    assert cli.run("--date", "2025-10-31").returncode == 0
    serve(standin, b'{"event_type":"\\ud800 M\\u00fcnchen \xf0\x9f\x8e\x89"}')
    assert cli.run(*DAY).returncode == 0
    result = cli.run("--report", "--start", "2025-10-31", "--end", "2025-11-01", PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # Counted under its escape, and what ascii cannot show comes out escaped too.
    assert "\\ud800 M\\xfcnchen \\U0001f389 appeared" in result.stdout, result.stdout
    page = (cli.data / "report.html").read_bytes().decode("utf-8")
    assert "\\ud800 München 🎉" in page


# 6. Personal data in messages about refused lines


def test_under_field_rules_a_refused_line_is_described_never_shown(cli, standin):
    serve(standin, b'{"event_type":"a","user_id":"u"}', b'{"email":"secret@example.com", "cut')
    result = cli.run(*DAY, *RULES, AMP_HASH_KEY=KEY)
    assert result.returncode == 1
    assert "secret@example.com" not in everything_shown(result, cli)
    assert re.search(r"line 2: not a JSON object in UTF-8 \(35 bytes\)", result.stderr), result.stderr


def test_without_rules_a_refused_line_shows_80_bytes_at_most_with_controls_escaped(cli, standin):
    line = b'{"a":"' + ESC.encode() + b'[2J' + b"z" * 200
    serve(standin, line)
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert ESC not in everything_shown(result, cli)
    shown = re.search(r"starting b'(.*)'\)", result.stderr).group(1)
    assert shown.startswith('{"a":"\\x1b[2J') and shown.count("z") == 80 - 10


# 7. Terminal and log injection


def test_control_characters_from_the_data_are_escaped_in_everything_printed(cli, standin):
    events = gzip.compress(b'{"event_type":"\\u001b[2J\\u001b]0;owned\\u0007"}\n{"event_type":"x"}\n')
    standin.add_fault("members", members=[(member_name(hour("20251101T03"), 0), events),
                                          ("notes\n2025-11-01 00:00:00,000 - ERROR - forged.txt", b"skipped")])
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    shown = everything_shown(result, cli)
    assert ESC not in shown and "\x07" not in shown
    assert not any(line.startswith("2025-11-01 00:00:00,000 - ERROR - forged") for line in shown.splitlines())
    assert "notes\\x0a2025-11-01 00:00:00,000 - ERROR - forged.txt, not a data file" in result.stderr, result.stderr
    report = cli.run("--report", *DAY)
    assert ESC not in report.stdout + report.stderr


# 8. The report never replaces the exporter's own files


@pytest.mark.parametrize("target", ["manifest.jsonl", ".lock", ".ampl-commit.json", "EXPORT"])
def test_the_report_file_cannot_be_one_of_the_exporters_own(cli, standin, target):
    assert cli.run(*DAY).returncode == 0
    before = {path.name: path.read_bytes() for path in cli.data.iterdir() if path.is_file()}
    name = cli.outputs()[0].name if target == "EXPORT" else target
    result = cli.run("--report", "--report-file", str(cli.data / name))
    assert result.returncode == 2
    assert f"--report-file {cli.data / name}: that is one of the exporter's own files" in result.stderr
    assert {path.name: path.read_bytes() for path in cli.data.iterdir() if path.is_file()} == before


# 10. Limits on what a setting or the clock can ask for


def test_a_clock_in_year_one_is_one_line(cli, standin):
    result = cli.run(now=dt.datetime(1, 1, 1, 0, 30, tzinfo=dt.UTC))
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: the system clock says 0001-01-01 00:30 UTC; set it right before exporting"


def test_a_range_of_more_windows_than_a_run_plans_is_one_line(cli, standin):
    result = cli.run("--start", "2000-01-01", "--end", "2025-01-01", "--window-hours", "1")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("Error: 219192 hours in windows of 1 would be more than 100000 windows")
    assert standin.requests == []


# 2. Plain http is for a stand-in on this machine, never through a proxy


def test_plain_http_to_this_machine_never_goes_through_a_proxy(cli, standin):
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        proxy.setblocking(False)
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        result = cli.run(*DAY, "--max-attempts", "1", "--read-timeout", "2", HTTP_PROXY=address, http_proxy=address,
                         ALL_PROXY=address, all_proxy=address)
        assert result.returncode == 0, result.stderr
        with pytest.raises(BlockingIOError):
            proxy.accept()  # nobody knocked: the Basic credentials went to the stand-in only
    assert len(standin.requests) == 1


# 12. Zip entries that share their bytes


def one_member_named_many_times(copies: int) -> bytes:
    """A zip whose central directory lists the same member `copies` times: one member's bytes, many entries."""
    single = io.BytesIO()
    with zipfile.ZipFile(single, "w") as archive:
        archive.writestr(member_name(hour("20251101T03"), 0), gzip.compress(b'{"event_type":"a"}\n'))
    raw = single.getvalue()
    end = raw.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<II", raw[end + 12 : end + 20])
    directory = raw[offset : offset + size]
    return raw[:offset] + directory * copies + raw[end : end + 8] + struct.pack(
        "<HHII", copies, copies, size * copies, offset) + raw[end + 20 :]


def test_entries_that_overlap_are_a_damaged_archive_never_events_written_twice(cli, standin):
    standin.add_fault("body", body=one_member_named_many_times(50), times=2)
    result = cli.run(*DAY, "--max-attempts", "2")
    assert result.returncode == 1
    assert "the archive is damaged (archive members overlap" in result.stderr
    assert cli.outputs() == [] and cli.manifest() == []
    assert result.stderr.count("Max fetch attempts reached") == 1
