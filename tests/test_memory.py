"""Memory stays flat: an export several times larger than the RSS budget, measured from outside the process."""

import datetime as dt
import itertools
import json
import os
import sys
import zipfile
import zlib

import pytest

from amplitude_standin import StandIn, member_name
from bench.bench import build_archive_file, run_measured
from tests.conftest import ROOT, hour

pytestmark = pytest.mark.slow

RSS_BUDGET_MB = 64
EVENTS_MB = 320  # five times the budget
RULES_BUDGET_MB = 160  # under field rules: the exporter and its two workers, summed (docs/design-choices.md)
RULES = ("--drop-fields", "ip_address,city", "--hash-fields", "user_id,device_id")
HASH_KEY = "a-hash-key-for-the-memory-tests-0123456789"


@pytest.mark.parametrize("workers", ["1", "5"])
def test_a_large_export_stays_under_the_rss_budget(tmp_path, workers):
    archive = tmp_path / "big.zip"
    events = build_archive_file(archive, EVENTS_MB, level=1)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01", "--workers", workers,
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
        _, peak_mb = run_measured(command, env)
    record = json.loads((tmp_path / "data" / "manifest.jsonl").read_text())
    assert record["events"] == events
    assert record["bytes"] > 5 * RSS_BUDGET_MB * 1_000_000
    assert peak_mb < RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


def test_a_large_export_under_field_rules_stays_under_its_budget(tmp_path):
    archive = tmp_path / "big.zip"
    events = build_archive_file(archive, EVENTS_MB, level=1, distinct=True)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url,
                   AMP_HASH_KEY=HASH_KEY)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01", *RULES,
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
        _, peak_mb = run_measured(command, env)
    record = json.loads((tmp_path / "data" / "manifest.jsonl").read_text())
    assert record["events"] == events and record["policy"]["hashed"] == ["device_id", "user_id"]
    assert peak_mb < RULES_BUDGET_MB, f"peak RSS {peak_mb} MB"


def test_long_lines_under_field_rules_cost_a_bounded_number_of_copies(tmp_path):
    line_mb = 12  # under the default --max-event-bytes (16 MB)
    line = b'{"event_type":"x","user_id":"u","ip_address":"1.2.3.4","blob":"' + b"a" * (line_mb << 20) + b'"}\n'
    members = [(member_name(hour("20251101T00") + dt.timedelta(hours=number), 0), gzipped_stream([line] * 4))
               for number in range(6)]
    peak_mb = measured_export(tmp_path, members, *RULES, AMP_HASH_KEY=HASH_KEY)
    assert json.loads((tmp_path / "data" / "manifest.jsonl").read_text())["events"] == 24
    # Each worker and the exporter hold a few copies of the line it has in hand (docs/design-choices.md).
    assert peak_mb < RULES_BUDGET_MB + 20 * line_mb, f"peak RSS {peak_mb} MB"


def test_events_named_by_megabytes_of_text_keep_the_manifest_and_memory_small(tmp_path):
    """An event type is counted by name in memory, the manifest and the report: a few kilobytes of archive naming
    each event by a megabyte of its own text must not cost a megabyte a name."""
    events = 300
    lines = (b'{"event_type":"%d' % number + b"a" * (1 << 20) + b'"}\n' for number in range(events))
    peak_mb = measured_export(tmp_path, [(member_name(hour("20251101T05"), 0), gzipped_stream(lines))])
    manifest = tmp_path / "data" / "manifest.jsonl"
    assert manifest.stat().st_size < 100_000
    types = json.loads(manifest.read_text())["event_types"]
    assert len(types) == events and {len(name) for name in types} == {201}
    assert types[f"0{'a' * 199}…"] == 1
    assert peak_mb < RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


def measured_export(tmp_path, members, *flags, expected_status=0, **env_extra) -> float:
    """fetch_data.py exporting a zip of `members` (name, gzipped bytes), ending in `expected_status`: its peak RSS in MB."""
    archive = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for name, data in members:
            out.writestr(name, data)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url, AMP_DELAY_SECONDS="0",
                   **env_extra)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01", "--max-attempts", "1",
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs"), *flags]
        return run_measured(command, env, expected_status)[1]


