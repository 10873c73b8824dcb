"""The README is the manual: every flag and variable is in it, and .env.example lists exactly what the code reads."""

import logging
import re

import pytest

import archive
import fetch_data as fd
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
CODE = "".join(p.read_text() for p in ROOT.glob("*.py") if p.name != "amplitude_standin.py")
VARIABLES_READ = set(re.findall(r'"((?:AMP|AZURE)_[A-Z_]+)"', CODE))


def flags():
    return {option for action in fd.build_parser()._actions for option in action.option_strings if option.startswith("--")}


def test_every_flag_is_in_the_readme():
    missing = sorted(flag for flag in flags() if f"`{flag}" not in README)
    assert missing == []


def test_every_variable_is_in_the_readme():
    assert len(VARIABLES_READ) >= 14
    assert sorted(v for v in VARIABLES_READ if f"`{v}`" not in README) == []


def test_env_example_lists_exactly_the_variables_the_code_reads():
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert listed == VARIABLES_READ


def test_the_quick_start_commands_are_the_ones_ci_runs():
    assert "bash test.sh" in README
    assert "bash test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "fetch_data.py --demo" in README


def troubleshooting_quotes() -> list[str]:
    """The messages quoted in the first column of the README's troubleshooting table."""
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [quote for row in rows[1:] for quote in re.findall(r"`([^`]+)`", row) if quote != "[]"]


def messages_the_program_prints(tmp_path, monkeypatch, caplog) -> list[str]:
    """Every message the table quotes, produced by the code that prints it."""
    import dataclasses
    import datetime as dt
    import socket
    import subprocess
    import sys

    import requests
    import responses
    import simdjson

    import azure_upload
    from logging_config import LogFileHandler

    now = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)
    keys = {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}
    messages = []

    def usage_error(argv, env, files=()):
        with pytest.raises(fd.UsageError) as caught:
            fd.parse_settings(argv, env, now, files)
        return f"Error: {caught.value}"

    def failure(call, *args):
        with pytest.raises((fd.ExportError, fd.Retryable, archive.BadEvent)) as caught:
            call(*args)
        return str(caught.value)

    def answer(status, body="", headers=None):
        return fd.Answer(status, headers or {}, body, "https://analytics.eu.amplitude.com/api/2/export")

    for python_flags in (["-S"], ["-c", "import sys, runpy; sys.version_info = (3, 10, 13); "
                                       f"runpy.run_path({str(ROOT / 'fetch_data.py')!r}, run_name='__main__')"]):
        script = [] if "-c" in python_flags else [str(ROOT / "fetch_data.py")]
        run = subprocess.run([sys.executable, *python_flags, *script], capture_output=True, text=True, timeout=60)
        messages.append(run.stderr)
    messages.append(usage_error([], {}, (tmp_path / ".env", ROOT / ".env")))
    messages.append(usage_error([], {**keys, "AMP_BASE_URL": "http://analytics.eu.amplitude.com"}))
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)
    messages.append(usage_error(["--upload"], {**keys, "AZURE_STORAGE_CONNECTION_STRING": "x"}))
    monkeypatch.undo()
    messages += [failure(fd.classify, answer(status, body, headers), 1) for status, body, headers in (
        (401, "", None), (404, "<html>", None), (302, "", {"Location": "https://elsewhere.example/"}))]

    settings = dataclasses.replace(fd.parse_settings(["--date", "2025-11-01"], keys, now), data_dir=tmp_path,
                                   max_attempts=1, attempt_timeout=0.2, delay_seconds=0)
    hour = fd.Window(settings.windows[0].start, settings.windows[0].start)
    writer = fd.EventWriter(tmp_path / "out.part", "json", False)
    with responses.RequestsMock() as mocked, requests.Session() as session:
        url = settings.base_url + fd.EXPORT_PATH
        mocked.get(url, status=502)
        mocked.get(url, status=400, body="The file size of the exported data is too large.")
        messages.append(failure(fd.fetch, hour, writer, session, settings, simdjson.Parser(), lambda _: None))
        messages.append(failure(fd.export_span, hour, writer, session, settings, simdjson.Parser()))
    writer.discard()
    for error, base_url in (
        (requests.ConnectionError(socket.gaierror(-2, "Name or service not known")), "https://no-such-host.invalid"),
        (requests.ConnectionError(ConnectionRefusedError(111, "Connection refused")), "http://127.0.0.1:9"),
        (requests.exceptions.SSLError("handshake failed"), "https://127.0.0.1:9"),
    ):
        messages.append(fd.describe_failure(error, dataclasses.replace(settings, base_url=base_url)))

    class SlowSession:
        def get(self, *args, **kwargs):
            import time

            time.sleep(1)
            raise requests.ConnectionError("late")

    messages.append(failure(fd.download, SlowSession(), hour, settings, tmp_path / "slow.zip"))
    messages.append(failure(archive.ensure_short, 20, 10, "m.json.gz", 3))
    messages.append(failure(archive.check_events, [b"not json"], "m.json.gz", 3, simdjson.Parser()))
    (tmp_path / "manifest.jsonl").symlink_to(tmp_path / "elsewhere")
    messages.append(failure(fd.read_own_file, tmp_path / "manifest.jsonl"))
    with fd.hold_lock(tmp_path):
        with pytest.raises(fd.ExportError) as caught, fd.hold_lock(tmp_path):
            pass
        messages.append(str(caught.value))
    fd.warn_if_fresh([fd.Window(now - 3 * fd.HOUR, now - fd.HOUR)], now)
    handler = LogFileHandler(tmp_path / "full.log")
    handler.stream = open("/dev/full", "w")  # noqa: SIM115 - the handler owns and closes it
    handler.emit(logging.makeLogRecord({"msg": "a line", "levelno": logging.INFO, "levelname": "INFO"}))
    handler.close()
    messages += [record.getMessage() for record in caplog.records]

    from azure.core.exceptions import HttpResponseError, ServiceRequestError

    connection = "DefaultEndpointsProtocol=https;AccountName=lake;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    uploader = azure_upload.Uploader(azure_upload.target_from({"AZURE_STORAGE_CONNECTION_STRING": connection}, "events", "p"))
    rejected = HttpResponseError(message="denied")
    rejected.status_code = 403
    messages += [uploader._describe(ServiceRequestError("down")), uploader._describe(rejected)]
    return messages


def test_the_troubleshooting_table_quotes_what_the_program_prints(tmp_path, monkeypatch, caplog):
    pytest.importorskip("azure.storage.blob")
    caplog.set_level(logging.INFO)
    printed = "\n".join(messages_the_program_prints(tmp_path, monkeypatch, caplog))
    quotes = troubleshooting_quotes()
    assert len(quotes) >= 20
    unmatched = [q for q in quotes if not re.search(r".*?".join(map(re.escape, q.split("..."))), printed)]
    assert unmatched == []
