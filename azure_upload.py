"""The upload stage: finished exports to Azure Blob Storage (`--upload`), each recorded in the manifest.

Optional: the Azure SDK packages come from requirements-azure.txt and are imported only when --upload is used.
Nothing here ever puts a key, a connection string or a SAS token into a message: errors name the account and the
container, and describe the failure by its type and status, never by the SDK's text (which can carry the URL).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from own_files import open_regular
from store import (
    MANIFEST_NAME,
    Export,
    Upload,
    append_manifest,
    file_key,
    is_intact,
    records_of,
    scan_manifest,
    uploaded_keys,
)
from urls import has_host_and_port, plain_http_elsewhere
from windows import iso_utc, now_utc

log = logging.getLogger("fetch_data")

PROJECT = Path(__file__).resolve().parent
REQUIREMENTS_FILE = "requirements-azure.txt"
BLOCK_BYTES = 4 * 1024 * 1024  # blocks of this size are read from the file and sent one at a time: flat memory
CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


class UploadError(Exception):
    """Storage unreachable, credentials rejected, or a blob that holds other bytes; the message names the account,
    the container and the blob only."""


class FileChanged(Exception):
    """A file whose bytes no longer match its manifest line: not uploaded, and its hours are exported again."""

    def __init__(self, name: str, reason: str = "its bytes no longer match the sha256 recorded when it was exported"):
        super().__init__(f"{name}: {reason}")
        self.name = name


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how to upload: credentials as found in the environment, first found wins."""

    container: str
    prefix: str
    account_url: str
    connection_string: str | None = dataclasses.field(default=None, repr=False)
    sas_token: str | None = dataclasses.field(default=None, repr=False)

    @property
    def method(self) -> str:
        if self.connection_string:
            return "connection string"
        return "SAS token" if self.sas_token else "DefaultAzureCredential"

    @property
    def account(self) -> str:
        """The account's name for messages: the first label of the host, or the first path part (Azurite)."""
        parts = urlsplit(self.account_url)
        host = parts.hostname or ""
        if host.endswith(".core.windows.net"):
            return host.split(".")[0]
        return parts.path.strip("/").split("/")[0] or host

    def blob_name(self, window_start: str, file_name: str) -> str:
        """Hive-style partition by the window's first UTC day: <prefix>/date=YYYY-MM-DD/<file>."""
        day = f"{window_start[0:4]}-{window_start[4:6]}-{window_start[6:8]}"
        return "/".join(part for part in (self.prefix, f"date={day}", file_name) if part)


def ensure_installed(needed_by: str = "--upload") -> None:
    """Raise ImportError with the file to install when the Azure packages are missing."""
    try:
        import azure.identity  # noqa: F401
        import azure.storage.blob  # noqa: F401
    except ImportError:
        install = shlex.join([sys.executable, "-m", "pip", "install", "-r", str(PROJECT / REQUIREMENTS_FILE)])
        raise ImportError(f"{needed_by} needs the Azure packages: {install}") from None


def target_from(credentials, container: str, prefix: str, needed_by: str = "--upload") -> Target:
    """The upload target from the AZURE_STORAGE_* credentials (a mapping by variable name); ValueError with a
    one-line reason when they do not add up."""
    if not CONTAINER_NAME.match(container):
        raise ValueError(
            f"container name {container!r} is not valid in Azure: 3 to 63 lowercase letters, digits and single hyphens"
        )
    prefix = check_prefix(prefix)
    connection_string = (credentials.get("AZURE_STORAGE_CONNECTION_STRING") or "").strip()
    account_url = (credentials.get("AZURE_STORAGE_ACCOUNT_URL") or "").strip().rstrip("/")
    sas_token = (credentials.get("AZURE_STORAGE_SAS_TOKEN") or "").strip().lstrip("?")
    if connection_string:
        endpoint = endpoint_of(connection_string)
        refuse_plain_http(endpoint, "AZURE_STORAGE_CONNECTION_STRING")
        ensure_key_readable(connection_string)
        return Target(container, prefix, endpoint, connection_string=connection_string)
    if not account_url:
        raise ValueError(
            f"{needed_by} needs AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_URL "
            "(with AZURE_STORAGE_SAS_TOKEN, or alone for DefaultAzureCredential)"
        )
    if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", account_url) or not has_host_and_port(account_url):
        raise ValueError("AZURE_STORAGE_ACCOUNT_URL: expected https://<account>.blob.core.windows.net (no query, no token)")
    refuse_plain_http(account_url, "AZURE_STORAGE_ACCOUNT_URL")
    return Target(container, prefix, account_url, sas_token=sas_token or None)


