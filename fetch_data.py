"""Export raw Amplitude Analytics events from the Export API (EU residency server by default).

`python fetch_data.py` exports yesterday (UTC, T00 to T23) to data/YYYYMMDD_HHMM_ampl_dump.json.
Ranges, resume, splitting of too-large windows, parallel windows and formats: see README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import email.utils
import errno
import fcntl
import hashlib
import http.client
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Checked before the third-party imports, which would otherwise end the first run in a traceback.
if sys.version_info < (3, 11):  # noqa: UP036 - the check is for interpreters older than the target
    sys.stderr.write(
        f"Error: fetch_data.py needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}. "
        f"Make the virtual environment with a newer one: python3.11 -m venv {HERE / '.venv'}\n"
    )
    raise SystemExit(2)
try:
    import requests
    import simdjson
    from dotenv import load_dotenv
    from isal import isal_zlib

    from archive import CHUNK_BYTES, BadEvent, CorruptArchive, check_events, first_text_line, member_hour, unzip
except ImportError as missing:
    venv_python = HERE / ".venv" / "bin" / "python"
    install = f"{sys.executable} -m pip install -r {HERE / 'requirements.txt'}"
    use_venv = venv_python.exists() and Path(sys.executable) != venv_python
    fix = f"run {venv_python} {HERE / 'fetch_data.py'}, or install them: {install}" if use_venv else install
    package = {"simdjson": "pysimdjson", "dotenv": "python-dotenv"}.get(missing.name, missing.name)
    sys.stderr.write(f"Error: the Python package {package} is missing for {sys.executable}; {fix}\n")
    raise SystemExit(2) from None

from logging_config import setup_logging  # noqa: E402 - after the checks above

log = logging.getLogger("fetch_data")

EU_BASE_URL = "https://analytics.eu.amplitude.com"
US_BASE_URL = "https://amplitude.com"
EXPORT_PATH = "/api/2/export"
USER_AGENT = "amplitude-eu-export/1.0 (fetch_data.py)"

# The seed's settings and defaults.
log_outpath = "logs"
log_level = logging.INFO
data_outpath = "data"
data_outfile = "ampl_dump"
max_attempts = 5
delay_seconds = 1

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
ATTEMPT_TIMEOUT = 3600.0
MAX_EVENT_BYTES = 16 << 20
RETRY_AFTER_CAP = 60.0
MAX_WORKERS = 5  # Amplitude allows 5 concurrent REST requests per project.
MAX_WINDOW_HOURS = 365 * 24  # The Export API's own limit for one request.
FRESHNESS = dt.timedelta(hours=2)  # Amplitude makes events exportable about 2 hours after upload.
HOUR = dt.timedelta(hours=1)
HOUR_FORMAT = "%Y%m%dT%H"
GZIP_LEVEL = isal_zlib.ISAL_DEFAULT_COMPRESSION
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".lock"
JOURNAL_NAME = ".ampl-commit.json"  # the manifest line of the file being put in place, until it is appended
TEMP_PREFIX = ".ampl-"
TEMP_SUFFIX = ".part"
ERROR_BODY_CHARS = 200
ERROR_BODY_BYTES = 4096
NO_DATA_TEXT = "Raw data files were not found"  # Amplitude's 404 body for a range without events
TOO_LARGE_TEXT = "too large"  # in Amplitude's 400 body for an export over its 4 GB limit
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2



class UsageError(Exception):
    """Bad flags, dates or configuration: exit 2 before any request."""


class ExportError(Exception):
    """An export that failed for a reason the user can read and act on: exit 1."""


class TooLarge(Exception):
    """Amplitude refused a window as too large (400) or kept timing out on it (504): split it."""


class Retryable(Exception):
    """A failed attempt worth repeating after `wait` seconds."""

    def __init__(self, reason: str, wait: float, status: int | None = None):
        super().__init__(reason)
        self.wait = wait
        self.status = status


@dataclasses.dataclass(frozen=True, order=True)
class Window:
    """Consecutive UTC hours from `start` to `end`, both included, as the Export API counts them."""

    start: dt.datetime
    end: dt.datetime

    @property
    def hours(self) -> int:
        return int((self.end - self.start) / HOUR) + 1

    @property
    def label(self) -> str:
        return f"{format_hour(self.start)}-{format_hour(self.end)}"

    def halves(self) -> tuple[Window, Window]:
        middle = self.start + (self.hours // 2) * HOUR
        return Window(self.start, middle - HOUR), Window(middle, self.end)

    def __str__(self) -> str:
        return self.label


@dataclasses.dataclass(frozen=True)
class Settings:
    api_key: str = dataclasses.field(repr=False)
    secret_key: str = dataclasses.field(repr=False)
    base_url: str
    windows: tuple[Window, ...]
    seed_named_window: Window | None  # exported alone, this window's file takes the seed's name
    data_dir: Path
    data_outfile: str
    log_dir: Path
    log_level: int
    max_attempts: int
    delay_seconds: float
    read_timeout: float
    attempt_timeout: float
    max_event_bytes: int
    window_hours: int
    workers: int
    file_format: str
    gzip: bool
    refetch: bool
    verify: bool
    report: bool
    report_file: Path | None
    explicit_range: bool  # --date or --start/--end given
    quiet: bool
    demo: bool
    started: dt.datetime
    upload: object = None  # azure_upload.Target when --upload
    field_rules: object = None  # field_rules.Pseudonymiser when --drop-fields or --hash-fields

    @property
    def policy(self) -> dict | None:
        """The field rules as the manifest records them; None when events are written as Amplitude sent them."""
        return self.field_rules.rules.policy if self.field_rules else None

    @property
    def extension(self) -> str:
        return f".{self.file_format}" + (".gz" if self.gzip else "")


@dataclasses.dataclass(frozen=True)
class Finished:
    """A window's events, complete and fsynced in a temporary file, waiting to be put in place."""

    window: Window
    temp_path: Path
    events: int
    size: int
    sha256: str
    seconds: float
    tally: Tally


