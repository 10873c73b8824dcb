"""Export raw Amplitude Analytics events from the Export API (EU residency server by default).

`.venv/bin/python fetch_data.py` exports yesterday (UTC, T00 to T23) to data/YYYYMMDD_HHMM_ampl_dump.json beside
this file. Ranges, resume, splitting of too-large windows, parallel windows, formats, upload and the report: see
docs/. This file is the entry point and the pipeline, top-down; each stage lives in a module of its own:

    settings      flags, variables and .env, declared once and checked before any I/O
    windows       UTC hours and windows
    export_api    one request, what an answer means, the retry loop (spans: several at once)
    archive       the zip's members in hour order, each line checked
    field_rules   personal data dropped or pseudonymised
    writer        the output file and its counts
    store         manifest, journal, lock, atomic files (temp_files: a run's temporary files)
    azure_upload  --upload
    lake          --lake (its schema in lake_schema, its rows in lake_batches; lake_convert runs lake_worker
                  processes to convert)
    report        --report
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT_MODULES = ("errors", "windows", "settings", "export_api", "archive", "writer", "store", "logging_config", "progress",
                   "report", "summary", "monitor", "urls", "field_rules", "azure_upload", "lake", "lake_schema", "lake_convert",
                   "lake_worker", "lake_batches", "spans", "processes", "member_workers", "temp_files", "own_files",
                   "amplitude_standin")


def explain_missing_import(missing: ImportError) -> str:
    """A missing file of the project, or a missing package with the command that installs it, in one line."""
    name = (missing.name or "").split(".")[0]
    if name in PROJECT_MODULES or (HERE / f"{name}.py").exists():
        return (f"Error: {name}.py, a file of this project, is missing or broken beside {HERE / 'fetch_data.py'}: "
                f"restore it (git checkout -- {name}.py) or clone the project again")
    venv_python = HERE / ".venv" / "bin" / "python"
    install = shlex.join([sys.executable, "-m", "pip", "install", "-r", str(HERE / "requirements.txt")])
    use_venv = venv_python.exists() and Path(sys.executable) != venv_python
    fix = f"run {shlex.join([str(venv_python), str(HERE / 'fetch_data.py')])}, or install them: {install}" \
        if use_venv else install
    package = {"simdjson": "pysimdjson", "dotenv": "python-dotenv", "isal": "isal"}.get(name, name)
    return f"Error: the Python package {package} is missing for {sys.executable}; {fix}"


# Checked before the third-party imports, which would otherwise end the first run in a traceback.
if sys.version_info < (3, 11):  # noqa: UP036 - the check is for interpreters older than the target
    sys.stderr.write(
        f"Error: fetch_data.py needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}. "
        f"Make the virtual environment with a newer one: python3.11 -m venv {shlex.quote(str(HERE / '.venv'))}\n"
    )
    raise SystemExit(2)
try:
    import report
    import store
    import temp_files
    from archive import BadEvent, CorruptArchive, allow_checked_nesting, member_hour
    from errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ExportError, UsageError
    from export_api import Retryable, TooLarge, fetch, halves_of_too_large, open_session
    from lake import open_lake
    from logging_config import ensure_standard_streams, print_for_reader, printable, setup_logging
    from member_workers import ArchiveReader, MemberWorkers
    from monitor import Watch
    from own_files import NotOwnFile
    from progress import progress_bar
    from settings import Settings, load_environment, parse_settings
    from spans import STOP_SIGNALS, Spans, leave_signals_to_main_thread
    from store import MANIFEST_NAME, Export, Finished
    from summary import Outcome, summary
    from windows import Window, format_hour, fresh_windows, hours_between, now_utc, plan_missing
    from writer import EventWriter
except ImportError as missing:
    sys.stderr.write(explain_missing_import(missing) + "\n")
    raise SystemExit(2) from None

log = logging.getLogger("fetch_data")


def main(argv: list[str] | None = None) -> int:
    """Every mode runs inside this one boundary: a usage problem exits 2, a failed run 1, each with one line."""
    ensure_standard_streams()
    allow_checked_nesting()
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets its escape instead
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    started, began = now_utc(), time.monotonic()
    try:
        env = load_environment(Path.cwd(), os.environ)
        settings = parse_settings(argv, env, started)
        log_file = start_logging(settings, started)
    except UsageError as exc:
        print(f"Error: {printable(str(exc))}", file=sys.stderr)
        if asks_for_json(argv, os.environ):
            print_for_reader(json.dumps(summary(Outcome("usage", EXIT_USAGE, error=str(exc)), None,
                                                time.monotonic() - began)))
        return EXIT_USAGE
    share_with_sdks(env)
    watch = Watch(settings)  # the dead man's switch and the metrics file, when asked for
    watch.started()
    outcome = run_mode(settings)
    document = summary(outcome, str(log_file), time.monotonic() - began)
    watch.finished(document)
    if outcome.exit_code != EXIT_OK or not settings.quiet:
        print(f"Log file: {log_file}", file=sys.stderr)
    logging.shutdown()
    if settings.json:  # the last line of stdout, where Airflow and other schedulers look
        print_for_reader(json.dumps(document, ensure_ascii=True))
    return outcome.exit_code


def start_logging(settings: Settings, started) -> Path:
    try:
        return setup_logging(settings.log_dir, settings.log_level, started, settings.quiet)
    except OSError as exc:
        raise UsageError(f"cannot write logs to {settings.log_dir}: {exc.strerror or exc}") from None


def asks_for_json(argv: list[str] | None, environ) -> bool:
    """--json for a run whose settings could not be read: a scheduler still gets its one line."""
    words = sys.argv[1:] if argv is None else argv
    return "--json" in words or environ.get("AMP_JSON", "").strip().lower() in ("1", "true", "yes", "on")


def run_mode(settings: Settings) -> Outcome:
    outcome = Outcome("report" if settings.report else "demo" if settings.demo else "export")
    try:
        if settings.report:
            outcome.exit_code = report.run(settings, outcome)
            return outcome
        if settings.lake_maintain:
            lake = open_lake(settings.lake, settings.data_dir, settings.policy, create=False)
            outcome.mode, outcome.lake_version = "lake-maintain", lake.maintain(settings.lake_retention_days)
            return outcome
        with serve_demo_if_asked(settings) as settings:
            outcome.exit_code = run_export(settings, outcome)
        if settings.demo:
            report.run(dataclasses.replace(settings, explicit_range=True), Outcome("report"))
            log.info("Demo: open %s in a browser", settings.data_dir / "report.html")
        return outcome
    except (UsageError, NotOwnFile) as exc:  # a link among its own files is met at the start, before requests
        return failed(outcome, EXIT_USAGE, str(exc))
    except ExportError as exc:
        return failed(outcome, EXIT_FAILED, str(exc))
    except OSError as exc:  # the data folder itself: unwritable, full, gone
        return failed(outcome, EXIT_FAILED, f"cannot use {exc.filename or settings.data_dir}: {exc.strerror or exc}")
    except KeyboardInterrupt:  # before the data folder is locked; afterwards stop_cleanly_on_signals answers
        return failed(outcome, EXIT_FAILED, "Interrupted before any export started")
    except Exception as exc:  # a bug, not the user's doing: one line, the traceback in the log file only
        log.debug("Traceback of the failure below", exc_info=True)
        return failed(outcome, EXIT_FAILED, f"Failed unexpectedly: {type(exc).__name__}: {exc}")


def failed(outcome: Outcome, exit_code: int, reason: str) -> Outcome:
    log.error("%s", reason)
    outcome.exit_code, outcome.error = exit_code, reason
    return outcome


def share_with_sdks(env) -> None:
    """Variables read from .env go into the process environment too, as python-dotenv does: the Azure SDK's
    credential chain reads AZURE_CLIENT_ID and its kin from there."""
    for name in env.origins:
        os.environ.setdefault(name, env[name])


def serve_demo_if_asked(settings: Settings):
    """For --demo, a stand-in of the Export API on 127.0.0.1 for the length of the run."""
    if not settings.demo:
        return contextlib.nullcontext(settings)
    from amplitude_standin import demo_server

    @contextlib.contextmanager
    def demo():
        with demo_server(settings.api.api_key, settings.api.secret_key, settings.started) as base_url:
            log.info("Demo: exporting from the local stand-in at %s", base_url)
            yield dataclasses.replace(settings, api=dataclasses.replace(settings.api, base_url=base_url))

    return demo()


# The export.


def run_export(settings: Settings, outcome: Outcome) -> int:
    """Export every planned window that is not already exported, telling `outcome`; exit code 1 if any failed."""
    began = time.monotonic()
    data_dir = store.ensure_folder(settings.data_dir)
    log.info("Data folder: %s", data_dir)
    with store.hold_lock(data_dir), contextlib.ExitStack() as stack:
        temp_files.remove_temp_files(data_dir)
        stop_cleanly_on_signals(data_dir)
        store.finish_interrupted_save(data_dir)
        uploads = start_uploads(settings)
        lake = open_lake(settings.lake, data_dir, settings.policy)
        if lake:
            stack.callback(lake.close)
        changed = uploads.changed if uploads else set()
        first, last = settings.windows[0].start, settings.windows[-1].end
        in_range = [record for record in store.exports_between(data_dir / MANIFEST_NAME, first, last)
                    if record.file not in changed]
        todo = plan_todo(settings, in_range)
        if lake:
            if todo:
                lake.start_workers()  # their start-up overlaps the export
            lake.fill(in_range, {hour for window in todo for hour in hours_between(window.start, window.end)})
        warn_if_fresh(todo, settings.started)
        outcome.start, outcome.end, outcome.windows_planned = format_hour(first), format_hour(last), len(todo)
        outcome.hours_already = sum(w.hours for w in settings.windows) - sum(w.hours for w in todo)
        several = todo != [settings.seed_named_window]

        def save(finished: Finished) -> Export:
            names = store.output_names(settings.started, settings.data_outfile, settings.extension, finished.window, several)
            record = store.save_window(finished, data_dir, names, settings.policy, now_utc())
            log.info("Exported %s: %d events, %d bytes to %s in %.1fs", finished.window, finished.events,
                     finished.size, data_dir / record.file, finished.seconds)
            if uploads:
                uploads.send(record)
            if lake:
                lake.send(record)
            return record

        def follow(window: Window, separator: bytes):  # a window exported alone goes to the lake as it is written
            names = store.output_names(settings.started, settings.data_outfile, settings.extension, window, several)
            return lake.follow(window, next(name for name in names if not (data_dir / name).exists()), separator)

        saved, failures = export_windows(todo, settings, save, follow if lake and len(todo) == 1 else None)
    if settings.field_rules:
        settings.field_rules.warn_of_unmatched()
    log_summary(settings, saved, failures, time.monotonic() - began)
    tell(outcome, data_dir, saved, failures, sum(w.hours for w in todo), uploads)
    outcome.lake_version = lake.version if lake else None
    if uploads and uploads.failure:
        log.error("Upload failed: %s; the files stay here and the next --upload run sends them", uploads.failure)
        outcome.fail(None, f"upload failed: {uploads.failure}")
    if lake and lake.failure:
        log.error("Lake: %s; the files stay here and the next --lake run loads them", lake.failure)
        outcome.fail(None, f"lake failed: {lake.failure}")
    return EXIT_FAILED if failures or outcome.failures else EXIT_OK


def tell(outcome: Outcome, data_dir: Path, saved: list[Export], failures, hours_todo: int, uploads) -> None:
    outcome.windows_exported, outcome.events = len(saved), sum(record.events for record in saved)
    outcome.hours_exported = sum(record.window.hours for record in saved)
    outcome.hours_missing = hours_todo - outcome.hours_exported
    outcome.files = [str(data_dir / record.file) for record in saved]
    outcome.bytes = sum(record.size for record in saved)
    outcome.uploaded = uploads.sent if uploads else 0
    for window, reason in failures:
        outcome.fail(window, reason)


def plan_todo(settings: Settings, records: list) -> list[Window]:
    """The planned windows minus the hours already exported under the same field rules."""
    first, last = settings.windows[0].start, settings.windows[-1].end
    covered = set() if settings.refetch else store.exported_hours(
        records, settings.data_dir, settings.policy, settings.verify, first, last)
    todo = plan_missing(settings.windows, covered)
    skipped = sum(w.hours for w in settings.windows) - sum(w.hours for w in todo)
    if skipped:
        log.info("Skipping %d hour(s) already exported (manifest %s; --refetch exports them again)",
                 skipped, settings.data_dir / MANIFEST_NAME)
    return todo


def warn_if_fresh(windows: list[Window], now) -> None:
    for window in fresh_windows(windows, now):
        log.warning(
            "%s ends less than 2 hours ago: Amplitude makes events exportable about 2 hours after upload, "
            "so its last hours may be incomplete (export it again later with --refetch)", window,
        )


def start_uploads(settings: Settings):
    if not settings.upload:
        return None
    from azure_upload import Uploads

    uploads = Uploads(settings.upload, settings.data_dir)
    uploads.send_pending()
    return uploads


def export_windows(windows: list[Window], settings: Settings, save, follow=None) -> tuple[list[Export], list]:
    """Download windows on `workers` threads; put each in place in window order so runs are reproducible."""
    saved, failures = [], []
    pending: deque = deque()
    queue = iter(windows)
    spans = Spans(settings.workers, len(windows), settings) if settings.workers > 1 else None
    members = MemberWorkers.for_run(settings.field_rules) if windows else None
    with progress_bar(len(windows), shown=not settings.quiet) as progress, ThreadPoolExecutor(
        settings.workers, thread_name_prefix="window", initializer=leave_signals_to_main_thread
    ) as pool:
        try:
            for window in itertools.islice(queue, 2 * settings.workers):
                pending.append((window, pool.submit(export_window, window, settings, spans, members, follow)))
            while pending:
                window, future = pending[0]
                try:
                    record = save(future.result())
                    saved.append(record)
                    progress.advance(record.size)
                except Exception as exc:  # an unforeseen failure ends its window, not the run
                    reason = str(exc) if isinstance(exc, ExportError) else f"unexpected {type(exc).__name__}: {exc}"
                    log.error("Window %s failed: %s (the next run exports it again)", window, reason)
                    failures.append((window, reason))
                    progress.advance(0)
                pending.popleft()
                following = next(queue, None)
                if following:
                    pending.append((following, pool.submit(export_window, following, settings, spans, members,
                                                           follow)))
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            if spans:
                spans.close()
            if members:
                members.close()
            for _, future in pending:
                discard_unsaved(future)
    return saved, failures


def export_window(window: Window, settings: Settings, spans: Spans | None = None,
                  members: MemberWorkers | None = None, follow=None) -> Finished:
    """One window into one temporary file, splitting requests Amplitude finds too large; `spans` fetch it in parts,
    `members` read its archives under field rules, `follow` gives its writer a follower (the lake's)."""
    began = time.monotonic()
    writer = None
    try:
        writer = EventWriter(temp_files.temp_path_for(settings.data_dir, window, settings.extension), settings.file_format,
                             settings.gzip)
        writer.follower = follow(window, writer.separator) if follow else None
        reader = ArchiveReader(settings.field_rules, settings.max_event_bytes, members)
        if spans:
            spans.export(window, lambda zip_path, span: write_to_local(zip_path, writer, settings, reader, span),
                         lambda span, session: export_span(span, writer, session, settings, reader))
        else:
            with open_session(settings.api) as session:
                export_span(window, writer, session, settings, reader)
        writer.finish()
    except BaseException as exc:
        if writer:
            writer.discard()
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write to {settings.data_dir}: {exc.strerror or exc}") from None
        raise
    return Finished(window, writer.path, writer.events, writer.size, writer.sha256(), time.monotonic() - began,
                    writer.tally.by_hour(window), dict(writer.tally.types), writer.tally.runs_out_of_order())


def export_span(span: Window, writer: EventWriter, session, settings: Settings, reader: ArchiveReader) -> None:
    """A span's events into `writer`; a span Amplitude finds too large is split in halves, each fetched in turn."""
    try:
        fetch(span, session, settings.api, lambda zip_path: write_to_local(zip_path, writer, settings, reader, span),
              settings.data_dir)
    except TooLarge as exc:
        for half in halves_of_too_large(span, exc):
            export_span(half, writer, session, settings, reader)


def write_to_local(zip_path: Path, writer: EventWriter, settings: Settings, reader: ArchiveReader,
                   span: Window) -> None:
    """The archive's events into `writer`; a damaged archive is undone and retried, a bad event fails the window."""
    mark = writer.mark()
    try:
        for member, block, types in reader.batches(zip_path, span, writer.separator):
            writer.write_batch(block, member_hour(member), types)
    except BadEvent as exc:  # the archive passed its CRC check: downloading it again would not help
        # Under field rules the line's content could be the very data the rules keep out of files and logs.
        raise ExportError(exc.without_content() if settings.field_rules else exc.with_content()) from None
    except CorruptArchive as exc:
        writer.rollback(mark)
        raise Retryable(f"the archive is damaged ({exc})", settings.api.delay_seconds) from None


def discard_unsaved(future) -> None:
    if future.cancelled() or not future.done() or future.exception() is not None:
        return
    future.result().temp_path.unlink(missing_ok=True)


def log_summary(settings: Settings, saved: list[Export], failures, seconds: float) -> None:
    events = sum(r.events for r in saved)
    size = sum(r.size for r in saved)
    first, last = settings.windows[0].start, settings.windows[-1].end
    files = saved[0].file if len(saved) == 1 else f"{len(saved)} files"
    log.info(
        "Summary: %s, %d window(s) exported, %d event(s), %d byte(s), %s, %d failed, %.1fs",
        Window(first, last), len(saved), events, size, files, len(failures), seconds,
    )


# Signals.


def stop_cleanly_on_signals(data_dir: Path) -> None:
    """SIGTERM (cron, systemd), Ctrl-C or a closed terminal (SIGHUP): leave no temporary file and exit 1 at once.
    Waiting for the download threads could take minutes; what they have not put in place is simply discarded, and
    the next run exports it. A journaled rename is completed by the next run either way. A signal left ignored
    (nohup, a script's background job) stays ignored; SIGTERM never is."""

    def stop(signum, frame):
        temp_files.stop_creating_temp_files()  # first: a download thread could otherwise leave one behind the removal
        temp_files.remove_temp_files(data_dir, quiet=True)
        log.error("Stopped by %s; files not yet in place were discarded, the next run exports what is missing",
                  signal.Signals(signum).name)
        logging.shutdown()
        os._exit(EXIT_FAILED)

    for signum in STOP_SIGNALS:
        if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)


if __name__ == "__main__":
    sys.exit(main())
