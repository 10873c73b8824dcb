"""Memory stays flat: an export several times larger than the RSS budget, measured from outside the process."""

import json
import os
import sys

from amplitude_standin import StandIn
from bench.bench import build_archive_file, run_measured
from tests.conftest import ROOT

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
