"""lake_convert and lake_worker: a file shared out in chunks among worker processes, and put back together in
the file's order."""

import gzip
import io
import os
import random
import subprocess

import pyarrow as pa
import pytest

import lake_convert
import lake_schema
import lake_worker
import processes
from tests.conftest import hour
from tests.test_lake import ODD_LINES, standin_lines


@pytest.fixture
def started(monkeypatch) -> list[subprocess.Popen]:
    """The worker processes the test starts, as they start."""
    processes = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: processes.append(popen(*a, **k)) or processes[-1])
    return processes


def file_of(lines: list[bytes], kind: str, trailing_newline: bool = True) -> bytes:
    """A file as the exporter writes it: a JSON array (one event a line) or JSON lines."""
    if kind == "json":
        text = b"[\n" + b",\n".join(lines) + b"\n]" if lines else b"[]"
    else:
        text = b"\n".join(lines)
    return text + b"\n" if trailing_newline else text


def converted(path, workers, chunk_bytes):
    """The file's batches from workers of their own, ended with the last batch or with the reader."""
    pool = lake_convert.Workers(workers, chunk_bytes)
    try:
        yield from pool.converted(path)
    finally:
        pool.close()


def round_robin(path, workers, chunk_bytes) -> list[list[bytes]]:
    """The workers' chunks in the parent's order, each worker run in this process."""
    streams = [[lake_worker.event_lines_of(text) for text in lake_worker.owned_chunks(path, worker, workers, chunk_bytes)]
               for worker in range(workers)]
    counts = [len(stream) for stream in streams]
    assert counts == sorted(counts, reverse=True) and counts[0] - counts[-1] <= 1  # turns stay in step
    return [streams[turn % workers][turn // workers] for turn in range(sum(counts))]


def random_lines(rng: random.Random, count: int) -> list[bytes]:
    """Events of lengths from a few bytes to several chunks."""
    return [b'{"event_type":"e%d","event_properties":{"pad":"%s"}}' % (index, b"x" * rng.choice([0, 3, 40, 300, 2500]))
            for index in range(count)]


SLOW = pytest.mark.slow  # the other layouts: the full suite runs them, the quick tier one


@pytest.mark.parametrize("kind", ["json", pytest.param("jsonl", marks=SLOW), pytest.param("json.gz", marks=SLOW)])
def test_every_worker_count_and_chunk_size_gives_back_every_line_once_in_order(tmp_path, kind):
    rng = random.Random(kind)
    for case in range(60):
        lines = random_lines(rng, rng.choice([0, 1, 2, 7, 40]))
        data = file_of(lines, kind.split(".")[0], trailing_newline=rng.random() < 0.8)
        path = tmp_path / f"f{case}.{kind}"
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
        chunk_bytes = rng.choice([1, 2, 7, 64, 500, 4096, 1 << 20])
        workers = rng.choice([1, 2, 3, 4])
        chunks = round_robin(path, workers, chunk_bytes)
        assert [line for chunk in chunks for line in chunk] == lines, (case, chunk_bytes, workers)
        assert len(chunks) == max(1, -(-len(data) // chunk_bytes)) if data else len(chunks) == 0


def test_a_line_longer_than_several_chunks_comes_whole_in_the_chunk_it_starts_in(tmp_path):
    lines = [b'{"a":1}', b'{"b":"' + b"y" * 100 + b'"}', b'{"c":3}']
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    chunks = round_robin(path, 3, 10)  # lines start at bytes 0, 8 and 117; the file has 125
    assert len(chunks) == 13
    assert chunks[0] == [lines[0], lines[1]]
    assert chunks[11] == [lines[2]]
    assert all(chunk == [] for chunk in chunks[1:11] + chunks[12:])  # no line starts in these


def test_a_byte_order_mark_and_blank_lines_are_left_out_as_when_exporting():
    assert lake_worker.event_lines_of(b'\xef\xbb\xbf{"a":1},\n\n[\n]\n{"b":2}') == [b'{"a":1}', b'{"b":2}']


def batches_of(path, workers, chunk_bytes) -> tuple[pa.Table, int]:
    found = list(converted(path, workers, chunk_bytes))
    table = pa.Table.from_batches([batch for batch, _ in found], lake_schema.EVENT_SCHEMA)
    return table, sum(misfits for _, misfits in found)


@pytest.mark.parametrize("kind", ["json", pytest.param("jsonl.gz", marks=SLOW)])
def test_worker_processes_give_the_same_rows_and_misfits_as_one_process(tmp_path, kind):
    lines = standin_lines(1200) + ODD_LINES * 10
    path = tmp_path / f"f.{kind}"
    data = file_of(lines, kind.split(".")[0])
    path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    alone = lake_worker.Converter()
    expected = lake_worker.Converter().events(lines)
    alone.events(lines)
    assert lake_convert.workers_for(path, 3, 48 << 10) == 3
    for workers in (1, 2, 3):  # 1: this process, the others: as many workers
        table, misfits = batches_of(path, workers, 48 << 10)
        assert table.num_rows == len(lines)
        assert table.equals(pa.Table.from_batches([expected]))
        assert misfits == alone.misfits > 0


def test_a_file_that_is_not_events_fails_with_the_workers_one_line_and_no_process_left(tmp_path, started):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a":1}\n' * 5000 + b"not json\n" + b'{"a":1}\n' * 5000)
    with pytest.raises(lake_convert.ConversionFailed, match=r"^DecodeError: JSON is malformed"):
        list(converted(path, 2, 4096))
    assert len(started) == 2 and all(process.returncode is not None for process in started)


def test_a_reader_that_stops_early_leaves_no_worker_running(tmp_path, started):
    path = tmp_path / "f.jsonl"
    path.write_bytes(file_of(standin_lines(4000), "jsonl"))
    batches = converted(path, 2, 8192)
    next(batches)
    batches.close()
    assert len(started) == 2 and all(process.returncode is not None for process in started)


def test_read_fully_waits_for_short_reads():
    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self.data = data

        def read(self, size=-1):
            piece, self.data = self.data[:min(3, size)], self.data[min(3, size):]
            return piece

    stream = Trickle(b"0123456789")
    assert lake_worker.read_fully(stream, 7) == b"0123456"
    assert lake_worker.read_fully(stream, 7) == b"789"
    assert lake_worker.read_fully(stream, 7) == b""


def test_hours_are_added_by_the_parent_in_the_files_order():
    events = lake_worker.Converter().events([b'{"event_type":"a"}', b'{"event_type":"b"}', b'{"event_type":"c"}'])
    batch = lake_schema.with_hours(events, [(hour("20251101T03"), 1), (hour("20251101T04"), 2)])
    assert batch.schema == lake_schema.SCHEMA
    assert [row["export_hour"].hour for row in batch.to_pylist()] == [3, 4, 4]
    with pytest.raises(ValueError):
        lake_schema.with_hours(events, [(hour("20251101T03"), 2)])


@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl.gz"])
def test_chunks_decoded_whole_give_the_rows_of_the_lines_one_by_one(tmp_path, kind):
    lines = standin_lines(600) + ODD_LINES + standin_lines(200, seed=8)
    expected = pa.Table.from_batches([lake_worker.Converter().events(lines)])
    data = file_of(lines, kind.split(".")[0])
    path = tmp_path / f"f.{kind}"
    path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    for chunk_bytes in (9_000, 100_000, 1 << 20):
        batches = [batch for batch, _ in lake_worker.owned_batches(path, 0, 1, chunk_bytes)]
        assert pa.Table.from_batches(batches, lake_schema.EVENT_SCHEMA).equals(expected), chunk_bytes


def test_an_array_text_is_only_taken_when_each_line_is_one_event():
    assert lake_worker.array_of(b'[\n{"a":1},\n{"b":2}\n]\n', False) == (b'[{"a":1},\n{"b":2}]', 2)
    assert lake_worker.array_of(b'{"a":1},\n{"b":2},\n', False) == (b'[{"a":1},\n{"b":2}]', 2)
    assert lake_worker.array_of(b'{"a":1}\n{"b":2}\n', True) == (b'[{"a":1},{"b":2}]', 2)
    assert lake_worker.array_of(b'{"a":1}\n{"b":2}', True) == (b'[{"a":1},{"b":2}]', 2)
    assert lake_worker.array_of(b'[\n{"a":1}\n{"b":2}\n', True) == (b'[{"a":1},{"b":2}]', 2)
    assert lake_worker.array_of(b'{"a":1},\n{"b":2}\n]', False) == (b'[{"a":1},\n{"b":2}]', 2)
    assert lake_worker.array_of(b"[]\n", False) == lake_worker.array_of(b"[\n]\n", False) == (None, 0)
    assert lake_worker.array_of(b"\n", True) == (None, 0)
    converter = lake_worker.Converter()
    two_on_a_line = lake_worker.array_of(b'{"event_type":"a"},{"event_type":"b"}\n', True)
    assert converter.events_of_array(*two_on_a_line) is None  # one line, two events: line by line, where it fails
    assert converter.events_of_array(b'[{"event_type":"a"},{"event_type":"b"}]', 2).num_rows == 2


def test_a_worker_killed_midway_fails_the_conversion_with_one_line(tmp_path, started):
    path = tmp_path / "f.json"
    path.write_bytes(file_of(standin_lines(3000), "json"))
    batches = converted(path, 2, 4096)  # hundreds of chunks: no worker can finish ahead of its reader
    next(batches)
    started[1].kill()
    with pytest.raises(lake_convert.ConversionFailed, match=r"^a conversion worker ended with code -9$"):
        list(batches)
    assert all(process.returncode is not None for process in started)


@pytest.mark.slow
def test_workers_started_once_convert_file_after_file_and_start_anew_after_a_failure(tmp_path):
    lines = standin_lines(1500)
    good, bad = tmp_path / "good.json", tmp_path / "bad.jsonl"
    good.write_bytes(file_of(lines, "json"))
    bad.write_bytes(b'{"a":1}\n' * 20000 + b"not json\n")
    expected = pa.Table.from_batches([lake_worker.Converter().events(lines)])
    pool = lake_convert.Workers(2, 32 << 10)
    pool.start()
    first = [process.pid for process in pool.processes]
    for _ in range(3):
        batches = [batch for batch, _ in pool.converted(good)]
        assert pa.Table.from_batches(batches, lake_schema.EVENT_SCHEMA).equals(expected)
        assert [process.pid for process in pool.processes] == first  # the same processes, file after file
    with pytest.raises(lake_convert.ConversionFailed, match="DecodeError"):
        list(pool.converted(bad))
    assert pool.processes == []  # ended with the failure
    batches = [batch for batch, _ in pool.converted(good)]
    assert pa.Table.from_batches(batches, lake_schema.EVENT_SCHEMA).equals(expected)
    started = pool.processes
    assert started and not set(first) & {process.pid for process in started}
    pool.close()
    assert pool.processes == [] and all(process.returncode is not None for process in started)


def test_without_processes_to_be_had_the_file_is_converted_here_with_a_warning(tmp_path, monkeypatch, caplog):
    def refused(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", refused)
    lines = standin_lines(300)
    path = tmp_path / "f.json"
    path.write_bytes(file_of(lines, "json"))
    pool = lake_convert.Workers(2, 8192)
    batches = [batch for batch, _ in pool.converted(path)]
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches([lake_worker.Converter().events(lines)]))
    assert pool.used == 1 and pool.processes == []
    assert "no conversion worker could start (" in caplog.text


def test_a_worker_gone_between_files_fails_that_file_only(tmp_path):
    lines = standin_lines(600)
    path = tmp_path / "f.json"
    path.write_bytes(file_of(lines, "json"))
    pool = lake_convert.Workers(2, 16 << 10)
    pool.start()
    if hasattr(processes.fcntl, "F_GETPIPE_SZ"):  # batches of megabytes cross in a turn or two (Linux)
        assert processes.fcntl.fcntl(pool.processes[0].stdout.fileno(), processes.fcntl.F_GETPIPE_SZ) == \
            processes.PIPE_BYTES
    pool.processes[1].kill()
    pool.processes[1].wait()
    with pytest.raises(lake_convert.ConversionFailed, match="ended with code -9"):
        list(pool.converted(path))
    assert pool.processes == []
    assert sum(batch.num_rows for batch, _ in pool.converted(path)) == len(lines)
    pool.close()


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_a_cpu_quota_of_the_control_group_caps_the_workers(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert processes.cpu_quota(tmp_path) == quota
    cores = len(os.sched_getaffinity(0))
    expected = max(1, min(processes.MAX_WORKERS, cores, int(quota) if quota is not None else cores))
    assert processes.worker_count(tmp_path) == expected
    if quota is not None and quota < 2:
        assert processes.worker_count(tmp_path) == 1  # one CPU's worth: the exporter converts alone
