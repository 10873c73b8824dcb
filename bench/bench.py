"""Benchmark: fetch_data.py against the floor (curl, then unzip -p | gzip -dc) and the naive in-memory approach.

    .venv/bin/python bench/bench.py                      # 250 MB and 1 GB of events, 3 rounds
    .venv/bin/python bench/bench.py --sizes 250 --rounds 5 --variants json
    .venv/bin/python bench/bench.py --sizes 250 --rate-mb 4 --variants json,workers4 --no-in-memory

Builds a realistic archive per size (cached in bench/work/), serves it from the stand-in on 127.0.0.1, then runs
every command once per round, in a rotated order (see in_turn), and prints medians of wall time and peak RSS (see
LAUNCHER) with ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amplitude_standin import StandIn, make_event, member_name  # noqa: E402

WORK = ROOT / "bench" / "work"
DAY = "2025-11-01"
START, END = "20251101T00", "20251101T23"
PARTS_PER_HOUR = 2
POOL_SIZE = 20_000
# "rules": 3 fields dropped and 2 pseudonymised, Amplitude's usual personal data (see README, Personal data);
# "rules-nested": the same with one dropped field inside user_properties, which costs a nested decode.
RULES = ["--drop-fields", "ip_address,city,country", "--hash-fields", "user_id,device_id"]
RULES_NESTED = ["--drop-fields", "ip_address,city,user_properties.plan", "--hash-fields", "user_id,device_id"]
LAKE = WORK / "out" / "lake-table"  # a new table each round: the out folder is emptied before every command
VARIANTS = {"json": [], "jsonl": ["--format", "jsonl"], "gzip": ["--gzip"], "rules": RULES, "rules-nested": RULES_NESTED,
            "lake": ["--lake", str(LAKE)], "workers4": ["--workers", "4"], "workers5": ["--workers", "5"]}
HASH_KEY = "bench-hash-key-0123456789abcdef0123456789"


def main() -> int:
    args = parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for size_mb in args.sizes:
        archive, events = ensure_archive(size_mb, args.kind)
        with StandIn("bench", "bench", archive_path=archive) as standin:
            standin.bytes_per_second = args.rate_mb * 1_000_000 if args.rate_mb else None
            rows += measure_size(size_mb, events, standin.base_url, args)
    print_table(rows)
    return 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[250, 1000], help="MB of events")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kind", choices=("distinct", "pooled"), default="distinct",
                        help="distinct: every event its own device_id (default); pooled: IDs recur from a pool of 20,000")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS), help=",".join(VARIANTS))
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory reference")
    parser.add_argument("--rate-mb", type=float, default=None,
                        help="the stand-in sends each answer at most this many MB/s (Amplitude builds big zips slowly)")
    return parser.parse_args()


def ensure_archive(size_mb: int, kind: str) -> tuple[Path, int]:
    """The benchmark's archive for size_mb and kind, built once and cached in bench/work/."""
    archive = WORK / f"export_{size_mb}mb_{kind}.zip"
    count_file = archive.with_suffix(".events")
    if not (archive.exists() and count_file.exists()):
        print(f"building {archive} ...", file=sys.stderr)
        count_file.write_text(str(build_archive_file(archive, size_mb, distinct=kind == "distinct")))
    return archive, int(count_file.read_text())


