"""fetch_data.py end to end: a subprocess talking HTTP over a socket to the stand-in, every fault included."""

import datetime as dt
import json
import re
import socket
import subprocess

import pytest

import windows
from amplitude_standin import CITIES
from tests.conftest import API_KEY, as_array, assert_no_secrets, hour
from windows import HOUR, format_hour

DAY = ("--date", "2025-11-01")
DAY_START, DAY_END = hour("20251101T00"), hour("20251101T23")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (DEBUG|INFO|WARNING|ERROR) - .+$")


def only_output(cli):
    outputs = cli.outputs()
    assert len(outputs) == 1, outputs
    return outputs[0]


def test_nightly_default_exports_yesterday_utc(cli, standin):
    result = cli.run()
    assert result.returncode == 0, result.stderr
    yesterday = windows.yesterday(dt.datetime.now(dt.UTC))
    output = only_output(cli)
    assert re.fullmatch(r"\d{8}_\d{4}_ampl_dump\.json", output.name)
    assert output.read_bytes() == as_array(standin.expected_lines(yesterday.start, yesterday.end))
    asked = [(r["start"], r["end"]) for r in standin.requests]
    assert asked == [(format_hour(yesterday.start), format_hour(yesterday.end))]
    logs = list(cli.logs.glob("log_*.log"))
    assert len(logs) == 1 and re.fullmatch(r"log_\d{8}_\d{6}\.log", logs[0].name)
    assert all(LOG_LINE.match(line) for line in logs[0].read_text().splitlines())
    assert_no_secrets(result, cli)


@pytest.mark.quick
def test_a_given_day_is_written_byte_for_byte_in_hour_order(cli, standin):
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    content = only_output(cli).read_bytes()
    assert content == as_array(standin.expected_lines(DAY_START, DAY_END))
    events = json.loads(content)
    assert len(events) == 24 * 2 * 3
    assert [e["event_time"][:13] for e in events] == sorted(e["event_time"][:13] for e in events)
    # Escapes and raw UTF-8 both arrive as sent: the stand-in writes every other line with ensure_ascii.
    assert b"\\u" in content and any(city.encode() in content for city in CITIES)
    request = standin.requests[0]
    assert (request["start"], request["end"]) == ("20251101T00", "20251101T23")
    assert request["user_agent"].startswith("amplitude-eu-export/")
    summary = [line for line in result.stderr.splitlines() if "Summary" in line][-1]
    assert "20251101T00-20251101T23" in summary and "144 event(s)" in summary
    assert f"{len(content)} byte(s)" in summary and only_output(cli).name in summary
    assert cli.leftovers() == []
    assert_no_secrets(result, cli)


@pytest.mark.parametrize(
    "fault, options",
    [
        (500, {}), (502, {}), (503, {}), (429, {}), (429, {"retry_after": "0"}), ("drop", {}), ("truncate", {}),
        ("corrupt_crc", {}), ("corrupt_gzip", {}), ("not_zip", {}),
    ],
)
def test_transient_faults_are_retried_until_the_export_is_whole(cli, standin, fault, options):
    standin.add_fault(fault, times=2, **options)
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))
    assert len(standin.requests) == 3
    assert result.stderr.count("waiting 0s before attempt") == 2
    assert "attempt 3/5" in result.stderr
    assert cli.leftovers() == []


def test_a_stalled_server_is_a_timeout_and_retried(cli, standin):
    standin.add_fault("stall", seconds=3)
    result = cli.run(*DAY, "--read-timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert "went silent for 0.5s (read timeout); waiting" in result.stderr
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))


