"""The lake stage (`--lake URI`): each window's events in a typed Delta table, each hour replaced exactly once.

A window's events are written to the table in one commit that replaces exactly the window's hours (a predicate
overwrite on `export_hour`, the hour of the archive member each event came in): a window exported again never
duplicates a row, and readers see its old rows or its new ones, never half. The commit is made once the window's
file is in place, and the manifest then records the table's id and the commit's version (a LakeLoad line), which is
how a later run knows what the table holds. A window exported alone is converted while it is written (follow);
other windows, and one whose conversion was given up, are read back from their file. Hours whose files are here but
not in the table (a new table, one deleted or replaced, a run killed between the file and the commit) are loaded
from those files, without a request to Amplitude.

Optional: delta-rs and pyarrow come from requirements-lake.txt and are imported only when --lake is used. The
schema is in lake_schema.py. Messages never carry a key or a SAS token: delta-rs's errors are scrubbed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from errors import ExportError, UsageError
from lake_batches import FileChanged, Followed, followed_batches, hours_predicate, latest_hours, record_batches
from lake_convert import Feed, Workers
from processes import worker_count
from store import DECODE_LAKE, MANIFEST_NAME, Export, LakeLoad, append_manifest, file_key, file_state, marked_lines
from urls import has_host_and_port, shown_url
from windows import Window, hours_between, iso_utc, now_utc

log = logging.getLogger("fetch_data")

PROJECT = Path(__file__).resolve().parent
REQUIREMENTS_FILE = "requirements-lake.txt"
# Parquet row groups are held in memory until written: delta-rs's default (a million rows) costs a big day's load
# hundreds of megabytes more; this many rows keeps it under 400 MB and still suits readers.
ROW_GROUP_ROWS = 65_536
# Spark's own default, which every reader of the table reads: about half the size of uncompressed Parquet, written
# in the same time.
COMPRESSION = "SNAPPY"
COMMIT_ATTEMPTS = 5
METADATA = "amplitude_export"  # the prefix of this program's keys in a commit's metadata
AZURE_URI = re.compile(r"^(?:az|abfss?)://", re.IGNORECASE)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # delta-rs colours the arrows of its error chains
# Where delta-rs appends the Rust backtrace of an error ("   0: <unknown>", "   1: ..."): not for the user's eyes.
RUST_BACKTRACE = re.compile(r"\n\s*0: ")


class LakeError(ExportError):
    """The table cannot be opened or written; the message names the table, never a credential."""


@dataclasses.dataclass(frozen=True)
class LakeTarget:
    """Where the table is and how to reach it: `uri` for delta-rs, `label` for messages and the manifest."""

    uri: str
    label: str
    storage_options: dict = dataclasses.field(default_factory=dict, repr=False)
    container: object = None  # an azure_upload.Target, to create the container with the Blob SDK

    def secrets(self) -> list[str]:
        return [value for key, value in self.storage_options.items() if key in ("account_key", "sas_key") and value]


def ensure_installed() -> None:
    """Raise ImportError with the file to install when the lake's packages are missing."""
    try:
        import deltalake  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        install = shlex.join([sys.executable, "-m", "pip", "install", "-r", str(PROJECT / REQUIREMENTS_FILE)])
        raise ImportError(f"--lake needs the Delta Lake packages: {install}") from None


def target_from(text: str, credentials, base: Path, own_folders: dict[str, Path] | None = None) -> LakeTarget:
    """The table from --lake: a local folder (relative to `base`, apart from `own_folders`), or az:// or abfss://
    with the Azure credentials of --upload (a mapping by variable name); ValueError with a one-line reason when
    they do not add up."""
    text = text.strip()
    if not AZURE_URI.match(text):
        if "://" in text:
            raise ValueError(f"{shown_url(text)!r}: expected a folder, az://<container>/<path> or "
                             "abfss://<container>@<account>.dfs.core.windows.net/<path>")
        folder = (base / Path(text).expanduser()).resolve()
        check_table_folder(folder, own_folders or {})
        return LakeTarget(str(folder), str(folder))
    container, account, path = parse_azure_uri(text)
    import azure_upload

    azure_upload.ensure_installed("--lake on Azure")  # the Blob SDK creates the container
    target = azure_upload.target_from(credentials, container, "", needed_by="an Azure URI")
    options = storage_options(target, account)
    return LakeTarget(f"az://{container}/{path}", text, options, target)


