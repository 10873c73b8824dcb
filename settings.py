"""Settings: every flag and variable declared once, in OPTIONS, and read into one checked Settings object.

Each Option holds a setting's flag, environment variable, reader (type and bounds), default and help. The
parser, `--help`, the environment and `.env` reading, and the tests that check `.env.example` and the manual's
tables are all driven by OPTIONS. argparse over one table rather than click: the precedence rules here (a blank
variable is unset, `--demo` ignores variables that would send it to real data, a relative path in `.env` is
relative to that file) and the one-line errors naming the flag or variable a bad value came from are a few lines
over argparse, and the standard library needs no pinning.

Precedence: a flag, else its variable (the real environment, then `.env` in the current folder, then `.env` beside
fetch_data.py), else the default. Everything is checked before any request or file is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from errors import UsageError
from urls import has_host_and_port, is_loopback, shown_url
from windows import FIRST_YEAR, LAST_YEAR, Window, format_hour, last_finished_hour, parse_hour, plan_windows, yesterday

PROJECT = Path(__file__).resolve().parent
EU_BASE_URL = "https://analytics.eu.amplitude.com"
US_BASE_URL = "https://amplitude.com"
EXPORT_PATH = "/api/2/export"
MAX_WORKERS = 5  # Amplitude allows 5 concurrent REST requests per project.
MAX_WINDOW_HOURS = 365 * 24  # The Export API's own limit for one request.
MAX_WINDOWS = 100_000  # a run plans at most this many windows: a typo in a range must not plan millions
UNSET = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: where it comes from, how it is read and checked, and what --help and the manual say of it."""

    name: str
    flag: str | None
    variable: str | None
    read: Callable[[str, str], object]  # (text, where it came from) -> value, or a UsageError
    default: object
    help: str
    group: str
    metavar: str | None = None
    switch: bool = False  # a flag without a value
    path: bool = False  # relative to the folder its source implies (see resolve_path)
    secret: bool = False  # never a flag (it would show in `ps` and shell history), never printed
    demo_default: object = UNSET  # with --demo: its own flag or this, never the variable

    @property
    def shown_default(self) -> str:
        if self.switch:
            return "off"
        return "" if self.default is None else str(self.default)


# Readers: each turns a text into a checked value, naming `source` in its error.


def whole(low: int, high: int):
    return bounded(int, "a whole number", low, high)


def seconds(low: float, high: float):
    return bounded(float, "a number of seconds", low, high)


def bounded(convert, expected: str, low, high):
    def read(text: str, source: str):
        try:
            number = convert(text)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: expected {expected}, got {text!r}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise UsageError(f"{source}: must be between {low} and {high}, got {text}")
        return number

    return read


def one_of(*choices: str):
    def read(text: str, source: str) -> str:
        value = str(text).lower()
        if value not in choices:
            raise UsageError(f"{source}: must be one of {', '.join(choices)}, got {text!r}")
        return value

    return read


def text(value: str, source: str) -> str:
    return str(value)


def switch(value, source: str) -> bool:
    if value is True or value is False:
        return value
    lowered = str(value).strip().lower()
    if lowered in ("", "0", "false", "no", "off"):
        return False
    if lowered in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{source}: expected 1/true/yes/on or 0/false/no/off, got {value!r}")


def file_stem(value: str, source: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(value)):
        raise UsageError(f"{source}: use letters, digits, '_', '.' and '-' only, got {value!r}")
    return str(value)


def log_level(value: str, source: str) -> int:
    return getattr(logging, one_of("debug", "info", "warning", "error")(value, source).upper())


WHEN, SOURCE, OUTPUT, PRIVACY, AZURE, LAKE, REPORT, WATCH, RUN = (
    "what to export (UTC; default: yesterday)", "where from", "where to", "personal data (docs/personal-data.md)",
    "Azure Blob Storage (needs requirements-azure.txt; docs/azure.md)",
    "Delta Lake table (needs requirements-lake.txt; docs/lake.md)", "completeness report (docs/report.md)",
    "schedulers and monitors (docs/monitoring.md)", "run",
)