def main(argv: list[str] | None = None) -> int:
    env_files = load_env_files()
    now = dt.datetime.now(dt.UTC)
    try:
        settings = parse_settings(argv, os.environ, now, env_files)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.report:
        import report

        return report.run(settings)
    try:
        setup_logging(settings.log_dir, settings.log_level, now, settings.quiet)
    except OSError as exc:
        print(f"Error: cannot write logs to {settings.log_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with serve_demo_if_asked(settings) as settings:
            exit_code = run(settings)
        if settings.demo:
            show_demo_report(settings)
        return exit_code
    except ExportError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except OSError as exc:  # the data folder itself: unwritable, full, gone
        log.error("cannot use %s: %s", exc.filename or settings.data_dir, exc.strerror or exc)
        return EXIT_FAILED
    except KeyboardInterrupt:  # before the data folder is locked; afterwards stop_cleanly_on_signals answers
        log.error("Interrupted before any export started")
        return EXIT_FAILED
    except Exception as exc:  # a bug, not the user's doing: one line, the traceback in the log file only
        log.debug("Traceback of the failure below", exc_info=True)
        log.error("Export failed unexpectedly: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED


def load_env_files() -> tuple[Path, ...]:
    """.env in the current folder, then the one beside fetch_data.py (cron and systemd may start elsewhere).

    Variables already set win over both, and the current folder's file over the other one.
    """
    places = tuple(dict.fromkeys([Path.cwd() / ".env", HERE / ".env"]))
    for place in places:
        load_dotenv(place, override=False)
    return places


def parse_settings(argv: list[str] | None, env, now: dt.datetime, env_files: tuple[Path, ...] = ()) -> Settings:
    """Every setting once, from a flag or its environment variable, validated before any I/O."""
    args = build_parser().parse_args(argv)
    pick = SettingPicker(args, env)
    demo = args.demo
    window_hours = pick.integer("window_hours", "AMP_WINDOW_HOURS", 24, 1, MAX_WINDOW_HOURS)
    start, end = pick_range(args, now)
    catch_up_days = pick_catch_up(pick)
    windows = plan_windows(start - dt.timedelta(days=catch_up_days), end, window_hours)
    if args.report_file and not args.report:
        raise UsageError("--report-file goes with --report")
    needs_keys = not (demo or args.report)
    api_key, secret_key = pick_credentials(env, env_files) if needs_keys else ("demo", "demo")
    return Settings(
        api_key=api_key,
        secret_key=secret_key,
        base_url=pick_base_url(pick),
        windows=tuple(windows),
        seed_named_window=Window(start, end) if catch_up_days or len(windows) == 1 else None,
        data_dir=Path(pick.location("data_dir", "AMP_DATA_DIR", data_outpath, "demo/data")),
        data_outfile=pick.file_stem("data_outfile", "AMP_DATA_OUTFILE", data_outfile),
        log_dir=Path(pick.location("log_dir", "AMP_LOG_DIR", log_outpath, "demo/logs")),
        log_level=pick.log_level("log_level", "AMP_LOG_LEVEL", logging.getLevelName(log_level)),
        max_attempts=pick.integer("max_attempts", "AMP_MAX_ATTEMPTS", max_attempts, 1, 100),
        delay_seconds=pick.number("delay_seconds", "AMP_DELAY_SECONDS", delay_seconds, 0, 3600),
        read_timeout=pick.number("read_timeout", "AMP_READ_TIMEOUT", READ_TIMEOUT, 0.1, 86400),
        attempt_timeout=pick.number("attempt_timeout", "AMP_ATTEMPT_TIMEOUT", ATTEMPT_TIMEOUT, 0.1, 7 * 86400),
        max_event_bytes=pick.integer("max_event_bytes", "AMP_MAX_EVENT_BYTES", MAX_EVENT_BYTES, 2, 1 << 40),
        window_hours=window_hours,
        workers=pick.integer("workers", "AMP_WORKERS", 1, 1, MAX_WORKERS),
        file_format=pick.choice("format", "AMP_FORMAT", "json", ("json", "jsonl")),
        gzip=args.gzip,
        refetch=args.refetch,
        verify=args.verify,
        report=args.report,
        report_file=Path(args.report_file) if args.report_file else None,
        explicit_range=bool(args.date or args.start or args.end),
        quiet=pick.switch("quiet", "AMP_QUIET"),
        demo=demo,
        started=now,
        upload=pick_upload(pick) if args.upload else None,
        field_rules=pick_field_rules(pick),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = QuietParser(
        prog="fetch_data.py",
        description="Export raw Amplitude events (EU residency server by default) to local files.",
        epilog="Credentials: AMP_API_KEY and AMP_SECRET_KEY, from the environment or a .env file (the current "
        "folder's, then the one beside fetch_data.py; see .env.example), never from flags. Manual: README.md.",
    )
    when = parser.add_argument_group("what to export (UTC; default: yesterday)")
    when.add_argument("--date", metavar="YYYY-MM-DD", help="one UTC day")
    when.add_argument("--start", metavar="WHEN", help="first hour: YYYY-MM-DD (its T00) or YYYYMMDDTHH")
    when.add_argument("--end", metavar="WHEN", help="last hour, included: YYYY-MM-DD (its T23) or YYYYMMDDTHH")
    when.add_argument("--window-hours", metavar="N", help="hours per request and per file (env AMP_WINDOW_HOURS, default 24)")
    when.add_argument("--refetch", action="store_true", help="export windows again even if the manifest has them")
    when.add_argument(
        "--verify", action="store_true",
        help="recompute each recorded file's sha256: a file whose bytes changed does not count as exported",
    )
    when.add_argument(
        "--catch-up", metavar="DAYS",
        help="with the nightly default: also export the hours of the DAYS days before yesterday that the manifest "
        "lacks (env AMP_CATCH_UP_DAYS, default 0)",
    )
    source = parser.add_argument_group("where from")
    source.add_argument("--region", metavar="{eu,us}", help="Amplitude's region (env AMP_REGION, default eu)")
    source.add_argument("--base-url", metavar="URL", help="API base URL; overrides --region (env AMP_BASE_URL)")
    source.add_argument("--max-attempts", metavar="N", help="attempts per request (env AMP_MAX_ATTEMPTS, default 5)")
    source.add_argument(
        "--delay-seconds", metavar="SECONDS",
        help="wait after a failed attempt; twice that after a 429 (env AMP_DELAY_SECONDS, default 1)",
    )
    source.add_argument(
        "--read-timeout", metavar="SECONDS",
        help="seconds without a byte before an attempt fails (env AMP_READ_TIMEOUT, default 300)",
    )
    source.add_argument(
        "--attempt-timeout", metavar="SECONDS",
        help="seconds an attempt (request and whole body) may take before it is abandoned and retried "
        "(env AMP_ATTEMPT_TIMEOUT, default 3600)",
    )
    source.add_argument(
        "--max-event-bytes", metavar="N",
        help="longest event line accepted; a longer one fails its window (env AMP_MAX_EVENT_BYTES, default 16 MiB)",
    )
    source.add_argument("--workers", metavar="N", help="windows downloaded in parallel, 1 to 5 (env AMP_WORKERS, default 1)")
    output = parser.add_argument_group("where to")
    output.add_argument("--data-dir", metavar="DIR", help="output folder (env AMP_DATA_DIR, default data)")
    output.add_argument("--data-outfile", metavar="STEM", help="file name stem (env AMP_DATA_OUTFILE, default ampl_dump)")
    output.add_argument(
        "--format", metavar="{json,jsonl}",
        help="json: one array; jsonl: one event a line (env AMP_FORMAT, default json)",
    )
    output.add_argument("--gzip", action="store_true", help="gzip the output files (.json.gz / .jsonl.gz)")
    output.add_argument("--log-dir", metavar="DIR", help="log folder (env AMP_LOG_DIR, default logs)")
    output.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (env AMP_LOG_LEVEL, default INFO)")
    output.add_argument(
        "--quiet", action="store_true",
        help="stderr gets WARNING and ERROR lines only; the log file keeps everything (env AMP_QUIET), for cron",
    )
    privacy = parser.add_argument_group("personal data (see README.md, Personal data)")
    privacy.add_argument(
        "--drop-fields", metavar="PATHS",
        help="comma-separated fields removed from every event, e.g. ip_address,user_properties.email (env AMP_DROP_FIELDS)",
    )
    privacy.add_argument(
        "--hash-fields", metavar="PATHS",
        help="comma-separated fields replaced by their HMAC-SHA256 keyed by AMP_HASH_KEY (env AMP_HASH_FIELDS)",
    )
    upload = parser.add_argument_group("Azure Blob Storage (needs requirements-azure.txt)")
    upload.add_argument("--upload", action="store_true", help="upload each finished file, and any still pending, to Azure")
    upload.add_argument("--container", metavar="NAME", help="blob container (env AZURE_STORAGE_CONTAINER, default amplitude)")
    upload.add_argument(
        "--blob-prefix", metavar="PREFIX", help="blob name prefix (env AZURE_BLOB_PREFIX, default amplitude/events)"
    )
    report = parser.add_argument_group("completeness report")
    report.add_argument(
        "--report", action="store_true",
        help="export nothing: write an HTML report of the range (default: the manifest's whole range) and print a "
        "table per day; exit 1 if an hour is missing",
    )
    report.add_argument("--report-file", metavar="PATH", help="where --report writes its page (default <data dir>/report.html)")
    parser.add_argument(
        "--demo", action="store_true",
        help="export the last 7 days from a local stand-in of the API and write its report: no credentials, no network",
    )
    return parser


class QuietParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (via UsageError) instead of usage text."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class SettingPicker:
    """Reads one setting from its flag, else its environment variable, else its default; names the source in errors."""

    def __init__(self, args: argparse.Namespace, env):
        self.args = args
        self.env = env

    def raw(self, name: str, variable: str | None, default):
        flag_value = getattr(self.args, name, None) if name else None
        if flag_value is not None:
            return flag_value, "--" + name.replace("_", "-")
        if variable and self.env.get(variable, "").strip():
            return self.env[variable].strip(), variable
        return default, None

    def text(self, name, variable, default) -> str:
        return str(self.raw(name, variable, default)[0])

    def location(self, name, variable, default, demo_default) -> str:
        """A place to write; --demo takes it from its own command line only, so .env never sends it to real data."""
        if self.args.demo:
            return str(self.raw(name, None, demo_default)[0])
        return self.text(name, variable, default)

    def switch(self, name, variable) -> bool:
        if getattr(self.args, name):
            return True
        value = self.env.get(variable, "").strip().lower()
        if value in ("", "0", "false", "no", "off"):
            return False
        if value in ("1", "true", "yes", "on"):
            return True
        raise UsageError(f"{variable}: expected 1/true/yes/on or 0/false/no/off, got {value!r}")

    def integer(self, name, variable, default, low, high) -> int:
        return self.bounded(name, variable, default, low, high, int, "a whole number")

    def number(self, name, variable, default, low, high) -> float:
        return self.bounded(name, variable, default, low, high, float, "a number of seconds")

    def bounded(self, name, variable, default, low, high, convert, expected):
        value, source = self.raw(name, variable, default)
        try:
            number = convert(value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: expected {expected}, got {value!r}") from None
        if not low <= number <= high:
            raise UsageError(f"{source}: must be between {low} and {high}, got {value}")
        return number

    def choice(self, name, variable, default, choices) -> str:
        value, source = self.raw(name, variable, default)
        value = str(value).lower()
        if value not in choices:
            raise UsageError(f"{source}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def log_level(self, name, variable, default) -> int:
        return getattr(logging, self.choice(name, variable, default.lower(), ("debug", "info", "warning", "error")).upper())

    def file_stem(self, name, variable, default) -> str:
        value, source = self.raw(name, variable, default)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(value)):
            raise UsageError(f"{source}: use letters, digits, '_', '.' and '-' only, got {value!r}")
        return str(value)


def pick_catch_up(pick: SettingPicker) -> int:
    """Days before yesterday whose missing hours the nightly run exports too; only with the nightly default."""
    # The demo shows a week, so that its report has days to compare.
    days = pick.integer("catch_up", None if pick.args.demo else "AMP_CATCH_UP_DAYS", 6 if pick.args.demo else 0, 0, 366)
    ranged = pick.args.date or pick.args.start or pick.args.end
    if ranged and pick.args.catch_up is not None:
        raise UsageError("--catch-up goes with the nightly default (yesterday), not with --date or --start/--end")
    return 0 if ranged else days


def pick_credentials(env, env_files: tuple[Path, ...] = ()) -> tuple[str, str]:
    names = ("AMP_API_KEY", "AMP_SECRET_KEY")
    missing = [name for name in names if not env.get(name, "").strip()]
    if missing:
        pronoun = "it" if len(missing) == 1 else "them"
        looked = f" (looked in {' and '.join(map(str, env_files))})" if env_files else ""
        raise UsageError(
            f"{' and '.join(missing)} not set: put {pronoun} in .env{looked} or the environment; see .env.example"
        )
    for name in names:
        # HTTP Basic sends latin-1; Amplitude's keys are hex, so anything else is a copy-paste accident.
        if not (env[name].strip().isascii() and env[name].strip().isprintable()):
            raise UsageError(f"{name} holds characters an Amplitude key never has (check for stray quotes or spaces)")
    return env[names[0]].strip(), env[names[1]].strip()


def pick_base_url(pick: SettingPicker) -> str:
    if pick.args.demo:
        return "http://127.0.0.1"  # replaced by the stand-in's address once it listens
    region = pick.choice("region", "AMP_REGION", "eu", ("eu", "us"))
    base_url, source = pick.raw("base_url", "AMP_BASE_URL", EU_BASE_URL if region == "eu" else US_BASE_URL)
    found = re.fullmatch(r"(https?)://([^\s/@?#]+)(/[^\s?#]*)?", base_url)
    if not found:
        raise UsageError(f"{source}: expected an http(s) URL without credentials, query or fragment, got {base_url!r}")
    scheme, host = found.group(1), found.group(2)
    if scheme == "http" and not is_loopback(host):
        raise UsageError(f"{source}: the keys would travel unencrypted to {host}; use https:// (http:// is for 127.0.0.1 only)")
    # People paste the whole endpoint; the path is added per request, so take what comes before it.
    return base_url.rstrip("/").removesuffix(EXPORT_PATH).rstrip("/")


def pick_upload(pick: SettingPicker):
    """The Azure target for --upload; the packages and the credentials' presence are checked before any export."""
    import azure_upload

    try:
        azure_upload.ensure_installed()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    container = pick.text("container", "AZURE_STORAGE_CONTAINER", "amplitude")
    prefix = pick.location("blob_prefix", "AZURE_BLOB_PREFIX", "amplitude/events", "demo/amplitude/events")
    try:
        target = azure_upload.target_from(pick.env, container, prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        azure_upload.container_client(target)  # the SDK's own checks of the settings; no request is made
    except ValueError:
        raise UsageError(f"the {target.method} for Azure is incomplete or malformed") from None
    return target


def pick_field_rules(pick: SettingPicker):
    """--drop-fields / --hash-fields as a Pseudonymiser, checked before any request; None without them."""
    dropped, dropped_source = pick.raw("drop_fields", "AMP_DROP_FIELDS", None)
    hashed, hashed_source = pick.raw("hash_fields", "AMP_HASH_FIELDS", None)
    if dropped is None and hashed is None:
        return None
    import field_rules

    try:
        rules = field_rules.rules_from(dropped, hashed, pick.env, (dropped_source, hashed_source))
    except field_rules.RuleError as exc:
        raise UsageError(str(exc)) from None
    return field_rules.Pseudonymiser(rules) if rules else None


def pick_range(args: argparse.Namespace, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The first and last hour to export: --date, --start/--end, or yesterday."""
    last_finished = last_finished_hour(now)
    if args.date and (args.start or args.end):
        raise UsageError("--date cannot be combined with --start/--end")
    if args.date:
        start = parse_hour(args.date, "--date", last_hour=False)
        end = start + 23 * HOUR
        if end > last_finished:
            raise UsageError(f"--date {args.date}: that UTC day has not ended yet")
        return start, end
    if args.start or args.end:
        if not (args.start and args.end):
            raise UsageError("--start and --end go together")
        start = parse_hour(args.start, "--start", last_hour=False)
        end = parse_hour(args.end, "--end", last_hour=True)
        if end < start:
            raise UsageError(f"--end {args.end} is before --start {args.start}")
        if end > last_finished:
            raise UsageError(f"--end {args.end}: the last finished hour is {format_hour(last_finished)} UTC")
        return start, end
    window = yesterday(now)
    return window.start, window.end


def serve_demo_if_asked(settings: Settings):
    """For --demo, a stand-in of the Export API on 127.0.0.1 for the length of the run."""
    if not settings.demo:
        return contextlib.nullcontext(settings)
    from amplitude_standin import demo_server

    @contextlib.contextmanager
    def demo():
        with demo_server(settings.api_key, settings.secret_key) as base_url:
            log.info("Demo: exporting from the local stand-in at %s", base_url)
            yield dataclasses.replace(settings, base_url=base_url)

    return demo()


def show_demo_report(settings: Settings) -> None:
    """The demo ends with its report: the page in the demo's data folder and the table on stdout."""
    import report

    report.run(dataclasses.replace(settings, explicit_range=True))
    log.info("Demo: open %s in a browser", (settings.data_dir / "report.html").resolve())


def run(settings: Settings) -> int:
    """Export every planned window that is not already exported; exit code 1 if any failed."""
    began = time.monotonic()
    data_dir = ensure_folder(settings.data_dir)
    with hold_lock(data_dir):
        remove_temp_files(data_dir)
        stop_cleanly_on_signals(data_dir)
        manifest = data_dir / MANIFEST_NAME
        records = read_manifest(manifest)
        records += finish_interrupted_save(data_dir, manifest, records)
        first, last = settings.windows[0].start, settings.windows[-1].end
        covered = set() if settings.refetch else exported_hours(records, data_dir, settings.policy, settings.verify, first, last)
        todo = plan_missing(settings.windows, covered)
        skipped = sum(w.hours for w in settings.windows) - sum(w.hours for w in todo)
        if skipped:
            log.info("Skipping %d hour(s) already exported (manifest %s; --refetch exports them again)", skipped, manifest)
        warn_if_fresh(todo, settings.started)
        several = todo != [settings.seed_named_window]
        uploads = Uploads(settings, manifest) if settings.upload else None
        if uploads:
            uploads.send_pending(records)

        def save(finished: Finished) -> dict:
            record = save_window(finished, settings, manifest, several)
            if uploads:
                uploads.send(record)
            return record

        saved, failures = export_windows(todo, settings, save)
    log_summary(settings, saved, failures, time.monotonic() - began)
    if uploads and uploads.failure:
        log.error("Upload failed: %s; the files stay here and the next --upload run sends them", uploads.failure)
        return EXIT_FAILED
    return EXIT_FAILED if failures else EXIT_OK


def export_windows(windows: list[Window], settings: Settings, save) -> tuple[list[dict], list[tuple[Window, str]]]:
    """Download windows on `workers` threads; put each in place in window order so runs are reproducible."""
    saved, failures = [], []
    pending: deque = deque()
    queue = iter(windows)
    with progress_bar(len(windows), shown=not settings.quiet) as progress, ThreadPoolExecutor(
        settings.workers, thread_name_prefix="window", initializer=leave_signals_to_main_thread
    ) as pool:
        try:
            for window in itertools.islice(queue, 2 * settings.workers):
                pending.append((window, pool.submit(export_window, window, settings)))
            while pending:
                window, future = pending[0]
                try:
                    record = save(future.result())
                    saved.append(record)
                    progress.advance(record["bytes"])
                except Exception as exc:  # an unforeseen failure ends its window, not the run
                    reason = str(exc) if isinstance(exc, ExportError) else f"unexpected {type(exc).__name__}: {exc}"
                    log.error("Window %s failed: %s", window, reason)
                    failures.append((window, reason))
                    progress.advance(0)
                pending.popleft()
                following = next(queue, None)
                if following:
                    pending.append((following, pool.submit(export_window, following, settings)))
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            for _, future in pending:
                discard_unsaved(future)
    return saved, failures


def export_window(window: Window, settings: Settings) -> Finished:
    """One window into one temporary file, splitting requests Amplitude finds too large."""
    began = time.monotonic()
    temp_path = settings.data_dir / f"{TEMP_PREFIX}{window.label}-{uuid.uuid4().hex[:8]}{settings.extension}{TEMP_SUFFIX}"
    writer = None
    try:
        writer = EventWriter(temp_path, settings.file_format, settings.gzip)
        with requests.Session() as session:
            session.auth = (settings.api_key, settings.secret_key)
            session.headers["User-Agent"] = USER_AGENT
            export_span(window, writer, session, settings, simdjson.Parser())
        writer.finish()
    except BaseException as exc:
        if writer:
            writer.discard()
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write to {settings.data_dir}: {exc.strerror or exc}") from None
        raise
    return Finished(window, temp_path, writer.events, writer.size, writer.sha256(), time.monotonic() - began, writer.tally)


def export_span(span: Window, writer: EventWriter, session, settings: Settings, parser) -> None:
    try:
        fetch(span, writer, session, settings, parser)
    except TooLarge as exc:
        if span.hours == 1:
            raise ExportError(
                f"hour {span.label[:11]} alone is too large for the Export API ({exc}); "
                "use Amplitude's Amazon S3 or data warehouse export for this hour"
            ) from None
        first, second = span.halves()
        log.warning("%s: %s; splitting into %s and %s", span, exc, first, second)
        export_span(first, writer, session, settings, parser)
        export_span(second, writer, session, settings, parser)


def fetch(span: Window, writer: EventWriter, session, settings: Settings, parser, sleep=time.sleep) -> None:
    """Download `span` and write its events, retrying as the seed specifies: a bounded loop, a counter per span."""
    last: Retryable | None = None
    for attempt in range(1, settings.max_attempts + 1):
        log.info("Fetching %s (attempt %d/%d)", span, attempt, settings.max_attempts)
        try:
            fetch_once(span, writer, session, settings, parser)
            return
        except Retryable as exc:
            last = exc
            if attempt < settings.max_attempts:
                log.warning("%s: %s; waiting %gs before attempt %d", span, exc, exc.wait, attempt + 1)
                sleep(exc.wait)
            else:
                log.warning("%s: %s", span, exc)
    if last.status == 504 and span.hours > 1:
        raise TooLarge(f"still timing out (504) after {settings.max_attempts} attempts")
    log.error("Max fetch attempts reached for %s (%d)", span, settings.max_attempts)
    raise ExportError(f"Max fetch attempts reached for {span} ({settings.max_attempts}); last error: {last}")


def fetch_once(span: Window, writer: EventWriter, session, settings: Settings, parser) -> None:
    """One request: on 200 the events go into `writer`, else the response says retry, split, skip or fail."""
    zip_path = writer.path.with_name(f"{TEMP_PREFIX}download-{span.label}-{uuid.uuid4().hex[:8]}.zip{TEMP_SUFFIX}")
    try:
        answer = download(session, span, settings, zip_path)
        decision = classify(answer, settings.delay_seconds)
        if decision == "ok":
            write_to_local(zip_path, writer, settings, parser, span)
        elif decision == "empty":
            log.info("%s: no data for this range (HTTP 404: %s)", span, answer.first_line)
    finally:
        zip_path.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one request got: the status, the headers, the start of any body other than a 200's, and the URL asked."""

    status: int
    headers: dict
    body: str
    url: str

    @property
    def first_line(self) -> str:
        return self.body.strip().splitlines()[0][:ERROR_BODY_CHARS] if self.body.strip() else "no body"


def download(session, span: Window, settings: Settings, dest: Path) -> Answer:
    """One attempt, abandoned once it has run `attempt_timeout` seconds.

    A read timeout bounds the silence between two bytes, not a whole answer: a server that sends a byte a second
    would hold the run (and the data folder's lock) for ever. The request runs on a thread of its own, which an
    abandoned attempt leaves to die with its connection; it writes nothing more once abandoned.
    """
    outcome: dict = {}
    abandoned = threading.Event()

    def attempt():
        try:
            outcome["answer"] = request_to_file(session, span, settings, dest, abandoned)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, name=f"request-{span.label}", daemon=True)
    thread.start()
    thread.join(settings.attempt_timeout)
    if thread.is_alive():
        abandoned.set()
        raise Retryable(
            f"no whole answer within {settings.attempt_timeout:g}s (--attempt-timeout); attempt abandoned",
            settings.delay_seconds,
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def request_to_file(session, span: Window, settings: Settings, dest: Path, abandoned: threading.Event) -> Answer:
    """Stream a 200's body to `dest`; any other answer comes back with the start of its body."""
    url = settings.base_url + EXPORT_PATH
    params = {"start": format_hour(span.start), "end": format_hour(span.end)}
    try:
        with session.get(
            url, params=params, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT, settings.read_timeout),
        ) as response:
            if response.status_code != 200:
                return Answer(response.status_code, response.headers, body_start(response), url)
            with open(dest, "wb") as out:
                for chunk in response.iter_content(CHUNK_BYTES):
                    if abandoned.is_set():
                        break
                    out.write(chunk)
            if abandoned.is_set():
                dest.unlink(missing_ok=True)
            return Answer(200, response.headers, "", url)
    except requests.RequestException as exc:
        raise Retryable(describe_failure(exc, settings), settings.delay_seconds) from None


def classify(answer: Answer, delay: float) -> str:
    """The one place that decides what a response means: 'ok', 'empty', or an exception to retry, split or fail."""
    status = answer.status
    if status == 200:
        return "ok"
    if status == 404 and NO_DATA_TEXT in answer.body:
        return "empty"
    if status == 404:
        raise ExportError(
            f"HTTP 404 for {answer.url} is not Amplitude's 'no data' answer ({answer.first_line}): "
            "check --base-url (AMP_BASE_URL) and --region"
        )
    if 300 <= status < 400:
        target = urllib.parse.urlsplit(answer.headers.get("Location", "")).hostname or "an address not given"
        raise ExportError(
            f"HTTP {status}: {answer.url} redirects to {target}; redirects are not followed, so the keys go nowhere "
            "else: point --base-url (AMP_BASE_URL) at the API itself"
        )
    if status == 429:
        wait = max(2 * delay, min(retry_after_seconds(answer.headers, now_utc()), RETRY_AFTER_CAP))
        raise Retryable("rate limit exceeded (HTTP 429)", wait, status)
    if status >= 500:
        raise Retryable(f"server error (HTTP {status})", delay, status)
    if status in (401, 403):
        raise ExportError(
            f"Amplitude rejected the credentials (HTTP {status}): check AMP_API_KEY and AMP_SECRET_KEY, "
            "and that the project lives in the region asked for (EU by default; --region us for a US project)"
        )
    if status == 400 and TOO_LARGE_TEXT in answer.body.lower():
        raise TooLarge(f"HTTP 400: {answer.first_line}")
    raise ExportError(f"Amplitude answered HTTP {status}: {answer.first_line}")


def write_to_local(zip_path: Path, writer: EventWriter, settings: Settings, parser, span: Window) -> None:
    """The archive's events into `writer`; a damaged archive is undone and retried, a bad event fails the window."""
    mark = writer.mark()
    try:
        for member, first_line_number, lines in unzip(zip_path, span, settings.max_event_bytes):
            events, types = check_events(lines, member, first_line_number, parser)
            writer.write_events(settings.field_rules.apply(events) if settings.field_rules else events)
            writer.tally.add(member_hour(member), types)
    except BadEvent as exc:  # the archive passed its CRC check: downloading it again would not help
        raise ExportError(str(exc)) from None
    except CorruptArchive as exc:
        writer.rollback(mark)
        raise Retryable(f"the archive is damaged ({exc})", settings.delay_seconds) from None


class EventWriter:
    """Streams events into one file as a JSON array or JSON lines, optionally gzipped, hashing as it writes.

    A mark/rollback pair undoes the events of a download that turned out damaged; with --gzip a mark closes
    the current gzip member so the file can be cut there (a gzip file may hold several members).
    """

    def __init__(self, path: Path, file_format: str, gzip: bool):
        self.path = path
        self.events = 0
        self.size = 0
        self._array = file_format == "json"
        self._gzip = gzip
        self._hash = hashlib.sha256()
        self._compressor = new_compressor() if gzip else None
        self._member_open = False
        self.tally = Tally()  # the counts of what is written, undone with it by rollback
        self._file = open(path, "xb")  # noqa: SIM115 - the writer owns the file until finish() or discard()

    def write_events(self, lines: list[bytes]) -> None:
        if not lines:
            return
        # Separators go apart from the lines: a batch of one long line is then never copied into a larger buffer.
        if self._array:
            self._encode(b",\n" if self.events else b"[\n")
            self._encode(b",\n".join(lines))
        else:
            self._encode(b"\n".join(lines))
            self._encode(b"\n")
        self.events += len(lines)

    def mark(self) -> tuple:
        self._close_member()
        return self.size, self.events, self._hash.copy(), self.tally.copy()

    def rollback(self, mark: tuple) -> None:
        self.size, self.events, hash_copy, tally = mark
        self._hash = hash_copy.copy()
        self.tally = tally.copy()
        self._file.seek(self.size)
        self._file.truncate()
        if self._gzip:
            self._compressor = new_compressor()
            self._member_open = False

    def finish(self) -> None:
        if self._array:
            self._encode(b"\n]\n" if self.events else b"[]\n")
        if self._gzip and (self._member_open or self.size == 0):
            self._raw(self._compressor.flush())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _encode(self, data: bytes) -> None:
        if self._gzip:
            self._member_open = True
            data = self._compressor.compress(data)
        self._raw(data)

    def _close_member(self) -> None:
        if self._gzip and self._member_open:
            self._raw(self._compressor.flush())
            self._compressor = new_compressor()
            self._member_open = False

    def _raw(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            self._hash.update(data)
            self.size += len(data)


class Tally:
    """Events per hour (the archive member's hour, which is how the Export API groups events) and per event type."""

    def __init__(self, hours=None, types=None, unplaced=0):
        self.hours: collections.Counter = collections.Counter(hours or {})
        self.types: collections.Counter = collections.Counter(types or {})
        self.unplaced = unplaced  # events of members whose name gives no hour

    def add(self, hour: dt.datetime | None, types: list[str]) -> None:
        if hour is None:
            self.unplaced += len(types)
        else:
            self.hours[hour] += len(types)
        self.types.update(types)

    def copy(self) -> Tally:
        return Tally(self.hours, self.types, self.unplaced)

    def by_hour(self, window: Window) -> dict[str, int] | None:
        """Every hour of the window (zeros included) and any stray hour; None if some events have no hour."""
        if self.unplaced:
            return None
        hours = {hour: 0 for hour in hours_between(window.start, window.end)} | dict(self.hours)
        return {format_hour(hour): hours[hour] for hour in sorted(hours)}


def new_compressor():
    return isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)


def save_window(finished: Finished, settings: Settings, manifest: Path, several: bool) -> dict:
    """Put a finished window under its final name (never over another file), then record it in the manifest.

    The record is journaled before the rename, so a run killed between the rename and the manifest append is
    completed by the next run (finish_interrupted_save) instead of leaving a file the manifest does not know.
    """
    data_dir = settings.data_dir
    journal = data_dir / JOURNAL_NAME
    try:
        for name in output_names(settings, finished.window, several):
            record = manifest_record(finished, name, now_utc(), settings.policy)
            if (data_dir / name).exists():
                continue
            write_durably(journal, json.dumps(record).encode())
            if put_in_place(finished.temp_path, data_dir / name):
                break
        fsync_folder(data_dir)
        append_manifest(manifest, record)
        journal.unlink()
    except ExportError:  # a link planted where the journal goes
        finished.temp_path.unlink(missing_ok=True)
        raise
    except OSError as exc:
        finished.temp_path.unlink(missing_ok=True)
        raise ExportError(f"cannot save {finished.window} in {data_dir}: {exc.strerror or exc}") from None
    log.info(
        "Exported %s: %d events, %d bytes to %s in %.1fs",
        finished.window, finished.events, finished.size, data_dir / name, finished.seconds,
    )
    return record


def put_in_place(temp_path: Path, target: Path) -> bool:
    """Rename `temp_path` to `target` unless `target` exists; a hard link makes the check and the rename one step."""
    try:
        os.link(temp_path, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A filesystem without hard links: the run lock keeps this check and rename free of races.
        if target.exists():
            return False
        os.replace(temp_path, target)
        return True
    temp_path.unlink()
    return True


def finish_interrupted_save(data_dir: Path, manifest: Path, records: list[dict]) -> list[dict]:
    """Record the file a killed run put in place without recording it; returns the records appended."""
    journal = data_dir / JOURNAL_NAME
    content = read_own_file(journal)
    if content is None:
        return []
    record = parse_journal(content)
    appended = []
    if record is None:
        # Torn while written (its rename never happened), or not written by this program at all.
        log.warning("%s does not describe a file in the data folder; ignored", journal)
    elif is_intact(record, data_dir) and not any(
        r.get("file") == record["file"] and r.get("sha256") == record["sha256"] for r in records
    ):
        log.warning("Recording %s, put in place by a run that stopped before recording it", record["file"])
        append_manifest(manifest, record)
        appended.append(record)
    journal.unlink()
    return appended


def parse_journal(content: bytes) -> dict | None:
    """The export record a journal holds, or None unless it has every field and names a plain file name."""
    try:
        record = json.loads(content)
        record_window(record)
        sound = all(type(record[key]) is int and record[key] >= 0 for key in ("events", "bytes"))
        sound = sound and re.fullmatch(r"[0-9a-f]{64}", str(record["sha256"])) is not None
        sound = sound and is_plain_name(record["file"]) and isinstance(record["finished_at"], str)
    except (ValueError, KeyError, TypeError, UsageError):
        return None
    return record if sound else None


def output_names(settings: Settings, window: Window, several: bool):
    """Candidate file names, best first: the seed's name, then with the window, then with a counter."""
    base = f"{settings.started:%Y%m%d_%H%M}_{settings.data_outfile}"
    if not several:
        yield base + settings.extension
    yield f"{base}_{window.label}{settings.extension}"
    for counter in itertools.count(2):
        yield f"{base}_{window.label}_{counter}{settings.extension}"


class Uploads:
    """The upload stage: each finished file to Azure, recorded in the manifest; the first storage failure stops it."""

    def __init__(self, settings: Settings, manifest: Path):
        from azure_upload import Uploader

        self.settings = settings
        self.manifest = manifest
        self.uploader = Uploader(settings.upload)
        self.failure: str | None = None

    def send_pending(self, records: list[dict]) -> None:
        pending = pending_uploads(records, self.settings.data_dir)
        if pending:
            log.info("Uploading %d file(s) exported earlier and not yet uploaded", len(pending))
        for record in pending:
            self.send(record)

    def send(self, record: dict) -> None:
        from azure_upload import UploadError

        if self.failure:
            return
        target = self.settings.upload
        blob = target.blob_name(record["start"], record["file"])
        metadata = {"window_start": record["start"], "window_end": record["end"], "events": str(record["events"]),
                    "sha256": record["sha256"]}
        if record.get("policy"):
            metadata["policy"] = json.dumps(record["policy"], separators=(",", ":"))
        try:
            sent = self.uploader.send(
                self.settings.data_dir / record["file"], blob, content_type_of(record["file"]),
                record["file"].endswith(".gz"), metadata,
            )
        except UploadError as exc:
            self.failure = str(exc)
            return
        append_manifest(self.manifest, {
            "start": record["start"], "end": record["end"], "file": record["file"], "blob": blob,
            "sha256": record["sha256"], "uploaded_at": iso_utc(now_utc()),
        })
        verb = "Uploaded" if sent else "Already uploaded (same sha256)"
        log.info("%s %s to %s/%s", verb, record["file"], target.container, blob)


def pending_uploads(records: list[dict], data_dir: Path) -> list[dict]:
    """Exported files still on disk with their recorded size whose bytes no manifest line records as uploaded."""
    uploaded = {(r["file"], r.get("sha256")) for r in records if "blob" in r}
    pending, seen = [], set()
    for record in records:
        key = (record.get("file"), record.get("sha256"))
        if "blob" in record or key in uploaded or key in seen:
            continue
        if is_intact(record, data_dir):
            pending.append(record)
            seen.add(key)
    return pending


def content_type_of(file_name: str) -> str:
    return "application/x-ndjson" if file_name.removesuffix(".gz").endswith(".jsonl") else "application/json"


def manifest_record(finished: Finished, name: str, now: dt.datetime, policy: dict | None) -> dict:
    record = {
        "start": format_hour(finished.window.start),
        "end": format_hour(finished.window.end),
        "file": name,
        "events": finished.events,
        "bytes": finished.size,
        "sha256": finished.sha256,
        "finished_at": iso_utc(now),
    }
    hours = finished.tally.by_hour(finished.window)
    if hours is not None:
        record["hours"] = hours
    record["event_types"] = dict(sorted(finished.tally.types.items()))
    return record | {"policy": policy} if policy else record


def append_manifest(manifest: Path, record: dict) -> None:
    with open_own_file(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab") as out:
        out.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        out.flush()
        os.fsync(out.fileno())


def read_manifest(manifest: Path, repair: bool = True) -> list[dict]:
    """The manifest's records; a line torn by a crash mid-append is cut off so the next append starts clean.

    Only a run holding the lock may `repair`: for a reader without it (the report), the last line may be one an
    export is appending right now.
    """
    content = read_own_file(manifest)
    if content is None:
        return []
    if content and not content.endswith(b"\n"):
        cut = content.rfind(b"\n") + 1
        if repair:
            log.warning("%s: removing an incomplete last line left by an interrupted run", manifest)
            with open_own_file(manifest, os.O_RDWR, "r+b") as fix:
                fix.truncate(cut)
                os.fsync(fix.fileno())
        content = content[:cut]
    records = []
    for number, line in enumerate(content.splitlines(), 1):
        try:
            record = json.loads(line)
            record_window(record)
            if not is_plain_name(record["file"]):
                raise ValueError("a manifest names files in the data folder only")
            records.append(record)
        except (ValueError, KeyError, TypeError, UsageError):
            log.warning("%s line %d is not a manifest record; ignored", manifest, number)
    return records


def exported_hours(records: list[dict], data_dir: Path, policy: dict | None, verify: bool,
                   first: dt.datetime, last: dt.datetime) -> set[dt.datetime]:
    """Hours from `first` to `last` exported under `policy` whose file is still there with the recorded size (and,
    with `verify`, the recorded sha256).

    Hours exported under other field rules do not count: their files hold other fields than asked for now.
    """
    covered = set()
    for record in records:
        window = record_window(record)
        if window.start > last or window.end < first or record.get("policy") != policy:
            continue
        state = file_state(record, data_dir, verify)
        if state == "changed" and verify:
            log.warning("%s: its bytes changed since it was exported; its hours are exported again", record["file"])
        if state == "intact":
            covered.update(hours_between(window.start, window.end))
    return covered


def file_state(record: dict, data_dir: Path, verify: bool) -> str:
    """'intact', 'gone' or 'changed': by size and type, and with `verify` by sha256 as well."""
    if not is_intact(record, data_dir):
        return "changed" if os.path.lexists(data_dir / record["file"]) else "gone"
    if verify and file_sha256(data_dir / record["file"]) != record["sha256"]:
        return "changed"
    return "intact"


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, read a megabyte at a time; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def is_intact(record: dict, data_dir: Path) -> bool:
    """An export line whose file is still in the data folder, a regular file (no link) of the recorded size."""
    try:
        found = os.lstat(data_dir / record["file"])
    except OSError:
        return False
    return "bytes" in record and stat.S_ISREG(found.st_mode) and found.st_size == record["bytes"]


def remove_temp_files(data_dir: Path, quiet: bool = False) -> None:
    """Temporary files of an interrupted run; the lock guarantees no running export owns them."""
    for stray in data_dir.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if not quiet:
            log.warning("Removing %s, left by an interrupted run", stray)
        stray.unlink(missing_ok=True)


def stop_cleanly_on_signals(data_dir: Path) -> None:
    """SIGTERM (cron, systemd) or Ctrl-C: leave no temporary file and exit 1 at once.

    Waiting for the download threads could take minutes; what they have not put in place is simply discarded,
    and the next run exports it. A journaled rename is completed by the next run either way.
    """

    def stop(signum, frame):
        remove_temp_files(data_dir, quiet=True)
        log.error("Stopped by %s; files not yet in place were discarded, the next run exports what is missing",
                  signal.Signals(signum).name)
        logging.shutdown()
        os._exit(EXIT_FAILED)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def leave_signals_to_main_thread() -> None:
    """Python runs signal handlers in the main thread only, and a signal the kernel hands to a worker thread does
    not wake a main thread blocked waiting on a future: so workers (and the threads they start) block them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


@contextlib.contextmanager
def hold_lock(data_dir: Path):
    """One run per data folder; the kernel drops the lock when a run dies, so a crash never blocks the next."""
    lock_path = data_dir / LOCK_NAME
    with open_own_file(lock_path, os.O_RDWR | os.O_CREAT, "r+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise ExportError(f"another export is running in {data_dir} (pid {holder}); try again when it ends") from None
        lock_file.truncate(0)
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        yield


def discard_unsaved(future) -> None:
    if future.cancelled() or not future.done() or future.exception() is not None:
        return
    future.result().temp_path.unlink(missing_ok=True)


def warn_if_fresh(windows: list[Window], now: dt.datetime) -> None:
    for window in windows:
        if window.end + HOUR > now - FRESHNESS:
            log.warning(
                "%s ends less than 2 hours ago: Amplitude makes events exportable about 2 hours after upload, "
                "so its last hours may be incomplete (export it again later with --refetch)", window,
            )


def log_summary(settings: Settings, saved: list[dict], failures, seconds: float) -> None:
    events = sum(r["events"] for r in saved)
    size = sum(r["bytes"] for r in saved)
    first, last = settings.windows[0].start, settings.windows[-1].end
    files = saved[0]["file"] if len(saved) == 1 else f"{len(saved)} files"
    log.info(
        "Summary: %s-%s, %d window(s) exported, %d event(s), %d byte(s), %s, %d failed, %.1fs",
        format_hour(first), format_hour(last), len(saved), events, size, files, len(failures), seconds,
    )
    for window, reason in failures:
        log.error("Failed window %s: %s (the next run exports it again)", window, reason)


@contextlib.contextmanager
def progress_bar(total: int, shown: bool):
    """A bar of windows and bytes when a person watches stderr; log lines only in cron."""
    if not (shown and sys.stderr.isatty()):
        yield NoProgress()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Log lines go through the bar's writer, so they scroll above it instead of tearing it.
    with logging_redirect_tqdm(), tqdm(total=total, unit="window", file=sys.stderr, dynamic_ncols=True) as bar:
        yield BarProgress(bar)


class NoProgress:
    def advance(self, size: int) -> None:
        pass


class BarProgress:
    def __init__(self, bar):
        self.bar = bar
        self.size = 0

    def advance(self, size: int) -> None:
        self.size += size
        self.bar.set_postfix_str(f"{self.size / 1e6:.1f} MB", refresh=False)
        self.bar.update(1)


def ensure_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the data folder {path}: {exc.strerror or exc}") from None
    return path


def write_durably(path: Path, content: bytes) -> None:
    with open_own_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())


def open_own_file(path: Path, flags: int, mode: str):
    """Open one of the exporter's own files (lock, manifest, journal) in the data folder, never through a link.

    A symbolic link planted there would make a run write, truncate or upload a file outside the folder; a FIFO
    would hang it. Both are refused before a byte is read or written.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ExportError(f"{path} is a symbolic link; remove it: the exporter does not follow links there") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ExportError(f"{path} is not a regular file; remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def read_own_file(path: Path) -> bytes | None:
    """The content of one of the exporter's own files, or None when there is none."""
    try:
        with open_own_file(path, os.O_RDONLY, "rb") as source:
            return source.read()
    except FileNotFoundError:
        return None


def write_atomically(path: Path, content: bytes) -> None:
    """Write beside `path`, fsync, rename over it: a reader sees the old file or the new one, never half of one."""
    temp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_durably(temp, content)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def body_start(response) -> str:
    try:
        return response.raw.read(ERROR_BODY_BYTES, decode_content=True).decode("utf-8", "replace")
    except Exception:  # an error body we cannot read still leaves its status to act on
        return ""


def retry_after_seconds(headers, now: dt.datetime) -> float:
    """Retry-After in seconds, given as a number or as an HTTP date; 0 when absent or unreadable."""
    value = str(headers.get("Retry-After", "")).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def describe_failure(exc: requests.RequestException, settings: Settings) -> str:
    """A failed connection in words: the host, and what went wrong (DNS, refused, TLS, timeout, reset, cut short)."""
    host = urllib.parse.urlsplit(settings.base_url).netloc
    causes = exception_chain(exc)

    def caused_by(*kinds) -> BaseException | None:
        return next((cause for cause in causes if isinstance(cause, kinds)), None)

    if caused_by(socket.gaierror) or "NameResolutionError" in {type(c).__name__ for c in causes}:
        return f"the name {host} could not be resolved (DNS)"
    if caused_by(requests.exceptions.ConnectTimeout):
        return f"no connection to {host} within {CONNECT_TIMEOUT:g}s (timeout)"
    if caused_by(requests.exceptions.ReadTimeout, socket.timeout):
        return f"{host} sent nothing for {settings.read_timeout:g}s (read timeout)"
    if caused_by(ConnectionRefusedError):
        return f"{host} refused the connection"
    certificate = caused_by(ssl.SSLCertVerificationError)
    if certificate:
        return f"the TLS certificate of {host} was rejected ({certificate.verify_message})"
    if caused_by(ssl.SSLError, requests.exceptions.SSLError):
        return f"TLS error with {host} ({first_text_line(caused_by(ssl.SSLError) or exc)})"
    if caused_by(ConnectionResetError, BrokenPipeError):
        return f"{host} reset the connection"
    if caused_by(requests.exceptions.ChunkedEncodingError, http.client.IncompleteRead) or \
            "ProtocolError" in {type(c).__name__ for c in causes}:
        return f"{host} closed the connection before the whole body arrived (body cut short)"
    return f"connection to {host} failed ({type(exc).__name__}: {first_text_line(exc)})"


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps: requests wraps urllib3, which wraps the socket's own error."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [inner for inner in wrapped if isinstance(inner, BaseException)]
    return found


# Pure helpers: time arithmetic and naming.


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def yesterday(now: dt.datetime) -> Window:
    day = floor_hour(now).replace(hour=0) - dt.timedelta(days=1)
    return Window(day, day + 23 * HOUR)


def last_finished_hour(now: dt.datetime) -> dt.datetime:
    return floor_hour(now) - HOUR


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def parse_hour(text: str, source: str, last_hour: bool) -> dt.datetime:
    """YYYY-MM-DD (its first hour, or its last when `last_hour`) or YYYYMMDDTHH, in UTC."""
    text = str(text).strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            return day + 23 * HOUR if last_hour else day
        if re.fullmatch(r"\d{8}T\d{2}", text):
            return dt.datetime.strptime(text, HOUR_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise UsageError(f"{source} {text}: no such date or hour") from None
    raise UsageError(f"{source} {text!r}: expected YYYY-MM-DD or YYYYMMDDTHH (UTC)")


def record_window(record: dict) -> Window:
    """The hours a manifest line covers; a UsageError (or KeyError) when it does not say them right."""
    return Window(parse_hour(record["start"], "start", last_hour=False), parse_hour(record["end"], "end", last_hour=True))


def format_hour(moment: dt.datetime) -> str:
    return moment.strftime(HOUR_FORMAT)


def hours_between(start: dt.datetime, end: dt.datetime):
    return (start + n * HOUR for n in range(int((end - start) / HOUR) + 1))


def plan_windows(start: dt.datetime, end: dt.datetime, window_hours: int) -> list[Window]:
    """Consecutive, non-overlapping windows of `window_hours` from `start`; the last one may be shorter."""
    windows = []
    while start <= end:
        last = min(start + (window_hours - 1) * HOUR, end)
        windows.append(Window(start, last))
        start = last + HOUR
    return windows


def plan_missing(windows, covered: set[dt.datetime]) -> list[Window]:
    """The parts of `windows` not in `covered`, as windows of consecutive missing hours."""
    missing = []
    for window in windows:
        run_start = None
        for hour in hours_between(window.start, window.end):
            if hour in covered:
                if run_start is not None:
                    missing.append(Window(run_start, hour - HOUR))
                    run_start = None
            elif run_start is None:
                run_start = hour
        if run_start is not None:
            missing.append(Window(run_start, window.end))
    return missing


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost, with or without a port: the only hosts plain http may carry the keys to."""
    try:
        name = urllib.parse.urlsplit(f"//{host}").hostname or ""
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name




if __name__ == "__main__":
    sys.exit(main())