def check_table_folder(folder: Path, own_folders: dict[str, Path]) -> None:
    """A table's folder is its own: a VACUUM (here or in Databricks, Spark, Fabric) removes the files in it that
    the table does not know, so it must not hold the data or log folder, nor files of anything else."""
    for name, own in own_folders.items():
        resolved = own.resolve()
        if resolved.is_relative_to(folder):
            where = f"is the {name}" if resolved == folder else f"holds the {name}, {own}"
            raise ValueError(f"{folder} {where}: give the table a folder of its own (a VACUUM removes files the "
                             "table does not know)")
    try:
        nearest = next(path for path in (folder, *folder.parents) if path.exists())  # the root exists
        if not nearest.is_dir():
            raise ValueError(f"{nearest} is a file, not a folder")
        other_files = folder.is_dir() and not (folder / "_delta_log").is_dir() and any(folder.iterdir())
    except OSError as exc:
        raise ValueError(f"{folder}: {exc.strerror or exc}") from None
    if other_files:
        raise ValueError(f"{folder} holds files and no Delta table: give the table a folder of its own, new or "
                         "empty (a VACUUM removes files the table does not know)")


def parse_azure_uri(text: str) -> tuple[str, str | None, str]:
    """(container, account or None, path in the container) of az://container/path or
    abfss://container@account.dfs.core.windows.net/path."""
    parts = urlsplit(text) if has_host_and_port(text) else None
    if parts is None or ":" in parts.netloc.rpartition("@")[2]:
        raise ValueError(f"{shown_url(text)!r}: an Azure URI names its container (and account) by name, without a port")
    if parts.query or parts.fragment or parts.password:
        raise ValueError("an Azure URI takes no query, fragment or credentials (they go in the variables)")
    container, _, host = parts.netloc.rpartition("@") if "@" in parts.netloc else (parts.netloc, "", "")
    account = host.split(".")[0] if host else None
    path = parts.path.strip("/")
    if not path:
        raise ValueError(f"{text!r}: name a folder in the container, e.g. az://{container or 'lake'}/amplitude")
    from azure_upload import CONTAINER_NAME, check_prefix

    if not CONTAINER_NAME.match(container):
        raise ValueError(f"container name {container!r} is not valid in Azure: 3 to 63 lowercase letters, "
                         "digits and single hyphens")
    return container, account, check_prefix(path)


def storage_options(target, account: str | None) -> dict[str, str]:
    """delta-rs's options for the credentials --upload uses: a key, a SAS, or none (its own credential chain:
    managed identity, Azure CLI, AZURE_CLIENT_ID and its kin)."""
    from azure_upload import connection_fields

    fields = connection_fields(target.connection_string) if target.connection_string else {}
    name = fields.get("ACCOUNTNAME") or target.account
    if account and account != name:
        raise ValueError(f"the URI names account {account}, the Azure credentials are for account {name}")
    options = {"account_name": name}
    if fields.get("ACCOUNTKEY"):
        options["account_key"] = fields["ACCOUNTKEY"]
    sas = fields.get("SHAREDACCESSSIGNATURE") or target.sas_token
    if sas:
        options["sas_key"] = sas.lstrip("?")
    endpoint = urlsplit(target.account_url)
    if not (endpoint.hostname or "").endswith(".core.windows.net"):  # Azurite, or another endpoint
        options["azure_storage_endpoint"] = target.account_url
    if endpoint.scheme == "http":  # loopback only: refused elsewhere when the target was read
        options["allow_http"] = "true"
    return options


def open_lake(target: LakeTarget | None, data_dir: Path, policy: dict | None, create: bool = True) -> Lake | None:
    """The table of --lake, opened (or created) before anything is exported; None without --lake."""
    if target is None:
        return None
    lake = Lake(target, data_dir, policy)
    lake.open(create)
    return lake


