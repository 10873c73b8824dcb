"""Letting monitors watch a run: a dead man's switch (`--ping-url`) and a metrics file (`--metrics-file`).

The ping follows the Healthchecks.io convention: `URL/start` when a run begins, `URL` on success and `URL/fail` on
failure, the last two with the run's JSON summary as their body. A monitor that hears nothing raises the alarm,
which is how a night that never ran is noticed. The ping URL is a secret (whoever has it can fake a success): it
is never logged, and a failed ping is a WARNING that never fails the export.

The metrics file is node_exporter's textfile format, written by prometheus_client atomically (a temporary name,
then a rename), so the collector never reads half a file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from pathlib import Path

from own_files import ensure_replaceable, not_regular, open_regular
from urls import has_host_and_port, plain_http_elsewhere

log = logging.getLogger("fetch_data")

PING_TIMEOUT = 10.0
USER_AGENT = "amplitude-eu-export/1.0 (fetch_data.py)"
PREFIX = "amplitude_export_"
MAX_METRICS_BYTES = 1 << 20  # the file holds a dozen lines; more is not ours to read


class Watch:
    """The monitors a run was asked to tell: started(), then finished(summary)."""

    def __init__(self, settings):
        self.ping_url = settings.ping_url
        self.metrics_file = settings.metrics_file
        self.data_dir = str(settings.data_dir)

    def started(self) -> None:
        if self.ping_url:
            ping(self.ping_url, "/start", None)

    def finished(self, document: dict) -> None:
        if self.metrics_file:
            write_metrics(self.metrics_file, self.data_dir, document, time.time())
        if self.ping_url:
            ping(self.ping_url, "" if document["status"] == "ok" else "/fail", document)


def ping(url: str, suffix: str, document: dict | None) -> None:
    """One ping, PING_TIMEOUT seconds at most in all: a monitor that trickles its answer, or never ends it, must not
    hold the night's run. What goes wrong is said without the URL and changes nothing else."""
    kind = {"/start": "start", "": "success", "/fail": "failure"}[suffix]
    sender = threading.Thread(target=send_ping, args=(url, suffix, document, kind), name="monitor-ping", daemon=True)
    sender.start()
    sender.join(PING_TIMEOUT)
    if sender.is_alive():  # the thread ends with the process
        log.warning("The %s ping to the monitor was not answered within %g s; the export is not affected", kind,
                    PING_TIMEOUT)


def send_ping(url: str, suffix: str, document: dict | None, kind: str) -> None:
    import requests

    body = json.dumps(document, ensure_ascii=True).encode() if document is not None else b""
    try:
        with requests.Session() as session:
            if urllib.parse.urlsplit(url).scheme == "http":  # loopback only (checked in settings): never a proxy
                session.trust_env = False
            # stream: the status is all a ping needs; a body, however long, is never read.
            with session.post(url.rstrip("/") + suffix, data=body, timeout=PING_TIMEOUT, allow_redirects=False,
                              headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
                              stream=True) as answer:
                status = answer.status_code
        if status >= 300:
            log.warning("The %s ping to the monitor was answered HTTP %d; the export is not affected", kind, status)
    except requests.RequestException as exc:
        log.warning("The %s ping to the monitor failed (%s); the export is not affected", kind, type(exc).__name__)


def check_ping_url(url: str, source: str) -> str:
    """An https URL (plain http to this machine only), or a ValueError that does not repeat it."""
    url = url.strip()
    readable = has_host_and_port(url) and not any(c.isspace() for c in url)
    if not readable or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{source}: expected an https:// URL (it is not shown here: it is a secret)")
    if plain_http_elsewhere(url):
        raise ValueError(f"{source}: plain http would carry the secret URL in the clear; use https:// (http:// is "
                         "for this machine only)")
    return url


def check_metrics_file(path: Path, source: str) -> Path:
    if path.suffix != ".prom":
        raise ValueError(f"{source} {path}: node_exporter reads files named *.prom only")
    if not path.parent.is_dir():
        raise ValueError(f"{source} {path}: the folder {path.parent} does not exist")
    kind = not_regular(path)
    if kind:  # written by a rename over it, which would replace the link or the device
        raise ValueError(f"{source} {path} is {kind}, not a file the metrics can be written to")
    return path


def write_metrics(path: Path, data_dir: str, document: dict, now: float) -> None:
    """The run's numbers for node_exporter's textfile collector; the last success survives a failed run."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()

    def gauge(name: str, text: str, value: float | None) -> None:
        metric = Gauge(PREFIX + name, text, ["data_dir"], registry=registry)
        if value is not None:
            metric.labels(data_dir).set(value)

    ok = document["status"] == "ok"
    gauge("last_run_timestamp_seconds", "When the last run ended, Unix time", now)
    gauge("last_success_timestamp_seconds", "When the last successful run ended, Unix time",
          now if ok else previous_value(path, PREFIX + "last_success_timestamp_seconds", data_dir))
    gauge("events", "Events the last run exported", document["events"])
    gauge("hours_exported", "Hours the last run exported", document["hours"]["exported"])
    gauge("hours_missing", "Hours of the last run's range still missing after it", document["hours"]["missing"])
    gauge("duration_seconds", "How long the last run took", document["seconds"])
    gauge("exit_code", "The last run's exit code: 0 ok, 1 failed, 2 bad settings", document["exit_code"])
    try:
        ensure_replaceable(path)  # checked at start, but it may have become a link or a pipe since
        write_to_textfile(str(path), registry)
    except OSError as exc:
        log.warning("Cannot write the metrics file %s (%s)", path, exc.strerror or exc)


def previous_value(path: Path, name: str, data_dir: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open_regular(path) as metrics:  # never a link, and never a pipe that blocks or a device without end
            text = metrics.read(MAX_METRICS_BYTES).decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("data_dir") == data_dir:
                    return sample.value
    except (OSError, ValueError):  # UnicodeDecodeError is one
        return None
    return None
