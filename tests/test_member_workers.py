"""Field rules on worker processes: the same lines, types and counts as on the window's own thread, failures named
the same way, the hash key in no command line or environment, and no process left running."""

import collections
import datetime as dt
import gzip
import io
import os
import pickle
import random
import signal
import threading
import zipfile

import pytest

import member_workers
import processes
from amplitude_standin import build_archive, make_event, member_name
from archive import BadEvent, CorruptArchive
from field_rules import FieldRules, Pseudonymiser
from member_workers import LINES, MEMBER_END, Answers, ArchiveReader, MemberWorkers, WorkerFailed
from tests.conftest import hour, processes_running, wait_for
from windows import Window

KEY = "k" * 20 + "-a-secret-of-32+chars"
MAX_EVENT_BYTES = 4 << 20
SPAN = Window(hour("20251101T00"), hour("20251101T05"))
DROPPED, HASHED = ("ip_address", "user_properties.plan", "never_there"), ("user_id", "device_id")


def rules() -> Pseudonymiser:
    return Pseudonymiser(FieldRules(DROPPED, HASHED, KEY.encode()))


def odd_lines(rng: random.Random) -> list[bytes]:
    """Lines the checks and the rules treat each in their own way."""
    return [
        b"\xef\xbb\xbf" + make_event(SPAN.start, 0, 1, rng),  # a byte-order mark
        b"",  # a blank line
        b"   ",
        b'{"event_type":"lone \\ud800","user_id":"\\ud83d","device_id":"d\\u00e9","ip_address":"1.2.3.4"}',
        b'{"event_type":"twice","user_id":"first","user_id":"second","n":123456789012345678901234567890}',
        b'{"event_type":"spaced" , "user_properties" : {"plan" : "pro", "plan": "free"} , "device_id" : null}',
        b'{"event_type":"long","user_id":"u","blob":"' + b"x" * (1_200_000) + b'"}',  # longer than a batch
        b'{"no_type":1,"user_id":7}',
    ]


def write_archive(path, rng: random.Random, bad: bytes | None = None) -> None:
    """Six hours of two parts each (gzip and plain), an hour outside the window, and a member that is not data."""
    members = []
    for number, when in enumerate(SPAN.start + dt_hours(h) for h in range(SPAN.hours)):
        for part in range(2):
            lines = [make_event(when, part, index, rng) for index in range(rng.randrange(0, 80))]
            if number == 2 and part == 1:
                lines[5:5] = odd_lines(rng)
            if bad is not None and number == 3 and part == 0:
                lines[4:4] = [bad]
            data = b"\n".join(lines) + b"\n"
            name = member_name(when, part)
            members.append((name, gzip.compress(data, 1)) if part == 0 else (name.removesuffix(".gz"), data))
    members.append((member_name(SPAN.end + dt_hours(2), 0), gzip.compress(make_event(SPAN.end, 0, 3, rng) + b"\n")))
    members.append(("__MACOSX/._notes", b"not data"))
    rng.shuffle(members)
    path.write_bytes(build_archive(members))


def dt_hours(count: int) -> dt.timedelta:
    return dt.timedelta(hours=count)


def read_all(path, workers=None, pseudonymiser=None, separator=b",\n"):
    pseudonymiser = pseudonymiser or rules()
    reader = ArchiveReader(pseudonymiser, MAX_EVENT_BYTES, workers)
    return lines_of(reader.batches(path, SPAN, separator), separator), pseudonymiser.events, pseudonymiser.unmatched()


def lines_of(batches, separator=b",\n") -> list[tuple]:
    """(member, line, event type) of every event in these batches, their blocks cut at the separator."""
    return [(member, line, kind) for member, block, types in batches
            for line, kind in zip(block.split(separator) if types else [], types, strict=True)]


@pytest.fixture
def workers():
    pool = MemberWorkers(rules(), 2)
    yield pool
    pool.close()


def started_processes(workers: MemberWorkers) -> list:
    assert workers.take()
    workers.give_back()
    return list(workers.processes)