OPTIONS: tuple[Option, ...] = (
    Option("api_key", None, "AMP_API_KEY", text, None, "Amplitude project API key (HTTP Basic user name)", SOURCE,
           secret=True),
    Option("secret_key", None, "AMP_SECRET_KEY", text, None, "Amplitude project secret key (HTTP Basic password)",
           SOURCE, secret=True),
    Option("date", "--date", None, text, None, "one UTC day", WHEN, "YYYY-MM-DD"),
    Option("start", "--start", None, text, None, "first hour: YYYY-MM-DD (its T00) or YYYYMMDDTHH", WHEN, "WHEN"),
    Option("end", "--end", None, text, None, "last hour, included: YYYY-MM-DD (its T23) or YYYYMMDDTHH", WHEN, "WHEN"),
    Option("window_hours", "--window-hours", "AMP_WINDOW_HOURS", whole(1, MAX_WINDOW_HOURS), 24,
           "hours per request and per file", WHEN, "N"),
    Option("catch_up", "--catch-up", "AMP_CATCH_UP_DAYS", whole(0, 366), 0,
           "with the nightly default: also export the hours of the DAYS days before yesterday that the manifest "
           "lacks", WHEN, "DAYS", demo_default=6),
    Option("refetch", "--refetch", None, switch, False, "export windows again even if the manifest has them", WHEN,
           switch=True),
    Option("verify", "--verify", None, switch, False,
           "recompute each recorded file's sha256: a file whose bytes changed does not count as exported", WHEN,
           switch=True),
    Option("region", "--region", "AMP_REGION", one_of("eu", "us"), "eu", "Amplitude's region", SOURCE, "{eu,us}"),
    Option("base_url", "--base-url", "AMP_BASE_URL", text, None,
           "API base URL, https:// (http:// to a loopback host only); overrides --region", SOURCE, "URL"),
    Option("max_attempts", "--max-attempts", "AMP_MAX_ATTEMPTS", whole(1, 100), 5, "attempts per request", SOURCE, "N"),
    Option("delay_seconds", "--delay-seconds", "AMP_DELAY_SECONDS", seconds(0, 3600), 1,
           "wait after a failed attempt; twice that after a 429", SOURCE, "SECONDS"),
    Option("read_timeout", "--read-timeout", "AMP_READ_TIMEOUT", seconds(0.1, 86400), 300,
           "seconds without a byte before an attempt fails", SOURCE, "SECONDS"),
    Option("attempt_timeout", "--attempt-timeout", "AMP_ATTEMPT_TIMEOUT", seconds(0.1, 7 * 86400), 3600,
           "seconds an attempt (request and whole body) may take before it is abandoned and retried", SOURCE,
           "SECONDS"),
    Option("max_event_bytes", "--max-event-bytes", "AMP_MAX_EVENT_BYTES", whole(2, 1 << 40), 16 << 20,
           "longest event line accepted, in bytes; a longer one fails its window", SOURCE, "N"),
    Option("workers", "--workers", "AMP_WORKERS", whole(1, MAX_WORKERS), 1,
           f"requests in flight at once, 1 to {MAX_WORKERS}: windows, or one window's hours as spans", SOURCE, "N"),
    Option("data_dir", "--data-dir", "AMP_DATA_DIR", text, "data", "output folder, beside fetch_data.py by default",
           OUTPUT, "DIR", path=True, demo_default="demo/data"),
    Option("data_outfile", "--data-outfile", "AMP_DATA_OUTFILE", file_stem, "ampl_dump", "file name stem", OUTPUT,
           "STEM"),
    Option("file_format", "--format", "AMP_FORMAT", one_of("json", "jsonl"), "json",
           "json: one array a file; jsonl: one event a line", OUTPUT, "{json,jsonl}"),
    Option("gzip", "--gzip", None, switch, False, "gzip the output files (.json.gz / .jsonl.gz)", OUTPUT, switch=True),
    Option("log_dir", "--log-dir", "AMP_LOG_DIR", text, "logs", "log folder, beside fetch_data.py by default", OUTPUT,
           "DIR", path=True, demo_default="demo/logs"),
    Option("log_level", "--log-level", "AMP_LOG_LEVEL", log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", OUTPUT,
           "LEVEL"),
    Option("quiet", "--quiet", "AMP_QUIET", switch, False,
           "stderr gets WARNING and ERROR lines only; the log file keeps everything (for cron)", OUTPUT, switch=True),
    Option("drop_fields", "--drop-fields", "AMP_DROP_FIELDS", text, None,
           "comma-separated fields removed from every event, e.g. ip_address,user_properties.email", PRIVACY, "PATHS"),
    Option("hash_fields", "--hash-fields", "AMP_HASH_FIELDS", text, None,
           "comma-separated fields replaced by their HMAC-SHA256 keyed by AMP_HASH_KEY", PRIVACY, "PATHS"),
    Option("hash_key", None, "AMP_HASH_KEY", text, None,
           "the secret key of --hash-fields, at least 32 characters", PRIVACY, secret=True),
    Option("upload", "--upload", None, switch, False, "upload each finished file, and any still pending, to Azure",
           AZURE, switch=True),
    Option("container", "--container", "AZURE_STORAGE_CONTAINER", text, "amplitude", "blob container, with --upload",
           AZURE, "NAME"),
    Option("blob_prefix", "--blob-prefix", "AZURE_BLOB_PREFIX", text, "amplitude/events",
           "blob name prefix, with --upload", AZURE, "PREFIX", demo_default="demo/amplitude/events"),
    Option("connection_string", None, "AZURE_STORAGE_CONNECTION_STRING", text, None,
           "storage connection string (first choice of credentials)", AZURE, secret=True),
    Option("account_url", None, "AZURE_STORAGE_ACCOUNT_URL", text, None,
           "https://<account>.blob.core.windows.net, with a SAS token or alone (DefaultAzureCredential)", AZURE),
    Option("sas_token", None, "AZURE_STORAGE_SAS_TOKEN", text, None, "a SAS token for the account URL", AZURE,
           secret=True),
    Option("lake", "--lake", "AMP_LAKE", text, None,
           "also write each window into the Delta table at URI: a folder, az://<container>/<path> or "
           "abfss://<container>@<account>.dfs.core.windows.net/<path> (Azure credentials as for --upload)", LAKE,
           "URI"),
    Option("lake_maintain", "--lake-maintain", None, switch, False,
           "export nothing: compact the --lake table's small files and remove files older than the retention",
           LAKE, switch=True),
    Option("lake_retention_days", "--lake-retention-days", "AMP_LAKE_RETENTION_DAYS", whole(0, 3650), 7,
           "with --lake-maintain: days a replaced file is kept for readers and time travel", LAKE, "DAYS"),
    Option("report", "--report", None, switch, False,
           "export nothing: write an HTML report of the range (default: the manifest's whole range) and print a "
           "table per day; exit 1 if an hour is missing", REPORT, switch=True),
    Option("report_file", "--report-file", None, text, None,
           "where --report writes its page (default <data dir>/report.html)", REPORT, "PATH", path=True),
    Option("json", "--json", "AMP_JSON", switch, False,
           "print one JSON summary of the run as the last line of stdout (human output goes to stderr)", WATCH,
           switch=True),
    Option("ping_url", "--ping-url", "AMP_PING_URL", text, None,
           "a dead man's switch: URL/start when a run begins, URL on success, URL/fail on failure (https only)",
           WATCH, "URL", secret=True),
    Option("metrics_file", "--metrics-file", "AMP_METRICS_FILE", text, None,
           "write node_exporter textfile metrics of the run to PATH (*.prom), atomically", WATCH, "PATH", path=True),
    Option("demo", "--demo", None, switch, False,
           "export the last 7 days from a local stand-in of the API and write its report: no credentials, no network",
           RUN, switch=True),
)
BY_NAME = {option.name: option for option in OPTIONS}


