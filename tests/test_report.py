"""--report and --verify: every hour of a range accounted for, flags a data engineer would accept, and the page
as a person sees it in a real browser (headless Chromium, offline, from a file:// URL)."""

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

import report
from tests.conftest import hour, missing
from windows import HOUR, format_hour, hours_between

DAY = ("--date", "2025-11-01")
CHROMIUM = "/usr/bin/chromium"


# The report's logic, on manifests built in code


def write_export(data_dir: Path, start: str, end: str, counts=None, types=None, name=None) -> dict:
    """A file and its manifest line, as fetch_data writes them; `counts` per hour (None: a window of old)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    hours = [format_hour(h) for h in hours_between(hour(start), hour(end))]
    counts = counts if counts is not None else [10] * len(hours)
    content = b"[]\n" if not sum(counts) else b"[\n" + b",\n".join([b"{}"] * sum(counts)) + b"\n]\n"
    name = name or f"x_{start}-{end}.json"
    (data_dir / name).write_bytes(content)
    record = {"start": start, "end": end, "file": name, "events": sum(counts), "bytes": len(content),
              "sha256": hashlib.sha256(content).hexdigest(), "finished_at": "2025-11-08T03:30:00Z",
              "hours": dict(zip(hours, counts, strict=True)), "event_types": types or {"page_view": sum(counts)}}
    with open(data_dir / "manifest.jsonl", "a") as manifest:
        manifest.write(json.dumps(record) + "\n")
    return record


def day_counts(base=100, **changes) -> list[int]:
    counts = [base] * 24
    for hour_text, value in changes.items():
        counts[int(hour_text[1:])] = value
    return counts


def build(data_dir, start, end, verify=False):
    return report.build_report(data_dir / "manifest.jsonl", data_dir, hour(start), hour(end), verify)


def page_data(page: str) -> dict:
    """The data the page's script draws from, as the browser reads it."""
    return json.loads(page.split('<script id="report-data" type="application/json">', 1)[1].split("</script>", 1)[0])


def test_missing_hours_say_why(tmp_path):
    write_export(tmp_path, "20251101T00", "20251101T05")
    gone = write_export(tmp_path, "20251101T06", "20251101T07")
    changed = write_export(tmp_path, "20251101T08", "20251101T09")
    (tmp_path / gone["file"]).unlink()
    (tmp_path / changed["file"]).write_bytes(b" " * changed["bytes"])  # same size, other bytes
    plain = build(tmp_path, "20251101T00", "20251101T11")
    assert [h.missing for h in plain.hours] == [""] * 6 + ["file gone"] * 2 + [""] * 2 + ["never exported"] * 2
    verified = build(tmp_path, "20251101T00", "20251101T11", verify=True)
    assert [h.missing for h in verified.hours][8:10] == ["file changed"] * 2
    assert verified.missing == 6 and plain.missing == 4
    assert [row.state for row in verified.files] == ["intact", "gone", "changed"]


def test_an_empty_hour_is_flagged_and_a_quiet_night_is_not(tmp_path):
    for day in range(1, 8):
        write_export(tmp_path, f"202511{day:02d}T00", f"202511{day:02d}T23", day_counts(T03=0))
    write_export(tmp_path, "20251108T00", "20251108T23", day_counts(T03=0, T13=0))
    built = build(tmp_path, "20251101T00", "20251108T23")
    flagged = [(format_hour(h.moment), h.flag) for h in built.hours if h.flag]
    # T03 is empty every night: on the first days there is not enough history to call it quiet.
    assert flagged == [("20251101T03", "empty"), ("20251102T03", "empty"), ("20251103T03", "empty"),
                       ("20251108T13", "empty")]


def test_a_collapse_is_judged_against_the_same_hour_on_the_days_before(tmp_path):
    for day in range(1, 5):
        write_export(tmp_path, f"202511{day:02d}T00", f"202511{day:02d}T23", day_counts(T02=5))
    write_export(tmp_path, "20251105T00", "20251105T23", day_counts(T02=4, T14=15, T15=25))
    built = build(tmp_path, "20251101T00", "20251105T23")
    # 15 is under 20 % of 100; 25 is not; a night hour of 4 against its own 5 is normal.
    assert [(format_hour(h.moment), h.flag) for h in built.hours if h.flag] == [("20251105T14", "collapsed")]