def gzipped_stream(parts) -> bytes:
    """Gzip of the concatenated `parts`, made a piece at a time so the test itself stays small."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(compressor.compress(part) for part in parts) + compressor.flush()


def test_one_long_line_costs_about_its_own_length(tmp_path):
    line_mb = 100
    head, tail = b'{"ok":1}\n{"event_type":"x","blob":"', b'"}\n{"ok":2}\n'
    data = gzipped_stream([head, *itertools.repeat(b"a" * 1_000_000, line_mb), tail])
    peak_mb = measured_export(tmp_path, [(member_name(hour("20251101T05"), 0), data)],
                              "--max-event-bytes", str(128 << 20), "--format", "jsonl")
    output = next((tmp_path / "data").glob("*_ampl_dump.jsonl"))
    assert output.stat().st_size == len(head) + line_mb * 1_000_000 + len(tail)
    assert peak_mb < 2.5 * line_mb + RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


def test_a_line_that_never_ends_fails_within_the_budget(tmp_path):
    data = gzipped_stream(itertools.repeat(b"a" * 1_000_000, 400))
    peak_mb = measured_export(tmp_path, [(member_name(hour("20251101T05"), 0), data)], expected_status=1)
    log = next((tmp_path / "logs").glob("*.log")).read_text()
    assert "line 1: longer than 16777216 bytes (--max-event-bytes)" in log
    assert peak_mb < 2.5 * 16 + RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


def test_a_day_of_tiny_events_stays_under_the_rss_budget(tmp_path):
    per_member = 500_000  # 12 million events: the peak is set by the batch, not by the length of the day
    members = [(member_name(hour("20251101T00") + dt.timedelta(hours=h), 0), gzipped_stream([b"{}\n" * per_member]))
               for h in range(24)]
    peak_mb = measured_export(tmp_path, members)
    record = json.loads((tmp_path / "data" / "manifest.jsonl").read_text())
    assert record["events"] == 24 * per_member
    assert peak_mb < RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


@pytest.fixture(scope="module")
def normal_run_mb(tmp_path_factory) -> float:
    """Peak RSS of an ordinary day (realistic events, 40 MB of them), the yardstick of the cases below."""
    tmp_path = tmp_path_factory.mktemp("normal")
    archive = tmp_path / "normal.zip"
    build_archive_file(archive, 40, level=1)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01",
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
        return run_measured(command, env)[1]


def test_blank_lines_cost_what_other_bytes_cost(tmp_path, normal_run_mb):
    blank = gzipped_stream(itertools.repeat(b"\n" * 1_000_000, 20))
    spaces = gzipped_stream(itertools.repeat(b" \r\n" * 100_000, 20))
    members = [(member_name(hour("20251101T05"), 0), blank), (member_name(hour("20251101T06"), 0), spaces)]
    archive = tmp_path / "blank.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name, data in members:
            out.writestr(name, data)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01",
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
        seconds, peak_mb = run_measured(command, env)
    assert json.loads((tmp_path / "data" / "manifest.jsonl").read_text())["events"] == 0
    # 26 million blank lines took a minute when each cost an exception; at C speed they take about a second.
    assert seconds < 8, f"{seconds} s"
    assert peak_mb < normal_run_mb + RSS_BUDGET_MB


def test_a_hundred_thousand_tiny_members_stay_within_the_budget(tmp_path, normal_run_mb):
    tiny = gzipped_stream([b'{"event_type":"a"}\n'])
    members = [(f"187520/187520_2025-11-01_{n % 24}#{n}.json.gz", tiny) for n in range(100_000)]
    peak_mb = measured_export(tmp_path, members)
    assert json.loads((tmp_path / "data" / "manifest.jsonl").read_text())["events"] == 100_000
    assert peak_mb < normal_run_mb + RSS_BUDGET_MB, f"peak RSS {peak_mb} MB, a normal run {normal_run_mb} MB"


def test_a_million_event_types_are_counted_ten_thousand_by_name(tmp_path, normal_run_mb):
    lines = (b'{"event_type":"type-%07d"}\n' % n for n in range(1_000_000))
    members = [(member_name(hour("20251101T07"), 0), gzipped_stream(lines))]
    peak_mb = measured_export(tmp_path, members)
    manifest = (tmp_path / "data" / "manifest.jsonl").read_bytes()
    record = json.loads(manifest)
    assert len(record["event_types"]) == 10_000 and sum(record["event_types"].values()) == 1_000_000
    assert record["event_types"]["(other types)"] > 900_000
    assert len(manifest) < 400_000
    assert peak_mb < normal_run_mb + RSS_BUDGET_MB, f"peak RSS {peak_mb} MB, a normal run {normal_run_mb} MB"


def write_long_manifest(path, lines: int) -> None:
    """`lines` export lines, two for each hour from 2000 on (a refetch of everything), none with its file."""
    first = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    sha = "ab" * 32
    with open(path, "w") as out:
        for n in range(lines):
            start = f"{first + dt.timedelta(hours=n // 2):%Y%m%dT%H}"
            out.write(f'{{"start":"{start}","end":"{start}","file":"f{n}.json","events":3,"bytes":99,"sha256":"{sha}",'
                      f'"finished_at":"2025-11-08T03:30:00Z","hours":{{"{start}":3}},'
                      f'"event_types":{{"page_view":2,"purchase":1}}}}\n')


def test_a_nightly_run_over_a_million_line_manifest_takes_seconds_and_little_memory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_long_manifest(data / "manifest.jsonl", 1_000_000)
    with StandIn("k", "s") as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01",
                   "--data-dir", str(data), "--log-dir", str(tmp_path / "logs")]
        seconds, peak_mb = run_measured(command, env)
    assert seconds < 10, f"{seconds} s"
    assert peak_mb < 256, f"peak RSS {peak_mb} MB"
    assert (data / "manifest.jsonl").read_bytes().count(b"\n") == 1_000_001


def test_the_report_of_a_million_line_manifest_stays_within_512_mb_and_a_bounded_page(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_long_manifest(data / "manifest.jsonl", 1_000_000)
    command = [sys.executable, str(ROOT / "fetch_data.py"), "--report", "--data-dir", str(data),
               "--log-dir", str(tmp_path / "logs")]
    _, peak_mb = run_measured(command, dict(os.environ), expected_status=1)  # 1: the files are not there
    page = (data / "report.html").stat().st_size
    assert peak_mb < 512, f"peak RSS {peak_mb} MB"
    assert page < 32_000_000, f"a page of {page} bytes"
    assert "The newest 2000 of 1000000 files are listed." in (data / "report.html").read_text()