@dataclasses.dataclass(frozen=True)
class Api:
    """What the Export API client needs: where, who, and how patiently."""

    base_url: str
    api_key: str = dataclasses.field(repr=False)
    secret_key: str = dataclasses.field(repr=False)
    max_attempts: int
    delay_seconds: float
    read_timeout: float
    attempt_timeout: float
    read_bytes: int = 1 << 20  # of a body read and written at a time; less when several downloads run at once


@dataclasses.dataclass(frozen=True)
class Settings:
    api: Api
    windows: tuple[Window, ...]
    seed_named_window: Window | None  # exported alone, this window's file takes the plain nightly name
    explicit_range: bool  # --date or --start/--end given
    data_dir: Path
    data_outfile: str
    file_format: str
    gzip: bool
    log_dir: Path
    log_level: int
    quiet: bool
    max_event_bytes: int
    window_hours: int
    workers: int
    refetch: bool
    verify: bool
    report: bool
    report_file: Path | None
    demo: bool
    started: dt.datetime
    json: bool = False
    ping_url: str | None = dataclasses.field(default=None, repr=False)
    metrics_file: Path | None = None
    upload: object = None  # azure_upload.Target with --upload
    lake: object = None  # lake.LakeTarget with --lake
    lake_maintain: bool = False
    lake_retention_days: int = 7
    field_rules: object = None  # field_rules.Pseudonymiser with --drop-fields or --hash-fields

    @property
    def policy(self) -> dict | None:
        """The field rules as the manifest records them; None when events are written as Amplitude sent them."""
        return self.field_rules.rules.policy if self.field_rules else None

    @property
    def extension(self) -> str:
        return f".{self.file_format}" + (".gz" if self.gzip else "")


