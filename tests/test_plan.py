"""Pure logic: the export window, hour parsing, windows and their halves, member order, file names, settings."""

import datetime as dt
import logging
import zipfile
from pathlib import Path

import pytest

import archive
from errors import ExportError, UsageError
from export_api import Answer, classify, retry_after_seconds
from settings import parse_settings
from store import is_plain_name, output_names
from tests.conftest import ROOT, hour
from windows import Window, format_hour, hours_between, parse_hour, plan_missing, plan_windows, yesterday

UTC = dt.UTC


@pytest.mark.parametrize(
    "now, start, end",
    [
        ("2025-11-07 00:43", "20251106T00", "20251106T23"),
        ("2025-11-07 23:59", "20251106T00", "20251106T23"),
        ("2025-03-01 03:00", "20250228T00", "20250228T23"),
        ("2024-03-01 03:00", "20240229T00", "20240229T23"),
        ("2026-01-01 00:00", "20251231T00", "20251231T23"),
    ],
)
def test_yesterday_is_the_previous_utc_day(now, start, end):
    moment = dt.datetime.strptime(now, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert yesterday(moment) == Window(hour(start), hour(end))


def test_yesterday_uses_utc_whatever_the_timezone_of_now():
    berlin_just_after_midnight = dt.datetime(2025, 11, 7, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert yesterday(berlin_just_after_midnight).label == "20251105T00-20251105T23"


@pytest.mark.parametrize(
    "text, last_hour, expected",
    [
        ("2025-11-01", False, "20251101T00"),
        ("2025-11-01", True, "20251101T23"),
        ("20251101T05", False, "20251101T05"),
        ("20251101T05", True, "20251101T05"),
        ("2024-02-29", True, "20240229T23"),
    ],
)
def test_parse_hour(text, last_hour, expected):
    assert format_hour(parse_hour(text, "--start", last_hour)) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("2025-02-30", "no such date or hour"),
        ("2023-02-29", "no such date or hour"),
        ("20251101T24", "no such date or hour"),
        ("2025-13-01", "no such date or hour"),
        ("yesterday", "expected YYYY-MM-DD or YYYYMMDDTHH"),
        ("2025-11-1", "expected YYYY-MM-DD or YYYYMMDDTHH"),
        ("20251101", "expected YYYY-MM-DD or YYYYMMDDTHH"),
        ("２０２５-１１-０１", "expected YYYY-MM-DD or YYYYMMDDTHH"),  # digits of another script
    ],
)
def test_parse_hour_refuses_impossible_input(text, message):
    with pytest.raises(UsageError, match=message):
        parse_hour(text, "--date", False)


@pytest.mark.parametrize(
    "start, end, hours, expected",
    [
        ("20251101T00", "20251103T23", 24, ["20251101T00-20251101T23", "20251102T00-20251102T23", "20251103T00-20251103T23"]),
        ("20250227T00", "20250301T23", 24, ["20250227T00-20250227T23", "20250228T00-20250228T23", "20250301T00-20250301T23"]),
        ("20240228T00", "20240301T23", 48, ["20240228T00-20240229T23", "20240301T00-20240301T23"]),
        ("20251031T22", "20251101T03", 4, ["20251031T22-20251101T01", "20251101T02-20251101T03"]),
        ("20251231T23", "20260101T00", 1, ["20251231T23-20251231T23", "20260101T00-20260101T00"]),
        ("20251101T05", "20251101T05", 24, ["20251101T05-20251101T05"]),
    ],
)
def test_plan_windows_covers_every_hour_once(start, end, hours, expected):
    windows = list(plan_windows(hour(start), hour(end), hours))
    assert [w.label for w in windows] == expected
    every_hour = [h for w in windows for h in hours_between(w.start, w.end)]
    assert every_hour == list(hours_between(hour(start), hour(end)))


@pytest.mark.parametrize(
    "window, first, second",
    [
        ("20251101T00-20251101T23", "20251101T00-20251101T11", "20251101T12-20251101T23"),
        ("20251101T00-20251101T02", "20251101T00-20251101T00", "20251101T01-20251101T02"),
        ("20240229T22-20240301T01", "20240229T22-20240229T23", "20240301T00-20240301T01"),
        ("20251101T05-20251101T06", "20251101T05-20251101T05", "20251101T06-20251101T06"),
    ],
)
def test_halves_split_a_window_without_gap_or_overlap(window, first, second):
    start, end = window.split("-")
    halves = Window(hour(start), hour(end)).halves()
    assert [h.label for h in halves] == [first, second]


