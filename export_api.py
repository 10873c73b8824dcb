"""The Export API client: one request streamed to a file, the one place that decides what an answer means, and the
bounded retry loop around them. It knows nothing of what the archive holds: `fetch` hands a downloaded zip to the
caller's `consume`, which may raise Retryable for a damaged archive.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import requests

from archive import MAX_DIRECTORY_BYTES, MAX_MEMBERS, directory_of
from errors import ExportError, first_text_line
from settings import EXPORT_PATH, Api
from temp_files import create_temp_file
from urls import is_loopback
from windows import Window, format_hour, now_utc

log = logging.getLogger("fetch_data")

USER_AGENT = "amplitude-eu-export/1.0 (fetch_data.py)"
CONNECT_TIMEOUT = 10.0
RETRY_AFTER_CAP = 60.0
ERROR_BODY_CHARS = 200
ERROR_BODY_BYTES = 4096
NO_DATA_TEXT = "raw data files were not found"  # Amplitude's 404 body for a range without events, in any case
TOO_LARGE_TEXT = "too large"  # in Amplitude's 400 body for an export over its 4 GB limit
# Amplitude answers an export over 4 GB with a 400: a longer answer is not one, and would fill the disk if it never
# ended (a body sent with Content-Encoding: gzip grows as it is decoded). It is split like a window too large.
MAX_ANSWER_BYTES = 5 << 30


class TooLarge(Exception):
    """Amplitude refused a window as too large (400) or kept timing out on it (504): split it."""


class Retryable(Exception):
    """A failed attempt worth repeating after `wait` seconds."""

    def __init__(self, reason: str, wait: float, status: int | None = None):
        super().__init__(reason)
        self.wait = wait
        self.status = status


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


def open_session(api: Api) -> requests.Session:
    """A session with the keys and the tool's name; plain http (loopback only) never goes through a proxy."""
    session = requests.Session()
    session.auth = (api.api_key, api.secret_key)
    session.headers["User-Agent"] = USER_AGENT
    if urllib.parse.urlsplit(api.base_url).scheme == "http" and is_loopback(urllib.parse.urlsplit(api.base_url).netloc):
        # HTTP_PROXY / ALL_PROXY would otherwise carry the Basic credentials in cleartext to another host.
        session.trust_env = False
        session.proxies = {"http": None, "https": None, "all": None}
    return session


def fetch(span: Window, session, api: Api, consume, temp_folder: Path, sleep=time.sleep, on_failure=None) -> None:
    """Download `span` and hand the zip to `consume`, retrying as the user's design specifies: a bounded loop, a
    counter per span, a fixed wait (twice it after a 429). `on_failure` hears of each failed attempt first."""
    last: Retryable | None = None
    for attempt in range(1, api.max_attempts + 1):
        log.info("Fetching %s (attempt %d/%d)", span, attempt, api.max_attempts)
        try:
            fetch_once(span, session, api, consume, temp_folder)
            return
        except Retryable as exc:
            last = exc
            if on_failure:
                on_failure(exc)
            if attempt < api.max_attempts:
                log.warning("%s: %s; waiting %gs before attempt %d", span, exc, exc.wait, attempt + 1)
                sleep(exc.wait)
            else:
                log.warning("%s: %s", span, exc)
    if last.status == 504 and span.hours > 1:
        raise TooLarge(f"still timing out (504) after {api.max_attempts} attempts")
    raise ExportError(f"Max fetch attempts reached for {span} ({api.max_attempts}); last error: {last}")


def halves_of_too_large(span: Window, exc: TooLarge) -> tuple[Window, Window]:
    """The halves to fetch instead of a span Amplitude finds too large; an ExportError for a single hour."""
    if span.hours == 1:
        raise ExportError(
            f"hour {span.label[:11]} alone is too large for the Export API ({exc}); "
            "use Amplitude's Amazon S3 or data warehouse export for this hour"
        ) from None
    first, second = span.halves()
    log.warning("%s: %s; splitting into %s and %s", span, exc, first, second)
    return first, second


def fetch_once(span: Window, session, api: Api, consume, temp_folder: Path) -> None:
    """One request: on 200 the zip goes to `consume`, else the answer says retry, split, skip or fail."""
    zip_path = temp_folder / f".ampl-download-{span.label}-{uuid.uuid4().hex[:8]}.zip.part"
    try:
        answer = download(session, span, api, zip_path)
        decision = classify(answer, api.delay_seconds)
        if decision == "ok":
            ensure_few_members(zip_path)
            consume(zip_path)
        elif decision == "empty":
            log.info("%s: no data for this range (HTTP 404: %s)", span, answer.first_line)
    finally:
        zip_path.unlink(missing_ok=True)