class Environment(dict):
    """Variables from the environment and `.env` files, remembering which file each came from."""

    def __init__(self, values: Mapping, origins: Mapping[str, Path] | None = None, files: tuple[Path, ...] = ()):
        super().__init__(values)
        self.origins = dict(origins or {})
        self.files = files


def load_environment(cwd: Path, environ: Mapping) -> Environment:
    """The environment, then `.env` in the current folder, then the one beside fetch_data.py (cron and systemd may
    start elsewhere): the first place that sets a variable wins."""
    from dotenv import dotenv_values

    files = tuple(dict.fromkeys([cwd / ".env", PROJECT / ".env"]))
    values, origins = dict(environ), {}
    for place in files:
        try:
            found = dotenv_values(place) if place.is_file() else {}
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {place}: {getattr(exc, 'strerror', None) or exc}") from None
        for name, value in found.items():
            if name not in values and value is not None:
                values[name] = value
                origins[name] = place
    return Environment(values, origins, files)


def parse_settings(argv: list[str] | None, env: Mapping, now: dt.datetime, cwd: Path | None = None) -> Settings:
    """Every setting once, from a flag or its environment variable, validated before any I/O."""
    args = build_parser().parse_args(argv)
    refuse_empty_flags(args)
    if not FIRST_YEAR <= now.year <= LAST_YEAR - 1:
        raise UsageError(f"the system clock says {now.year:04d}-{now:%m-%d %H:%M} UTC; set it right before exporting")
    values = Values(args, env, cwd or Path.cwd())
    demo, report = values["demo"], values["report"]
    start, end = pick_range(args, now)
    catch_up_days = pick_catch_up(values, args)
    window_hours = values["window_hours"]
    windows = plan_range(start - dt.timedelta(days=catch_up_days), end, window_hours)
    refuse_flags_alone(args, values)
    if values["lake_maintain"] and not values["lake"]:
        raise UsageError("--lake-maintain needs --lake (or AMP_LAKE): the table to maintain")
    api_key, secret_key = ("demo", "demo") if demo or report else pick_credentials(values, env)
    api = Api(pick_base_url(values), api_key, secret_key, values["max_attempts"], values["delay_seconds"],
              values["read_timeout"], values["attempt_timeout"])
    return Settings(
        api=api,
        windows=windows,
        seed_named_window=Window(start, end) if catch_up_days or len(windows) == 1 else None,
        explicit_range=bool(args.date or args.start or args.end),
        data_dir=values["data_dir"],
        data_outfile=values["data_outfile"],
        file_format=values["file_format"],
        gzip=values["gzip"],
        log_dir=values["log_dir"],
        log_level=values["log_level"],
        quiet=values["quiet"],
        max_event_bytes=values["max_event_bytes"],
        window_hours=window_hours,
        workers=values["workers"],
        refetch=values["refetch"],
        verify=values["verify"],
        report=report,
        report_file=values["report_file"],
        demo=demo,
        started=now,
        json=values["json"],
        ping_url=pick_checked(values, "ping_url", "check_ping_url"),
        metrics_file=pick_checked(values, "metrics_file", "check_metrics_file"),
        upload=pick_upload(values) if values["upload"] else None,
        lake=pick_lake(values),
        lake_maintain=values["lake_maintain"],
        lake_retention_days=values["lake_retention_days"],
        field_rules=pick_field_rules(values),
    )


def refuse_empty_flags(args: argparse.Namespace) -> None:
    """`--date "$DAY"` with DAY unset must not quietly export yesterday, nor `--data-dir "$DIR"` write here."""
    for option in OPTIONS:
        value = getattr(args, option.name, None) if option.flag and not option.switch else None
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"{option.flag}: the value is empty (leave the flag out for its default)")