def test_a_day_of_many_new_types_names_five_of_each_change_and_counts_the_rest(tmp_path):
    """A client that puts an ID into its event names: thousands of types stop and appear every day."""
    write_export(tmp_path, "20251101T00", "20251101T23", types={"page_view": 9, **{f"item {n}": 5 for n in range(900)}})
    write_export(tmp_path, "20251102T00", "20251102T23", types={"page_view": 9, **{f"item {n}": 1 for n in range(900, 1600)}})
    flags = build(tmp_path, "20251101T00", "20251102T23").days[1].flags
    assert flags == [*(f"item {n} stopped" for n in (0, 1, 10, 100, 101)), "895 more types stopped",
                     *(f"item {n} appeared" for n in (1000, 1001, 1002, 1003, 1004)), "695 more types appeared"]


def test_no_collapse_on_a_young_history(tmp_path):
    write_export(tmp_path, "20251101T00", "20251101T23", day_counts())
    write_export(tmp_path, "20251102T00", "20251102T23", day_counts(T10=1))
    assert build(tmp_path, "20251101T00", "20251102T23").flagged == 0


def test_event_types_that_stop_or_appear_are_flagged_by_day(tmp_path):
    write_export(tmp_path, "20251101T00", "20251101T23", types={"page_view": 2000, "purchase": 400})
    write_export(tmp_path, "20251102T00", "20251102T23", types={"page_view": 2100, "signup": 300})
    write_export(tmp_path, "20251103T00", "20251103T05", types={"page_view": 60})
    built = build(tmp_path, "20251101T00", "20251103T23")
    assert [day.type_flags for day in built.days] == [[], ["purchase stopped", "signup appeared"], []]
    assert built.days[1].flags == ["purchase stopped", "signup appeared"]


def test_windows_without_per_hour_counts_are_shown_by_window_never_invented(tmp_path):
    record = write_export(tmp_path, "20251101T00", "20251101T23")
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    del record["hours"]
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n" + "\n".join(lines[1:]))
    built = build(tmp_path, "20251101T00", "20251101T23")
    assert [h.count for h in built.hours] == [None] * 24
    assert built.missing == 0 and built.flagged == 0
    assert built.days[0].events == 240 and built.days[0].by_window_only
    assert page_data(report.render_html(built))["states"] == "w" * 24


def test_the_last_intact_export_of_an_hour_counts(tmp_path):
    write_export(tmp_path, "20251101T00", "20251101T23", day_counts(50), name="old.json")
    newer = write_export(tmp_path, "20251101T00", "20251101T23", day_counts(100), name="new.json")
    assert build(tmp_path, "20251101T00", "20251101T23").days[0].events == 2400
    (tmp_path / newer["file"]).unlink()
    assert build(tmp_path, "20251101T00", "20251101T23").days[0].events == 1200


# --report and --verify from the command line


def test_report_of_a_complete_range_exits_0_and_prints_a_table(cli, standin):
    standin.empty_hours = {hour("20251102T07")}
    assert cli.run("--start", "2025-11-01", "--end", "2025-11-02").returncode == 0
    result = cli.run("--report", AMP_API_KEY=None, AMP_SECRET_KEY=None)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["day", "events", "hours exported", "hours missing", "flags"]
    assert re.split(r"\s{2,}", lines[1]) == ["2025-11-01", "144", "24", "0", "-"]
    assert re.split(r"\s{2,}", lines[2]) == ["2025-11-02", "138", "24", "0", "empty T07"]
    assert lines[3] == ("48 hour(s) from 20251101T00 to 20251102T23: 48 exported and intact, 0 missing, 1 flagged. "
                        f"Report: {cli.data / 'report.html'}")
    page = (cli.data / "report.html").read_text()
    assert "<script src" not in page and "<link" not in page and "http://" not in page.replace("http://www.w3.org", "")


def test_report_of_a_range_with_missing_hours_exits_1(cli, standin, tmp_path):
    assert cli.run(*DAY).returncode == 0
    result = cli.run("--report", "--start", "2025-11-01", "--end", "20251102T05", "--report-file", str(tmp_path / "r.html"))
    assert result.returncode == 1
    assert re.split(r"\s{2,}", result.stdout.splitlines()[2]) == ["2025-11-02", "0", "0", "6", "-"]
    assert "30 hour(s) from 20251101T00 to 20251102T05: 24 exported and intact, 6 missing" in result.stdout
    assert (tmp_path / "r.html").exists() and not (cli.data / "report.html").exists()
    assert standin.requests[1:] == []  # a report asks Amplitude nothing


def test_the_report_never_cuts_a_manifest_line_an_export_may_be_appending(cli, standin):
    assert cli.run(*DAY).returncode == 0
    manifest = cli.data / "manifest.jsonl"
    with open(manifest, "a") as out:
        out.write('{"start":"20251102T00","end":"2025')
    before = manifest.read_bytes()
    assert cli.run("--report", *DAY).returncode == 0
    assert manifest.read_bytes() == before


