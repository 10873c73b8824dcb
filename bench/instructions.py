"""Instructions an event for the two costliest stages, counted by callgrind: repeatable where wall time is not.

    .venv/bin/python bench/instructions.py                      # both stages
    .venv/bin/python bench/instructions.py "lake conversion"    # one

Wall times on a shared 2-core machine vary by a quarter from one run to the next; callgrind counts the same
instructions for the same code and input whatever else the machine does. Each stage runs on the first hour of the
benchmark's 250 MB archive (built by bench.py and cached in bench/work/), once with no batch and once with two, so
that start-up and imports cancel out. Needs valgrind (Debian's package) and requirements-lake.txt.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from isal import igzip

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ensure_archive  # noqa: E402

SIZE_MB, KIND = 250, "distinct"
ROUNDS = 2
STAGES = {
    # The lake's conversion of one chunk of lines (about lake_convert.CHUNK_BYTES) into a typed record batch, as a
    # worker does it: the lines decoded as one JSON array.
    "lake conversion": 2_600,
    # bench.py's "rules": 3 fields dropped, user_id and device_id pseudonymised, every device_id new.
    "field rules": 4_000,
}


def main() -> int:
    if len(sys.argv) == 4:  # the measured process
        run_stage(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
        return 0
    archive, _ = ensure_archive(SIZE_MB, KIND)
    for stage, events in STAGES.items():
        if len(sys.argv) > 1 and stage not in sys.argv[1:]:
            continue
        counted = [count_instructions(stage, rounds, archive) for rounds in (0, ROUNDS)]
        print(f"{stage}: {(counted[1] - counted[0]) // (ROUNDS * events):,} instructions an event")
    return 0


def count_instructions(stage: str, rounds: int, archive: Path) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, __file__, stage, str(rounds), str(archive)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(re.search(r"refs:\s+([\d,]+)", finished.stderr).group(1).replace(",", ""))


def run_stage(stage: str, rounds: int, archive: Path) -> None:
    with zipfile.ZipFile(archive) as opened:
        first = opened.infolist()[0]
        lines = igzip.decompress(opened.read(first)).split(b"\n")[: STAGES[stage]]
    if stage == "lake conversion":
        from lake_worker import Converter

        converter = Converter()
        converter.events(lines[:100])  # decoders built and modules warm before counting starts
        array = b"[" + b",".join(lines) + b"]"
        for _ in range(rounds):
            converter.events_of_array(array, len(lines))
    else:
        from bench import HASH_KEY, RULES
        from field_rules import Pseudonymiser, rules_from

        rules = rules_from(RULES[1], RULES[3], HASH_KEY)
        Pseudonymiser(rules).apply(lines[:10])
        for _ in range(rounds):  # a new one each round: every value new, as on the benchmark's day
            Pseudonymiser(rules).apply(lines)


if __name__ == "__main__":
    sys.exit(main())