def test_plan_missing_keeps_only_uncovered_hours():
    windows = list(plan_windows(hour("20251101T00"), hour("20251102T23"), 24))
    covered = set(hours_between(hour("20251101T00"), hour("20251101T23")))
    covered |= set(hours_between(hour("20251102T05"), hour("20251102T09")))
    missing = plan_missing(windows, covered)
    assert [w.label for w in missing] == ["20251102T00-20251102T04", "20251102T10-20251102T23"]
    assert plan_missing(windows, set()) == windows


def test_members_sort_by_hour_then_part_not_by_string():
    names = [
        "187/187_2025-11-01_10#0.json.gz",
        "zz-unnamed.json",
        "187/187_2025-11-01_2#1.json.gz",
        "187/187_2025-11-01_2#0.json.gz",
        "187/187_2025-10-31_23#0.json.gz",
        "187/187_2025-11-01_2#10.json.gz",
        "187/187_2025-11-01_9#0.json.gz",
        "187/187_2025-11-01_3.json.gz",
        "a-unnamed.json",
        "readme.txt",
    ]
    members, skipped = archive.sort_members([zipfile.ZipInfo(name) for name in names])
    assert [member.filename for member in members] == [
        "187/187_2025-10-31_23#0.json.gz",
        "187/187_2025-11-01_2#0.json.gz",
        "187/187_2025-11-01_2#1.json.gz",
        "187/187_2025-11-01_2#10.json.gz",
        "187/187_2025-11-01_3.json.gz",
        "187/187_2025-11-01_9#0.json.gz",
        "187/187_2025-11-01_10#0.json.gz",
        "a-unnamed.json",
        "zz-unnamed.json",
    ]
    assert skipped == ["readme.txt"]


def settings_for(argv, env=None, now="2025-11-07 00:43"):
    env = {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s", **(env or {})}
    moment = dt.datetime.strptime(now, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    return parse_settings(argv, env, moment, cwd=Path("/somewhere"))


def test_output_names_start_with_the_seeds_name_then_add_the_window_then_a_counter():
    settings = settings_for([])
    window = settings.windows[0]
    names = output_names(settings.started, settings.data_outfile, settings.extension, window, several=False)
    assert [next(names) for _ in range(4)] == [
        "20251107_0043_ampl_dump.json",
        "20251107_0043_ampl_dump_20251106T00-20251106T23.json",
        "20251107_0043_ampl_dump_20251106T00-20251106T23_2.json",
        "20251107_0043_ampl_dump_20251106T00-20251106T23_3.json",
    ]
    gzipped = settings_for(["--format", "jsonl", "--gzip"])
    several = output_names(gzipped.started, gzipped.data_outfile, gzipped.extension, window, several=True)
    assert next(several) == "20251107_0043_ampl_dump_20251106T00-20251106T23.jsonl.gz"


def test_default_settings_are_the_seeds():
    settings = settings_for([])
    assert settings.api.base_url == "https://analytics.eu.amplitude.com"
    assert [w.label for w in settings.windows] == ["20251106T00-20251106T23"]
    assert (settings.api.max_attempts, settings.api.delay_seconds) == (5, 1)
    # Beside fetch_data.py, wherever the run starts from.
    assert (settings.data_dir, settings.log_dir) == (ROOT / "data", ROOT / "logs")
    assert settings.data_outfile == "ampl_dump"
    assert settings.log_level == logging.INFO
    assert (settings.file_format, settings.gzip, settings.workers, settings.window_hours) == ("json", False, 1, 24)


def test_secrets_stay_out_of_the_settings_repr():
    text = repr(settings_for([], {"AMP_API_KEY": "key-visible", "AMP_SECRET_KEY": "secret-visible"}))
    assert "key-visible" not in text and "secret-visible" not in text


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["--region", "us"], {}, "https://amplitude.com"),
        ([], {"AMP_REGION": "US"}, "https://amplitude.com"),
        (["--base-url", "http://127.0.0.1:9/"], {"AMP_REGION": "us"}, "http://127.0.0.1:9"),
        ([], {"AMP_BASE_URL": "https://proxy.example/amp"}, "https://proxy.example/amp"),
        (["--base-url", "https://analytics.eu.amplitude.com/api/2/export"], {}, "https://analytics.eu.amplitude.com"),
        (["--base-url", "https://proxy.example/amp/api/2/export/"], {}, "https://proxy.example/amp"),
        (["--base-url", "http://localhost:8080"], {}, "http://localhost:8080"),
        (["--base-url", "http://[::1]:8080/api/2/export"], {}, "http://[::1]:8080"),
        (["--base-url", "http://127.8.9.1"], {}, "http://127.8.9.1"),
    ],
)
def test_base_url_from_region_or_override(argv, env, expected):
    assert settings_for(argv, env).api.base_url == expected


