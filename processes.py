"""Worker processes: how many this machine gives us, how one starts and ends, and what it said when it failed.

The lake's conversion (lake_convert) and the field rules (member_workers) each run Python loops that take a day of
events seconds on one core; both share their work out to processes started here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_WORKERS = 2  # see worker_count
CGROUP = Path("/sys/fs/cgroup")
PIPE_BYTES = 1 << 20  # Linux's default upper bound for a pipe that any user may ask for (/proc/sys/fs/pipe-max-size)


def worker_count(cgroup: Path = CGROUP) -> int:
    """One worker a core this process may use, up to MAX_WORKERS; one means the exporter does the work alone.

    The cores it may run on, less any CPU quota of its control group (a container or a Kubernetes pod limited to one
    CPU sees every core of its host, and two workers would then only share that one CPU, with their memory on top).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, min(MAX_WORKERS, cores))


def cpu_quota(cgroup: Path) -> float | None:
    """The CPUs the control group may use (cgroup v2's cpu.max, or v1's CFS quota), None when unlimited or unknown."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def start_process(script: Path, *args: str) -> subprocess.Popen:
    """`python script args...` with pipes to its standard input and output."""
    # Standard error goes to a file (unlinked at once): a pipe nobody reads could fill and stop the worker.
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by end_processes
    try:
        # A session of its own: Ctrl-C in a terminal reaches the exporter, which ends its workers itself.
        process = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    except BaseException:
        errors.close()
        raise
    process.errors = errors
    return process


def widen_pipe(stream) -> None:
    """Let the pipe behind `stream` hold PIPE_BYTES rather than 64 KB, where the system allows it.

    A worker that answers with megabytes otherwise waits for its reader every few dozen events; each wait switches
    both processes out and cools their caches, which cost the field rules' workers a fifth of their time.
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower limit: the default pipe works too
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def end_processes(processes: list[subprocess.Popen]) -> None:
    """End the processes at once, and close their pipes."""
    for process in processes:
        with contextlib.suppress(OSError):
            process.kill()
    for process in processes:
        process.wait()
        for stream in (process.stdin, process.stdout, process.errors):
            with contextlib.suppress(OSError):
                stream.close()


def one_that_ended(processes: list[subprocess.Popen]) -> subprocess.Popen:
    """The worker that has ended, whose message says why a pipe to the workers broke (the first, if none has yet)."""
    return next((process for process in processes if process.poll() is not None), processes[0])


def first_error(process: subprocess.Popen, what: str) -> str:
    """The last line the worker wrote on standard error, once it has ended (a worker whose stream broke off is
    ending: it is given a few seconds to say why). `what` names the worker when it said nothing."""
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.errors.seek(0)
    lines = process.errors.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"{what} ended with code {process.returncode}"