SPECIAL = "a device, a pipe or a socket"


def special_files(folder: Path, suffix: str) -> list[tuple[Path, str]]:
    """A link, a pipe and (where the user may make one) a device like /dev/full, each where a file is written by a
    rename over it: the rename would replace it instead of writing to it. (path, what the message calls it)"""
    (folder / f"elsewhere{suffix}").write_text("kept")
    (folder / f"link{suffix}").symlink_to(folder / f"elsewhere{suffix}")
    os.mkfifo(folder / f"pipe{suffix}")
    made = [(folder / f"link{suffix}", "a symbolic link"), (folder / f"pipe{suffix}", SPECIAL)]
    with contextlib.suppress(PermissionError):
        os.mknod(folder / f"device{suffix}", 0o600 | stat.S_IFCHR, os.makedev(1, 7))
        made.append((folder / f"device{suffix}", SPECIAL))
    return made


def test_a_link_or_a_device_where_the_report_goes_is_a_usage_error_and_stays(cli, standin):
    assert cli.run(*DAY).returncode == 0
    for target, kind in special_files(cli.workdir, ".html"):
        before = os.lstat(target)
        result = cli.run("--report", *DAY, "--report-file", str(target))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{target} is {kind}, not a file the report can be written to" in result.stderr
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert (cli.workdir / "elsewhere.html").read_text() == "kept"