# Flags that only change what another mode does. Given without it, the flag would quietly do nothing; its variable
# may stay set in .env for every run.
GOES_WITH = {"report_file": "report", "lake_retention_days": "lake_maintain", "container": "upload",
             "blob_prefix": "upload"}


def refuse_flags_alone(args: argparse.Namespace, values: Values) -> None:
    for name, mode in GOES_WITH.items():
        if getattr(args, name) is not None and not values[mode]:
            raise UsageError(f"{BY_NAME[name].flag} goes with {BY_NAME[mode].flag}")


def build_parser() -> argparse.ArgumentParser:
    parser = QuietParser(
        prog="fetch_data.py",
        description="Export raw Amplitude events (EU residency server by default) to local files.",
        epilog="Credentials: AMP_API_KEY and AMP_SECRET_KEY, from the environment or a .env file (the current "
        "folder's, then the one beside fetch_data.py; see .env.example), never from flags. Manual: docs/.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if option.flag is None:
            continue
        group = groups.setdefault(option.group, parser.add_argument_group(option.group))
        if option.switch:
            group.add_argument(option.flag, dest=option.name, action="store_true", help=help_of(option))
        else:
            group.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=help_of(option))
    return parser


def help_of(option: Option) -> str:
    extra = []
    if option.variable:
        extra.append(f"env {option.variable}")
    if not option.switch and option.default is not None:
        extra.append(f"default {option.default}")
    return option.help + (f" ({', '.join(extra)})" if extra else "")


class QuietParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (via UsageError) instead of usage text."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class Values:
    """Each option's value: its flag, else its variable, else its default; read and checked on first use."""

    def __init__(self, args: argparse.Namespace, env: Mapping, cwd: Path):
        self.args = args
        self.env = env
        self.cwd = cwd
        self.demo = bool(args.demo)

    def __getitem__(self, name: str):
        option = BY_NAME[name]
        raw, source, base = self.raw(option)
        if raw is None:
            return None
        if isinstance(raw, str) and not option.switch:
            raw = raw.strip()
        value = option.read(raw, source)
        return resolve_path(value, base) if option.path else value

    def raw(self, option: Option) -> tuple[object, str, Path]:
        """(text or default, where it came from, the folder a relative path in it is relative to)."""
        flag_value = getattr(self.args, option.name, None) if option.flag else None
        if flag_value not in (None, False):
            return flag_value, option.flag, self.cwd
        demo_default = self.demo and option.demo_default is not UNSET
        if option.variable and not demo_default and str(self.env.get(option.variable, "")).strip():
            origin = getattr(self.env, "origins", {}).get(option.variable)
            return self.env[option.variable], option.variable, origin.parent if origin else self.cwd
        return (option.demo_default if demo_default else option.default), option.flag or option.variable, PROJECT

    def given(self, name: str) -> bool:
        return getattr(self.args, name, None) not in (None, False)


def resolve_path(value: str, base: Path) -> Path:
    return Path(base, os.path.expanduser(value)).absolute() if value else Path(base)