def refuse_plain_http(endpoint: str, source: str) -> None:
    """Keys, SAS tokens and the data itself travel over https only; plain http is for Azurite on this machine."""
    host = plain_http_elsewhere(endpoint)
    if host:
        raise ValueError(f"{source}: the credentials and the data would travel unencrypted to {host}; use https "
                         "(plain http is for Azurite on 127.0.0.1 only)")


def check_prefix(prefix: str) -> str:
    """The blob prefix without its outer slashes; one that could climb out of its folder or confuse a reader is
    refused before any request."""
    stripped = prefix.strip().strip("/")
    segments = stripped.split("/") if stripped else []
    if "\\" in stripped or any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"blob prefix {prefix!r}: use names separated by single slashes, without '.', '..', "
                         "empty parts or backslashes")
    if any(not character.isprintable() for character in stripped):
        raise ValueError(f"blob prefix {prefix!r}: holds a character that is not printable")
    return stripped


def connection_fields(connection_string: str) -> dict[str, str]:
    """The fields of a connection string by upper-case name, as the Blob SDK reads them (`blobendpoint=` is its
    BlobEndpoint too): a field the SDK would act on is never one this check overlooks. The last of a name wins."""
    return {name.strip().upper(): value for name, value in
            (part.split("=", 1) for part in connection_string.split(";") if "=" in part)}


def endpoint_of(connection_string: str) -> str:
    fields = connection_fields(connection_string)
    if fields.get("USEDEVELOPMENTSTORAGE", "").lower() == "true":
        return "http://127.0.0.1:10000/devstoreaccount1"
    if fields.get("BLOBENDPOINT"):
        return fields["BLOBENDPOINT"].rstrip("/")
    if fields.get("ACCOUNTNAME"):
        protocol = fields.get("DEFAULTENDPOINTSPROTOCOL", "https")
        suffix = fields.get("ENDPOINTSUFFIX", "core.windows.net")
        return f"{protocol}://{fields['ACCOUNTNAME']}.blob.{suffix}"
    raise ValueError("AZURE_STORAGE_CONNECTION_STRING has neither AccountName nor BlobEndpoint")


def ensure_key_readable(connection_string: str) -> None:
    """An AccountKey signs each request once base64-decoded: one that does not decode would fail the upload only
    after the export, with a message about credentials in general."""
    key = connection_fields(connection_string).get("ACCOUNTKEY")
    if key is None:
        return
    try:
        if not base64.b64decode(key.strip(), validate=True):
            raise ValueError
    except ValueError:  # binascii.Error is one
        raise ValueError("AZURE_STORAGE_CONNECTION_STRING: its AccountKey is empty or not base64 (copy it again from "
                         "the storage account's Access keys)") from None


def build_credential(target: Target):
    """What the SDK authenticates with: the SAS token, or DefaultAzureCredential (managed identity, az login, ...)."""
    if target.sas_token:
        return target.sas_token
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def container_client(target: Target):
    from azure.storage.blob import BlobServiceClient, ExponentialRetry

    # The SDK's default retry waits 15, 18 and 24 s; a few seconds is enough for a blip, and a run that cannot reach
    # storage should say so soon: the next run sends what is pending.
    retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3)
    options = {"max_single_put_size": BLOCK_BYTES, "max_block_size": BLOCK_BYTES, "retry_policy": retry}
    if target.connection_string:
        service = BlobServiceClient.from_connection_string(target.connection_string, **options)
    else:
        service = BlobServiceClient(target.account_url, credential=build_credential(target), **options)
    return service.get_container_client(target.container)