def build_archive_file(archive: Path, size_mb: int, level: int = 6, distinct: bool = False) -> int:
    """About size_mb MB of realistic event lines for one day; returns the event count.

    Pooled: 24 hours x 2 parts, events from a pool of 20,000, so IDs recur as a day's active users do. Distinct:
    24 members of one hour each, every event with a device_id of its own, which no pseudonym cache helps with.
    """
    rng = random.Random(size_mb)
    first = dt.datetime.strptime(DAY, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    pool = [make_event(first, i % 2, i, rng, complete=True) for i in range(POOL_SIZE)]
    parts = 1 if distinct else PARTS_PER_HOUR
    per_member = size_mb * 1_000_000 // (24 * parts)
    events = 0
    lines = itertools.cycle(pool)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for hour, part in itertools.product(range(24), range(parts)):
            chunk, size = [], 0
            while size < per_member:
                line = next(lines)
                if distinct:
                    line = with_own_device_id(line, events + len(chunk))
                chunk.append(line)
                size += len(line) + 1
            events += len(chunk)
            name = member_name(first + dt.timedelta(hours=hour), part)
            out.writestr(name, gzip.compress(b"\n".join(chunk) + b"\n", level))
    return events


DEVICE_ID = re.compile(rb'"device_id": ?"[0-9a-f]{16}"')


def with_own_device_id(line: bytes, number: int) -> bytes:
    return DEVICE_ID.sub(b'"device_id":"%016x"' % (0xD5C0000000000 + number), line, count=1)


def measure_size(size_mb: int, events: int, base_url: str, args) -> list[dict]:
    env = dict(os.environ, AMP_API_KEY="bench", AMP_SECRET_KEY="bench", AMP_BASE_URL=base_url, AMP_HASH_KEY=HASH_KEY)
    with_bytecode_cache(env)
    url = f"{base_url}/api/2/export?start={START}&end={END}"
    out = WORK / "out"
    commands = {"floor": floor_command(url, out)}
    for variant in args.variants:
        commands[f"fetch_data {variant}"] = [
            sys.executable, str(ROOT / "fetch_data.py"), "--date", DAY, "--data-dir", str(out / variant),
            "--log-dir", str(out / "logs"), "--refetch", *VARIANTS[variant],
        ]
    if not args.no_in_memory:
        commands["in-memory approach"] = [
            sys.executable, str(ROOT / "bench" / "in_memory_reference.py"), base_url + "/api/2/export", START, END,
            str(out / "in_memory.json"),
        ]
    results = {name: [] for name in commands}
    # Unmeasured, once: the first command to fetch the archive would read it from disk, every later one from memory.
    warm_up(commands["floor"], env, out)
    for round_number in range(args.rounds):
        for name, command in in_turn(commands, round_number):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            results[name].append(run_measured(command, env))
            check_output(name, out, events)
            print(f"{size_mb} MB round {round_number + 1}: {name}: {results[name][-1]}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    floor = median_of(results["floor"])
    in_memory = median_of(results["in-memory approach"]) if "in-memory approach" in results else None
    rows = []
    for name, samples in results.items():
        wall, rss = median_of(samples)
        rows.append({
            "size": f"{size_mb} MB", "command": name, "wall": wall, "rss": rss,
            "vs_floor": wall / floor[0], "vs_in_memory": wall / in_memory[0] if in_memory else None,
        })
    return rows


def warm_up(command: list[str], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(out, ignore_errors=True)


def in_turn(commands: dict, round_number: int) -> list:
    """The commands in a rotated order, each round starting one further on.

    A command's time depends on the one before it: this machine's disk is slower or quicker to write just after a
    large file was written or deleted (the first command after the floor came out a sixth slower, whichever it
    was). Rotating gives every command each place in turn, so no command always follows the same one.
    """
    items = list(commands.items())
    start = round_number % len(items)
    return items[start:] + items[:start]


def with_bytecode_cache(env: dict) -> None:
    """Python as users run it: modules compiled once and cached, not compiled again by every run.

    Some environments (containers, CI images) set PYTHONDONTWRITEBYTECODE, which makes every run compile the
    project's modules anew (about 0.1 s here). The cache goes to bench/work/pycache, and is filled before the first
    round, so that no round pays for it.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-l", str(ROOT)], env=env, check=True)


def floor_command(url: str, out: Path) -> list[str]:
    script = (
        f'curl -sfS -u bench:bench -o "{out}/floor.zip" "{url}" && '
        f'unzip -p "{out}/floor.zip" | gzip -dc > "{out}/floor.jsonl"'
    )
    return ["bash", "-o", "pipefail", "-c", script]


# A small launcher starts each command: a child started straight from this process (which holds the stand-in
# and the archive builder's memory) would report this process's RSS as its own peak. wait4's ru_maxrss is the peak
# of the biggest single process; processes that run side by side (the lake's conversion workers, a shell pipeline)
# add up, so the launcher also samples the sum of the RSS of the command's whole process tree every 50 ms, and the
# larger of the two is reported. The sum counts the pages that processes share once for each: it errs high.
LAUNCHER = """
import os, subprocess, sys, threading, time

def tree_rss_kb(pid):
    # The RSS of a process and its descendants, found through /proc/PID/task/TID/children.
    total = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                total += sum(tree_rss_kb(int(child)) for child in children.read().split())
    except (OSError, StopIteration):
        pass  # it ended meanwhile
    return total

began = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak, done = [0], threading.Event()

def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], tree_rss_kb(child.pid))

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - began
done.set()
sampler.join()
print(wall, max(usage.ru_maxrss, peak[0]), os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], env: dict, expected_status: int = 0) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB (the larger of wait4's ru_maxrss and the sampled sum over the process tree)."""
    launched = subprocess.run([sys.executable, "-c", LAUNCHER, *command], env=env, capture_output=True, text=True)
    wall, max_rss_kb, status = launched.stdout.split()
    if int(status) != expected_status:
        raise SystemExit(f"{command[:3]} failed: {launched.stderr[-2000:]}")
    return round(float(wall), 3), round(int(max_rss_kb) / 1024, 1)


def check_output(name: str, out: Path, events: int) -> None:
    """Each command must have produced every event, so no row is fast by skipping work."""
    if name == "floor":
        produced = (out / "floor.jsonl").read_bytes().count(b"\n")
    elif name == "in-memory approach":
        produced = events if (out / "in_memory.json").stat().st_size > 0 else 0
    else:
        manifest = next(out.glob("*/manifest.jsonl"))
        produced = int(manifest.read_text().split('"events":')[1].split(",")[0])
    if produced != events:
        raise SystemExit(f"{name}: {produced} events, expected {events}")
    if name == "fetch_data lake":
        from deltalake import DeltaTable

        rows = DeltaTable(LAKE).count()
        if rows != events:
            raise SystemExit(f"{name}: {rows} rows in the table, expected {events}")


def median_of(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def print_table(rows: list[dict]) -> None:
    print("| size | command | wall s (median) | peak RSS MB (median) | wall / floor | wall / in-memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        in_memory = f"{row['vs_in_memory']:.2f}" if row["vs_in_memory"] is not None else "-"
        cells = [row["size"], row["command"], f"{row['wall']:.2f}", f"{row['rss']:.0f}", f"{row['vs_floor']:.2f}", in_memory]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