def pick_range(args: argparse.Namespace, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The first and last hour to export: --date, --start/--end, or yesterday."""
    last_finished = last_finished_hour(now)
    if args.date and (args.start or args.end):
        raise UsageError("--date cannot be combined with --start/--end")
    if args.date:
        start = parse_hour(args.date, "--date", last_hour=False)
        end = start + dt.timedelta(hours=23)
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


def pick_catch_up(values: Values, args: argparse.Namespace) -> int:
    """Days before yesterday whose missing hours the nightly run exports too; only with the nightly default.

    The demo shows a week, so that its report has days to compare.
    """
    ranged = args.date or args.start or args.end
    if ranged and values.given("catch_up"):
        raise UsageError("--catch-up goes with the nightly default (yesterday), not with --date or --start/--end")
    return 0 if ranged else values["catch_up"]


def plan_range(start: dt.datetime, end: dt.datetime, window_hours: int) -> tuple[Window, ...]:
    hours = int((end - start).total_seconds() // 3600) + 1
    if math.ceil(hours / window_hours) > MAX_WINDOWS:
        raise UsageError(
            f"{hours} hours in windows of {window_hours} would be more than {MAX_WINDOWS} windows: "
            "raise --window-hours or export the range in parts"
        )
    return tuple(plan_windows(start, end, window_hours))


def pick_credentials(values: Values, env: Mapping) -> tuple[str, str]:
    names = {"api_key": "AMP_API_KEY", "secret_key": "AMP_SECRET_KEY"}
    keys = {name: (values[name] or "").strip() for name in names}
    missing = [variable for name, variable in names.items() if not keys[name]]
    if missing:
        pronoun = "it" if len(missing) == 1 else "them"
        files = getattr(env, "files", ())
        looked = f" (looked in {' and '.join(map(str, files))})" if files else ""
        raise UsageError(
            f"{' and '.join(missing)} not set: put {pronoun} in .env{looked} or the environment; see .env.example"
        )
    for name, variable in names.items():
        # Amplitude's keys are hex. Quotes, spaces or a colon (which would cut the key short in HTTP Basic) are a
        # copy-paste accident, whose 401 would come only after a request.
        if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", keys[name]):
            raise UsageError(f"{variable} holds characters an Amplitude key never has (check for stray quotes or spaces)")
    return keys["api_key"], keys["secret_key"]


def pick_base_url(values: Values) -> str:
    if values.demo:
        return "http://127.0.0.1"  # replaced by the stand-in's address once it listens
    region = values["region"]
    option = BY_NAME["base_url"]
    raw, source, _ = values.raw(option)
    base_url = str(raw).strip() if raw else (EU_BASE_URL if region == "eu" else US_BASE_URL)
    source = source if raw else "--region"
    found = re.fullmatch(r"(https?)://([^\s/@?#]+)(/[^\s?#]*)?", base_url)
    if not found or not has_host_and_port(base_url):
        raise UsageError(f"{source}: expected an http(s) URL without credentials, query or fragment, "
                         f"got {shown_url(base_url)!r}")
    scheme, host = found.group(1), found.group(2)
    if scheme == "http" and not is_loopback(host):
        raise UsageError(f"{source}: the keys would travel unencrypted to {host}; use https:// (http:// is for 127.0.0.1 only)")
    # People paste the whole endpoint; the path is added per request, so take what comes before it.
    return base_url.rstrip("/").removesuffix(EXPORT_PATH).rstrip("/")


def pick_checked(values: Values, name: str, checker: str):
    """A monitoring setting, checked by the monitor module before any request; None when not asked for."""
    value = values[name]
    if value is None:
        return None
    import monitor

    try:
        return getattr(monitor, checker)(value, BY_NAME[name].flag if values.given(name) else BY_NAME[name].variable)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def pick_upload(values: Values):
    """The Azure target for --upload; the packages and the credentials' presence are checked before any export."""
    import azure_upload

    try:
        azure_upload.ensure_installed()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    try:
        target = azure_upload.target_from(azure_credentials(values), values["container"], values["blob_prefix"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        azure_upload.container_client(target)  # the SDK's own checks of the settings; no request is made
    except ValueError:
        raise UsageError(f"the {target.method} for Azure is incomplete or malformed") from None
    return target


def azure_credentials(values: Values) -> dict:
    """The AZURE_STORAGE_* credentials by variable name, as --upload and --lake read them."""
    return {BY_NAME[name].variable: values[name] for name in ("connection_string", "account_url", "sas_token")}


def pick_lake(values: Values):
    """The Delta table of --lake, its packages and credentials checked before any export; None without it."""
    raw, source, base = values.raw(BY_NAME["lake"])
    if not raw or not str(raw).strip():  # an empty --lake was refused with the other empty flags
        return None
    import lake

    try:
        lake.ensure_installed()
        return lake.target_from(str(raw), azure_credentials(values), base,
                                {"data folder": values["data_dir"], "log folder": values["log_dir"]})
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


def pick_field_rules(values: Values):
    """--drop-fields / --hash-fields as a Pseudonymiser, checked before any request; None without them."""
    dropped, dropped_source, _ = values.raw(BY_NAME["drop_fields"])
    hashed, hashed_source, _ = values.raw(BY_NAME["hash_fields"])
    if dropped is None and hashed is None:
        return None
    import field_rules

    try:
        rules = field_rules.rules_from(dropped, hashed, values["hash_key"] or "", (dropped_source, hashed_source))
    except field_rules.RuleError as exc:
        raise UsageError(str(exc)) from None
    return field_rules.Pseudonymiser(rules) if rules else None
