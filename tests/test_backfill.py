"""Ranges end to end: windows, manifest, resume, refetch, splitting, failures, workers, the lock, crashes, formats."""

import datetime as dt
import fcntl
import gzip
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time

import pytest

from tests.conftest import as_array, as_jsonl, hour, wait_for
from windows import HOUR, format_hour, last_finished_hour

RANGE = ("--start", "2025-11-01", "--end", "2025-11-03")
DAYS = ["20251101", "20251102", "20251103"]


def day_lines(standin, day):
    return standin.expected_lines(hour(f"{day}T00"), hour(f"{day}T23"))


def assert_range_exported_once(cli, standin, days=DAYS):
    """Every day of the range in exactly one recorded file, byte for byte, and the manifest true to the files."""
    latest = {(r["start"], r["end"]): r for r in cli.manifest()}
    records = [r for r in latest.values() if (cli.data / r["file"]).exists()]
    assert sorted((r["start"], r["end"]) for r in records) == [(f"{d}T00", f"{d}T23") for d in days]
    for record in records:
        content = (cli.data / record["file"]).read_bytes()
        assert content == as_array(day_lines(standin, record["start"][:8]))
        assert record["bytes"] == len(content)
        assert record["sha256"] == hashlib.sha256(content).hexdigest()
        assert record["events"] == len(json.loads(content))
    assert len(cli.outputs()) == len(records)
    assert cli.leftovers() == []


