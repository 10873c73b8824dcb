"""The progress bar: windows and megabytes, on a terminal only; cron and systemd get log lines alone."""

import contextlib
import sys


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