class Lake:
    """One Delta table, written window by window; one commit at a time, from one thread."""

    def __init__(self, target: LakeTarget, data_dir: Path, policy: dict | None):
        self.target = target
        self.data_dir = data_dir
        self.policy = policy
        self.table = None
        self.table_id = ""
        self.failure: str | None = None  # the first failure stops the stage; the next run loads what is missing
        self.sleep = time.sleep  # between commits that met another writer's (the tests pass their own)
        self.workers = Workers(worker_count())  # processes converting a file's events side by side
        self.followed: Followed | None = None  # the window being converted while it is exported

    def start_workers(self) -> None:
        """Start the conversion workers now, so that they are ready when the first file is (see lake_convert)."""
        self.workers.start()

    def close(self) -> None:
        if self.followed:  # its window failed, or was never saved: nothing of it is committed
            self.followed.give_up()
            self.followed = None
        self.workers.close()

    def follow(self, window: Window, file: str, separator: bytes) -> Feed | None:
        """A feed for the writer of a window exported alone, whose events are then converted and written to the table
        while they are exported; the commit waits for send() of the file, which must be `file`. None when the lake
        stage has stopped or no worker can run (the file is then loaded once it is in place, as any other)."""
        if self.failure or self.followed:
            return None
        feed = self.workers.feed(separator)
        if feed is None:
            return None
        followed = Followed(window, file, feed)
        followed.thread = threading.Thread(target=self._write_followed, args=(followed,), name="lake", daemon=True)
        followed.thread.start()
        self.followed = followed
        return feed

    @property
    def version(self) -> int | None:
        return self.table.version() if self.table is not None else None

    def open(self, create: bool = True) -> None:
        """The table at the URI, created (and its container) when missing, or else a usage error."""
        from deltalake import DeltaTable

        from lake_schema import PARTITION_BY, SCHEMA

        with self._described("open"):
            if self.target.container is not None:
                from azure_upload import UploadError, ensure_container

                try:
                    ensure_container(self.target.container)
                except UploadError as exc:
                    raise LakeError(f"the lake at {self.target.label}: {exc}") from None
            if DeltaTable.is_deltatable(self.target.uri, storage_options=self.target.storage_options):
                self.table = DeltaTable(self.target.uri, storage_options=self.target.storage_options)
                self._check_schema()
            elif not create:
                raise UsageError(f"--lake: no Delta table at {self.target.label}")
            else:
                self.table = DeltaTable.create(
                    self.target.uri, SCHEMA, mode="ignore", partition_by=PARTITION_BY,
                    name="amplitude_events", description="Amplitude events exported by fetch_data.py",
                    storage_options=self.target.storage_options,
                )
                log.info("Lake: created the Delta table at %s", self.target.label)
            self.table_id = self.table.metadata().id

    def send(self, record: Export) -> None:
        """load() for the pipeline, or the commit of a followed window: a failure is kept, said once, and stops the
        stage for the rest of the run."""
        followed, self.followed = self.followed, None
        if followed and followed.window == record.window and not self.failure:
            followed.feed.finish(record)
            followed.thread.join()
            if followed.version is not None:
                self._record_load(record, followed.version, followed.began, len(followed.feed.processes), True)
                warn_of_misfits(record.file, followed.misfits)
                return
            log.debug("Lake: %s was not converted while exported (%s); loading it from the file", record.file,
                      followed.failure)
        elif followed:
            followed.give_up()
        if self.failure:
            return
        try:
            self.load(record)
        except (LakeError, FileChanged) as exc:  # the file's own errors come as a LakeError naming it
            self.failure = str(exc)

    def fill(self, records: list[Export], skip: set[dt.datetime]) -> None:
        """Load the hours whose latest intact file under this run's field rules is not in the table yet, from those
        files (no request to Amplitude); hours in `skip` are about to be exported again and are loaded then."""
        loaded_keys = self.loaded_keys()
        same_rules = [record for record in records if record.policy == self.policy]
        todo = [(record, hours) for record, hours in latest_hours(same_rules, skip)
                if file_key(record) not in loaded_keys]
        if todo:
            log.info("Lake: loading %d file(s) exported earlier into %s", len(todo), self.target.label)
        for record, hours in todo:
            state = file_state(record, self.data_dir, verify=False)
            if state != "intact":
                log.warning("Lake: %s is %s; its hours are not loaded (--verify exports them again)", record.file,
                            "missing" if state == "gone" else "not the file recorded")
                continue
            try:
                self.load(record, hours, check_sha256=True)
            except FileChanged as exc:
                log.warning("Lake: %s; its hours are not loaded (--verify exports them again)", exc)
            except LakeError as exc:
                self.failure = str(exc)
                return

    def load(self, record: Export, hours: set[dt.datetime] | None = None, check_sha256: bool = False) -> LakeLoad:
        """One file's events (only those of `hours`, when given) in one commit that replaces exactly those hours;
        recorded in the manifest."""
        window = record.window
        hours = set(hours_between(window.start, window.end)) if hours is None else hours
        metadata = commit_metadata(record.file, window, record.policy)
        began = time.monotonic()
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                with self._described(f"write {record.file} to"):
                    processes = self._write(record, hours, metadata, check_sha256)
                break
            except LakeConflict:
                if attempt == COMMIT_ATTEMPTS:
                    raise LakeError(f"the lake at {self.target.label}: {COMMIT_ATTEMPTS} commits in a row met "
                                    "another writer's; the next run loads the file") from None
                self.sleep(attempt)
        return self._record_load(record, self.table.version(), began, processes, False, len(hours))

    def _record_load(self, record: Export, version: int, began: float, processes: int, followed: bool,
                     hours: int | None = None) -> LakeLoad:
        """The manifest's line for a commit of the file's events, and the log's."""
        line = LakeLoad(start=record.start, end=record.end, file=record.file, sha256=record.sha256,
                        lake=self.target.label, table_id=self.table_id, version=version, loaded_at=iso_utc(now_utc()))
        append_manifest(self.data_dir / MANIFEST_NAME, line)
        log.info("Lake: %s loaded as version %d of %s (%d hour(s), %.1fs, converted by %d process(es)%s)", record.file,
                 line.version, self.target.label, record.window.hours if hours is None else hours,
                 time.monotonic() - began, processes, " while exporting" if followed else "")
        return line

    def loaded_keys(self) -> set[bytes]:
        """The (file, sha256) of every LakeLoad line for this table at a version it has reached: what it holds."""
        version = self.table.version()
        return {file_key(line) for line in marked_lines(self.data_dir / MANIFEST_NAME, b'"table_id"', DECODE_LAKE)
                if line.lake == self.target.label and line.table_id == self.table_id and line.version <= version}

    def maintain(self, retention_days: int) -> int:
        """Compact small files, then remove the files no version younger than the retention needs; the version."""
        with self._described("maintain"):
            compacted = self.table.optimize.compact(writer_properties=writer_properties())
            # full: also the files of writes that never committed (a run killed mid-load), which only a listing finds
            removed = self.table.vacuum(retention_hours=retention_days * 24, dry_run=False,
                                        enforce_retention_duration=False, full=True)
        log.info("Lake: %s compacted (%d file(s) into %d); %d file(s) unneeded for %d day(s) removed; version %d",
                 self.target.label, compacted.get("numFilesRemoved", 0), compacted.get("numFilesAdded", 0),
                 len(removed), retention_days, self.table.version())
        return self.table.version()

    def _write(self, record: Export, hours: set[dt.datetime], metadata: dict, check_sha256: bool) -> int:
        """One commit of the file's events of `hours`; the number of processes that converted them."""
        import pyarrow as pa
        from deltalake import CommitProperties, write_deltalake
        from deltalake.exceptions import CommitFailedError

        from lake_schema import SCHEMA

        counts: dict = {}
        batches = Remembering(record_batches(self.data_dir / record.file, record, hours, check_sha256, self.workers,
                                             counts))
        reader = pa.RecordBatchReader.from_batches(SCHEMA, batches)
        try:
            write_deltalake(self.table, reader, mode="overwrite", predicate=hours_predicate(hours),
                            writer_properties=writer_properties(),
                            commit_properties=CommitProperties(custom_metadata=metadata))
        except CommitFailedError:
            self.table.update_incremental()
            raise LakeConflict() from None
        except Exception:
            if batches.failure is not None:  # what went wrong reading the file, not what delta-rs made of it
                raise batches.failure from None
            raise
        warn_of_misfits(record.file, counts.get("misfits", 0))
        return self.workers.used

    def _write_followed(self, followed: Followed) -> None:
        """The lake's thread for a followed window: one commit of its events as they are converted, made only once
        its file is in place as the one expected; any failure gives the conversion up and commits nothing."""
        import pyarrow as pa
        from deltalake import CommitProperties, write_deltalake

        from lake_schema import SCHEMA

        window = followed.window
        batches = Remembering(followed_batches(followed))
        try:
            with self._described(f"write {followed.file} to"):
                write_deltalake(self.table, pa.RecordBatchReader.from_batches(SCHEMA, batches), mode="overwrite",
                                predicate=hours_predicate(set(hours_between(window.start, window.end))),
                                writer_properties=writer_properties(),
                                commit_properties=CommitProperties(
                                    custom_metadata=commit_metadata(followed.file, window, self.policy)))
            followed.version = self.table.version()
        except BaseException as exc:  # noqa: BLE001 - on the lake's own thread: the file is loaded instead
            cause = batches.failure or exc  # what went wrong on the way, not what delta-rs made of it
            followed.failure = f"{type(cause).__name__}: {cause}"
            followed.feed.abort()
            with contextlib.suppress(Exception):
                self.table.update_incremental()  # another writer's commit, if that was the failure

    def _check_schema(self) -> None:
        from lake_schema import SCHEMA

        found = {field.name for field in self.table.schema().fields}
        missing = [field.name for field in SCHEMA if field.name not in found]
        if missing:
            raise LakeError(f"{self.target.label} holds a Delta table of another schema (no column {missing[0]}); "
                            "give --lake a folder of its own")

    def _described(self, doing: str):
        return described(self.target, doing)


