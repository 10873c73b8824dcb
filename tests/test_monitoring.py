"""A run every scheduler can watch: the --json summary, the dead man's switch, the metrics file."""

import contextlib
import json
import os
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import monitor
from tests.conftest import wait_for

DAY = ("--date", "2025-11-01")
SECRET_PATH = "/ping/0f3c9e1a-secret-uuid"


def last_json(result) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # stdout holds the summary alone
    return json.loads(lines[0])


def test_the_summary_of_an_export(cli, standin):
    result = cli.run(*DAY, "--json")
    assert result.returncode == 0, result.stderr
    document = last_json(result)
    assert document["status"] == "ok" and document["exit_code"] == 0 and document["mode"] == "export"
    assert document["range"] == {"start": "20251101T00", "end": "20251101T23"}
    assert document["windows"] == {"planned": 1, "exported": 1, "failed": 0}
    assert document["hours"] == {"exported": 24, "already": 0, "missing": 0}
    assert document["events"] == len(standin.expected_lines(*hours_of_day()))
    (path,) = document["files"]
    assert path == str(cli.outputs()[0]) and document["bytes"] == cli.outputs()[0].stat().st_size
    assert document["log_file"].startswith(str(cli.logs)) and document["failures"] == []
    again = last_json(cli.run(*DAY, "--json"))
    assert again["hours"] == {"exported": 0, "already": 24, "missing": 0} and again["files"] == []


def hours_of_day():
    from tests.conftest import hour

    return hour("20251101T00"), hour("20251101T23")


def test_the_summary_of_a_failed_window_and_of_bad_settings(cli, standin):
    standin.add_fault(418, start="20251102T00")
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--json")
    assert result.returncode == 1
    document = last_json(result)
    assert document["status"] == "failed" and document["windows"] == {"planned": 2, "exported": 1, "failed": 1}
    assert document["hours"]["missing"] == 24
    assert document["failures"] == [{"window": "20251102T00-20251102T23",
                                     "reason": "Amplitude answered HTTP 418: Error 418"}]
    usage = cli.run("--workers", "9", AMP_JSON="1")
    assert usage.returncode == 2
    assert last_json(usage) | {"seconds": 0} == last_json(usage) | {
        "status": "usage", "exit_code": 2, "mode": "usage", "log_file": None, "seconds": 0,
        "error": "--workers: must be between 1 and 5, got 9"}


def test_the_summary_of_a_report_keeps_the_table_on_stderr(cli, standin):
    assert cli.run(*DAY).returncode == 0
    result = cli.run("--report", *DAY, "--json")
    assert result.returncode == 0, result.stderr
    document = last_json(result)
    assert document["mode"] == "report" and document["hours"] == {"exported": 0, "already": 24, "missing": 0}
    assert "hours exported" in result.stderr


@pytest.mark.parametrize("args", [(*DAY, "--json"), ("--report", *DAY), ("--report", *DAY, "--json")])
def test_a_reader_that_closed_stdout_changes_nothing_but_the_output(cli, standin, args):
    """`| head -1` closes the pipe: the run still exports and reports, and ends as it would have, without a
    traceback."""
    if args[0] == "--report":
        assert cli.run(*DAY).returncode == 0
    run = cli.start(*args)
    run.stdout.close()  # closed before the run writes to it
    stderr = run.stderr.read()
    assert run.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr and "Error" not in stderr
    assert len(cli.manifest()) == 1 and cli.outputs()