def test_a_variable_of_a_mode_not_asked_for_is_no_error():
    """AZURE_STORAGE_CONTAINER and AMP_LAKE_RETENTION_DAYS may stay in .env for the nights that upload or maintain."""
    env = {"AZURE_STORAGE_CONTAINER": "events", "AZURE_BLOB_PREFIX": "x", "AMP_LAKE_RETENTION_DAYS": "3"}
    assert settings_for(["--date", "2025-11-01"], env).upload is None


def test_a_flag_wins_over_its_environment_variable():
    settings = settings_for(["--max-attempts", "3", "--workers", "4"], {"AMP_MAX_ATTEMPTS": "9", "AMP_WORKERS": "2"})
    assert (settings.api.max_attempts, settings.workers) == (3, 4)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {"AMP_API_KEY": ""}, "AMP_API_KEY not set"),
        ([], {"AMP_API_KEY": "", "AMP_SECRET_KEY": " "}, "AMP_API_KEY and AMP_SECRET_KEY not set"),
        (["--date", "2025-11-07"], {}, "has not ended yet"),
        (["--date", "2025-02-29"], {}, "no such date"),
        (["--date", "2025-11-01", "--start", "2025-11-01"], {}, "cannot be combined"),
        (["--start", "2025-11-01"], {}, "go together"),
        (["--start", "2025-11-03", "--end", "2025-11-01"], {}, "is before --start"),
        (["--start", "2025-11-01", "--end", "20251107T00"], {}, "last finished hour is 20251106T23"),
        (["--max-attempts", "0"], {}, "--max-attempts: must be between 1 and 100"),
        ([], {"AMP_MAX_ATTEMPTS": "five"}, "AMP_MAX_ATTEMPTS: expected a whole number"),
        (["--delay-seconds", "-1"], {}, "--delay-seconds: must be between"),
        (["--workers", "6"], {}, "--workers: must be between 1 and 5"),
        (["--window-hours", "0"], {}, "--window-hours: must be between 1 and 8760"),
        (["--format", "csv"], {}, "--format: must be one of json, jsonl"),
        (["--region", "asia"], {}, "--region: must be one of eu, us"),
        (["--base-url", "ftp://x"], {}, "expected an http"),
        (["--base-url", "https://user:pw@host"], {}, "without credentials"),
        (["--base-url", "http://analytics.eu.amplitude.com"], {}, "unencrypted to analytics.eu.amplitude.com"),
        (["--base-url", "http://10.0.0.5:8080"], {}, "use https://"),
        (["--base-url", "http://localhost.evil.example"], {}, "use https://"),
        (["--base-url", "https://host/x?start=1"], {}, "without credentials, query"),
        (["--attempt-timeout", "0"], {}, "--attempt-timeout: must be between"),
        ([], {"AMP_MAX_EVENT_BYTES": "lots"}, "AMP_MAX_EVENT_BYTES: expected a whole number"),
        (["--log-level", "LOUD"], {}, "--log-level: must be one of"),
        (["--data-outfile", "../x"], {}, "--data-outfile: use letters"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--date", ""], {}, "--date: the value is empty"),
        ([], {"AMP_API_KEY": "0123:4567"}, "AMP_API_KEY holds characters an Amplitude key never has"),
        ([], {"AMP_SECRET_KEY": '"0123abcd"'}, "AMP_SECRET_KEY holds characters an Amplitude key never has"),
        ([], {"AMP_SECRET_KEY": "0123 abcd"}, "AMP_SECRET_KEY holds characters an Amplitude key never has"),
        (["--data-dir", " "], {}, "--data-dir: the value is empty"),
        (["--lake="], {}, "--lake: the value is empty"),
        (["--container", "events"], {}, "--container goes with --upload"),
        (["--blob-prefix", "x/y"], {}, "--blob-prefix goes with --upload"),
        (["--lake-retention-days", "0", "--lake", "t"], {}, "--lake-retention-days goes with --lake-maintain"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(argv, env, message):
    with pytest.raises(UsageError, match=message):
        settings_for(argv, env)


@pytest.mark.parametrize(
    "base_url, shown",
    [
        ("https://user:pw-secret@host", "'https://…@host'"),
        ("https://host/x?sig=token-secret", "'https://host/x?…'"),
        ("https://host/x#token-secret", "'https://host/x#…'"),
        ("https://[token-secret", "'https://…'"),
        ("https://host:99999", "'https://host:99999'"),
        ("https://host:port", "'https://host:port'"),
        ("https://:443", "'https://:443'"),
    ],
)
def test_a_base_url_that_cannot_work_is_refused_without_its_secrets(base_url, shown):
    with pytest.raises(UsageError) as refused:
        settings_for(["--base-url", base_url], {})
    assert str(refused.value) == f"--base-url: expected an http(s) URL without credentials, query or fragment, got {shown}"
    assert "secret" not in str(refused.value)


def test_the_end_may_be_the_last_finished_hour():
    settings = settings_for(["--start", "20251106T20", "--end", "20251107T00"], now="2025-11-07 01:00")
    assert [w.label for w in settings.windows] == ["20251106T20-20251107T00"]


URL = "https://analytics.eu.amplitude.com/api/2/export"
TOO_LARGE = "The file size of the exported data is too large. Shorten the time ranges and try again."


def answer(status, headers=None, body=""):
    return Answer(status, headers or {}, body, URL)


@pytest.mark.parametrize(
    "status, headers, body, delay, expected",
    [
        (503, {}, "", 1, ("Retryable", 1)),
        (500, {}, "", 0.5, ("Retryable", 0.5)),
        (429, {}, "", 1, ("Retryable", 2)),
        (429, {"Retry-After": "7"}, "", 1, ("Retryable", 7)),
        (429, {"Retry-After": "1"}, "", 1, ("Retryable", 2)),
        (429, {"Retry-After": "3600"}, "", 1, ("Retryable", 60)),
        (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, "", 1, ("Retryable", 2)),
        (429, {"Retry-After": "soon"}, "", 1, ("Retryable", 2)),
        (400, {}, TOO_LARGE, 1, ("TooLarge", None)),
        (400, {}, "Invalid start or end parameter", 1, ("ExportError", None)),
        (400, {}, "", 1, ("ExportError", None)),
        (401, {}, "", 1, ("ExportError", None)),
        (403, {}, "", 1, ("ExportError", None)),
        (404, {}, "<html><body>404 Not Found</body></html>", 1, ("ExportError", None)),
        (404, {}, "", 1, ("ExportError", None)),
        (302, {"Location": "https://elsewhere.example/login"}, "", 1, ("ExportError", None)),
        (418, {}, "", 1, ("ExportError", None)),
    ],
)
def test_classify_decides_retry_split_or_fail(status, headers, body, delay, expected):
    with pytest.raises(Exception) as caught:
        classify(answer(status, headers, body), delay)
    assert type(caught.value).__name__ == expected[0]
    assert getattr(caught.value, "wait", None) == expected[1]


def test_retry_after_as_an_http_date_is_the_time_until_then():
    now = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)
    assert retry_after_seconds({"Retry-After": "Fri, 07 Nov 2025 03:30:25 GMT"}, now) == 25
    assert retry_after_seconds({"Retry-After": "Fri, 07 Nov 2025 03:00:00 GMT"}, now) == 0
    assert retry_after_seconds({}, now) == 0


def test_a_404_that_is_not_amplitudes_no_data_names_the_url_and_the_settings():
    with pytest.raises(ExportError) as caught:
        classify(answer(404, body="<html>\n<head><title>404 Not Found</title></head>"), 1)
    assert str(caught.value) == (
        f"HTTP 404 for {URL} is not Amplitude's 'no data' answer (<html>): check --base-url (AMP_BASE_URL) and --region"
    )


def test_a_redirect_names_the_status_and_the_host_it_points_to():
    with pytest.raises(ExportError, match=r"^HTTP 301: .* redirects to evil\.example; redirects are not followed"):
        classify(answer(301, {"Location": "http://evil.example:8080/api/2/export?x=1"}), 1)


def test_a_400_that_is_not_too_large_fails_with_its_first_line():
    with pytest.raises(ExportError, match=r"^Amplitude answered HTTP 400: Invalid start or end parameter$"):
        classify(answer(400, body="Invalid start or end parameter\nmore"), 1)


@pytest.mark.parametrize(
    "status, body, expected",
    [(200, "", "ok"), (404, "Raw data files were not found.", "empty"), (404, "Raw data files were not found", "empty"),
     (404, '{"error": "raw data files were not found."}', "empty")],
)
def test_classify_success_and_empty(status, body, expected):
    assert classify(answer(status, body=body), 1) == expected


@pytest.mark.parametrize(
    "name, plain",
    [("20251107_0043_ampl_dump.json", True), ("../etc/passwd", False), ("sub/x.json", False), ("..", False),
     ("", False), (None, False), ("a\\b", False)],
)
def test_manifest_records_name_files_in_the_data_folder_only(name, plain):
    assert is_plain_name(name) is plain