def warn_of_misfits(file: str, misfits: int) -> None:
    if misfits:
        log.warning("Lake: %s: %d value(s) did not fit their column's type and are kept as JSON in other_fields",
                    file, misfits)


def commit_metadata(file: str, window: Window, policy: dict | None) -> dict[str, str]:
    """What a commit says of itself in the table's history: the file, the window and the field rules' policy."""
    return {f"{METADATA}.file": file, f"{METADATA}.window": window.label,
            f"{METADATA}.policy": json.dumps(policy, sort_keys=True) if policy else "none"}


def writer_properties():
    from deltalake import WriterProperties

    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION)


class Remembering:
    """An iterator that keeps the exception it raised: delta-rs reports it as an error of its own."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.failure: BaseException | None = None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            self.failure = exc
            raise


class LakeConflict(Exception):
    """Another writer committed first: the commit is tried again."""


class described:
    """delta-rs's and the filesystem's errors as one LakeError line that names the table and no secret."""

    def __init__(self, target: LakeTarget, doing: str):
        self.target, self.doing = target, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or isinstance(exc, (LakeError, LakeConflict, FileChanged, UsageError, KeyboardInterrupt)):
            return False
        if isinstance(exc, Exception):
            text = RUST_BACKTRACE.split(ANSI_ESCAPE.sub("", str(exc)), maxsplit=1)[0]
            reason = scrub(" ".join(text.split())[:300], self.target.secrets())
            raise LakeError(f"cannot {self.doing} the lake at {self.target.label}: {type(exc).__name__}: {reason}") \
                from None
        return False


def scrub(text: str, secrets: list[str]) -> str:
    """The text without the secrets and without the query of any URL in it (where a SAS would be)."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return re.sub(r"\?[^\s\"')]*", "?***", text)