@pytest.mark.parametrize("flags", [(), ("--report-file", "out/r.html")])
def test_a_folder_where_the_report_goes_is_a_usage_error(cli, standin, flags):
    target = cli.workdir / "out" / "r.html" if flags else cli.data / "report.html"
    target.mkdir(parents=True)
    result = cli.run("--report", *DAY, *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{target} is a folder, not a file the report can be written to" in result.stderr
    assert target.is_dir() and list(target.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("--report",), "records no export: give a range with --date or --start/--end"),
        (("--report-file", "x.html"), "--report-file goes with --report"),
    ],
)
def test_report_usage_errors_exit_2(cli, standin, args, message):
    result = cli.run(*args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_verify_exports_a_changed_file_again_into_a_new_file(cli, standin):
    assert cli.run(*DAY).returncode == 0
    (first,) = cli.outputs()
    damaged = first.read_bytes().replace(b"Berlin", b"Bxrlin", 1).replace(b"user-", b"usxr-", 1)
    first.write_bytes(damaged)
    standin.requests.clear()
    assert cli.run(*DAY).returncode == 0 and standin.requests == []  # by size it still looks whole
    assert cli.run("--report", *DAY).returncode == 0
    result = cli.run("--report", "--verify", *DAY)
    assert result.returncode == 1 and "24 missing" in result.stdout
    result = cli.run(*DAY, "--verify")
    assert result.returncode == 0, result.stderr
    assert "its bytes changed since it was exported" in result.stderr
    assert len(standin.requests) == 1
    assert first.read_bytes() == damaged and len(cli.outputs()) == 2
    assert cli.run("--report", "--verify", *DAY).returncode == 0


# In a real browser


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    absent = ("playwright is not installed" if sync_playwright is None
              else f"{CHROMIUM} is missing" if not os.path.exists(CHROMIUM) else None)
    if absent:
        missing(absent)  # test.sh installs both; CI must not pass by skipping what a person would see
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield launched
        launched.close()


def open_offline(browser, page_path: Path):
    """The page from a file:// URL, every other request refused, as on a laptop without network."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, offline=True)
    page = context.new_page()
    refused = []

    def refuse(route):
        if route.request.url.startswith("file://"):
            return route.continue_()
        refused.append(route.request.url)
        return route.abort()

    page.route("**/*", refuse)
    began = time.monotonic()
    page.goto(page_path.resolve().as_uri())
    page.wait_for_selector("body[data-hours-drawn]")
    return context, page, time.monotonic() - began, refused


def seen(page, selector: str) -> int:
    return page.locator(selector).count()


def test_the_demo_report_shows_every_hour_and_its_flags(browser, cli, tmp_path):
    result = cli.run("--demo")
    assert result.returncode == 0, result.stderr
    page_path = cli.project / "demo" / "data" / "report.html"
    context, page, _, refused = open_offline(browser, page_path)
    try:
        assert seen(page, "svg#chart rect.hour") == 7 * 24 == int(page.get_attribute("body", "data-hours-drawn"))
        assert seen(page, "svg#chart rect.missing") == 0
        assert seen(page, "svg#chart rect.flagged") == 1
        assert page.locator("svg#chart rect.flagged title").text_content().endswith("T13: 0 events, exported, empty")
        assert page.inner_text("#total-hours") == "168" and page.inner_text("#total-missing") == "0"
        assert page.inner_text("#total-flagged") == "1"
        assert page.inner_text("#verdict") == "Every hour of the range is exported and intact."
        assert "purchase stopped" in page.inner_text("#days")
        assert seen(page, "#types td.stopped") == 1
        assert seen(page, "#files tbody tr") == 7
        page.screenshot(path=str(tmp_path / "demo-report.png"), full_page=True)
        assert (tmp_path / "demo-report.png").stat().st_size > 10_000
        assert refused == []
    finally:
        context.close()


def test_missing_hours_are_marked_in_the_browser(browser, cli, standin):
    assert cli.run("--start", "2025-11-01", "--end", "2025-11-03").returncode == 0
    middle = next(r for r in cli.manifest() if r["start"] == "20251102T00")
    (cli.data / middle["file"]).unlink()
    assert cli.run("--report").returncode == 1
    context, page, _, _ = open_offline(browser, cli.data / "report.html")
    try:
        assert seen(page, "svg#chart rect.hour") == 72
        assert seen(page, "svg#chart rect.missing") == 24
        assert page.inner_text("#total-missing") == "24"
        assert page.inner_text("#problems") == "20251102T00 to 20251102T23: missing: file gone"
        assert seen(page, "#files tr.missing") == 1
    finally:
        context.close()


def test_a_year_of_hourly_exports_renders_in_under_two_seconds(browser, tmp_path):
    data_dir = tmp_path / "data"
    types = {f"type_{n}": 100 + n for n in range(40)}
    first = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    for day in range(365):
        start = first + dt.timedelta(days=day)
        counts = [100 + (hour_of_day * 37 + day) % 50 for hour_of_day in range(24)]
        write_export(data_dir, format_hour(start), format_hour(start + 23 * HOUR), counts, types)
    built = report.build_report(data_dir / "manifest.jsonl", data_dir, first,
                                first + (365 * 24 - 1) * HOUR, verify=False)
    page_path = tmp_path / "year.html"
    page_path.write_text(report.render_html(built))
    assert page_path.stat().st_size < 3_000_000
    context, page, seconds, refused = open_offline(browser, page_path)
    try:
        assert seen(page, "svg#chart rect.hour") == 8760
        assert int(page.get_attribute("body", "data-render-ms")) < 2000
        assert seconds < 2.0, f"{seconds:.2f}s from navigation to the drawn chart"
        assert refused == []
    finally:
        context.close()


def test_the_readme_shows_the_demo_report():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", readme)
    assert images
    for image in images:
        assert (Path(__file__).resolve().parents[1] / image).stat().st_size > 10_000


HOSTILE_TYPES = ["</script><script>window.pwned = 'type'</script>", "<img src=x onerror=\"window.pwned='img'\">",
                 "\"><svg onload=window.pwned='svg'>", "{{ 7 * 7 }} & &amp; '"]


def test_markup_in_event_types_file_names_and_the_manifest_shows_as_text(browser, tmp_path):
    data_dir = tmp_path / "data"
    counts = {name: 10 for name in HOSTILE_TYPES}
    write_export(data_dir, "20251101T00", "20251101T23", day_counts(40), types=counts,
                 name="<img src=x onerror=window.pwned='file'>.json")
    write_export(data_dir, "20251102T00", "20251102T23", day_counts(40), types={"page_view": 960})
    with open(data_dir / "manifest.jsonl", "a") as manifest:  # a tampered line: refused, never shown as markup
        manifest.write('{"start":"20251103T00","end":"<script>window.pwned=1</script>","file":"y.json"}\n')
    built = build(data_dir, "20251101T00", "20251102T23")
    page_path = tmp_path / "report.html"
    page_path.write_text(report.render_html(built))
    context, page, _, refused = open_offline(browser, page_path)
    try:
        dialogs = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert dialogs == [] and refused == []
        assert seen(page, "img") == 0 and seen(page, "svg") == 1  # the chart is the page's only svg
        text = page.inner_text("body")
        for name in HOSTILE_TYPES:
            assert name in text or name in page.inner_text("#types thead")
        assert "<img src=x onerror=window.pwned='file'>.json" in page.inner_text("#files")
        assert page.evaluate("JSON.parse(document.getElementById('report-data').textContent).start") == "20251101T00"
    finally:
        context.close()