def create_container(target: Target):
    """The container client, creating the container where the credentials allow it."""
    from azure.core.exceptions import HttpResponseError, ResourceExistsError

    container = container_client(target)
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    except HttpResponseError as exc:
        # A SAS scoped to one container may neither create nor inspect it: write into it as it is.
        if not (target.sas_token and exc.status_code == 403):
            raise
    return container


def ensure_container(target: Target) -> None:
    """create_container for another stage (the lake): an UploadError, naming no secret, when it fails."""
    from azure.core.exceptions import AzureError

    try:
        create_container(target)
    except AzureError as exc:
        raise UploadError(describe(target, exc)) from None


class Uploader:
    """Sends files to one container, skipping blobs that already hold the same bytes."""

    def __init__(self, target: Target):
        self.target = target
        self._container = None

    def send(self, path: Path, blob_name: str, content_type: str, gzip: bool, metadata: dict[str, str]) -> bool:
        """Upload `path` as a new blob; True when bytes were sent, False when the blob already holds them.

        A blob is never replaced: one that holds other bytes is an UploadError. The file is sent in blocks and
        hashed as it is read; the blob is committed, with that sha256 in its metadata, only when it equals
        `metadata["sha256"]` (the manifest's), else FileChanged and nothing is committed.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError
        from azure.storage.blob import BlobBlock, ContentSettings

        expected = metadata["sha256"]
        try:
            blob = self._connect().get_blob_client(blob_name)
            if self._already_there(blob, blob_name, expected):
                return False
            digest, blocks = hashlib.sha256(), []
            with open_regular(path) as source:
                while chunk := source.read(BLOCK_BYTES):
                    digest.update(chunk)
                    blocks.append(BlobBlock(base64.b64encode(f"{len(blocks):08d}".encode()).decode()))
                    blob.stage_block(blocks[-1].id, chunk)
            if digest.hexdigest() != expected:
                raise FileChanged(path.name)
            settings = ContentSettings(content_type=content_type, content_encoding="gzip" if gzip else None)
            try:
                blob.commit_block_list(blocks, content_settings=settings, metadata={**metadata, "sha256": digest.hexdigest()},
                                       match_condition=MatchConditions.IfMissing)
            except (ResourceExistsError, ResourceModifiedError):  # another run committed it meanwhile
                if self._already_there(blob, blob_name, expected):
                    return False
                raise
            return True
        except AzureError as exc:
            raise UploadError(describe(self.target, exc)) from None
        except OSError as exc:
            raise FileChanged(path.name, exc.strerror or str(exc)) from None

    def _already_there(self, blob, blob_name: str, expected: str) -> bool:
        """True when the blob holds these bytes; an UploadError when it holds others; False when it is missing."""
        stored = self._stored_sha256(blob)
        if stored is None:
            return False
        if stored != expected:
            raise UploadError(
                f"blob {blob_name} in container {self.target.container} already holds other bytes (sha256 "
                f"{stored[:12]}...); it is not replaced. Two data folders uploading to one prefix? Give each its own "
                "--blob-prefix"
            )
        return True

    def _connect(self):
        if self._container is None:
            self._container = create_container(self.target)
        return self._container

    @staticmethod
    def _stored_sha256(blob) -> str | None:
        """The sha256 a blob's metadata records; None when there is no such blob; "" when it records none."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            return blob.get_blob_properties().metadata.get("sha256", "")
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            if exc.status_code == 403:  # a write-only SAS cannot read: the conditional commit still never replaces
                return None
            raise



