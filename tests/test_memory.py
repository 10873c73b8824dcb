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


def test_a_large_export_stays_under_the_rss_budget(tmp_path):
    archive = tmp_path / "big.zip"
    events = build_archive_file(archive, EVENTS_MB, level=1)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url)
        command = [sys.executable, str(ROOT / "fetch_data.py"), "--date", "2025-11-01",
                   "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
        _, peak_mb = run_measured(command, env)
    record = json.loads((tmp_path / "data" / "manifest.jsonl").read_text())
    assert record["events"] == events
    assert record["bytes"] > 5 * RSS_BUDGET_MB * 1_000_000
    assert peak_mb < RSS_BUDGET_MB, f"peak RSS {peak_mb} MB"


def measured_export(tmp_path, members, *flags, expected_status=0) -> float:
    """fetch_data.py exporting a zip of `members` (name, gzipped bytes), ending in `expected_status`: its peak RSS in MB."""
    archive = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for name, data in members:
            out.writestr(name, data)
    with StandIn("k", "s", archive_path=archive) as standin:
        env = dict(os.environ, AMP_API_KEY="k", AMP_SECRET_KEY="s", AMP_BASE_URL=standin.base_url, AMP_DELAY_SECONDS="0")
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
