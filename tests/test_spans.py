"""--workers on one window: hour spans over several connections, written in hour order, byte for byte a single
request's file; at most N requests in flight, fewer after a 429; a failed span fails its window."""

import json
import threading
import time

import pytest

import spans
from export_api import Retryable
from tests.conftest import hour
from windows import Window

DAY = ("--date", "2025-11-01")


def day_window() -> Window:
    return Window(hour("20251101T00"), hour("20251101T23"))


def test_a_window_is_cut_into_contiguous_spans_of_near_equal_hours():
    cut = spans.plan_spans(day_window(), 8)
    assert [span.hours for span in cut] == [3] * 8
    assert all(a.end + spans.HOUR == b.start for a, b in zip(cut, cut[1:], strict=False))
    assert (cut[0].start, cut[-1].end) == (day_window().start, day_window().end)
    assert [span.hours for span in spans.plan_spans(day_window(), 5)] == [5, 5, 5, 5, 4]
    assert len(spans.plan_spans(Window(hour("20251101T00"), hour("20251101T02")), 8)) == 3
    assert spans.spans_per_window(1, 1) == 1 and spans.spans_per_window(4, 1) == 8
    assert spans.spans_per_window(4, 3) == 3 and spans.spans_per_window(5, 30) == 1


def test_the_pace_holds_requests_at_the_limit_and_a_429_lowers_it():
    pace = spans.Pace(2)
    entered, leave = threading.Semaphore(0), threading.Event()

    def request():
        with pace.slot():
            entered.release()
            leave.wait(30)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert entered.acquire(timeout=30) and entered.acquire(timeout=30)
    assert not entered.acquire(timeout=0.2)  # the third waits for a slot (a bounded look, not a hope)
    assert pace.in_flight == 2
    leave.set()
    assert entered.acquire(timeout=30)
    for thread in threads:
        thread.join()
    pace.heard(Retryable("busy", 0, 503))
    assert pace.limit == 2
    pace.heard(Retryable("rate limit", 0, 429))
    pace.heard(Retryable("rate limit", 0, 429))
    assert pace.limit == 1 and pace.in_flight == 0


def serial_bytes(cli, *args) -> tuple[bytes, dict]:
    result = cli.run(*DAY, *args, "--data-dir", "serial")
    assert result.returncode == 0, result.stderr
    folder = cli.workdir / "serial"
    (output,) = [p for p in folder.iterdir() if p.name.endswith(".json")]
    record = next(line for line in (folder / "manifest.jsonl").read_text().splitlines())
    return output.read_bytes(), record


def assert_same_as_serial(cli, expected: bytes, record: str) -> None:
    (output,) = cli.outputs()
    assert output.read_bytes() == expected
    ours, theirs = cli.manifest()[0], json.loads(record)
    for key in ("events", "bytes", "sha256", "hours", "event_types"):
        assert ours[key] == theirs[key]
    assert cli.leftovers() == []


@pytest.mark.quick
def test_one_day_over_four_connections_is_the_serial_file_byte_for_byte(cli, standin):
    standin.events_per_part = 40
    expected, record = serial_bytes(cli)
    asked = len(standin.requests)
    standin.gate = threading.Event()
    process = cli.start(*DAY, "--workers", "4")
    try:
        deadline = time.monotonic() + 60
        while standin.in_flight < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a condition: four requests held at the gate at once
        assert standin.in_flight == 4
    finally:
        standin.gate.set()
    assert process.wait(120) == 0, process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert standin.most_in_flight == 4
    ranges = [(r["start"], r["end"]) for r in standin.requests[asked:]]
    assert sorted(ranges) == [(f"20251101T{h:02d}", f"20251101T{h + 2:02d}") for h in range(0, 24, 3)]
    assert_same_as_serial(cli, expected, record)


def test_a_429_lowers_the_requests_in_flight_for_the_rest_of_the_run(cli, standin):
    expected, record = serial_bytes(cli)
    standin.add_fault(429, "20251101T00", "20251101T02", retry_after=0)
    result = cli.run(*DAY, "--workers", "4")
    assert result.returncode == 0, result.stderr
    assert "at most 3 request(s) at once from now on" in result.stderr
    assert_same_as_serial(cli, expected, record)


def test_spans_amplitude_finds_too_large_are_split(cli, standin):
    expected, record = serial_bytes(cli)
    standin.too_large_over_hours = 2
    result = cli.run(*DAY, "--workers", "2")  # four spans of six hours, each split down to two hours
    assert result.returncode == 0, result.stderr
    assert "splitting into" in result.stderr
    assert_same_as_serial(cli, expected, record)


def test_a_damaged_span_is_fetched_again_and_a_failed_span_fails_its_window(cli, standin):
    expected, record = serial_bytes(cli)
    standin.add_fault("corrupt_crc", "20251101T09", "20251101T11")
    result = cli.run(*DAY, "--workers", "4")
    assert result.returncode == 0, result.stderr
    assert "fetching it again" in result.stderr
    assert_same_as_serial(cli, expected, record)

    for output in cli.outputs():
        output.unlink()
    (cli.data / "manifest.jsonl").unlink()
    standin.add_fault(500, "20251101T15", "20251101T17", times=3)
    result = cli.run(*DAY, "--workers", "4", "--max-attempts", "3")
    assert result.returncode == 1
    assert "Max fetch attempts reached for 20251101T15-20251101T17" in result.stderr
    assert cli.outputs() == [] and cli.leftovers() == []
    result = cli.run(*DAY, "--workers", "4")  # the next run exports the window again
    assert result.returncode == 0, result.stderr
    assert_same_as_serial(cli, expected, record)


@pytest.mark.slow
def test_kill_9_mid_spans_leaves_nothing_and_the_next_run_completes_the_window(cli, standin):
    import signal

    standin.events_per_part = 300  # a window that takes a while to write, so the kill lands mid-way
    expected, record = serial_bytes(cli)
    standin.gate = threading.Event()
    process = cli.start(*DAY, "--workers", "4")
    deadline = time.monotonic() + 60
    while standin.in_flight < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a condition: four span requests in flight
    first_done = standin.in_flight == 4
    standin.gate.set()  # the first spans come back while others are still asked for...
    while not any(cli.data.glob(".ampl-span-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # ...until a span's archive waits on disk
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    assert first_done and cli.outputs() == []
    result = cli.run(*DAY, "--workers", "4")
    assert result.returncode == 0, result.stderr
    assert_same_as_serial(cli, expected, record)
