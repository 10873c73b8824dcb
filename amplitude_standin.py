"""A local stand-in of Amplitude's Export API, for `fetch_data.py --demo`, the tests and the benchmark.

It serves what the real API serves: a zip of gzipped JSON-lines members named
`<project>/<project>_<YYYY-MM-DD>_<H>#<N>.json.gz` (hour not zero-padded), HTTP Basic auth, 404 for an empty
range, and on request the faults seen in practice: 5xx, 429, 400 "too large", 401/403, connections dropped
mid-body, truncated bodies, damaged members, non-zip 200s and stalls. Standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import io
import json
import math
import random
import threading
import time
import zipfile
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PROJECT_ID = 187520
HOUR = dt.timedelta(hours=1)
TOO_LARGE_TEXT = (
    "The file size of the exported data is too large. Shorten the time ranges and try again. The limit size is 4GB."
)
NOT_FOUND_TEXT = "Raw data files were not found."
EVENT_TYPES = ("session_start", "page_view", "button_click", "purchase", "Bestellung abgeschlossen", "検索", "🎉 signup")
CITIES = ("Berlin", "München", "Zürich", "Kraków", "São Paulo", "Reykjavík", "Αθήνα", "東京")


class Fault:
    """One scripted answer: `kind` is an HTTP status (int) or one of the named misbehaviours below."""

    KINDS = ("drop", "truncate", "corrupt_crc", "corrupt_gzip", "not_zip", "stall", "bad_line", "trickle", "members", "body")

    def __init__(self, kind, start=None, end=None, body=None, retry_after=None, seconds=0.0, headers=None, members=None):
        if not isinstance(kind, int) and kind not in self.KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        self.kind = kind
        self.start = start
        self.end = end
        self.body = body  # the error text of a status, or the raw 200 body of "body"
        self.retry_after = retry_after
        self.seconds = seconds  # "stall": silence before a 503; "trickle": the pause between two bytes
        self.headers = headers or {}
        self.members = members  # "members": (name, bytes stored as they are) for a zip of exactly these

    def matches(self, start: str, end: str) -> bool:
        return (self.start is None or self.start == start) and (self.end is None or self.end == end)


class StandIn:
    """The Export API on 127.0.0.1; use as a context manager, `base_url` once started."""

    def __init__(
        self,
        api_key="demo",
        secret_key="demo",
        events_per_part=3,
        parts_per_hour=2,
        empty_hours=(),
        too_large_over_hours=None,
        timeout_over_hours=None,
        archive_path=None,
        seed=7,
        stopped_types=None,
        daily_cycle=False,
    ):
        self.api_key = api_key
        self.secret_key = secret_key
        self.events_per_part = events_per_part
        self.parts_per_hour = parts_per_hour
        self.empty_hours = set(empty_hours)
        self.too_large_over_hours = too_large_over_hours
        self.timeout_over_hours = timeout_over_hours
        self.archive_path = archive_path
        self.seed = seed
        self.stopped_types = dict(stopped_types or {})  # event type -> the hour from which it is never sent
        self.daily_cycle = daily_cycle  # fewer events at night, most in the afternoon, as real traffic
        self.answer_delay = 0.0  # seconds before each answer, to make concurrent requests overlap
        self.bytes_per_second = None  # each answer's body sent no faster than this, as a busy export server does
        self.gate: threading.Event | None = None  # when set to an Event, answers wait until it is set
        self.in_flight = 0
        self.arrived = 0  # requests received, counted before any gate or delay
        self.most_in_flight = 0
        self.faults: deque[Fault] = deque()
        self._members: dict = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def start(self, port=0):
        self._server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def add_fault(self, kind, start=None, end=None, times=1, **options):
        """Answer the next `times` matching requests with `kind` instead of the data."""
        for _ in range(times):
            self.faults.append(Fault(kind, start, end, **options))

    def take_fault(self, start: str, end: str):
        with self._lock:
            for fault in self.faults:
                if fault.matches(start, end):
                    self.faults.remove(fault)
                    return fault
        return None

    @contextlib.contextmanager
    def counting_in_flight(self):
        with self._lock:
            self.in_flight += 1
            self.arrived += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def record(self, **entry):
        with self._lock:
            self.requests.append(entry)

    def events(self, hour: dt.datetime, part: int) -> list[bytes]:
        """The event lines of one member, the same on every call."""
        if hour in self.empty_hours:
            return []
        rng = random.Random(f"{self.seed}-{hour:%Y%m%d%H}-{part}")
        stopped = {name for name, since in self.stopped_types.items() if hour >= since}
        count = self.events_per_part
        if self.daily_cycle:
            count = round(count * (0.55 - 0.45 * math.cos((hour.hour - 3) * math.pi / 12)))
        return [make_event(hour, part, index, rng, stopped) for index in range(count)]

    def expected_lines(self, start: dt.datetime, end: dt.datetime) -> list[bytes]:
        """Every event of the range in the order the exporter must write them: hour, then part."""
        return [line for hour in hours(start, end) for part in range(self.parts_per_hour) for line in self.events(hour, part)]

    def members(self, start: dt.datetime, end: dt.datetime) -> list[tuple[str, bytes]]:
        """(name, gzipped JSON lines) for every non-empty part, in the scrambled order a zip may list them."""
        members = [self.member(hour, part) for hour in hours(start, end) for part in range(self.parts_per_hour)]
        return sorted((m for m in members if m), key=lambda member: member[0], reverse=True)

    def member(self, hour: dt.datetime, part: int):
        """One hour's part, compressed once and kept: a backfill asks for the same hours again."""
        key = (hour, part, self.events_per_part, self.daily_cycle, hour in self.empty_hours,
               tuple(sorted(self.stopped_types.items())))
        if key not in self._members:
            lines = self.events(hour, part)
            packed = gzip.compress(b"\n".join(lines) + b"\n", 6, mtime=0) if lines else None
            self._members[key] = (member_name(hour, part), packed) if lines else None
        return self._members[key]


