"""Logging: one timestamped file per run, mirrored to stderr, and text from data made safe to print.

Event types, member names and server answers come from outside: a control character in them could clear a
terminal, and a newline could forge a log line. Every log line passes through one filter that escapes them.
"""

import contextlib
import datetime as dt
import itertools
import logging
import os
import re
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


def setup_logging(log_outpath="logs", log_level=logging.INFO, now=None, quiet=False):
    """Send log records to logs/log_YYYYMMDD_HHMMSS.log and stderr; return the log file's path.

    `quiet` keeps stderr to warnings and errors, so cron mails only when something went wrong.
    """
    now = now or dt.datetime.now(dt.UTC)
    folder = Path(log_outpath)
    folder.mkdir(parents=True, exist_ok=True)
    log_file = new_log_file(folder, now)
    formatter = logging.Formatter(LOG_FORMAT)
    handlers = [LogFileHandler(log_file, encoding="utf-8", errors="backslashreplace"), logging.StreamHandler(sys.stderr)]
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(escape_record)
        root.addHandler(handler)
    if quiet:
        handlers[1].setLevel(logging.WARNING)
    root.setLevel(log_level)
    # urllib3 logs full request lines at DEBUG; keep its chatter out of audit logs.
    logging.getLogger("urllib3").setLevel(max(log_level, logging.INFO))
    # The Azure SDK logs every request and its headers at INFO: too much for an audit log.
    logging.getLogger("azure").setLevel(max(log_level, logging.WARNING))
    return log_file


def new_log_file(folder: Path, now: dt.datetime) -> Path:
    """log_YYYYMMDD_HHMMSS.log, made anew: a run started in the same second as another (a report beside the nightly
    run) gets _2, _3, ..., so that each log holds its own run's lines; a name taken by anything, a link included,
    is passed over."""
    stem = f"log_{now:%Y%m%d_%H%M%S}"
    names = itertools.chain([f"{stem}.log"], (f"{stem}_{number}.log" for number in itertools.count(2)))
    for path in (folder / name for name in names):
        with contextlib.suppress(FileExistsError), open(path, "x"):
            return path


class LogFileHandler(logging.FileHandler):
    """The log file, which gives up quietly when it cannot be written (disk full, file system gone).

    logging's default answer to a failed write is a traceback on stderr for every later line; the run itself is
    fine and stderr still gets every line, so say it once and carry on without the file.
    """

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):
        if self.failed:
            return
        self.failed = True
        reason = sys.exc_info()[1]
        logging.getLogger("fetch_data").error(
            "Cannot write the log file %s (%s); logging to stderr only", self.baseFilename,
            getattr(reason, "strerror", None) or reason,
        )

    def close(self):
        # The buffered lines that could not be written cannot be written now either.
        with contextlib.suppress(OSError):
            super().close()


# C0 and C1 controls (newlines included), lone surrogates, and the marks that reorder text on screen.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def ensure_standard_streams() -> None:
    """Give /dev/null to a standard descriptor the run was started without (`2>&-`, a bare supervisor).

    Python then has no sys.stderr to log to, and the next file opened would be given the free descriptor: a data
    file, into which a library's message to stderr, or a worker process that inherits it, would write.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:  # closed: /dev/null takes its number, then the stream Python could not make
            send_to_devnull(fd)
            stream = open(fd, mode, closefd=False, errors="backslashreplace")  # noqa: SIM115 - kept for the run
            setattr(sys, name, stream)


def print_for_reader(text: str, stream=None) -> None:
    """Print `text` to stdout (or `stream`); a reader that closed it (`| head -1`) wants no more, which is no failure
    of the run: the rest goes nowhere, and the run ends as it would have."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        send_to_devnull(stream.fileno())  # so that Python's own flush at exit does not fail on it either


def send_to_devnull(fd: int) -> None:
    """Point descriptor `fd`, open or closed, at /dev/null."""
    devnull = os.open(os.devnull, os.O_RDWR)
    if devnull != fd:  # a closed fd is the lowest free number when those below it are open: it is taken already
        os.dup2(devnull, fd)
        os.close(devnull)


def printable(text: str) -> str:
    """`text` with every character that could move a cursor, end a line or reorder a line shown as its escape."""
    return UNPRINTABLE.sub(escape_character, text)


def escape_character(found: re.Match) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_record(record: logging.LogRecord) -> bool:
    """A logging filter: the message, arguments filled in, made printable; the record is always kept."""
    message = record.getMessage()
    escaped = printable(message)
    if escaped != message:
        record.msg, record.args = escaped, None
    return True
