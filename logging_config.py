"""Logging for fetch_data.py: one timestamped file per run, mirrored to stderr."""

import datetime as dt
import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


def setup_logging(log_outpath="logs", log_level=logging.INFO, now=None):
    """Send log records to logs/log_YYYYMMDD_HHMMSS.log and stderr; return the log file's path."""
    now = now or dt.datetime.now(dt.UTC)
    folder = Path(log_outpath)
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / f"log_{now:%Y%m%d_%H%M%S}.log"
    formatter = logging.Formatter(LOG_FORMAT)
    handlers = [logging.FileHandler(log_file, encoding="utf-8"), logging.StreamHandler(sys.stderr)]
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(log_level)
    # urllib3 logs full request lines at DEBUG; keep its chatter out of audit logs.
    logging.getLogger("urllib3").setLevel(max(log_level, logging.INFO))
    # The Azure SDK logs every request and its headers at INFO: too much for an audit log.
    logging.getLogger("azure").setLevel(max(log_level, logging.WARNING))
    return log_file
