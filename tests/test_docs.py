"""The manual is true: the README is a front page, docs/ names every flag and variable as OPTIONS declares them,
every command shown runs as written, and the troubleshooting table quotes what the program prints."""

import datetime as dt
import logging
import re
import shlex
import types

import pytest

import archive
import fetch_data as fd
import report
from errors import ExportError, UsageError
from export_api import Answer, Retryable, classify, describe_failure, download, fetch
from member_workers import ArchiveReader
from settings import EXPORT_PATH, OPTIONS, Environment, build_parser, parse_settings
from store import hold_lock, read_own_file
from tests.conftest import ROOT
from windows import HOUR, Window
from writer import EventWriter

README = (ROOT / "README.md").read_text()
MANUAL = {path.relative_to(ROOT).as_posix(): path.read_text() for path in
          [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
CONFIGURATION = MANUAL["docs/configuration.md"]
CODE = "".join(p.read_text() for p in ROOT.glob("*.py") if p.name != "amplitude_standin.py")
VARIABLES = {option.variable for option in OPTIONS if option.variable}


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown table's body rows."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def test_the_settings_table_is_the_declaration():
    """One row per option: its variable, its flag and its default, as OPTIONS declares them, and nothing else."""
    rows = table_rows(section(CONFIGURATION, "## Every setting"))
    declared = {(f"`{o.variable}`" if o.variable else "", f"`{o.flag}`" if o.flag else "",
                 f"`{o.shown_default}`" if o.shown_default not in ("", "off") else o.shown_default) for o in OPTIONS}
    documented = {tuple(row[:3]) for row in rows if row[1] != "`--help`"}
    assert documented == declared


def test_every_flag_has_a_help_line_naming_its_variable_and_default():
    parser = build_parser()
    for option in OPTIONS:
        if option.flag is None:
            continue
        action = next(a for a in parser._actions if option.flag in a.option_strings)
        assert action.help.startswith(option.help)
        if option.variable:
            assert f"env {option.variable}" in action.help


def test_the_code_reads_only_declared_variables_and_env_example_lists_them_all():
    read = set(re.findall(r'"((?:AMP|AZURE)_[A-Z_]+)"', CODE))
    assert read <= VARIABLES
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert listed == VARIABLES


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", README, re.MULTILINE)
    assert headings == ["Quick start", "Install", "The nightly schedule", "Essential settings", "Exit codes",
                        "The manual"]
    quick = section(README, "## Quick start")
    assert ".venv/bin/python fetch_data.py --demo" in quick and "bash test.sh" in quick
    assert "bash test.sh" in (ROOT / ".ci" / "run").read_text()
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+|CONTRIBUTING.md)", README):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize("name", sorted(MANUAL))
def test_the_manual_speaks_of_the_tool_only(name):
    text = MANUAL[name]
    assert not re.search(r"\bseed\b|issues were silent|the issue", text, re.IGNORECASE)
    # Commands run as written from a fresh clone: the project's interpreter, never a bare `python`.
    assert not re.search(r"(^|[\s`(])python3? (fetch_data|bench/|-m pytest)", text, re.MULTILINE)


def shown_commands() -> list[tuple[str, str]]:
    """Every `fetch_data.py` command in the manual's code blocks, with the page it is on."""
    found = []
    for name, text in MANUAL.items():
        for kind, block in re.findall(r"```(bash|cron)?\n(.*?)```", text, re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                if "bin/python" in line and "fetch_data.py" in line and not line.lstrip().startswith("#"):
                    command = line.split(" #")[0].split("&&")[-1].strip()
                    found.append((name, command.split(None, 5)[5] if kind == "cron" else command))
    return found


def test_every_command_shown_is_one_the_program_accepts():
    """Each one's flags are read as the program reads them; credentials and the clock are given."""
    commands = shown_commands()
    assert len(commands) >= 10
    now = dt.datetime(2025, 12, 1, 3, 30, tzinfo=dt.UTC)
    env = {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s", "AMP_HASH_KEY": "k" * 32,
           "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=a2V5"}
    for name, command in commands:
        words = shlex.split(command)
        assert words[0].endswith(".venv/bin/python"), (name, command)
        args = words[words.index(next(w for w in words if w.endswith("fetch_data.py"))) + 1:]
        try:
            parse_settings(args, env, now)
        except UsageError as exc:
            pytest.fail(f"{name}: {command}: {exc}")


def troubleshooting_quotes() -> list[str]:
    """The messages quoted in the first column of the troubleshooting table."""
    rows = table_rows(MANUAL["docs/troubleshooting.md"])
    return [quote for row in rows for quote in re.findall(r"`([^`]+)`", row[0]) if quote != "[]"]


def messages_the_program_prints(tmp_path, monkeypatch, caplog) -> list[str]:
    """Every message the table quotes, produced by the code that prints it."""
    import dataclasses
    import datetime as dt
    import functools
    import socket
    import subprocess
    import sys
    import threading

    import requests
    import responses
    import simdjson

    import azure_upload
    from logging_config import LogFileHandler

    now = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)
    keys = {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}
    messages = []

    def usage_error(argv, env):
        with pytest.raises(UsageError) as caught:
            parse_settings(argv, env, now)
        return f"Error: {caught.value}"

    def failure(call, *args):
        with pytest.raises((ExportError, Retryable, archive.BadEvent)) as caught:
            call(*args)
        return str(caught.value)

    def answer(status, body="", headers=None):
        return Answer(status, headers or {}, body, "https://analytics.eu.amplitude.com/api/2/export")

    for python_flags in (["-S"], ["-c", "import sys, runpy; sys.version_info = (3, 10, 13); "
                                       f"runpy.run_path({str(ROOT / 'fetch_data.py')!r}, run_name='__main__')"]):
        script = [] if "-c" in python_flags else [str(ROOT / "fetch_data.py")]
        run = subprocess.run([sys.executable, *python_flags, *script], capture_output=True, text=True, timeout=60)
        messages.append(run.stderr)
    messages.append(usage_error([], Environment({}, files=(tmp_path / ".env", ROOT / ".env"))))
    messages.append(usage_error([], {**keys, "AMP_BASE_URL": "http://analytics.eu.amplitude.com"}))
    messages.append(usage_error([], {**keys, "AMP_API_KEY": '"0123abcd"'}))
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)
    messages.append(usage_error(["--upload"], {**keys, "AZURE_STORAGE_CONNECTION_STRING": "x"}))
    monkeypatch.undo()
    messages += [failure(classify, answer(status, body, headers), 1) for status, body, headers in (
        (401, "", None), (404, "<html>", None), (302, "", {"Location": "https://elsewhere.example/"}))]

    base = parse_settings(["--date", "2025-11-01"], keys, now)
    settings = dataclasses.replace(base, data_dir=tmp_path, api=dataclasses.replace(
        base.api, max_attempts=1, attempt_timeout=0.2, delay_seconds=0))
    hour = Window(settings.windows[0].start, settings.windows[0].start)
    writer = EventWriter(tmp_path / "out.part", "json", False)
    with responses.RequestsMock() as mocked, requests.Session() as session:
        url = settings.api.base_url + EXPORT_PATH
        mocked.get(url, status=502)
        mocked.get(url, status=400, body="The file size of the exported data is too large.")
        reader = ArchiveReader(settings.field_rules, settings.max_event_bytes)
        consume = functools.partial(fd.write_to_local, writer=writer, settings=settings, reader=reader, span=hour)
        messages.append(failure(fetch, hour, session, settings.api, consume, tmp_path, lambda _: None))
        messages.append(failure(fd.export_span, hour, writer, session, settings, reader))
    writer.discard()
    for error, base_url in (
        (requests.ConnectionError(socket.gaierror(-2, "Name or service not known")), "https://no-such-host.invalid"),
        (requests.ConnectionError(ConnectionRefusedError(111, "Connection refused")), "http://127.0.0.1:9"),
        (requests.exceptions.SSLError("handshake failed"), "https://127.0.0.1:9"),
    ):
        messages.append(describe_failure(error, dataclasses.replace(settings.api, base_url=base_url)))

    never = threading.Event()

    class SilentSession:
        def get(self, *args, **kwargs):
            never.wait(10)  # an answer that never comes: the attempt timeout (0.2 s) must end the wait
            raise requests.ConnectionError("late")

    messages.append(failure(download, SilentSession(), hour, settings.api, tmp_path / "slow.zip"))
    never.set()
    messages.append(failure(archive.ensure_short, 20, 10, "m.json.gz", 3))
    messages.append(failure(archive.check_events, [b"not json"], "m.json.gz", 3, simdjson.Parser()))
    (tmp_path / "manifest.jsonl").symlink_to(tmp_path / "elsewhere")
    messages.append(failure(read_own_file, tmp_path / "manifest.jsonl"))
    (tmp_path / ".ampl-commit.json").mkdir()
    messages.append(failure(read_own_file, tmp_path / ".ampl-commit.json"))
    with hold_lock(tmp_path):
        with pytest.raises(ExportError) as caught, hold_lock(tmp_path):
            pass
        messages.append(str(caught.value))
    fd.warn_if_fresh([Window(now - 3 * HOUR, now - HOUR)], now)
    handler = LogFileHandler(tmp_path / "full.log")
    handler.stream = open("/dev/full", "w")  # noqa: SIM115 - the handler owns and closes it
    handler.emit(logging.makeLogRecord({"msg": "a line", "levelno": logging.INFO, "levelname": "INFO"}))
    handler.close()
    messages += [record.getMessage() for record in caplog.records]

    from azure.core.exceptions import HttpResponseError, ServiceRequestError

    connection = "DefaultEndpointsProtocol=https;AccountName=lake;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    target = azure_upload.target_from({"AZURE_STORAGE_CONNECTION_STRING": connection}, "events", "p")
    uploader = azure_upload.Uploader(target)
    rejected = HttpResponseError(message="denied")
    rejected.status_code = 403
    messages += [azure_upload.describe(target, ServiceRequestError("down")), azure_upload.describe(target, rejected)]

    class TakenBlob:
        def get_blob_properties(self):
            return types.SimpleNamespace(metadata={"sha256": "f" * 64})

    messages.append(failure_of(azure_upload.UploadError, uploader._already_there, TakenBlob(), "p/x.json", "0" * 64))
    messages.append(usage_error(["--upload"], {**keys, "AZURE_STORAGE_ACCOUNT_URL": "http://acct.blob.core.windows.net"}))
    messages.append(failure_of(UsageError, report.refuse_own_file, tmp_path / ".lock", tmp_path,
                               tmp_path / "manifest.jsonl"))
    typo = parse_settings(["--date", "2025-11-01", "--drop-fields", "ip_adress"], keys, now)
    typo.field_rules.apply([b'{"ip_address":"10.0.0.1"}'])
    typo.field_rules.warn_of_unmatched()
    messages += [record.getMessage() for record in caplog.records]
    return messages


def failure_of(kind, call, *args) -> str:
    with pytest.raises(kind) as caught:
        call(*args)
    return str(caught.value)


def test_the_troubleshooting_table_quotes_what_the_program_prints(tmp_path, monkeypatch, caplog):
    pytest.importorskip("azure.storage.blob")
    caplog.set_level(logging.INFO)
    printed = "\n".join(messages_the_program_prints(tmp_path, monkeypatch, caplog))
    quotes = troubleshooting_quotes()
    assert len(quotes) >= 20
    unmatched = [q for q in quotes if not re.search(r".*?".join(map(re.escape, q.split("..."))), printed)]
    assert unmatched == []
