"""Why members are decompressed on the thread that checks their lines, not on a thread of isal's own.

    .venv/bin/python bench/threads.py

Reads the first eight members of the benchmark's 250 MB archive (built by bench.py and cached in bench/work/) with
isal's plain reader and with its threaded reader, alone and while a Python loop runs on another thread, as the
checking of lines does during an export. A reader that must take the interpreter lock back for every block it
hands over waits behind that loop each time.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import zipfile
from pathlib import Path

from isal import igzip, igzip_threaded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ensure_archive  # noqa: E402

MEMBERS = 8
BLOCK_BYTES = 256 << 10  # the threaded reader's block size as the exporter used it


def main() -> int:
    archive, _ = ensure_archive(250, "distinct")
    with zipfile.ZipFile(archive) as opened:
        members = [opened.read(info) for info in opened.infolist()[:MEMBERS]]
    for name, reader in (("plain reader", plain), ("threaded reader", threaded)):
        alone = seconds_to_read(members, reader)
        with python_loop_running():
            beside_a_loop = seconds_to_read(members, reader)
        print(f"{name}: {alone:.2f} s alone, {beside_a_loop:.2f} s beside a Python loop")
    return 0


def plain(data: bytes):
    return igzip.IGzipFile(fileobj=io.BytesIO(data), mode="rb")


def threaded(data: bytes):
    return igzip_threaded.open(io.BytesIO(data), "rb", threads=1, block_size=BLOCK_BYTES)


def seconds_to_read(members: list[bytes], reader) -> float:
    started = time.perf_counter()
    for data in members:
        with reader(data) as stream:
            while stream.read(1 << 20):
                pass
    return time.perf_counter() - started


class python_loop_running:
    """A thread that runs Python without pause, as the checking of lines does."""

    def __enter__(self):
        self.stop = False
        self.thread = threading.Thread(target=self.spin)
        self.thread.start()

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()

    def spin(self) -> None:
        count = 0
        while not self.stop:
            count += 1


if __name__ == "__main__":
    sys.exit(main())