def answer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "rules-worker-answers"]


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_workers_give_the_lines_types_and_counts_the_windows_thread_gives(tmp_path, workers, seed):
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(seed))
    here = read_all(path)
    there = read_all(path, workers, workers.rules)
    assert len(workers.processes) == 2  # they did the work, and stay for the next archive
    assert there == here
    assert here[1] > 300 and here[2] == ["never_there"]
    assert any(b"\\ud800" in line for _, line, _ in here[0])  # the odd lines went through
    # A second archive on the same processes, and the counts add up.
    again = read_all(path, workers, workers.rules)
    assert again[0] == here[0] and again[1] == 2 * here[1]
    assert read_all(path, workers, workers.rules, b"\n")[0] == here[0]  # joined as JSON lines are, too


@pytest.mark.skipif(not hasattr(processes.fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are Linux's")
def test_a_workers_answers_come_through_a_pipe_of_a_megabyte_or_the_systems_own(tmp_path, workers, monkeypatch):
    process = started_processes(workers)[0]
    assert processes.fcntl.fcntl(process.stdout.fileno(), processes.fcntl.F_GETPIPE_SZ) == processes.PIPE_BYTES
    workers.close()
    monkeypatch.setattr(processes, "PIPE_BYTES", 1 << 40)  # over any system's limit: the default pipe, and no error
    process = started_processes(workers)[0]
    assert processes.fcntl.fcntl(process.stdout.fileno(), processes.fcntl.F_GETPIPE_SZ) < processes.PIPE_BYTES
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(4))
    assert read_all(path, workers, workers.rules)[0] == read_all(path)[0]


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_with_room_for_one_answer_in_memory_the_workers_still_give_every_line(tmp_path, workers, monkeypatch):
    monkeypatch.setattr(member_workers, "AHEAD_BYTES", 1)
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(9))
    assert read_all(path, workers, workers.rules)[0] == read_all(path)[0]


def test_answers_past_the_memory_budget_wait_in_a_spill_file_and_come_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(member_workers, "AHEAD_BYTES", 10)
    answers = Answers()
    answers.spill_dir = tmp_path
    batches = [(b"\n".join(b"%d-%d" % (n, i) * (n + 1) for i in range(3)), [f"type {n}"] * 3) for n in range(6)]
    for kind, batch in [(LINES, batches[0]), (LINES, batches[1]), (MEMBER_END, (6, set())), *[(LINES, b) for b in
                                                                                             batches[2:]]]:
        answers.put(kind, batch, len(batch[0]) if kind == LINES else 0)  # never waits: a worker goes on
    assert answers._held == len(batches[0][0])  # the first in memory, every later batch on disk
    assert answers._spilled == 5 and answers._spill_end > 0
    assert list(tmp_path.iterdir()) == []  # a file without a name: nothing to leave behind
    assert answers.get() == (LINES, batches[0])
    assert answers.get() == (LINES, batches[1])
    assert answers.get() == (MEMBER_END, (6, set()))
    answers.put(LINES, batches[0], 1)  # while others still wait on disk: in turn, after them
    assert [answers.get() for _ in range(5)] == [(LINES, b) for b in batches[2:]] + [(LINES, batches[0])]
    assert answers._spilled == 0 and answers._spill_end == 0  # read to its end: emptied
    answers.put(LINES, batches[1], 100)
    answers.put(LINES, batches[2], 100)
    answers.close()
    answers.put(LINES, batches[3], 100)  # a reader still running after its process ended
    assert answers._items == collections.deque() and answers._spill is None