def make_handler(standin: StandIn):
    class ExportHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            with standin.counting_in_flight():
                if standin.gate is not None:
                    standin.gate.wait(60)
                time.sleep(standin.answer_delay)
                self.answer()

        def answer(self):
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            start, end = query.get("start", ""), query.get("end", "")
            standin.record(
                path=url.path, start=start, end=end, user_agent=self.headers.get("User-Agent", ""),
                authorization=self.headers.get("Authorization", ""),
            )
            if url.path != "/api/2/export":
                return self.send_text(404, "Not found")
            if not self.authorized():
                return self.send_text(401, "Invalid API key or secret key")
            span = parse_span(start, end)
            if span is None:
                return self.send_text(400, "Invalid start or end parameter")
            fault = standin.take_fault(start, end)
            if fault:
                return self.send_fault(fault, span)
            span_hours = int((span[1] - span[0]) / HOUR) + 1
            if standin.too_large_over_hours is not None and span_hours > standin.too_large_over_hours:
                return self.send_text(400, TOO_LARGE_TEXT)
            if standin.timeout_over_hours is not None and span_hours > standin.timeout_over_hours:
                return self.send_text(504, "Gateway Timeout")
            if standin.archive_path:
                members = archive_members_between(Path(standin.archive_path), *span)
                if members is None:  # the span covers the whole archive: sent as it is
                    return self.send_file(Path(standin.archive_path))
                if not members:
                    return self.send_text(404, NOT_FOUND_TEXT)
                return self.send_bytes(200, build_archive(members), "application/zip")
            members = standin.members(*span)
            if not members:
                return self.send_text(404, NOT_FOUND_TEXT)
            self.send_bytes(200, build_archive(members), "application/zip")

        def authorized(self) -> bool:
            expected = base64.b64encode(f"{standin.api_key}:{standin.secret_key}".encode()).decode()
            return self.headers.get("Authorization", "") == f"Basic {expected}"

        def send_fault(self, fault: Fault, span):
            if isinstance(fault.kind, int):
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                return self.send_text(fault.kind, fault.body or f"Error {fault.kind}", {**headers, **fault.headers})
            if fault.kind == "members":
                return self.send_bytes(200, build_archive(fault.members), "application/zip")
            if fault.kind == "body":
                return self.send_bytes(200, fault.body, "application/zip")
            if fault.kind == "trickle":
                return self.send_trickle(build_archive(standin.members(*span)), fault.seconds)
            if fault.kind == "stall":
                time.sleep(fault.seconds)
                return self.send_text(503, "stalled")
            if fault.kind == "not_zip":
                return self.send_bytes(200, b"<html><body>Service temporarily unavailable</body></html>", "text/html")
            members = standin.members(*span) or [(member_name(span[0], 0), gzip.compress(b'{"event_type":"x"}\n'))]
            if fault.kind == "drop":
                body = build_archive(members)
                return self.send_partial(body, announce_length=True)
            if fault.kind == "truncate":
                body = build_archive(members)
                return self.send_partial(body, announce_length=False)
            if fault.kind == "corrupt_crc":
                body = bytearray(build_archive(members))
                body[len(body) // 4] ^= 0xFF
                return self.send_bytes(200, bytes(body), "application/zip")
            if fault.kind == "corrupt_gzip":
                name, data = members[0]
                damaged = data[:10] + bytes(b ^ 0x55 for b in data[10:30]) + data[30:]
                return self.send_bytes(200, build_archive([(name, damaged)] + members[1:]), "application/zip")
            if fault.kind == "bad_line":
                name, data = members[-1]
                lines = gzip.decompress(data) + b'{"event_type": "cut short\n'
                return self.send_bytes(200, build_archive(members[:-1] + [(name, gzip.compress(lines))]), "application/zip")
            raise AssertionError(fault.kind)

        def send_text(self, status: int, text: str, headers=None):
            self.send_bytes(status, text.encode(), "text/plain; charset=utf-8", headers)

        def send_bytes(self, status: int, body: bytes, content_type: str, headers=None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.write_paced(io.BytesIO(body))

        def write_paced(self, source) -> None:
            """The body in blocks, at most `bytes_per_second` when the stand-in is capped."""
            rate, began, sent = standin.bytes_per_second, time.monotonic(), 0
            while block := source.read(64 << 10 if rate else 1 << 20):
                self.wfile.write(block)
                sent += len(block)
                if rate:
                    time.sleep(max(0.0, began + sent / rate - time.monotonic()))

        def send_partial(self, body: bytes, announce_length: bool):
            """Half the body, then the connection closes: with a Content-Length it is a drop, without a truncation."""
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            if announce_length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def send_trickle(self, body: bytes, pause: float):
            """The whole body announced, then a byte at a time: never silent long enough for a read timeout."""
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for index in range(len(body)):
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()
                    time.sleep(pause)

        def send_file(self, path: Path):
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as source:
                self.write_paced(source)

    return ExportHandler


@contextlib.contextmanager
def demo_server(api_key: str, secret_key: str, now: dt.datetime | None = None):
    """A stand-in for `fetch_data.py --demo`, with something for its report to find: yesterday has an hour that
    Amplitude served empty, and `purchase` events stop at its start. Yields its base URL."""
    now = now or dt.datetime.now(dt.UTC)
    yesterday = now.replace(minute=0, second=0, microsecond=0, hour=0) - dt.timedelta(days=1)
    with StandIn(api_key, secret_key, events_per_part=60, parts_per_hour=2, empty_hours={yesterday + 13 * HOUR},
                 stopped_types={"purchase": yesterday}, daily_cycle=True) as standin:
        yield standin.base_url


def archive_members_between(path: Path, first: dt.datetime, last: dt.datetime) -> list[tuple[str, bytes]] | None:
    """The members of a stored archive whose hour lies in first..last; None when every member that names an hour
    does (the archive is then sent as it is, members without an hour included)."""
    with zipfile.ZipFile(path) as archive:
        hours = [(info, member_hour(info.filename)) for info in archive.infolist()]
        if all(hour is None or first <= hour <= last for _, hour in hours):
            return None
        return [(info.filename, archive.read(info)) for info, hour in hours if hour and first <= hour <= last]


def member_hour(name: str) -> dt.datetime | None:
    """The hour a member's name gives (`<project>_<YYYY-MM-DD>_<H>#<part>.json.gz`), or None."""
    try:
        day, hour = name.rsplit("/", 1)[-1].split("#")[0].split("_")[-2:]
        return dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC) + int(hour) * HOUR
    except ValueError:
        return None


def build_archive(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def member_name(hour: dt.datetime, part: int) -> str:
    return f"{PROJECT_ID}/{PROJECT_ID}_{hour:%Y-%m-%d}_{hour.hour}#{part}.json.gz"


def parse_span(start: str, end: str):
    try:
        first = dt.datetime.strptime(start, "%Y%m%dT%H").replace(tzinfo=dt.UTC)
        last = dt.datetime.strptime(end, "%Y%m%dT%H").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return (first, last) if first <= last else None


def hours(start: dt.datetime, end: dt.datetime):
    moment = start
    while moment <= end:
        yield moment
        moment += HOUR


def make_event(hour: dt.datetime, part: int, index: int, rng: random.Random, stopped=frozenset(),
               complete: bool = False) -> bytes:
    """One event line shaped like Amplitude's: Unicode, integers beyond 2^53, escapes kept as sent.

    `complete` adds the other four timestamps, the location and the library, as the benchmark's day has them:
    about 1,060 bytes an event, 235,000 events in 250 MB (the targets' day has 240,000).
    """
    when = hour + dt.timedelta(seconds=rng.randrange(3600), microseconds=rng.randrange(10**6))
    uploaded = when + dt.timedelta(seconds=rng.randrange(1, 30))
    user = rng.randrange(1, 5000)
    event = {
        "$insert_id": f"{rng.getrandbits(128):032x}",
        "uuid": f"{rng.getrandbits(128):032x}",
        "app": PROJECT_ID,
        "event_id": rng.randrange(1, 10**6),
        "event_type": rng.choice([name for name in EVENT_TYPES if name not in stopped] if stopped else EVENT_TYPES),
        "event_time": f"{when:%Y-%m-%d %H:%M:%S.%f}",
        "server_upload_time": f"{uploaded:%Y-%m-%d %H:%M:%S.%f}",
        "client_event_time": f"{when:%Y-%m-%d %H:%M:%S.%f}",
        "user_id": f"user-{user}",
        "device_id": f"{rng.getrandbits(64):016x}",
        "session_id": int(when.timestamp() * 1000) - rng.randrange(10**6),
        "amplitude_id": 2**53 + rng.getrandbits(60),
        "country": "Germany",
        "city": rng.choice(CITIES),
        "platform": rng.choice(("Web", "iOS", "Android")),
        "os_name": "Chrome",
        "language": "de",
        "ip_address": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        "event_properties": {
            "path": f"/produkte/{rng.randrange(1000)}",
            "price": round(rng.uniform(1, 500), 2),
            "order_id": 2**62 + rng.getrandbits(60),
            "note": rng.choice(("grüße", "naïve café", "emoji 🚀", "quote \" and \\ backslash", "")),
        },
        "user_properties": {"plan": rng.choice(("free", "pro", "enterprise")), "cohort": rng.randrange(52)},
        "groups": {},
        "data": {"path": "/2/httpapi", "group_first_event": {}},
    }
    if complete:
        event.update(other_fields(when, uploaded, rng))
    if index % 1000 == 1:  # now and then an integer beyond 64 bits, which some JSON parsers refuse
        event["event_properties"]["ledger_id"] = 10**25 + rng.getrandbits(64)
    line = json.dumps(event, ensure_ascii=bool(index % 2), separators=(", ", ": ") if part % 2 else (",", ":"))
    return line.encode("utf-8")


def other_fields(when: dt.datetime, uploaded: dt.datetime, rng: random.Random) -> dict:
    """Fields of an exported event that make_event leaves out by default."""
    received = uploaded + dt.timedelta(microseconds=rng.randrange(1, 10**5))
    return {
        "client_upload_time": f"{uploaded:%Y-%m-%d %H:%M:%S.%f}",
        "server_received_time": f"{received:%Y-%m-%d %H:%M:%S.%f}",
        "processed_time": f"{received + dt.timedelta(seconds=rng.randrange(1, 60)):%Y-%m-%d %H:%M:%S.%f}",
        "user_creation_time": f"{when - dt.timedelta(days=rng.randrange(400)):%Y-%m-%d %H:%M:%S.%f}",
        "location_lat": round(rng.uniform(47.3, 54.9), 4),
        "location_lng": round(rng.uniform(5.9, 15.0), 4),
        "library": "amplitude-ts/2.11.1",
    }