@pytest.mark.quick
def test_a_range_is_one_file_per_day_with_a_manifest(cli, standin):
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    names = [p.name for p in cli.outputs()]
    assert [n[14:] for n in names] == [f"ampl_dump_{d}T00-{d}T23.json" for d in DAYS]
    assert_range_exported_once(cli, standin)
    record = cli.manifest()[0]
    assert set(record) == {"start", "end", "file", "events", "bytes", "sha256", "finished_at", "hours", "event_types"}
    assert dt.datetime.strptime(record["finished_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert [(r["start"], r["end"]) for r in standin.requests] == [(f"{d}T00", f"{d}T23") for d in DAYS]


def test_the_manifest_counts_events_per_hour_and_per_event_type(cli, standin):
    standin.empty_hours = {hour("20251101T05")}
    result = cli.run("--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    (record,) = cli.manifest()
    expected = {f"20251101T{h:02d}": 0 if h == 5 else 6 for h in range(24)}
    assert record["hours"] == expected and list(record["hours"]) == sorted(expected)
    events = json.loads((cli.data / record["file"]).read_bytes())
    types = {}
    for event in events:
        types[event["event_type"]] = types.get(event["event_type"], 0) + 1
    assert record["event_types"] == types
    assert sum(record["hours"].values()) == sum(record["event_types"].values()) == record["events"] == len(events)


def test_counts_are_undone_with_a_damaged_download(cli, standin):
    standin.add_fault("corrupt_crc")
    assert cli.run("--date", "2025-11-01", "--window-hours", "6").returncode == 0
    for record in cli.manifest():
        assert sum(record["hours"].values()) == record["events"] == 6 * 6
        assert len(record["hours"]) == 6


def test_hours_and_window_hours(cli, standin):
    result = cli.run("--start", "20251101T20", "--end", "20251102T03", "--window-hours", "3")
    assert result.returncode == 0, result.stderr
    spans = [(r["start"], r["end"]) for r in cli.manifest()]
    assert spans == [("20251101T20", "20251101T22"), ("20251101T23", "20251102T01"), ("20251102T02", "20251102T03")]
    for record in cli.manifest():
        expected = standin.expected_lines(hour(record["start"]), hour(record["end"]))
        assert (cli.data / record["file"]).read_bytes() == as_array(expected)


def test_a_rerun_skips_what_is_exported_without_a_request(cli, standin):
    assert cli.run(*RANGE).returncode == 0
    files_before = {p.name: p.read_bytes() for p in cli.outputs()}
    standin.requests.clear()
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert standin.requests == []
    assert "Skipping 72 hour(s) already exported" in result.stderr
    assert {p.name: p.read_bytes() for p in cli.outputs()} == files_before
    assert len(cli.manifest()) == 3


def test_a_missing_or_damaged_file_is_exported_again(cli, standin):
    assert cli.run(*RANGE).returncode == 0
    first, second, _ = cli.outputs()
    first.unlink()
    with open(second, "ab") as damaged:
        damaged.write(b"garbage")
    standin.requests.clear()
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert [(r["start"], r["end"]) for r in standin.requests] == [("20251101T00", "20251101T23"), ("20251102T00", "20251102T23")]
    second.unlink()
    assert_range_exported_once(cli, standin)


def test_refetch_exports_again_without_overwriting(cli, standin):
    assert cli.run(*RANGE).returncode == 0
    before = {p.name: p.read_bytes() for p in cli.outputs()}
    result = cli.run(*RANGE, "--refetch")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_bytes() for p in cli.outputs()}
    assert len(after) == 6 and all(after[name] == content for name, content in before.items())
    assert len(standin.requests) == 6 and len(cli.manifest()) == 6


def test_a_window_too_large_is_split_down_to_what_amplitude_accepts(cli, standin):
    standin.too_large_over_hours = 5
    result = cli.run("--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    asked = [(r["start"], r["end"]) for r in standin.requests]
    assert asked[:3] == [("20251101T00", "20251101T23"), ("20251101T00", "20251101T11"), ("20251101T00", "20251101T05")]
    served = [span for span in asked if int(span[1][-2:]) - int(span[0][-2:]) < 5]
    assert served == [(f"20251101T{h:02d}", f"20251101T{h + 2:02d}") for h in range(0, 24, 3)]
    assert_range_exported_once(cli, standin, days=["20251101"])
    assert "splitting into 20251101T00-20251101T11 and 20251101T12-20251101T23" in result.stderr


def test_a_window_that_keeps_timing_out_is_split(cli, standin):
    standin.timeout_over_hours = 12
    result = cli.run("--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    asked = [(r["start"], r["end"]) for r in standin.requests]
    assert asked == [("20251101T00", "20251101T23")] * 5 + [("20251101T00", "20251101T11"), ("20251101T12", "20251101T23")]
    assert "still timing out (504) after 5 attempts" in result.stderr
    assert_range_exported_once(cli, standin, days=["20251101"])


def test_a_damaged_half_is_rolled_back_and_fetched_again(cli, standin):
    standin.too_large_over_hours = 12
    standin.add_fault("corrupt_crc", start="20251101T12", end="20251101T23")
    result = cli.run("--date", "2025-11-01", "--gzip")
    assert result.returncode == 0, result.stderr
    content = gzip.decompress(cli.outputs()[0].read_bytes())
    assert content == as_array(day_lines(standin, "20251101"))


def test_a_failing_window_does_not_stop_the_others_and_the_next_run_finishes(cli, standin):
    standin.add_fault(500, start="20251102T00", end="20251102T23", times=5)
    result = cli.run(*RANGE)
    assert result.returncode == 1
    assert result.stderr.count("Max fetch attempts reached") == 1
    assert "Window 20251102T00-20251102T23 failed: Max fetch attempts reached" in result.stderr
    assert "2 window(s) exported" in result.stderr and "1 failed" in result.stderr
    assert [r["start"] for r in cli.manifest()] == ["20251101T00", "20251103T00"]
    standin.requests.clear()
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert [(r["start"], r["end"]) for r in standin.requests] == [("20251102T00", "20251102T23")]
    assert_range_exported_once(cli, standin)


def comparable(cli):
    return [
        ({k: v for k, v in r.items() if k not in ("file", "finished_at")}, r["file"][14:], (cli.data / r["file"]).read_bytes())
        for r in cli.manifest()
    ]


@pytest.mark.slow
def test_workers_give_the_same_files_and_manifest(cli, standin, tmp_path):
    days = ("--start", "2025-10-27", "--end", "2025-11-03")
    standin.add_fault(503, start="20251027T00", end="20251027T23", times=2)
    assert cli.run(*days, "--workers", "4").returncode == 0
    parallel = comparable(cli)
    cli.data = tmp_path / "serial"
    assert cli.run(*days, "--data-dir", str(cli.data)).returncode == 0
    assert parallel == comparable(cli)
    assert [r[0]["start"][:8] for r in parallel] == [f"202510{d}" for d in range(27, 32)] + DAYS


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 4])
def test_workers_are_concurrent_requests(cli, standin, workers):
    standin.answer_delay = 0.5
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-04", "--workers", str(workers))
    assert result.returncode == 0, result.stderr
    assert standin.most_in_flight == workers


@pytest.mark.slow
def test_one_run_at_a_time_per_data_folder(cli, standin):
    standin.add_fault("stall", seconds=4)
    first = cli.start("--date", "2025-11-01", "--read-timeout", "30")
    wait_for(lambda: standin.requests)
    began = time.monotonic()
    second = cli.run("--date", "2025-11-02")
    assert second.returncode == 1
    assert f"another export is running in {cli.data}" in second.stderr
    assert time.monotonic() - began < 10
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert [r["start"] for r in cli.manifest()] == ["20251101T00"]


def test_a_killed_run_leaves_nothing_half_done_and_the_next_run_completes(cli, standin):
    standin.add_fault("stall", start="20251102T00", end="20251102T23", seconds=30)
    victim = cli.start(*RANGE, "--read-timeout", "60")
    # The second window's request starts while the first is being recorded: wait for both.
    wait_for(lambda: len(standin.requests) >= 2 and len(cli.manifest()) == 1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert [r["start"] for r in cli.manifest()] == ["20251101T00"]
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert_range_exported_once(cli, standin)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_ends_the_run_at_once_leaving_no_temporary_file(cli, standin, signum):
    standin.add_fault("stall", start="20251102T00", end="20251102T23", seconds=30)
    victim = cli.start(*RANGE, "--read-timeout", "60", "--workers", "2")
    wait_for(lambda: len(standin.requests) >= 2 and len(cli.outputs()) >= 1)
    wait_for(lambda: any(p.name.endswith(".part") for p in cli.leftovers()))
    began = time.monotonic()
    victim.send_signal(signum)
    _, stderr = victim.communicate(timeout=20)
    assert victim.returncode == 1
    assert time.monotonic() - began < 10
    assert f"Stopped by {signum.name}" in stderr, stderr
    assert [p for p in cli.leftovers() if p.name.endswith(".part")] == []
    standin.faults.clear()  # a stall the stopped run did not reach would hold the next one 30 s
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert_range_exported_once(cli, standin)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_ignored_when_the_run_starts_stays_ignored(cli, standin, signum):
    """nohup ignores SIGHUP, and a script's background job SIGINT: a closed terminal or a Ctrl-C meant for the
    script must not stop a backfill started that way."""
    standin.add_fault("stall", start="20251102T00", end="20251102T23", seconds=5)
    victim = subprocess.Popen(cli.command(*RANGE), cwd=cli.workdir, env=cli.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))
    wait_for(lambda: len(standin.requests) >= 2)
    assert victim.poll() is None  # held by the stall: the signal reaches a run in progress
    victim.send_signal(signum)
    _, stderr = victim.communicate(timeout=60)
    assert victim.returncode == 0, stderr
    assert "Stopped by" not in stderr
    assert_range_exported_once(cli, standin)


def requested(cli, standin):
    return standin.arrived >= 1


def writing(cli, standin):
    return any(p.name.endswith(".part") for p in cli.leftovers())


def recorded(cli, standin):
    return len(cli.manifest()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("moment", [requested, writing, recorded])
def test_kill_at_any_moment_then_resume(cli, standin, moment):
    standin.events_per_part = 150
    if moment is requested:
        standin.answer_delay = 30  # held until the kill: the run has asked, and written nothing
    victim = cli.start(*RANGE, "--workers", "2")
    wait_for(lambda: moment(cli, standin) or victim.poll() is not None)
    assert victim.poll() is None, "the run ended before the moment to kill it"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    standin.answer_delay = 0
    records = cli.manifest()
    if moment is requested:
        assert records == [] and cli.outputs() == []
    if moment is recorded:
        assert records
    for record in records:
        assert (cli.data / record["file"]).stat().st_size == record["bytes"]
    # A file under its final name has its manifest line, or, killed between rename and append, its journal.
    journal = cli.data / ".ampl-commit.json"
    journaled = {json.loads(journal.read_bytes())["file"]} if journal.exists() else set()
    assert {p.name for p in cli.outputs()} <= {r["file"] for r in records} | journaled
    for output in cli.outputs():
        assert json.loads(output.read_bytes())
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert_range_exported_once(cli, standin)


def test_a_run_killed_between_rename_and_manifest_append_is_completed(cli, standin):
    assert cli.run(*RANGE).returncode == 0
    manifest = cli.data / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    # The state such a kill leaves: the last file in place, its line only in the journal.
    manifest.write_text("".join(line + "\n" for line in lines[:-1]))
    (cli.data / ".ampl-commit.json").write_text(lines[-1])
    standin.requests.clear()
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert standin.requests == []
    assert "put in place by a run that stopped before recording it" in result.stderr
    assert manifest.read_text().splitlines() == lines
    assert not (cli.data / ".ampl-commit.json").exists()
    assert_range_exported_once(cli, standin)


@pytest.mark.parametrize("journal", ["{\"start\": \"2025110", '{"start":"20251102T00","end":"20251102T23","file":"gone.json"}'])
def test_a_journal_whose_rename_never_happened_is_dropped(cli, standin, journal):
    assert cli.run("--date", "2025-11-01").returncode == 0
    (cli.data / ".ampl-commit.json").write_text(journal)
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert not (cli.data / ".ampl-commit.json").exists()
    assert_range_exported_once(cli, standin)


def test_a_manifest_line_pointing_outside_the_data_folder_is_ignored(cli, standin):
    outside = cli.workdir / "elsewhere.json"
    outside.write_bytes(b"[]\n")
    cli.data.mkdir()
    record = {"start": "20251101T00", "end": "20251101T23", "file": "../elsewhere.json", "events": 0, "bytes": 3,
              "sha256": "x", "finished_at": "2025-11-02T00:00:00Z"}
    (cli.data / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    result = cli.run("--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    assert re.search(r"manifest.jsonl line 1 is not a manifest record \(.*\); ignored", result.stderr)
    assert len(standin.requests) == 1


def test_a_manifest_line_torn_by_a_crash_is_repaired(cli, standin):
    assert cli.run("--date", "2025-11-01").returncode == 0
    with open(cli.data / "manifest.jsonl", "a") as manifest:
        manifest.write('{"start":"20251102T00","end":"2025')
    result = cli.run(*RANGE)
    assert result.returncode == 0, result.stderr
    assert "incomplete last line" in result.stderr
    assert_range_exported_once(cli, standin)


@pytest.mark.parametrize(
    "flags, suffix, layout, packed",
    [
        ((), ".json", as_array, False),
        (("--format", "jsonl"), ".jsonl", as_jsonl, False),
        (("--gzip",), ".json.gz", as_array, True),
        (("--format", "jsonl", "--gzip"), ".jsonl.gz", as_jsonl, True),
    ],
)
def test_formats(cli, standin, flags, suffix, layout, packed):
    result = cli.run(*RANGE, *flags)
    assert result.returncode == 0, result.stderr
    for day, output in zip(DAYS, cli.outputs(), strict=True):
        assert output.name.endswith(f"_{day}T00-{day}T23{suffix}")
        content = output.read_bytes()
        assert (gzip.decompress(content) if packed else content) == layout(day_lines(standin, day))


def test_a_window_that_ended_less_than_2_hours_ago_is_flagged(cli, standin):
    last = last_finished_hour(dt.datetime.now(dt.UTC))
    result = cli.run("--start", format_hour(last - 3 * HOUR), "--end", format_hour(last))
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "may be incomplete" in result.stderr


def test_an_old_window_is_not_flagged(cli, standin):
    result = cli.run("--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    assert "may be incomplete" not in result.stderr


def test_a_terminal_gets_a_progress_bar_and_cron_does_not(cli, standin):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(cli.command(*RANGE), cwd=cli.workdir, env=cli.env(), stdout=subprocess.DEVNULL,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    process.wait(timeout=60)
    assert b"3/3" in seen and b"window" in seen
    cron = cli.run(*RANGE, "--refetch")
    assert "3/3" not in cron.stderr