def test_a_bad_line_in_a_workers_member_fails_as_it_does_on_the_windows_thread(tmp_path, workers):
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(4), bad=b'{"event_type":"secret@example.com" oops}')
    with pytest.raises(BadEvent) as here:
        read_all(path)
    started = started_processes(workers)
    with pytest.raises(BadEvent) as there:
        read_all(path, workers, workers.rules)
    assert str(there.value) == str(here.value) and "line 5" in str(here.value)
    assert there.value.without_content() == here.value.without_content()
    assert "secret@example.com" not in there.value.without_content()
    assert all(process.returncode is not None for process in started)
    assert workers.processes == [] and not answer_threads()  # ended: the next archive starts new ones


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_a_damaged_member_is_a_damaged_archive_and_the_next_archive_starts_new_workers(tmp_path, workers):
    good, damaged = tmp_path / "good.zip", tmp_path / "damaged.zip"
    write_archive(good, random.Random(5))
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        victim = max(archive.infolist(), key=lambda info: info.compress_size)
    data[victim.header_offset + 30 + len(victim.filename) + victim.compress_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptArchive) as here:
        read_all(damaged)
    started = started_processes(workers)
    with pytest.raises(CorruptArchive) as there:
        read_all(damaged, workers, workers.rules)
    assert str(there.value) == str(here.value)
    assert all(process.returncode is not None for process in started)
    assert workers.processes == [] and not answer_threads()
    assert read_all(good, workers, workers.rules)[0] == read_all(good)[0]


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_a_worker_gone_mid_archive_fails_the_window_and_the_next_archive_starts_anew(tmp_path, workers):
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(6))
    assert workers.take()
    second = workers.processes[1]
    os.kill(second.pid, signal.SIGSTOP)  # before it has an archive: it can have answered nothing
    workers.give_back()
    batches = ArchiveReader(workers.rules, MAX_EVENT_BYTES, workers).batches(path, SPAN, b",\n")
    next(batches)  # the first member is the first worker's
    second.kill()
    second.wait()
    with pytest.raises(WorkerFailed, match="^field rules: a field rules worker ended with code -9$"):
        list(batches)
    assert workers.processes == [] and not answer_threads()
    assert read_all(path, workers, workers.rules)[0] == read_all(path)[0]


@pytest.mark.skipif(processes.worker_count() < 2, reason="one core: no workers to start")
def test_workers_that_cannot_start_leave_the_rules_to_the_windows_thread_with_one_warning(tmp_path, monkeypatch,
                                                                                          caplog):
    def no_process(*args):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(member_workers, "start_process", no_process)
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(10))
    pool = MemberWorkers.for_run(rules())
    assert pool is not None and pool.processes == []
    assert read_all(path, pool, pool.rules)[0] == read_all(path)[0]
    assert read_all(path, pool, pool.rules)[0] == read_all(path)[0]
    warnings = [r.getMessage() for r in caplog.records if "no worker process could start" in r.getMessage()]
    assert warnings == ["Field rules: no worker process could start ([Errno 11] Resource temporarily unavailable); "
                        "the download threads apply them"]


def test_the_hash_key_is_in_no_workers_command_line_or_environment(workers):
    assert workers.take()
    try:
        for process in workers.processes:
            for part in ("cmdline", "environ"):
                with open(f"/proc/{process.pid}/{part}", "rb") as seen:
                    assert KEY.encode() not in seen.read()
    finally:
        workers.give_back()


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_a_window_that_finds_the_workers_busy_reads_its_archive_on_its_own_thread(tmp_path, workers):
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(7))
    assert workers.take()  # another window's archive
    try:
        started = [process.pid for process in workers.processes]
        assert read_all(path, workers, workers.rules)[0] == read_all(path)[0]
        assert [process.pid for process in workers.processes] == started
    finally:
        workers.give_back()


def test_an_archive_abandoned_half_read_ends_the_workers_and_their_readers(tmp_path, workers):
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(8))
    batches = ArchiveReader(workers.rules, MAX_EVENT_BYTES, workers).batches(path, SPAN, b",\n")
    next(batches)
    processes = list(workers.processes)
    assert len(processes) == 2 and len(answer_threads()) == 2
    batches.close()  # a failure further on: the writer's disk filled, a signal
    assert workers.processes == [] and not answer_threads()
    assert all(process.returncode is not None for process in processes)
    assert workers.take()  # free for the next archive
    workers.give_back()