def describe(target: Target, exc) -> str:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    where = f"account {target.account}, container {target.container}"
    status = getattr(exc, "status_code", None)
    answer = f" (HTTP {status} {getattr(exc, 'error_code', None) or ''})".replace(" )", ")") if status else ""
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        if not status:  # DefaultAzureCredential found no identity to use
            return f"no Azure credentials were available ({target.method}) for {where}"
        return f"Azure rejected the credentials ({target.method}) for {where}{answer}"
    if isinstance(exc, ServiceRequestError):
        return f"cannot reach Azure Blob Storage for {where} ({type(exc).__name__})"
    if isinstance(exc, HttpResponseError):
        return f"Azure answered{answer} for {where}"
    return f"upload to {where} failed ({type(exc).__name__})"


class Uploads:
    """Each finished file to Azure, recorded in the manifest; the first storage failure stops the stage."""

    def __init__(self, target: Target, data_dir: Path):
        self.target = target
        self.data_dir = data_dir
        self.uploader = Uploader(target)
        self.failure: str | None = None
        self.sent = 0  # files through the upload stage: sent, or found in place already
        self.changed: set[str] = set()  # files not uploaded because their bytes changed: export their hours again

    def send_pending(self) -> None:
        sent = 0
        for record in pending_uploads(self.data_dir):
            if not sent:
                log.info("Uploading files exported earlier and not yet uploaded")
            self.send(record)
            sent += 1
        if sent:
            log.info("%d file(s) exported earlier went through the upload stage", sent)

    def send(self, record: Export) -> None:
        if self.failure:
            return
        blob = self.target.blob_name(record.start, record.file)
        metadata = {"window_start": record.start, "window_end": record.end, "events": str(record.events),
                    "sha256": record.sha256, **policy_metadata(record.policy)}
        try:
            sent = self.uploader.send(
                self.data_dir / record.file, blob, content_type_of(record.file), record.file.endswith(".gz"), metadata,
            )
        except FileChanged as exc:
            log.warning("%s; not uploaded, its hours are exported again", exc)
            self.changed.add(record.file)
            return
        except UploadError as exc:
            self.failure = str(exc)
            return
        append_manifest(self.data_dir / MANIFEST_NAME, Upload(
            start=record.start, end=record.end, file=record.file, blob=blob, sha256=record.sha256,
            uploaded_at=iso_utc(now_utc()),
        ))
        self.sent += 1
        verb = "Uploaded" if sent else "Already uploaded (same sha256)"
        log.info("%s %s to %s/%s", verb, record.file, self.target.container, blob)


def pending_uploads(data_dir: Path):
    """Exported files still on disk with their recorded size whose bytes no manifest line records as uploaded,
    streamed from the manifest: a manifest of a million lines never sits in memory."""
    manifest = data_dir / MANIFEST_NAME
    uploaded, seen = uploaded_keys(manifest), set()
    candidates = ((head, line, number) for head, line, number in scan_manifest(manifest, warn=False)
                  if head.is_export and file_key(head) not in uploaded and file_key(head) not in seen)
    for head, record in records_of(candidates):
        if isinstance(record, Export) and file_key(head) not in seen and is_intact(record, data_dir):
            seen.add(file_key(head))
            yield record


POLICY_METADATA_CHARS = 2048  # Azure allows 8 KB of metadata in all; the rest is for the window, count and sha256


def policy_metadata(policy: dict | None) -> dict[str, str]:
    """The field rules as blob metadata: their JSON when short and plain ASCII, else its sha256 and the counts (the
    manifest line keeps the whole policy). Decided from the policy alone, so it never fails at upload time."""
    if not policy:
        return {}
    text = msgspec.json.encode(policy).decode()
    if len(text) <= POLICY_METADATA_CHARS and text.isascii() and text.isprintable():
        return {"policy": text}
    return {"policy_sha256": hashlib.sha256(text.encode()).hexdigest(), "policy_key_id": policy.get("key_id") or "",
            "policy_fields": f"{len(policy.get('dropped', []))} dropped, {len(policy.get('hashed', []))} hashed"}


def content_type_of(file_name: str) -> str:
    return "application/x-ndjson" if file_name.removesuffix(".gz").endswith(".jsonl") else "application/json"
