"""What a run did, for schedulers and monitors: the `--json` summary, the keys of docs/monitoring.md.

The pipeline fills an Outcome as it goes; `summary` turns it into the one JSON object a scheduler reads (Airflow
takes the last line of stdout), which the dead man's switch posts and the metrics file counts.
"""

from __future__ import annotations

import dataclasses

from errors import EXIT_OK, EXIT_USAGE

SCHEMA = 1  # raised when a key changes meaning or goes away; new keys may be added without it


@dataclasses.dataclass
class Outcome:
    mode: str  # export, report or demo
    exit_code: int = EXIT_OK
    start: str | None = None  # the range, YYYYMMDDTHH
    end: str | None = None
    windows_planned: int = 0
    windows_exported: int = 0
    hours_exported: int = 0  # by this run
    hours_already: int = 0  # exported before, skipped
    hours_missing: int = 0  # in the range and not exported after this run
    events: int = 0
    files: list[str] = dataclasses.field(default_factory=list)  # absolute paths of the files written
    bytes: int = 0
    uploaded: int = 0
    lake_version: int | None = None
    failures: list[dict] = dataclasses.field(default_factory=list)  # {"window", "reason"}
    error: str | None = None  # the run's one reason, when it failed as a whole

    def fail(self, window, reason: str) -> None:
        self.failures.append({"window": str(window) if window else None, "reason": reason})


def summary(outcome: Outcome, log_file: str | None, seconds: float) -> dict:
    status = "ok" if outcome.exit_code == EXIT_OK else "usage" if outcome.exit_code == EXIT_USAGE else "failed"
    return {
        "schema": SCHEMA,
        "status": status,
        "exit_code": outcome.exit_code,
        "mode": outcome.mode,
        "range": {"start": outcome.start, "end": outcome.end},
        "windows": {"planned": outcome.windows_planned, "exported": outcome.windows_exported,
                    "failed": sum(1 for failure in outcome.failures if failure["window"])},
        "hours": {"exported": outcome.hours_exported, "already": outcome.hours_already,
                  "missing": outcome.hours_missing},
        "events": outcome.events,
        "files": outcome.files,
        "bytes": outcome.bytes,
        "uploaded": outcome.uploaded,
        "lake_version": outcome.lake_version,
        "failures": outcome.failures,
        "error": outcome.error,
        "log_file": log_file,
        "seconds": round(seconds, 3),
    }
