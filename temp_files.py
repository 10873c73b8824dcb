"""A run's temporary files: created, renamed and removed through one door, which a stop signal closes.

Download threads create them (archives, a window's file being written); the main thread, on SIGTERM or Ctrl-C,
first closes the door, then removes what is there, so no thread can leave one behind between the two. They are named
TEMP_PREFIX...TEMP_SUFFIX in the data folder, where the next run removes any a killed run left.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import uuid
from pathlib import Path

from windows import Window

log = logging.getLogger("fetch_data")

TEMP_PREFIX = ".ampl-"
TEMP_SUFFIX = ".part"


class Stopping(Exception):
    """The run is stopping on a signal: no new temporary file may appear."""


_temp_files = threading.Lock()
_stopping = threading.Event()


def create_temp_file(path: Path, mode: str = "xb"):
    """A new temporary file (named TEMP_PREFIX...TEMP_SUFFIX), unless the run is stopping.

    The download threads create them; a stop signal, handled on the main thread, first closes this door (under
    the same lock), then removes what exists. A thread can then no longer leave a file behind between the two.
    """
    with _temp_files:
        if _stopping.is_set():
            raise Stopping("the run is stopping")
        return open(path, mode)  # noqa: SIM115 - the caller owns the file


def rename_temp_file(source: Path, target: Path) -> None:
    """A temporary file under another temporary name, unless the run is stopping (the same door as creation)."""
    with _temp_files:
        if _stopping.is_set():
            raise Stopping("the run is stopping")
        os.replace(source, target)


def stop_creating_temp_files() -> None:
    with _temp_files:
        _stopping.set()


def remove_temp_files(data_dir: Path, quiet: bool = False) -> None:
    """Temporary files of an interrupted run; the lock guarantees no running export owns them.

    Only regular files are the exporter's: a folder, a link or a pipe under such a name was put there by someone
    else, and is left alone (a new temporary name never meets it: each holds a random part, and is created only
    if it does not exist).
    """
    for stray in data_dir.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        try:
            mode = stray.lstat().st_mode  # the entry itself, not what a link points to
        except FileNotFoundError:  # on a stop signal, a download thread renamed or removed it meanwhile
            continue
        if not stat.S_ISREG(mode):
            if not quiet:
                log.warning("%s is not a file the exporter made; left alone", stray)
            continue
        if not quiet:
            log.warning("Removing %s, left by an interrupted run", stray)
        stray.unlink(missing_ok=True)


def temp_path_for(data_dir: Path, window: Window, extension: str) -> Path:
    return data_dir / f"{TEMP_PREFIX}{window.label}-{uuid.uuid4().hex[:8]}{extension}{TEMP_SUFFIX}"
