"""The completeness report for fetch_data.py (`--report`): is every hour there, and does any look wrong?

Reads the manifest (and, with --verify, each file's sha256), then writes one self-contained HTML page (styles,
script and data inline, so it opens offline from a file:// URL) and prints a per-day table on stdout. Exit code 0
when every hour of the range is exported and intact, 1 when any is missing.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import html
import json
import statistics
import sys
from pathlib import Path

import fetch_data as fd

HISTORY_DAYS = 7  # the same hour on up to this many days before is an hour's expectation
MIN_HISTORY = 3  # days of history the collapse rule needs; with fewer, only empty hours are flagged
COLLAPSE_SHARE = 0.2  # below this share of the expected count an hour has collapsed
MIN_EXPECTED = 20  # expectations smaller than this are noise: no collapse is flagged against them
STOPPED_MIN = 5  # a type with at least this many events the day before, and none on a day, has stopped
RULE_TEXT = (
    f"An exported hour is flagged <b>empty</b> when it has no events, unless the same hour was empty on most of "
    f"the {HISTORY_DAYS} days before (at least {MIN_HISTORY} of them exported). It is flagged <b>collapsed</b> when "
    f"it has fewer than {COLLAPSE_SHARE:.0%} of its expected count: the median of the same hour of the day on the "
    f"{HISTORY_DAYS} days before, where at least {MIN_HISTORY} of them are exported and the median is at least "
    f"{MIN_EXPECTED}. Comparing an hour with itself on earlier days follows the daily cycle: a night hour is not "
    f"compared with an afternoon. An event type is flagged <b>stopped</b> on a day without it after a day with at "
    f"least {STOPPED_MIN}, and <b>appeared</b> on a day with it after a day without it (both days complete)."
)


@dataclasses.dataclass
class Hour:
    moment: dt.datetime
    count: int | None = None  # None when missing, or exported by a window without per-hour counts
    missing: str = ""  # why the hour is missing: never exported, file gone, file changed
    flag: str = ""  # empty, collapsed

    @property
    def exported(self) -> bool:
        return not self.missing


@dataclasses.dataclass
class Day:
    day: dt.date
    hours: list[Hour]
    events: int = 0
    by_window_only: bool = False  # some of its events are known per window only
    types: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    type_flags: list[str] = dataclasses.field(default_factory=list)

    @property
    def exported(self) -> int:
        return sum(hour.exported for hour in self.hours)

    @property
    def missing(self) -> int:
        return len(self.hours) - self.exported

    @property
    def flags(self) -> list[str]:
        flagged = [f"{hour.flag} {hour.moment:T%H}" for hour in self.hours if hour.flag]
        return flagged + self.type_flags + (["counts by window only"] if self.by_window_only else [])


@dataclasses.dataclass
class Report:
    start: dt.datetime
    end: dt.datetime
    hours: list[Hour]
    days: list[Day]
    files: list[dict]
    verified: bool

    @property
    def missing(self) -> int:
        return sum(not hour.exported for hour in self.hours)

    @property
    def flagged(self) -> int:
        return sum(bool(hour.flag) for hour in self.hours)


def run(settings) -> int:
    """--report: the page and the table for the range asked for, or the manifest's whole range."""
    data_dir = settings.data_dir
    try:
        records = fd.read_manifest(data_dir / fd.MANIFEST_NAME, repair=False)  # an export may be appending
    except (fd.ExportError, OSError) as exc:
        print(f"Error: cannot read the manifest in {data_dir}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return fd.EXIT_FAILED
    exports = [r for r in records if "bytes" in r]
    if settings.explicit_range:
        start, end = settings.windows[0].start, settings.windows[-1].end
    elif exports:
        start = min(fd.record_window(r).start for r in exports)
        end = max(fd.record_window(r).end for r in exports)
    else:
        print(f"Error: {data_dir / fd.MANIFEST_NAME} records no export: give a range with --date or --start/--end",
              file=sys.stderr)
        return fd.EXIT_USAGE
    report = build_report(records, data_dir, start, end, settings.verify)
    target = settings.report_file or data_dir / "report.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd.write_atomically(target, render_html(report).encode("utf-8"))
    except OSError as exc:
        print(f"Error: cannot write the report to {target}: {exc.strerror or exc}", file=sys.stderr)
        return fd.EXIT_FAILED
    print(render_table(report, target))
    return fd.EXIT_FAILED if report.missing else fd.EXIT_OK


def build_report(records: list[dict], data_dir: Path, start: dt.datetime, end: dt.datetime, verify: bool) -> Report:
    exports = [r for r in records if "bytes" in r and overlaps(r, start, end)]
    uploaded = {(r["file"], r.get("sha256")) for r in records if "blob" in r}
    state = {r["file"]: fd.file_state(r, data_dir, verify) for r in exports}
    hours = {moment: Hour(moment, missing="never exported") for moment in fd.hours_between(start, end)}
    owner: dict[dt.datetime, dict] = {}  # the export each hour is counted from: the last intact one
    for record in exports:
        window = fd.record_window(record)
        for moment in fd.hours_between(window.start, window.end):
            if moment not in hours:
                continue
            if state[record["file"]] == "intact":
                hours[moment] = Hour(moment, record.get("hours", {}).get(fd.format_hour(moment)))
                owner[moment] = record
            elif hours[moment].missing:
                hours[moment].missing = f"file {state[record['file']]}"
    flag_hours(hours)
    current = list({id(record): record for record in owner.values()}.values())
    days = build_days(list(hours.values()), current)
    files = [file_row(r, state[r["file"]], (r["file"], r["sha256"]) in uploaded) for r in exports]
    return Report(start, end, list(hours.values()), days, files, verify)


def flag_hours(hours: dict[dt.datetime, Hour]) -> None:
    """Empty and collapsed hours, each against the same hour of the day on the days before (see RULE_TEXT)."""
    for moment, hour in hours.items():
        if hour.count is None:
            continue
        history = [hours[earlier].count for earlier in same_hour_before(moment) if earlier in hours]
        history = [count for count in history if count is not None]
        expected = statistics.median(history) if len(history) >= MIN_HISTORY else None
        if hour.count == 0 and (expected is None or expected > 0):
            hour.flag = "empty"
        elif expected is not None and expected >= MIN_EXPECTED and hour.count < COLLAPSE_SHARE * expected:
            hour.flag = "collapsed"


def same_hour_before(moment: dt.datetime):
    return (moment - dt.timedelta(days=days) for days in range(1, HISTORY_DAYS + 1))


def build_days(hours: list[Hour], current: list[dict]) -> list[Day]:
    by_day: dict[dt.date, Day] = {}
    for hour in hours:
        by_day.setdefault(hour.moment.date(), Day(hour.moment.date(), [])).hours.append(hour)
        if hour.count is not None:
            by_day[hour.moment.date()].events += hour.count
    for record in current:
        day = by_day.get(fd.record_window(record).start.date())
        if day is None:
            continue
        day.types.update(record.get("event_types", {}))
        if "hours" not in record:  # never invent hours: its events go to its first day, and the day says so
            day.events += record["events"]
            day.by_window_only = True
    days = sorted(by_day.values(), key=lambda d: d.day)
    for before, day in zip(days, days[1:], strict=False):
        if before.missing or day.missing:
            continue  # a missing hour explains a type's absence better than tracking does
        for name in sorted(set(before.types) | set(day.types)):
            if before.types[name] >= STOPPED_MIN and not day.types[name]:
                day.type_flags.append(f"{name} stopped")
            elif day.types[name] and not before.types[name]:
                day.type_flags.append(f"{name} appeared")
    return days


def file_row(record: dict, state: str, uploaded: bool) -> dict:
    return {"window": f"{record['start']}-{record['end']}", "file": record["file"], "events": record["events"],
            "bytes": record["bytes"], "sha256": record["sha256"], "uploaded": uploaded, "state": state}


def overlaps(record: dict, start: dt.datetime, end: dt.datetime) -> bool:
    window = fd.record_window(record)
    return window.start <= end and window.end >= start


# Output: the table on stdout and the page.


def render_table(report: Report, target: Path) -> str:
    rows = [("day", "events", "hours exported", "hours missing", "flags")]
    for day in report.days:
        events = f"{day.events}" + ("*" if day.by_window_only else "")
        rows.append((f"{day.day}", events, f"{day.exported}", f"{day.missing}", "; ".join(day.flags) or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    hours = len(report.hours)
    lines.append(
        f"{hours} hour(s) from {fd.format_hour(report.start)} to {fd.format_hour(report.end)}: "
        f"{hours - report.missing} exported and intact, {report.missing} missing, {report.flagged} flagged. "
        f"Report: {target}"
    )
    return "\n".join(lines)


def render_html(report: Report) -> str:
    data = {
        "start": fd.format_hour(report.start),
        "counts": [hour.count for hour in report.hours],
        "states": "".join("m" if hour.missing else "w" if hour.count is None else "e" for hour in report.hours),
        "flags": "".join({"": "-", "empty": "z", "collapsed": "c"}[hour.flag] for hour in report.hours),
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    exported = len(report.hours) - report.missing
    events = sum(day.events for day in report.days)
    totals = (
        f'<dl id="totals"><dt>Hours</dt><dd id="total-hours">{len(report.hours)}</dd>'
        f'<dt>Exported and intact</dt><dd id="total-exported">{exported}</dd>'
        f'<dt>Missing</dt><dd id="total-missing" class="{"bad" if report.missing else "good"}">{report.missing}</dd>'
        f'<dt>Flagged</dt><dd id="total-flagged" class="{"warn" if report.flagged else "good"}">{report.flagged}</dd>'
        f'<dt>Events</dt><dd id="total-events">{events}</dd></dl>'
    )
    verdict = ("Every hour of the range is exported and intact." if not report.missing
               else f"{report.missing} hour(s) of the range are missing: the next export run exports them.")
    return PAGE.format(
        title=html.escape(f"Amplitude export {fd.format_hour(report.start)} to {fd.format_hour(report.end)}"),
        verdict=html.escape(verdict), verdict_class="bad" if report.missing else "good", totals=totals,
        rule=RULE_TEXT, problems=problems_html(report), days=days_html(report), types=types_html(report),
        files=files_html(report), payload=payload, style=STYLE, script=SCRIPT,
        checked="Each file's sha256 was recomputed (--verify)." if report.verified
        else "Each file's size was checked; --verify recomputes its sha256.",
    )


def problems_html(report: Report) -> str:
    """Missing and flagged hours as stretches, so a year's view still names every one."""
    stretches: list[list] = []
    for hour in report.hours:
        kind = f"missing: {hour.missing}" if hour.missing else hour.flag
        if not kind:
            continue
        if stretches and stretches[-1][2] == kind and stretches[-1][1] + fd.HOUR == hour.moment:
            stretches[-1][1] = hour.moment
        else:
            stretches.append([hour.moment, hour.moment, kind])
    if not stretches:
        return '<p id="problems" class="good">No missing or flagged hour.</p>'
    items = "".join(
        f'<li class="{"missing" if kind.startswith("missing") else "flagged"}">'
        f"{fd.format_hour(first)}{'' if first == last else ' to ' + fd.format_hour(last)}: {html.escape(kind)}</li>"
        for first, last, kind in stretches
    )
    return f'<ul id="problems">{items}</ul>'


def days_html(report: Report) -> str:
    rows = [
        f'<tr class="{"missing" if day.missing else "flagged" if day.flags else ""}"><td>{day.day}</td>'
        f'<td class="n">{day.events}{"*" if day.by_window_only else ""}</td><td class="n">{day.exported}</td>'
        f'<td class="n">{day.missing}</td><td>{html.escape("; ".join(day.flags))}</td></tr>'
        for day in report.days
    ]
    return table_html("days", ["Day (UTC)", "Events", "Hours exported", "Hours missing", "Flags"], rows)


def types_html(report: Report, columns: int = 12) -> str:
    totals = collections.Counter()
    for day in report.days:
        totals.update(day.types)
    names = [name for name, _ in totals.most_common(columns)]
    others = len(totals) > len(names)
    rows = []
    for day in report.days:
        stopped = {flag.removesuffix(" stopped") for flag in day.type_flags if flag.endswith(" stopped")}
        appeared = {flag.removesuffix(" appeared") for flag in day.type_flags if flag.endswith(" appeared")}
        cells = "".join(
            f'<td class="n{" stopped" if name in stopped else " appeared" if name in appeared else ""}">'
            f"{day.types[name]}</td>" for name in names
        )
        if others:
            cells += f'<td class="n">{sum(day.types.values()) - sum(day.types[name] for name in names)}</td>'
        changes = html.escape("; ".join(day.type_flags))
        rows.append(f"<tr><td>{day.day}</td>{cells}<td>{changes}</td></tr>")
    headers = ["Day (UTC)", *map(html.escape, names), *(["other types"] if others else []), "Changes"]
    return table_html("types", headers, rows)


def files_html(report: Report) -> str:
    rows = [
        f'<tr class="{"" if row["state"] == "intact" else "missing"}"><td>{row["window"]}</td>'
        f'<td>{html.escape(row["file"])}</td><td class="n">{row["events"]}</td><td class="n">{row["bytes"]}</td>'
        f'<td class="hash">{row["sha256"]}</td><td>{"yes" if row["uploaded"] else "no"}</td><td>{row["state"]}</td></tr>'
        for row in report.files
    ]
    return table_html("files", ["Window", "File", "Events", "Bytes", "sha256", "Uploaded", "State"], rows)


def table_html(table_id: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{header}</th>" for header in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.good{color:#17703a}.bad{color:#b3261e}.warn{color:#9a5b00}
#totals{display:flex;gap:28px;margin:12px 0}#totals dt{font-size:12px;color:#5b6472}#totals dd{margin:0;font-size:22px}
#chart{width:100%;height:180px;border:1px solid #d5d9e0;background:#fafbfc}
#axis{display:flex;justify-content:space-between;font-size:12px;color:#5b6472}
rect.hour.e{fill:#3b6fd8}rect.hour.w{fill:#9aa5b8}rect.hour.m{fill:#f3b1ab}rect.hour.missing{fill:#d93025}
rect.hour.flagged{fill:#f29900}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
table{border-collapse:collapse;margin:4px 0}th,td{border-bottom:1px solid #e3e6eb;padding:3px 10px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.hash{font-family:monospace;font-size:12px}
tr.missing td{background:#fdecea}tr.flagged td{background:#fff4e0}
td.stopped{background:#fdecea;font-weight:bold}td.appeared{background:#e6f4ea;font-weight:bold}
#problems li.missing{color:#b3261e}#problems li.flagged{color:#9a5b00}
.scroll{overflow-x:auto}p.rule{max-width:900px;color:#3c4450}
"""

SCRIPT = """
(function () {
  var began = performance.now();
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var n = data.counts.length, top = 1, i;
  for (i = 0; i < n; i++) { if (data.counts[i] !== null && data.counts[i] > top) { top = data.counts[i]; } }
  var ns = 'http://www.w3.org/2000/svg', svg = document.getElementById('chart');
  svg.setAttribute('viewBox', '0 0 ' + n + ' 100');
  var y0 = Date.UTC(+data.start.slice(0, 4), +data.start.slice(4, 6) - 1, +data.start.slice(6, 8), +data.start.slice(9, 11));
  var names = {e: 'exported', w: 'exported, counted by window only', m: 'missing'};
  var flags = {z: 'empty', c: 'collapsed'};
  var fragment = document.createDocumentFragment();
  for (i = 0; i < n; i++) {
    var state = data.states[i], flag = data.flags[i], count = data.counts[i];
    var rect = document.createElementNS(ns, 'rect');
    var height = state === 'e' ? Math.max(1.5, 96 * count / top) : 100;
    if (flag !== '-') { height = 100; }
    rect.setAttribute('x', i); rect.setAttribute('width', 1);
    rect.setAttribute('y', 100 - height); rect.setAttribute('height', height);
    var classes = 'hour ' + state + (state === 'm' ? ' missing' : '') + (flag !== '-' ? ' flagged' : '');
    rect.setAttribute('class', classes);
    var label = new Date(y0 + i * 3600000).toISOString().slice(0, 13).replace(/-/g, '');
    var title = document.createElementNS(ns, 'title');
    title.textContent = label + ': ' + (count === null ? 'no count' : count + ' events') + ', ' + names[state] +
      (flag !== '-' ? ', ' + flags[flag] : '');
    rect.appendChild(title);
    fragment.appendChild(rect);
  }
  svg.appendChild(fragment);
  document.getElementById('axis-start').textContent = data.start;
  document.getElementById('axis-end').textContent = new Date(y0 + (n - 1) * 3600000).toISOString().slice(0, 13).replace(/-/g, '');
  document.body.setAttribute('data-render-ms', String(Math.round(performance.now() - began)));
  document.body.setAttribute('data-hours-drawn', String(svg.querySelectorAll('rect.hour').length));
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body>
<h1>{title}</h1>
<p id="verdict" class="{verdict_class}">{verdict}</p>
{totals}
<h2>Events per hour (UTC)</h2>
<svg id="chart" preserveAspectRatio="none" role="img" aria-label="events per hour"></svg>
<div id="axis"><span id="axis-start"></span><span id="axis-end"></span></div>
<p class="legend"><span style="background:#3b6fd8"></span>exported<span style="background:#9aa5b8"></span>counted by
window only<span style="background:#d93025"></span>missing<span style="background:#f29900"></span>flagged (empty or
collapsed)</p>
<p class="rule">{rule}</p>
<h2>Missing and flagged hours</h2>
{problems}
<h2>Days</h2>
<div class="scroll">{days}</div>
<h2>Event types by day</h2>
<div class="scroll">{types}</div>
<h2>Files</h2>
<p>{checked}</p>
<div class="scroll">{files}</div>
<script id="report-data" type="application/json">{payload}</script>
<script>{script}</script>
</body></html>
"""