class PingReceiver:
    """A monitor on 127.0.0.1 that records each ping's path and body."""

    def __init__(self, status=200):
        self.pings: list[tuple[str, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.pings.append((self.path, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    monitor = PingReceiver()
    yield monitor
    monitor.close()


def test_pings_say_start_then_success_with_the_summary(cli, standin, receiver):
    result = cli.run(*DAY, AMP_PING_URL=receiver.url)
    assert result.returncode == 0, result.stderr
    assert [path for path, _ in receiver.pings] == [SECRET_PATH + "/start", SECRET_PATH]
    assert json.loads(receiver.pings[1][1])["status"] == "ok"
    assert "secret-uuid" not in result.stdout + result.stderr + cli.everything_written()


def test_a_failed_run_pings_fail(cli, standin, receiver):
    standin.add_fault(401)
    result = cli.run(*DAY, "--ping-url", receiver.url)
    assert result.returncode == 1
    assert [path for path, _ in receiver.pings] == [SECRET_PATH + "/start", SECRET_PATH + "/fail"]
    assert json.loads(receiver.pings[1][1])["failures"][0]["window"] == "20251101T00-20251101T23"


def test_a_ping_that_fails_is_a_warning_and_never_fails_the_export(cli, standin):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = cli.run(*DAY, AMP_PING_URL=f"http://127.0.0.1:{closed}{SECRET_PATH}")
    assert result.returncode == 0, result.stderr
    assert "WARNING - The start ping to the monitor failed (ConnectionError); the export is not affected" in result.stderr
    assert "secret-uuid" not in result.stderr + cli.everything_written()


class EndlessAnswer(BaseHTTPRequestHandler):
    """A monitor that answers 200, then trickles its body a byte at a time (or, `in_headers`, one header line) and
    ends only after GIVE_UP seconds: every read gets a byte long before the read timeout."""

    in_headers = False

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.wfile.write(b"HTTP/1.1 200 OK\r\n" + (b"X-Slow: " if self.in_headers else b"\r\n"))
        deadline = time.monotonic() + GIVE_UP
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and not self.server.closing.wait(0.05):
                self.wfile.write(b"x")
                self.wfile.flush()

    def log_message(self, *args):
        pass


GIVE_UP = 8


@pytest.mark.parametrize("in_headers", [False, True])
def test_a_monitor_that_never_ends_its_answer_holds_the_run_no_longer_than_the_ping_timeout(
        monkeypatch, caplog, in_headers):
    handler = type("Handler", (EndlessAnswer,), {"in_headers": in_headers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.closing = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(monitor, "PING_TIMEOUT", 1.0)
    try:
        started = time.monotonic()
        monitor.ping(f"http://127.0.0.1:{server.server_address[1]}{SECRET_PATH}", "", {"status": "ok"})
        took = time.monotonic() - started
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
    # The abandoned ping ends with its connection: it must not log into the tests after this one.
    wait_for(lambda: not any(thread.name == "monitor-ping" for thread in threading.enumerate()))
    assert took < GIVE_UP / 2
    if in_headers:
        assert "The success ping to the monitor was not answered within 1 s" in caplog.text
    else:
        assert "WARNING" not in caplog.text  # a 200 is a success, whatever follows it
    assert "secret-uuid" not in caplog.text


@pytest.mark.parametrize(
    "url, message",
    [("http://hc-ping.example/secret-uuid", "AMP_PING_URL: plain http would carry the secret URL in the clear"),
     ("ftp://hc-ping.example/secret-uuid", "AMP_PING_URL: expected an https:// URL (it is not shown here"),
     ("https://[hc-ping.example/secret-uuid", "AMP_PING_URL: expected an https:// URL (it is not shown here"),
     ("https://hc-ping.example:99999/secret-uuid", "AMP_PING_URL: expected an https:// URL (it is not shown here")],
)
def test_a_ping_url_that_would_leak_is_refused_without_being_shown(cli, standin, url, message):
    result = cli.run(*DAY, AMP_PING_URL=url)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"Error: {message}")
    assert "secret-uuid" not in result.stderr and standin.requests == []


def metrics_of(path) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name: (sample.value, sample.labels) for family in text_string_to_metric_families(path.read_text())
            for sample in family.samples}


def test_the_metrics_file_and_a_last_success_that_outlives_a_failure(cli, standin, tmp_path):
    target = tmp_path / "textfile" / "amplitude.prom"
    target.parent.mkdir()
    assert cli.run(*DAY, "--metrics-file", str(target)).returncode == 0
    first = metrics_of(target)
    assert first["amplitude_export_events"] == (144.0, {"data_dir": str(cli.data)})
    assert first["amplitude_export_hours_exported"][0] == 24 and first["amplitude_export_exit_code"][0] == 0
    success = first["amplitude_export_last_success_timestamp_seconds"][0]
    assert success == first["amplitude_export_last_run_timestamp_seconds"][0]
    standin.add_fault(401)
    assert cli.run("--date", "2025-11-02", "--metrics-file", str(target)).returncode == 1
    second = metrics_of(target)
    assert second["amplitude_export_exit_code"][0] == 1 and second["amplitude_export_hours_missing"][0] == 24
    assert second["amplitude_export_last_success_timestamp_seconds"][0] == success
    assert second["amplitude_export_last_run_timestamp_seconds"][0] >= success
    assert [p.name for p in target.parent.iterdir()] == ["amplitude.prom"]  # no temporary file left


def test_a_metrics_file_node_exporter_would_not_read_is_refused(cli, standin, tmp_path):
    result = cli.run(*DAY, "--metrics-file", str(tmp_path / "amplitude.txt"))
    assert result.returncode == 2
    assert "node_exporter reads files named *.prom only" in result.stderr


def test_a_link_or_a_device_where_the_metrics_go_is_a_usage_error_and_stays(cli, standin):
    from tests.test_report import special_files

    for target, kind in special_files(cli.workdir, ".prom"):
        before = os.lstat(target)
        result = cli.run(*DAY, "--metrics-file", str(target))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"--metrics-file {target} is {kind}, not a file the metrics can be written to" in result.stderr
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert cli.outputs() == []


def test_a_metrics_file_that_became_a_pipe_is_neither_read_nor_replaced(tmp_path):
    target = tmp_path / "amplitude.prom"
    os.mkfifo(target)  # opened for reading, a pipe without a writer would block the run's end for ever
    document = {"status": "failed", "events": 0, "hours": {"exported": 0, "missing": 24}, "seconds": 1.0,
                "exit_code": 1}
    monitor.write_metrics(target, "/data", document, 1_700_000_000.0)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)


def test_the_summary_counts_uploads(cli, standin, azurite):
    connection = azurite["connection_string"]
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--upload", "--json",
                     AZURE_STORAGE_CONNECTION_STRING=connection, AZURE_STORAGE_CONTAINER="summary-uploads")
    assert result.returncode == 0, result.stderr
    assert last_json(result)["uploaded"] == 2