def ensure_few_members(zip_path: Path) -> None:
    """An archive listing more members than MAX_MEMBERS, or with a directory over MAX_DIRECTORY_BYTES, is split
    like a window Amplitude finds too large: halves list fewer, and reading its directory whole would cost memory
    in proportion."""
    listed, size = directory_of(zip_path) or (0, 0)
    if listed > MAX_MEMBERS:
        raise TooLarge(f"the archive lists {listed:,} members, more than {MAX_MEMBERS:,}")
    if size > MAX_DIRECTORY_BYTES:
        raise TooLarge(f"the archive's directory takes {size:,} bytes, more than {MAX_DIRECTORY_BYTES:,}")


def download(session, span: Window, api: Api, dest: Path) -> Answer:
    """One attempt, abandoned once it has run `attempt_timeout` seconds.

    A read timeout bounds the silence between two bytes, not a whole answer: a server that sends a byte a second
    would hold the run (and the data folder's lock) for ever. The request runs on a thread of its own, which an
    abandoned attempt leaves to die with its connection; it writes nothing more once abandoned.
    """
    outcome: dict = {}
    abandoned = threading.Event()

    def attempt():
        try:
            outcome["answer"] = request_to_file(session, span, api, dest, abandoned)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, name=f"request-{span.label}", daemon=True)
    thread.start()
    thread.join(api.attempt_timeout)
    if thread.is_alive():
        abandoned.set()
        raise Retryable(
            f"no whole answer within {api.attempt_timeout:g}s (--attempt-timeout); attempt abandoned", api.delay_seconds
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def request_to_file(session, span: Window, api: Api, dest: Path, abandoned: threading.Event) -> Answer:
    """Stream a 200's body to `dest`; any other answer comes back with the start of its body."""
    url = api.base_url + EXPORT_PATH
    params = {"start": format_hour(span.start), "end": format_hour(span.end)}
    try:
        with session.get(
            url, params=params, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT, api.read_timeout),
        ) as response:
            if response.status_code != 200:
                return Answer(response.status_code, response.headers, body_start(response), url)
            announced = response.headers.get("Content-Length", "").strip()
            ensure_within_limit(int(announced) if announced.isdigit() else 0)
            received = 0
            with create_temp_file(dest) as out:
                for chunk in response.iter_content(api.read_bytes):
                    if abandoned.is_set():
                        break
                    received += len(chunk)
                    ensure_within_limit(received)
                    out.write(chunk)
            if abandoned.is_set():
                dest.unlink(missing_ok=True)
            return Answer(200, response.headers, "", url)
    except requests.RequestException as exc:
        raise Retryable(describe_failure(exc, api), api.delay_seconds) from None


def ensure_within_limit(size: int) -> None:
    if size > MAX_ANSWER_BYTES:
        raise TooLarge(f"the answer passed {MAX_ANSWER_BYTES:,} bytes, more than Amplitude sends for one export")


def classify(answer: Answer, delay: float) -> str:
    """The one place that decides what a response means: 'ok', 'empty', or an exception to retry, split or fail."""
    status = answer.status
    if status == 200:
        return "ok"
    if status == 404 and NO_DATA_TEXT in answer.body.lower():
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


def describe_failure(exc: requests.RequestException, api: Api) -> str:
    """A failed connection in words: the host, and what went wrong (DNS, refused, TLS, timeout, reset, cut short)."""
    host = urllib.parse.urlsplit(api.base_url).netloc
    causes = exception_chain(exc)

    def caused_by(*kinds) -> BaseException | None:
        return next((cause for cause in causes if isinstance(cause, kinds)), None)

    if caused_by(socket.gaierror) or "NameResolutionError" in {type(c).__name__ for c in causes}:
        return f"the name {host} could not be resolved (DNS)"
    if caused_by(requests.exceptions.ConnectTimeout):
        return f"no connection to {host} within {CONNECT_TIMEOUT:g}s (timeout)"
    if caused_by(requests.exceptions.ReadTimeout, socket.timeout):
        return f"{host} went silent for {api.read_timeout:g}s (read timeout)"
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