@pytest.mark.skipif(processes.worker_count() < 2, reason="one core: field rules run on the download threads")
def test_an_exporter_killed_mid_run_leaves_no_worker_running(cli):
    cli.standin.events_per_part = 50
    cli.standin.add_fault("stall", start="20251102T00", end="20251102T23", seconds=30)
    exporter = cli.start("--start", "2025-11-01", "--end", "20251102T23", "--hash-fields", "user_id",
                         AMP_HASH_KEY=KEY)
    try:
        script = cli.project / "member_workers.py"
        wait_for(lambda: len(processes_running(script)) == 2)  # the first day's archive is read by two workers
        wait_for(lambda: cli.standin.arrived >= 2)  # the run is held on day two
        exporter.kill()
        exporter.wait()
        wait_for(lambda: not processes_running(script))
    finally:
        if exporter.poll() is None:
            exporter.kill()
            exporter.wait()
        exporter.stdout.close()
        exporter.stderr.close()


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_a_write_that_fails_mid_archive_frees_the_workers_at_once(tmp_path, workers):
    import fetch_data
    from settings import parse_settings

    path = tmp_path / "export.zip"
    write_archive(path, random.Random(11))
    settings = parse_settings(["--date", "2025-11-01"], {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"},
                              dt.datetime(2025, 11, 3, tzinfo=dt.UTC))

    class FullDisk:
        tally = None
        separator = b"\n"

        def mark(self):
            return 0

        def write_batch(self, block, hour, types):
            raise OSError(28, "No space left on device")

    reader = ArchiveReader(workers.rules, MAX_EVENT_BYTES, workers)
    with pytest.raises(OSError) as failed:
        fetch_data.write_to_local(path, FullDisk(), settings, reader, SPAN)
    assert workers.processes == [] and not answer_threads()  # ended as the failure left the loop
    assert failed.value.__traceback__ is not None
    assert workers.take()
    workers.give_back()


@pytest.mark.slow  # a few tenths of a second each: kept out of the quick tier
def test_lines_spilled_while_the_writing_waits_come_back_in_order(tmp_path, workers, monkeypatch):
    monkeypatch.setattr(member_workers, "AHEAD_BYTES", 1)
    path = tmp_path / "export.zip"
    write_archive(path, random.Random(14))
    batches = ArchiveReader(workers.rules, MAX_EVENT_BYTES, workers).batches(path, SPAN, b",\n")
    first = next(batches)  # the writing waits here, while the second worker answers for its members
    wait_for(lambda: workers.answers[1]._spilled >= 2)
    assert lines_of([first, *batches]) == read_all(path)[0]
    assert workers.answers[1]._spill_end == 0  # read to its end, and emptied


def frames(*batches) -> io.BytesIO:
    """What a worker writes for these batches of lines, as serve() writes it."""
    out = io.BytesIO()
    for lines in batches:
        pickled, block = pickle.dumps(["t"] * len(lines)), b"\n".join(lines)
        out.write(member_workers.FRAME.pack(LINES, len(pickled), len(block)) + pickled + block)
    return io.BytesIO(out.getvalue())


@pytest.mark.parametrize("refusal", ["TemporaryFile", "pwrite"])
def test_a_spill_file_that_cannot_be_written_ends_the_answers_with_one_line(tmp_path, monkeypatch, refusal):
    def refused(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(member_workers, "AHEAD_BYTES", 1)
    monkeypatch.setattr(member_workers.tempfile if refusal == "TemporaryFile" else member_workers.os, refusal, refused)
    answers = Answers()
    answers.spill_dir = tmp_path
    member_workers.read_answers(frames([b"a", b"b"], [b"c"]), answers)  # the second must wait on disk
    assert answers.get() == (LINES, (b"a\nb", ["t", "t"]))
    assert answers.get() == (member_workers.GONE, f"cannot keep a worker's lines in {tmp_path}: No space left on device")


def test_a_worker_that_ended_mid_frame_ends_its_answers(tmp_path):
    whole = frames([b"a", b"b"], [b"c" * 100]).getvalue()
    answers = Answers()
    member_workers.read_answers(io.BytesIO(whole[:-10]), answers)
    assert answers.get() == (LINES, (b"a\nb", ["t", "t"]))
    assert answers.get() == (member_workers.GONE, None)


def test_a_readers_own_failure_is_the_windows_message():
    pool = MemberWorkers(rules(), 2)
    pool.answers = [Answers(), Answers()]
    pool.answers[0].put(member_workers.GONE, "cannot keep a worker's lines in /data: No space left on device")
    with pytest.raises(WorkerFailed, match="^field rules: cannot keep a worker's lines in /data: No space left on device$"):
        list(pool._member(0))
