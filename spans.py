"""One window over several connections (`--workers N` with fewer windows than workers).

A window is cut into contiguous hour spans, more of them than there are workers, so that the first spans are
written while later ones still download. Every request of the run goes through one pool of N threads and one
Pace, so at most N requests are in flight whatever the number of windows (Amplitude allows 5 per project), and a
429 lowers that number for the rest of the run. Each span's archive is kept on disk (a temporary file the next run
removes if this one dies) until the window's thread writes it, in hour order: the file is byte for byte what a
single request for the window gives. A span Amplitude finds too large is split, as a window is; a failed span
fails its window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from export_api import Retryable, TooLarge, fetch, halves_of_too_large, open_session
from temp_files import rename_temp_file
from windows import HOUR, Window

log = logging.getLogger("fetch_data")

SPANS_PER_WORKER = 2  # spans in flight and spans waiting, so that writing never waits for a whole download
READ_BYTES = 256 << 10  # of each body at a time: five downloads at once stay within the 64 MB budget
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each stops a run cleanly (fetch_data.py)


def plan_spans(window: Window, count: int) -> list[Window]:
    """`window` as `count` (or fewer, one hour at least each) contiguous spans of near-equal hours, in order."""
    count = max(1, min(count, window.hours))
    spans, start = [], window.start
    for index in range(count):
        hours = window.hours // count + (1 if index < window.hours % count else 0)
        spans.append(Window(start, start + (hours - 1) * HOUR))
        start += hours * HOUR
    return spans


def spans_per_window(workers: int, windows: int) -> int:
    """Enough spans for every worker to have a request and one waiting, shared among the windows planned."""
    return 1 if workers == 1 else max(1, math.ceil(SPANS_PER_WORKER * workers / max(1, windows)))


class Pace:
    """At most `limit` requests at once; a 429 lowers the limit by one (down to one) for the rest of the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def slot(self):
        with self._changed:
            self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    def heard(self, failure) -> None:
        if getattr(failure, "status", None) == 429 and self.limit > 1:
            with self._changed:
                self.limit = max(1, self.limit - 1)
            log.warning("Amplitude answered 429 (rate limit): at most %d request(s) at once from now on", self.limit)


class Spans:
    """The run's request pool: windows hand it their spans and write what comes back, in order."""

    def __init__(self, workers: int, windows: int, settings):
        self.settings = settings
        self.per_window = spans_per_window(workers, windows)
        self.pace = Pace(workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="span", initializer=leave_signals_to_main_thread)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def export(self, window: Window, write, again) -> None:
        """Each span of `window` downloaded on the pool and handed to `write(zip_path, span)` in hour order. A
        span whose archive turns out damaged (Retryable) is fetched again, in its turn, with its own retries, by
        `again(span, session)`."""
        futures = [(span, self.pool.submit(self.download, span)) for span in plan_spans(window, self.per_window)]
        try:
            for _, future in futures:
                for part, zip_path in future.result():
                    try:
                        write(zip_path, part)
                    except Retryable as exc:
                        log.warning("%s: %s; fetching it again", part, exc)
                        with self.pace.slot(), open_session(self.settings.api) as session:
                            again(part, session)
                    finally:
                        zip_path.unlink(missing_ok=True)
        finally:  # after a failure, spans not started are dropped and the others' archives removed when done
            for _, future in futures:
                future.cancel()
                future.add_done_callback(discard_archives)

    def download(self, span: Window) -> list[tuple[Window, Path]]:
        """The archives of `span` on disk, in hour order: one, or one per part when Amplitude finds it too large."""
        kept: list[Path] = []

        def keep(zip_path: Path) -> None:
            target = zip_path.with_name(f".ampl-span-{span.label}-{uuid.uuid4().hex[:8]}.zip.part")
            rename_temp_file(zip_path, target)
            kept.append(target)

        api = dataclasses.replace(self.settings.api, read_bytes=READ_BYTES)
        try:
            with self.pace.slot(), open_session(api) as session:
                fetch(span, session, api, keep, self.settings.data_dir, on_failure=self.pace.heard)
            return [(span, path) for path in kept]
        except TooLarge as exc:
            for path in kept:
                path.unlink(missing_ok=True)
            return [part for half in halves_of_too_large(span, exc) for part in self.download(half)]
        except BaseException:
            for path in kept:
                path.unlink(missing_ok=True)
            raise


def discard_archives(future) -> None:
    if not future.cancelled() and future.exception() is None:
        for _, zip_path in future.result():
            zip_path.unlink(missing_ok=True)


def leave_signals_to_main_thread() -> None:
    """Python runs signal handlers in the main thread only, and a signal the kernel hands to a worker thread does
    not wake a main thread blocked waiting on a future: so workers (and the threads they start) block them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