def test_a_body_that_stops_halfway_is_a_timeout_and_retried(cli, standin):
    standin.add_fault("trickle", seconds=3)  # the answer's first byte, then silence longer than the timeout
    result = cli.run(*DAY, "--read-timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert "went silent for 0.5s (read timeout); waiting" in result.stderr
    assert len(standin.requests) == 2
    assert only_output(cli).read_bytes() == as_array(standin.expected_lines(DAY_START, DAY_END))
    assert cli.leftovers() == []


@pytest.mark.parametrize("extra", [(), ("--json", "--workers", "3"), ("--drop-fields", "city")])
def test_a_run_started_without_stdout_and_stderr_exports_and_writes_them_nowhere(cli, standin, extra):
    """A supervisor that closes the standard descriptors (`>&- 2>&-`): the run must not fail on them, and no file
    it opens may take their numbers, where a message meant for stderr (its own or a worker's) would land."""
    script = 'exec "$@" <&- >&- 2>&-'
    run = subprocess.run(["bash", "-c", script, "bash", *cli.command(*DAY, *extra)], cwd=cli.workdir,
                         env=cli.env(), capture_output=True, timeout=120)
    assert run.returncode == 0 and run.stdout == b"" and run.stderr == b""
    lines = standin.expected_lines(DAY_START, DAY_END)
    if "city" in extra:
        assert len(json.loads(only_output(cli).read_bytes())) == len(lines)
        assert b'"city"' not in only_output(cli).read_bytes()
    else:
        assert only_output(cli).read_bytes() == as_array(lines)
    log = next(cli.logs.glob("log_*.log")).read_text()
    assert "Exported 20251101T00-20251101T23" in log and "ERROR" not in log


def test_max_attempts_reached_exits_1_and_leaves_nothing(cli, standin):
    standin.add_fault(503, times=5)
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert "Max fetch attempts reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(standin.requests) == 5
    assert cli.outputs() == [] and cli.leftovers() == []
    assert_no_secrets(result, cli)


def test_the_attempt_count_is_a_flag(cli, standin):
    standin.add_fault(500, times=2)
    result = cli.run(*DAY, "--max-attempts", "2")
    assert result.returncode == 1
    assert len(standin.requests) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_are_not_retried(cli, standin, status):
    standin.add_fault(status)
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert "rejected the credentials" in result.stderr and "--region us" in result.stderr
    assert len(standin.requests) == 1
    assert cli.outputs() == []


def test_wrong_keys_are_rejected_and_never_shown(cli, standin):
    result = cli.run(*DAY, AMP_API_KEY="wrong-key-123", AMP_SECRET_KEY="wrong-secret-456")
    assert result.returncode == 1
    assert "rejected the credentials (HTTP 401)" in result.stderr
    assert "wrong-key-123" not in result.stderr + cli.everything_written()
    assert "wrong-secret-456" not in result.stderr + cli.everything_written()


def test_no_data_is_an_empty_array_and_success(cli, standin):
    standin.add_fault(404, body="Raw data files were not found.")
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert only_output(cli).read_bytes() == b"[]\n"
    assert "no data for this range" in result.stderr
    assert cli.manifest()[0]["events"] == 0


def test_a_single_hour_over_the_4gb_limit_fails_with_advice(cli, standin):
    standin.too_large_over_hours = 0
    result = cli.run("--start", "20251101T05", "--end", "20251101T05")
    assert result.returncode == 1
    assert "too large" in result.stderr and "S3" in result.stderr
    assert cli.outputs() == [] and cli.leftovers() == []


def test_an_unexpected_status_fails_with_its_first_body_line(cli, standin):
    standin.add_fault(418, body="I'm a teapot\nwith details")
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert "Amplitude answered HTTP 418: I'm a teapot" in result.stderr
    assert "with details" not in result.stderr


def test_a_line_that_is_not_json_fails_naming_member_and_line(cli, standin):
    standin.add_fault("bad_line")
    result = cli.run(*DAY)
    assert result.returncode == 1
    assert re.search(r"187520_2025-11-01_\d+#\d\.json\.gz line 4: not a JSON object", result.stderr), result.stderr
    assert cli.outputs() == [] and cli.leftovers() == []


def test_an_unreachable_server_is_retried_then_fails_cleanly(cli):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = cli.run(*DAY, "--max-attempts", "2", AMP_BASE_URL=f"http://127.0.0.1:{closed_port}")
    assert result.returncode == 1
    assert f"127.0.0.1:{closed_port} refused the connection; waiting 0s before attempt 2" in result.stderr
    assert "Max fetch attempts reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_host_that_does_not_resolve_is_named_with_the_cause(cli):
    result = cli.run(*DAY, "--max-attempts", "1", AMP_BASE_URL="https://no-such-host.invalid")
    assert result.returncode == 1
    assert "last error: the name no-such-host.invalid could not be resolved (DNS)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_tls_failure_is_named_with_the_cause(cli, standin):
    # https:// to the stand-in's plain-HTTP port: the TLS handshake fails.
    https_url = standin.base_url.replace("http://", "https://")
    result = cli.run(*DAY, "--max-attempts", "1", AMP_BASE_URL=https_url)
    assert result.returncode == 1
    assert f"last error: TLS error with {https_url.removeprefix('https://')} (" in result.stderr
    assert "Traceback" not in result.stderr


# One bad input of each kind runs in the quick tier too: a credential, a date, a flag, a variable.
@pytest.mark.parametrize(
    "args, env, message",
    [
        pytest.param(
            (),
            {"AMP_API_KEY": None},
            "Error: AMP_API_KEY not set: put it in .env (looked in {here} and {beside}) or the environment; see .env.example",
            marks=pytest.mark.quick,
        ),
        (
            (),
            {"AMP_API_KEY": None, "AMP_SECRET_KEY": ""},
            "Error: AMP_API_KEY and AMP_SECRET_KEY not set: put them in .env (looked in {here} and {beside}) or the "
            "environment; see .env.example",
        ),
        pytest.param(("--date", "2025-02-30"), {}, "Error: --date 2025-02-30: no such date or hour",
                     marks=pytest.mark.quick),
        (("--date", "2099-01-01"), {}, "Error: --date 2099-01-01: that UTC day has not ended yet"),
        (("--date", "2999-01-01"), {}, "Error: --date 2999-01-01: the year must be between 2000 and 2100"),
        (("--start", "0001-01-01", "--end", "2025-01-01"), {},
         "Error: --start 0001-01-01: the year must be between 2000 and 2100"),
        (("--workers", "9"), {}, "Error: --workers: must be between 1 and 5, got 9"),
        pytest.param((), {"AMP_MAX_ATTEMPTS": "many"}, "Error: AMP_MAX_ATTEMPTS: expected a whole number, got 'many'",
                     marks=pytest.mark.quick),
        pytest.param(("--nope",), {}, "Error: unrecognized arguments: --nope (see --help)", marks=pytest.mark.quick),
        (
            (),
            {"AMP_SECRET_KEY": "sécret"},
            "Error: AMP_SECRET_KEY holds characters an Amplitude key never has (check for stray quotes or spaces)",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_request(cli, standin, args, env, message):
    result = cli.run(*args, **env)
    assert result.returncode == 2
    looked = {"here": cli.workdir / ".env", "beside": cli.project / ".env"}
    assert result.stderr.strip().splitlines() == [message.format(**looked)]
    assert standin.requests == []
    assert not cli.data.exists() and not cli.logs.exists()


def test_credentials_come_from_dotenv_and_the_environment_wins(cli, standin):
    (cli.workdir / ".env").write_text(f"AMP_API_KEY={API_KEY}\nAMP_SECRET_KEY=not-the-secret\n")
    result = cli.run(*DAY, AMP_API_KEY=None)
    assert result.returncode == 0, result.stderr
    result = cli.run(*DAY, "--refetch", AMP_API_KEY=None, AMP_SECRET_KEY=None)
    assert result.returncode == 1 and "rejected the credentials" in result.stderr
    assert "not-the-secret" not in result.stderr + cli.everything_written()


def test_a_second_run_in_the_same_minute_never_overwrites(cli, standin):
    assert cli.run(*DAY).returncode == 0
    first = only_output(cli)
    before = first.read_bytes()
    assert cli.run(*DAY, "--refetch").returncode == 0
    names = [p.name for p in cli.outputs()]
    assert len(names) == 2 and first.read_bytes() == before
    # Which name the second file takes when the minute is the same: tests/test_store.py, with the clock given.


def test_runs_started_in_the_same_second_keep_logs_of_their_own(cli, standin, tmp_path):
    moment = dt.datetime(2025, 11, 7, 3, 30, 0, tzinfo=dt.UTC)
    cli.logs.mkdir()
    elsewhere = tmp_path / "not a log"
    elsewhere.write_text("kept\n")
    (cli.logs / "log_20251107_033000_2.log").symlink_to(elsewhere)  # a name taken by a link is passed over
    first = cli.run(*DAY, now=moment)
    second = cli.run("--date", "2025-11-02", now=moment)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.strip().endswith(f"Log file: {cli.logs / 'log_20251107_033000.log'}")
    assert second.stderr.strip().endswith(f"Log file: {cli.logs / 'log_20251107_033000_3.log'}")
    assert "20251102" not in (cli.logs / "log_20251107_033000.log").read_text()
    assert "Exported 20251102T00-20251102T23" in (cli.logs / "log_20251107_033000_3.log").read_text()
    assert elsewhere.read_text() == "kept\n"


def test_data_and_log_folders_are_settings(cli, standin):
    result = cli.run(*DAY, "--data-dir", "out/events", AMP_LOG_DIR="out/logs")
    assert result.returncode == 0, result.stderr
    assert len(list((cli.workdir / "out/events").glob("*_ampl_dump.json"))) == 1
    assert len(list((cli.workdir / "out/logs").glob("log_*.log"))) == 1
    assert not cli.data.exists()


def test_a_data_folder_that_cannot_be_made_is_a_usage_error(cli, standin):
    (cli.workdir / "blocked").write_text("a file, not a folder")
    result = cli.run(*DAY, "--data-dir", "blocked/data")
    assert result.returncode == 2 and standin.requests == []
    assert f"cannot create the data folder {cli.workdir / 'blocked' / 'data'}: Not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_log_folder_that_cannot_be_made_is_a_usage_error(cli, standin):
    (cli.workdir / "blocked").write_text("a file, not a folder")
    result = cli.run(*DAY, "--log-dir", "blocked/logs")
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: cannot write logs to {cli.workdir / 'blocked' / 'logs'}: Not a directory"
    assert standin.requests == []


@pytest.mark.quick
def test_demo_needs_no_credentials_and_no_network(cli):
    result = cli.run("--demo", AMP_API_KEY=None, AMP_SECRET_KEY=None, AMP_BASE_URL=None)
    assert result.returncode == 0, result.stderr
    yesterday = windows.yesterday(dt.datetime.now(dt.UTC))
    manifest = [json.loads(line) for line in (cli.project / "demo/data/manifest.jsonl").read_text().splitlines()]
    assert [r["start"] for r in manifest] == [format_hour(yesterday.start - dt.timedelta(days=d)) for d in range(6, -1, -1)]
    events = [e for r in manifest for e in json.loads((cli.project / "demo/data" / r["file"]).read_bytes())]
    assert sum(r["events"] for r in manifest) == len(events) > 7 * 24 * 10
    assert any(e["amplitude_id"] > 2**53 for e in events)
    assert "127.0.0.1" in result.stderr
    # Something for its report to find: yesterday's T13 is empty and purchases stop.
    assert manifest[-1]["hours"][format_hour(yesterday.start + 13 * HOUR)] == 0
    assert "purchase" not in manifest[-1]["event_types"] and manifest[-2]["event_types"]["purchase"] > 5
    assert "empty T13; purchase stopped" in result.stdout
    assert (cli.project / "demo/data/report.html").exists()
