"""--lake: the typed Delta table, written by real runs against the stand-in and read back by delta-rs and Polars
(Spark reads it in test_lake_spark.py; Azure paths against Azurite at the end)."""

import datetime as dt
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable

import lake
import lake_batches
import lake_schema
import lake_worker
import processes
from amplitude_standin import make_event, member_name
from errors import UsageError
from settings import parse_settings
from tests.conftest import API_KEY, ROOT, SECRET_KEY, hour, processes_running, wait_for

DAY = ("--date", "2025-11-01")
UTC = dt.UTC


def table_rows(uri, **options) -> list[dict]:
    return DeltaTable(uri, storage_options=options or None).to_pyarrow_table().to_pylist()


def exported_events(cli) -> list[dict]:
    """Every event of the current export files, as json.loads gives them."""
    events = []
    for record in cli.manifest():
        if "events" in record and (cli.data / record["file"]).exists():
            text = (cli.data / record["file"]).read_text()
            events += json.loads(text) if record["file"].endswith(".json") else [json.loads(x) for x in text.splitlines()]
    return events


def canonical(events) -> list[str]:
    return sorted(json.dumps(event, sort_keys=True) for event in events)


def parquet_codecs(table) -> set[str]:
    """The compression of every column chunk of every Parquet file under the table's folder."""
    import pyarrow.parquet as pq

    codecs = set()
    for path in table.rglob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        codecs |= {metadata.row_group(group).column(column).compression
                   for group in range(metadata.num_row_groups) for column in range(metadata.num_columns)}
    return codecs


def lake_lines(cli) -> list[dict]:
    return [line for line in cli.manifest() if "table_id" in line]


# The schema: every event rebuilt from its row.


def standin_lines(count=2000, seed=7, complete=False):
    rng = random.Random(seed)
    start = hour("20251101T00")
    return [make_event(start, index % 2, index, rng, complete=complete) for index in range(count)]


ODD_LINES = [
    b'{"event_type":"a","newkey":{"a": 1},"app":1}',
    b'{"event_type":"b","paying":"yes","location_lat":52,"event_id":"x","user_id":null,"is_attribution_event":false}',
    b'{"event_type":"\\ud800x","event_time":"2022-02-31 00:00:00.000000","user_id":"\\"q\\u00e9",'
    b'"amplitude_id":99999999999999999999}',
    b'{"event_type":"c","event_time":"2022-01-01T00:00:00","amplitude_id":-9223372036854775808,'
    b'"session_id":9223372036854775808,"data":null,"groups":[1,2.50,1e5],"event_properties":{}}',
    b'{"event_type":"d","\\ud801k":1, "e\\u0301":true, "$schema":12, "sample_rate":null}',
    b'{"event_type":"e","user_id":"first","user_id":"second","location_lng":-1.5e-3}',
    b'{"event_type":"f","event_time":"2025-11-01 00:00:06.000001","amplitude_id":9223372036854775807,"app":-0}',
]


def test_every_event_of_the_archives_rebuilds_from_its_row():
    converter = lake_worker.Converter()
    # The benchmark's events (complete) carry all seven timestamps and the location as well.
    for lines in (standin_lines(), standin_lines(500, seed=11, complete=True), ODD_LINES,
                  standin_lines(300, seed=3) + ODD_LINES):
        batch = lake_schema.with_hours(converter.events(lines), [(hour("20251101T00"), len(lines))])
        assert batch.schema == lake_schema.SCHEMA
        rebuilt = [lake_schema.rebuild_event(row) for row in batch.to_pylist()]
        assert rebuilt == [json.loads(line) for line in lines]


ODD_VALUES = ['0', '-0', '-0.0', '1.10', '5e0', '1E-7', '4.9e-324', '1e308', '9007199254740992', '9007199254740993',
              '9223372036854775807', '-9223372036854775808', '9223372036854775808', '12345678901234567890123', 'true',
              'false', 'null', '""', '" "', '"x"', '"5"', '"\\u00e9"', '"\\u0000"', '"\\ud800"', '"\\ud83d\\ude00"',
              '"\\n\\t\\"\\\\"', '"2025-11-01 00:00:06.000001"', '"2025-11-01T00:00:06.000001"',
              '"0000-01-01 00:00:00.000000"', '"9999-12-31 23:59:59.999999"', '{}', '[]', '{"a":1}', '[1,"2",{"b":null}]']
ODD_KEYS = [*lake_schema.DOCUMENTED, "$schema", "sample_rate", "new_key", "\u00e9", "", "insert_id", "other_fields",
            "absent_fields", "export_hour"]


def test_any_value_under_any_key_rebuilds_as_sent():
    """Events of random keys, each with a value of a random JSON type and edge (sign, size, precision, escapes,
    times of other shapes), in one batch and each in a batch of its own: every one rebuilds as json.loads reads
    it, and what a column cannot hold exactly (an integer past 2**53 in a float column) stays as sent."""
    rng = random.Random(5)
    lines = []
    for _ in range(500):
        keys = rng.sample(ODD_KEYS, rng.randint(0, 12))
        lines.append(("{" + ",".join(f"{json.dumps(key)}:{rng.choice(ODD_VALUES)}" for key in keys) + "}").encode())
    lines.append(b'{"location_lat":9007199254740993,"location_lng":52,"event_type":"big"}')
    for batch_lines in [lines] + [[line] for line in lines[-60:]]:
        batch = lake_worker.Converter().events(batch_lines)
        rows = lake_schema.with_hours(batch, [(hour("20251101T00"), len(batch_lines))]).to_pylist()
        assert [lake_schema.rebuild_event(row) for row in rows] == [json.loads(line) for line in batch_lines]
    assert rows[0]["location_lat"] is None and rows[0]["location_lng"] == 52.0
    assert json.loads(rows[0]["other_fields"]) == {"location_lat": 9007199254740993}


def test_the_benchmarks_events_fill_their_typed_columns():
    lines = standin_lines(200, seed=11, complete=True)
    rows = lake_worker.Converter().events(lines).to_pylist()
    assert all(row[lake_schema.OTHER_FIELDS] is None for row in rows)  # nothing misfit, nothing unknown
    for key in (*lake_schema.TIMESTAMPS, "location_lat", "location_lng"):
        values = [row[lake_schema.column_of(key)] for row in rows]
        assert None not in values and len(set(values)) > 100, key


def test_a_row_names_the_same_absent_keys_whether_or_not_its_batch_agrees():
    """A batch whose events all lack the same keys gets one absent_fields text; a mixed batch joins it row by row."""
    uniform = [b'{"event_type":"a","city":"x","event_properties":{}}',
               b'{"event_type":"b","city":null,"event_properties":{"k":1}}']
    mixed = [*uniform, b'{"event_type":"c"}']

    def rows(lines):
        events = lake_worker.Converter().events(lines)
        return lake_schema.with_hours(events, [(hour("20251101T00"), len(lines))]).to_pylist()

    assert [row["absent_fields"] for row in rows(uniform)] == [row["absent_fields"] for row in rows(mixed)[:2]]
    absent = json.loads(rows(mixed)[2]["absent_fields"])
    assert {"city", "event_properties"} <= set(absent) and "event_type" not in absent
    assert "city" not in json.loads(rows(uniform)[0]["absent_fields"])
    complete = b"{" + b",".join(b'"%s":null' % key.encode() for key in lake_schema.DOCUMENTED) + b"}"
    assert [row["absent_fields"] for row in rows([complete, complete])] == [None, None]


def test_values_get_their_natural_types_and_misfits_are_kept_as_json():
    converter = lake_worker.Converter()
    rows = lake_schema.with_hours(converter.events(ODD_LINES), [(hour("20251101T05"), len(ODD_LINES))]).to_pylist()
    assert rows[1]["paying"] is None and json.loads(rows[1]["other_fields"]) == {"paying": "yes", "event_id": "x"}
    assert rows[1]["location_lat"] == 52.0 and rows[1]["is_attribution_event"] is False
    assert rows[2]["event_time"] is None and rows[2]["amplitude_id"] is None and rows[2]["user_id"] == '"qé'
    assert rows[3]["amplitude_id"] == -(2**63) and rows[3]["session_id"] is None
    assert rows[3]["groups"] == "[1,2.50,1e5]" and rows[3]["event_properties"] == "{}" and rows[3]["data"] is None
    assert "data" not in json.loads(rows[3]["absent_fields"])  # null, not missing
    assert rows[6]["event_time"] == dt.datetime(2025, 11, 1, 0, 0, 6, 1, tzinfo=UTC)
    assert rows[6]["amplitude_id"] == 2**63 - 1
    assert json.loads(rows[4]["other_fields"]) == {"e\u0301": True, "$schema": 12, "sample_rate": None, "\ud801k": 1}
    assert all(row["export_hour"] == hour("20251101T05") for row in rows)
    assert all(row["export_date"] == dt.date(2025, 11, 1) for row in rows)
    # paying and event_id (line 1), event_type, event_time and amplitude_id (line 2), event_time and
    # session_id (line 3): seven values that do not fit their column.
    assert converter.misfits == 7


def test_a_time_is_typed_only_when_it_is_amplitudes_shape_and_a_real_time():
    """Near misses of `YYYY-MM-DD hh:mm:ss.ffffff`, all in one batch (the careful path), and each of Amplitude's
    length beside a good time (which the quick check by length and space may take): typed exactly when it rebuilds
    as sent, else kept as JSON."""
    rng = random.Random(11)
    good = "2025-11-01 00:00:06.000001"
    alphabet = "0123456789 -:.TZ+/,x\u0661\u00e9"
    texts = ["2025-11-01T00:00:06.000001", "2025-02-31 00:00:00.000000", "2025-11-01 24:00:00.000000",
             "2025-11-01 00:00:60.000000", "2025-11-01 0\u0661:0:00.123456", "2025-11-01 00:00:06.00001Z",
             "2025-11-01 00:00:06.001+01", "2025-11-01 00:00:06", "2025-11-01 00:00:06.0000010",
             "0000-01-01 00:00:00.000000", "0001-01-01 00:00:00.000000", "0025-11-01 00:00:06.000001"]
    for _ in range(1200):
        text = list(good)
        for _ in range(rng.randint(1, 3)):
            spot, choice = rng.randrange(len(text)), rng.random()
            if choice < 0.8:
                text[spot] = rng.choice(alphabet)
            elif choice < 0.9:
                del text[spot]
            else:
                text.insert(spot, rng.choice(alphabet))
        texts.append("".join(text))
    batches = [texts] + [[good, text, None] for text in texts if len(text.encode()) == len(good)]
    assert len(batches) > 600
    for values in batches:
        typed, misfit = lake_worker.timestamps(values)
        kept_texts = (misfit or pa.nulls(len(values))).to_pylist()
        for text, value, kept in zip(values, typed.to_pylist(), kept_texts, strict=True):
            if text is None:
                continue
            exact = re.fullmatch(lake_worker.TIME_TEXT, text, re.ASCII) and lake_worker.parse_time(text) is not None
            assert (value is not None) == bool(exact), text
            assert lake_schema.time_text(value) == text if exact else json.loads(kept) == text


def test_property_maps_keep_the_text_amplitude_sent():
    line = b'{"event_type":"a","event_properties":{"x": 1.10, "y": "\\u00e9\\/", "z": 1e5},"user_properties":{ }}'
    row = lake_schema.with_hours(lake_worker.Converter().events([line]), [(hour("20251101T00"), 1)]).to_pylist()[0]
    assert row["event_properties"] == '{"x": 1.10, "y": "\\u00e9\\/", "z": 1e5}'
    assert row["user_properties"] == "{ }"


def test_a_key_amplitude_adds_tomorrow_is_learnt_once_and_kept():
    converter = lake_worker.Converter()
    lines = [b'{"event_type":"a","new_field":[1,{"b":2}]}', b'{"event_type":"b"}', b'{"event_type":"c","new_field":3}']
    rows = lake_schema.with_hours(converter.events(lines), [(hour("20251101T00"), 3)]).to_pylist()
    assert converter.extra_keys == ["new_field"]
    assert [row["other_fields"] for row in rows] == ['{"new_field":[1,{"b":2}]}', None, '{"new_field":3}']
    assert converter.misfits == 0


def test_events_that_each_bring_new_keys_do_not_grow_the_decoder_without_bound():
    converter = lake_worker.Converter()
    lines = [b'{"event_type":"a","k%d":%d,"k%d":[%d]}' % (n, n, n + 100_000, n) for n in range(2000)]
    rows = lake_schema.with_hours(converter.events(lines), [(hour("20251101T00"), len(lines))]).to_pylist()
    assert len(converter.extra_keys) == lake_worker.MAX_LEARNT_KEYS
    assert [lake_schema.rebuild_event(row) for row in rows] == [json.loads(line) for line in lines]


def test_export_hours_come_from_the_members_never_from_event_times():
    record = lake.Export(start="20251101T00", end="20251101T02", file="f.json", events=6, size=1, sha256="0" * 64,
                         finished_at="x", hours={"20251101T00": 2, "20251101T02": 1, "20251103T07": 3})
    assert lake_batches.line_hours(record) == [(hour("20251101T00"), 2), (hour("20251101T02"), 1), (hour("20251101T00"), 3)]
    record.runs = [(None, 2), ("20251101T01", 4)]
    assert lake_batches.line_hours(record) == [(hour("20251101T00"), 2), (hour("20251101T01"), 4)]
    runs = lake_batches.line_hours(record)
    assert lake_batches.take_runs(runs, 3) == [(hour("20251101T00"), 2), (hour("20251101T01"), 1)]
    assert lake_batches.take_runs(runs, 3) == [(hour("20251101T01"), 3)]
    assert lake_batches.take_runs(runs, 1) is None


@pytest.mark.parametrize("change", ["append", "replace"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_that_changes_while_it_is_read_is_not_committed(tmp_path, workers, change):
    import lake_convert

    lines = standin_lines(400)
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    record = lake.Export(start="20251101T00", end="20251101T00", file="f.jsonl", events=400, size=1, sha256="0" * 64,
                         finished_at="x", runs=[("20251101T00", 400)])
    pool = lake_convert.Workers(workers, 8192)
    batches = lake_batches.record_batches(path, record, {hour("20251101T00")}, False, pool, {})
    next(batches)
    if change == "append":
        with open(path, "ab") as file:
            file.write(lines[0] + b"\n")
    else:  # the same bytes in a new file put in its place, as an editor saves: only the inode tells
        (tmp_path / "new").write_bytes(path.read_bytes())
        os.replace(tmp_path / "new", path)
    with pytest.raises(lake_batches.FileChanged):
        list(batches)
    pool.close()


def test_the_predicate_names_exactly_the_hours_replaced():
    hours = {hour("20251101T22"), hour("20251101T23"), hour("20251102T00"), hour("20251102T05")}
    assert lake_batches.hours_predicate(hours) == (
        "export_date >= '2025-11-01' AND export_date <= '2025-11-02' AND "
        "((export_hour >= '2025-11-01T22:00:00Z' AND export_hour <= '2025-11-02T00:00:00Z') OR "
        "(export_hour >= '2025-11-02T05:00:00Z' AND export_hour <= '2025-11-02T05:00:00Z'))"
    )


def test_each_hour_goes_in_from_its_latest_file():
    def record(name, start, end):
        return lake.Export(start=start, end=end, file=name, events=0, size=0, sha256="0" * 64, finished_at="x")

    day, refetched, next_day = (record("a", "20251101T00", "20251101T23"), record("b", "20251101T05", "20251101T06"),
                                record("c", "20251102T00", "20251102T23"))
    latest = lake_batches.latest_hours([day, refetched, next_day], skip={hour("20251102T03")})
    assert [(r.file, len(hours)) for r, hours in latest] == [("a", 22), ("b", 2), ("c", 23)]
    assert hour("20251101T05") not in latest[0][1]


# Runs: the table written, read back, and kept exact.


def test_a_day_goes_into_a_typed_table_readers_count_exactly(cli, standin, folder_without_spaces):
    table = folder_without_spaces / "lake"  # for Polars (see folder_without_spaces)
    result = cli.run(*DAY, "--lake", str(table), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    rows = table_rows(table)
    assert canonical(lake_schema.rebuild_event(row) for row in rows) == canonical(exported_events(cli))
    (loaded,) = lake_lines(cli)
    found = DeltaTable(table)
    assert loaded["table_id"] == found.metadata().id and loaded["version"] == found.version() == summary["lake_version"]
    assert isinstance(loaded["version"], int)
    protocol = found.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features  # no timestampNtz: Synapse reads it
    assert found.metadata().partition_columns == ["export_date"]
    assert parquet_codecs(table) == {"SNAPPY"}

    frame = pl.scan_delta(str(table)).collect()
    assert frame.schema["event_time"] == pl.Datetime("us", "UTC") and frame.schema["amplitude_id"] == pl.Int64
    assert frame.schema["location_lat"] == pl.Float64 and frame.schema["event_properties"] == pl.String
    per_hour = dict(frame.group_by("export_hour").len().iter_rows())
    export = next(line for line in cli.manifest() if "events" in line)
    assert {f"{h:%Y%m%dT%H}": n for h, n in per_hour.items()} == {h: n for h, n in export["hours"].items() if n}
    assert frame["event_id"].sum() == sum(event["event_id"] for event in exported_events(cli))
    commit = found.history(1)[0]
    assert commit["amplitude_export.file"] == export["file"] and commit["amplitude_export.policy"] == "none"


@pytest.mark.quick
def test_refetching_replaces_the_hours_and_never_duplicates(cli, standin):
    assert cli.run(*DAY, "--lake", "lake").returncode == 0
    first = table_rows(cli.workdir / "lake")
    result = cli.run("--start", "20251101T05", "--end", "20251101T06", "--refetch", "--lake", "lake", "--window-hours", "1")
    assert result.returncode == 0, result.stderr
    again = table_rows(cli.workdir / "lake")
    assert canonical(map(lake_schema.rebuild_event, again)) == canonical(map(lake_schema.rebuild_event, first))
    assert len({row["uuid"] for row in again}) == len(again)
    assert [line["version"] for line in lake_lines(cli)] == [1, 2, 3]


def test_a_deleted_or_replaced_table_is_refilled_from_the_files_without_asking_amplitude(cli, standin):
    import shutil

    assert cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--lake", "lake").returncode == 0
    expected = canonical(exported_events(cli))
    asked = len(standin.requests)
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--lake", "lake")
    assert result.returncode == 0 and "loading" not in result.stderr  # the table has them
    shutil.rmtree(cli.workdir / "lake")
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert "Lake: loading 2 file(s) exported earlier" in result.stderr
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == expected
    assert len(standin.requests) == asked
    ids = {line["table_id"] for line in lake_lines(cli)}
    assert len(ids) == 2  # the new table's id: the old lines no longer count


def test_a_year_of_files_becomes_a_table_with_no_request(cli, standin):
    assert cli.run("--start", "2025-11-01", "--end", "2025-11-03").returncode == 0
    asked = len(standin.requests)
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-03", "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert len(standin.requests) == asked
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(exported_events(cli))


def test_a_file_changed_after_export_is_not_loaded(cli, standin):
    assert cli.run(*DAY).returncode == 0
    (output,) = cli.outputs()
    output.write_bytes(output.read_bytes().replace(b"Berlin", b"Berlix"))  # same size, other bytes
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0
    assert "is not the file recorded" in result.stderr and "--verify exports them again" in result.stderr
    assert table_rows(cli.workdir / "lake") == []
    result = cli.run(*DAY, "--lake", "lake", "--verify")
    assert result.returncode == 0, result.stderr
    latest = [line for line in cli.manifest() if "events" in line][-1]
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(
        json.loads((cli.data / latest["file"]).read_text()))


def test_field_rules_apply_before_the_table_and_never_mix_in_an_hour(cli, standin):
    key = "k" * 40
    rules = ("--drop-fields", "ip_address,user_properties.plan", "--hash-fields", "user_id")
    result = cli.run(*DAY, "--lake", "lake", *rules, AMP_HASH_KEY=key)
    assert result.returncode == 0, result.stderr
    rows = table_rows(cli.workdir / "lake")
    assert all(row["ip_address"] is None and "ip_address" in json.loads(row["absent_fields"]) for row in rows)
    assert all("plan" not in json.loads(row["user_properties"]) for row in rows)
    assert all(len(row["user_id"]) == 64 and not row["user_id"].startswith("user-") for row in rows)
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(exported_events(cli))
    policy = json.loads(DeltaTable(cli.workdir / "lake").history(1)[0]["amplitude_export.policy"])
    assert policy["dropped"] == ["ip_address", "user_properties.plan"] and policy["hashed"] == ["user_id"]
    assert key not in json.dumps(policy)

    result = cli.run(*DAY, "--lake", "lake")  # no rules now: the hours are exported again and replaced whole
    assert result.returncode == 0, result.stderr
    rows = table_rows(cli.workdir / "lake")
    latest = [line for line in cli.manifest() if "events" in line][-1]
    assert "policy" not in latest and len(rows) == latest["events"]
    assert all(row["user_id"].startswith("user-") and row["ip_address"] for row in rows)


def test_members_without_an_hour_or_outside_the_window_go_under_its_first_hour(cli, standin):
    rng = random.Random(1)
    named = [make_event(hour("20251101T03"), 0, i, rng) for i in range(3)]
    stray = [make_event(hour("20251105T09"), 0, i, rng) for i in range(2)]
    nameless = [make_event(hour("20251101T04"), 0, i, rng) for i in range(4)]
    import gzip

    members = [(member_name(hour("20251105T09"), 0), gzip.compress(b"\n".join(stray))),
               (member_name(hour("20251101T03"), 0), gzip.compress(b"\n".join(named))),
               ("export/other.json.gz", gzip.compress(b"\n".join(nameless)))]
    standin.add_fault("members", members=members)
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert "outside the window" in result.stderr
    by_hour = {}
    for row in table_rows(cli.workdir / "lake"):
        by_hour[row["export_hour"]] = by_hour.get(row["export_hour"], 0) + 1
    assert by_hour == {hour("20251101T00"): 6, hour("20251101T03"): 3}


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_readable_table_and_the_next_run_completes_it(cli, standin):
    standin.events_per_part = 400
    args = ("--start", "2025-11-01", "--end", "2025-11-04", "--lake", "lake")
    table = cli.workdir / "lake"

    def exports():
        return len([line for line in cli.manifest() if "events" in line]) if cli.data.exists() else 0

    moments = [  # killed when each becomes true: between a file and its commit, mid-write, between commit and line
        lambda: exports() >= 1,
        lambda: any(table.rglob("*.parquet")),
        lambda: len(list(table.glob("_delta_log/*.json"))) >= 3,
        lambda: exports() >= 3,
    ]
    for moment in moments:
        process = cli.start(*args)
        wait_for(lambda process=process, moment=moment: moment() or process.poll() is not None, timeout=60)
        assert process.poll() is not None or processes.worker_count() == 1 or conversion_workers(cli)  # they run
        process.send_signal(signal.SIGKILL)
        process.wait()
        wait_for(lambda: not conversion_workers(cli), timeout=60)  # the workers see their pipes close and end too
        if (table / "_delta_log").exists():
            rows = table_rows(table)
            assert len({row["uuid"] for row in rows}) == len(rows)  # every hour at most once
    result = cli.run(*args)
    assert result.returncode == 0, result.stderr
    assert "converted by 2 process(es)" in result.stderr or processes.worker_count() == 1
    assert not conversion_workers(cli)  # a run that ends ends its workers
    rows = table_rows(table)
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(exported_events(cli))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_a_load_ends_the_run_and_its_workers(cli, standin, signum):
    standin.events_per_part = 400
    args = ("--start", "2025-11-01", "--end", "2025-11-03", "--lake", "lake")
    table = cli.workdir / "lake"
    victim = cli.start(*args)
    wait_for(lambda: any(table.rglob("*.parquet")) or victim.poll() is not None, timeout=60)
    victim.send_signal(signum)
    _, stderr = victim.communicate(timeout=30)
    assert victim.returncode == 1 and f"Stopped by {signum.name}" in stderr and "Traceback" not in stderr
    wait_for(lambda: not conversion_workers(cli), timeout=60)
    result = cli.run(*args)
    assert result.returncode == 0, result.stderr
    rows = table_rows(table)
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(exported_events(cli))


@pytest.mark.skipif(processes.worker_count() < 2, reason="conversion workers need two cores")
def test_a_day_exported_alone_goes_into_the_lake_while_it_is_written(cli, standin):
    standin.events_per_part = 400  # 17 MB: chunks for both workers
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert re.search(r"Lake: \S+ loaded as version 1 of .* \(24 hour\(s\), [\d.]+s, converted by 2 process\(es\) "
                     r"while exporting\)", result.stderr)
    rows = table_rows(cli.workdir / "lake")
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(exported_events(cli))
    (export,) = [line for line in cli.manifest() if "events" in line]
    per_hour = {}
    for row in rows:
        per_hour[f"{row['export_hour']:%Y%m%dT%H}"] = per_hour.get(f"{row['export_hour']:%Y%m%dT%H}", 0) + 1
    assert per_hour == export["hours"]
    assert DeltaTable(cli.workdir / "lake").history(1)[0]["amplitude_export.file"] == export["file"]


@pytest.mark.skipif(processes.worker_count() < 2, reason="conversion workers need two cores")
@pytest.mark.parametrize("options", [("--format", "jsonl", "--gzip"), ("--workers", "3"), ("--gzip",)])
def test_a_day_of_any_layout_or_over_several_connections_goes_in_while_it_is_written(cli, standin, options):
    import gzip

    standin.events_per_part = 100
    result = cli.run(*DAY, *options, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert re.search(r"converted by 2 process\(es\) while exporting\)", result.stderr)
    (output,) = cli.outputs()
    text = (gzip.decompress if output.name.endswith(".gz") else bytes)(output.read_bytes()).decode()
    events = [json.loads(line) for line in text.splitlines()] if ".jsonl" in output.name else json.loads(text)
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(events)


def test_a_damaged_archive_gives_up_the_conversion_while_exporting_and_the_file_is_loaded(cli, standin):
    standin.events_per_part = 400
    standin.add_fault("corrupt_crc")
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert "the archive is damaged" in result.stderr and "while exporting)" not in result.stderr
    assert "loaded as version 1 of" in result.stderr
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(exported_events(cli))


def test_a_window_that_fails_while_its_events_are_converted_commits_nothing(cli, standin):
    standin.events_per_part = 400
    standin.add_fault("bad_line", times=5)
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert DeltaTable(cli.workdir / "lake").version() == 0 and lake_lines(cli) == []
    assert not conversion_workers(cli) and cli.leftovers() == []


@pytest.mark.skipif(processes.worker_count() < 2, reason="conversion workers need two cores")
def test_a_stop_signal_while_a_day_is_converted_as_it_is_written_leaves_the_table_as_it_was(cli, standin):
    standin.events_per_part = 1000  # 43 MB: long enough to be stopped halfway
    victim = cli.start(*DAY, "--lake", "lake")
    wait_for(lambda: any(part.stat().st_size > 8 << 20 for part in cli.leftovers()) or victim.poll() is not None,
             timeout=60)
    victim.send_signal(signal.SIGTERM)
    _, stderr = victim.communicate(timeout=30)
    assert victim.returncode == 1 and "Stopped by SIGTERM" in stderr and "Traceback" not in stderr
    wait_for(lambda: not conversion_workers(cli), timeout=60)
    assert DeltaTable(cli.workdir / "lake").version() == 0
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(exported_events(cli))


def conversion_workers(cli) -> list[int]:
    """The processes running this copy of the project's lake_worker.py."""
    return processes_running(cli.project / "lake_worker.py")


def test_parallel_windows_commit_one_at_a_time(cli, standin):
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-04", "--workers", "3", "--lake", "lake")
    assert result.returncode == 0, result.stderr
    assert sorted(line["version"] for line in lake_lines(cli)) == [1, 2, 3, 4]
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(exported_events(cli))


def test_lake_maintain_compacts_and_vacuums(cli, standin):
    assert cli.run(*DAY, "--lake", "lake", "--window-hours", "1").returncode == 0
    before = DeltaTable(cli.workdir / "lake")
    files_before, rows_before = len(before.file_uris()), before.to_pyarrow_table().num_rows
    result = cli.run("--lake", "lake", "--lake-maintain", "--lake-retention-days", "0", "--json")
    assert result.returncode == 0, result.stderr
    after = DeltaTable(cli.workdir / "lake")
    assert len(after.file_uris()) < files_before and after.to_pyarrow_table().num_rows == rows_before
    parquet = list((cli.workdir / "lake").rglob("*.parquet"))
    assert len(parquet) == len(after.file_uris())  # the replaced files are gone from the folder
    assert parquet_codecs(cli.workdir / "lake") == {"SNAPPY"}
    assert json.loads(result.stdout.splitlines()[-1])["lake_version"] == after.version()


def test_lake_maintain_removes_the_files_of_loads_that_never_committed(cli, standin):
    assert cli.run(*DAY, "--lake", "lake").returncode == 0
    partition = next((cli.workdir / "lake").glob("export_date=*"))
    written = next(partition.glob("*.parquet"))
    old, young = partition / "part-00000-killed-old.snappy.parquet", partition / "part-00000-killed-young.snappy.parquet"
    for orphan in (old, young):
        orphan.write_bytes(written.read_bytes())
    os.utime(old, (time.time() - 8 * 86400,) * 2)
    assert cli.run("--lake", "lake", "--lake-maintain").returncode == 0  # 7 days of retention
    assert not old.exists() and young.exists() and written.exists()
    assert len(DeltaTable(cli.workdir / "lake").to_pyarrow_table()) == len(exported_events(cli))


@pytest.mark.quick
@pytest.mark.parametrize(("args", "env", "message"), [
    (("--lake-maintain",), {}, "--lake-maintain needs --lake"),
    (("--lake", "s3://bucket/t"), {}, "--lake: 's3://bucket/t': expected a folder"),
    (("--lake", "s3://key:secret@bucket/t?token=secret"), {}, "--lake: 's3://…@bucket/t?…': expected a folder"),
    (("--lake", "az://events/t"), {}, "--lake: an Azure URI needs AZURE_STORAGE_CONNECTION_STRING"),
    (("--lake", "az://events/t"), {"AZURE_STORAGE_ACCOUNT_URL": "http://storage.example.com/acc"},
     "the credentials and the data would travel unencrypted to storage.example.com"),
    (("--lake", "az://Bad_Name/t"), {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"},
     "container name 'Bad_Name' is not valid"),
    (("--lake", "az://events"), {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"},
     "name a folder in the container"),
    (("--lake", "abfss://events@other.dfs.core.windows.net/t"),
     {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"},
     "the URI names account other, the Azure credentials are for account acc"),
    (("--lake", "az://events/t?sig=abc"), {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"},
     "an Azure URI takes no query"),
    (("--lake", "abfss://events@[acc/t"), {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"},
     "--lake: 'abfss://…': an Azure URI names its container (and account) by name, without a port"),
    (("--lake", "abfss://events@acc.dfs.core.windows.net:99999/t"),
     {"AZURE_STORAGE_ACCOUNT_URL": "https://acc.blob.core.windows.net"}, "without a port"),
    (("--lake-retention-days", "-1", "--lake", "x", "--lake-maintain"), {}, "--lake-retention-days"),
    (("--lake-retention-days", "3", "--lake", "x"), {}, "--lake-retention-days goes with --lake-maintain"),
])
def test_bad_lake_settings_are_usage_errors_before_any_request(args, env, message):
    with pytest.raises(UsageError) as caught:
        parse_settings([*DAY, *args], {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s", **env},
                       dt.datetime(2025, 11, 7, tzinfo=UTC))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_lake_setting_is_one_line_and_exit_2(cli, standin):
    result = cli.run(*DAY, "--lake", "az://events/t", AZURE_STORAGE_ACCOUNT_URL="http://storage.example.com/acc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("Error: --lake: AZURE_STORAGE_ACCOUNT_URL: the credentials")
    assert standin.requests == []


@pytest.mark.parametrize("where", ["data folder", "its parent", "log folder", "a file", "inside a file",
                                   "a folder of files", "empty"])
def test_a_table_folder_that_is_not_its_own_is_refused_before_any_request(cli, standin, where):
    """A VACUUM (here or in another engine) removes the files a table does not know: the exporter's own folders,
    or anything else, must never be inside one."""
    (cli.workdir / "notes.txt").write_text("a file of the user's")
    (cli.workdir / "papers").mkdir()
    (cli.workdir / "papers" / "draft.txt").write_text("kept")
    folder, message = {
        "data folder": (str(cli.data), f"{cli.data} is the data folder"),
        "its parent": (str(cli.data.parent), f"{cli.data.parent} holds the data folder, {cli.data}"),
        "log folder": ("logs-here", "is the log folder"),
        "a file": ("notes.txt", "notes.txt is a file, not a folder"),
        "inside a file": ("notes.txt/t/u", "notes.txt is a file, not a folder"),
        "a folder of files": ("papers", "papers holds files and no Delta table"),
        "empty": ("", "--lake: the value is empty"),
    }[where]
    result = cli.run(*DAY, "--lake", folder, "--log-dir", "logs-here")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: --lake: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and standin.requests == []
    assert not list(cli.workdir.rglob("_delta_log")) and (cli.workdir / "papers" / "draft.txt").exists()


def test_a_damaged_table_log_fails_the_run_with_one_line_before_any_request(cli, standin):
    log_folder = cli.workdir / "t" / "_delta_log"
    log_folder.mkdir(parents=True)
    (log_folder / "00000000000000000000.json").write_text("not a commit\n")
    result = cli.run(*DAY, "--lake", "t")
    assert result.returncode == 1 and standin.requests == []
    errors = [line for line in result.stderr.splitlines() if " - ERROR - " in line]
    assert len(errors) == 1 and f"cannot open the lake at {cli.workdir / 't'}: " in errors[0]
    assert "<unknown>" not in result.stderr and "Traceback" not in result.stderr
    assert (log_folder / "00000000000000000000.json").read_text() == "not a commit\n"


def test_a_table_folder_that_cannot_be_read_is_one_reason(tmp_path, monkeypatch):
    folder = tmp_path / "t"
    folder.mkdir()

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(folder), "iterdir", refuse)
    with pytest.raises(ValueError, match=f"^{folder}: Permission denied$"):
        lake.check_table_folder(folder, {})


def test_maintaining_a_table_that_is_not_there_creates_none(cli, standin):
    result = cli.run("--lake", "typo", "--lake-maintain")
    assert result.returncode == 2 and "--lake: no Delta table at" in result.stderr and "Traceback" not in result.stderr
    assert not (cli.workdir / "typo").exists() and standin.requests == []


def test_lake_without_its_packages_says_which_file_to_install(cli, standin, tmp_path):
    for package in ("deltalake", "pyarrow"):
        shadow = tmp_path / "shadow" / package
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(f"raise ImportError('no {package} here')")
    result = cli.run(*DAY, "--lake", "lake", PYTHONPATH=str(tmp_path / "shadow"))
    assert result.returncode == 2
    assert "--lake needs the Delta Lake packages" in result.stderr and "requirements-lake.txt" in result.stderr
    assert standin.requests == []
    # Without --lake, the packages are neither needed nor loaded: a plain export runs without them.
    result = cli.run(*DAY, PYTHONPATH=str(tmp_path / "shadow"))
    assert result.returncode == 0, result.stderr


@pytest.mark.quick
def test_a_run_without_lake_loads_no_arrow():
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import fetch_data, lake, lake_convert; "
             "print(sorted(m for m in ('pyarrow', 'deltalake', 'pyarrow.compute') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe, str(ROOT)], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["[]"]


LOAD_BY_WORKERS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import lake
from store import Export
folder = Path(sys.argv[2])
target = lake.target_from(str(folder / "table"), None, folder, {})
table = lake.open_lake(target, folder, None)
table.workers.chunk_bytes = 16 << 10
record = Export(start="20251101T00", end="20251101T00", file="f.jsonl", events=int(sys.argv[3]), size=1,
                sha256="0" * 64, finished_at="x", runs=[("20251101T00", int(sys.argv[3]))])
table.load(record)
table.close()
print(table.version, "pyarrow.compute" in sys.modules)
"""


def test_an_exporter_whose_workers_convert_never_loads_arrows_compute_functions(tmp_path):
    if processes.worker_count() == 1:
        pytest.skip("one core: the exporter converts, with Arrow's compute functions")
    lines = standin_lines(600)
    (tmp_path / "f.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    loaded = subprocess.run([sys.executable, "-c", LOAD_BY_WORKERS, str(ROOT), str(tmp_path), str(len(lines))],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["1", "False"]  # 11 MB and 45 ms of the exporter saved
    assert len(DeltaTable(tmp_path / "table").to_pyarrow_table()) == len(lines)


def test_an_azure_lake_without_the_azure_packages_says_which_file_to_install(cli, standin, tmp_path):
    shadow = tmp_path / "shadow" / "azure"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    result = cli.run(*DAY, "--lake", "az://events/t", PYTHONPATH=str(tmp_path / "shadow"),
                     AZURE_STORAGE_ACCOUNT_URL="https://acc.blob.core.windows.net")
    assert result.returncode == 2
    assert "--lake on Azure needs the Azure packages" in result.stderr and "requirements-azure.txt" in result.stderr
    assert standin.requests == []


def test_a_table_of_another_schema_is_refused(cli, standin):
    import deltalake

    deltalake.write_deltalake(cli.workdir / "lake", pa.table({"a": [1]}))
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 1
    assert "holds a Delta table of another schema" in result.stderr and "Traceback" not in result.stderr
    assert standin.requests == []


def test_a_commit_that_meets_another_writers_is_tried_again(tmp_path, monkeypatch):
    import deltalake
    from deltalake.exceptions import CommitFailedError

    import store

    data = tmp_path / "data"
    data.mkdir()
    lines = standin_lines(50)
    (data / "f.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    record = store.Export(start="20251101T00", end="20251101T00", file="f.jsonl", events=50,
                          size=(data / "f.jsonl").stat().st_size, sha256="0" * 64, finished_at="x",
                          hours={"20251101T00": 50})
    table = lake.Lake(lake.LakeTarget(str(tmp_path / "t"), str(tmp_path / "t")), data, None)
    table.open()
    real, calls, waits = deltalake.write_deltalake, [], []

    def conflicting(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:  # another writer commits first, twice
            for _ in kwargs["data"] if "data" in kwargs else args[1]:
                pass
            raise CommitFailedError("conflict")
        return real(*args, **kwargs)

    monkeypatch.setattr(deltalake, "write_deltalake", conflicting)
    table.sleep = waits.append
    loaded = table.load(record)
    assert len(calls) == 3 and waits == [1, 2]
    assert loaded.version == 1 and DeltaTable(tmp_path / "t").to_pyarrow_table().num_rows == 50


# A window exported alone: converted while it is written, committed once its file is in place.


def followed_lake(tmp_path, lines: list[bytes]):
    """A lake over a data folder holding the events as f.jsonl, and the export record of that file."""
    import store

    data = tmp_path / "data"
    data.mkdir()
    (data / "f.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    record = store.Export(start="20251101T00", end="20251101T01", file="f.jsonl", events=len(lines),
                          size=(data / "f.jsonl").stat().st_size, sha256="0" * 64, finished_at="x",
                          hours={"20251101T00": len(lines) // 2, "20251101T01": len(lines) - len(lines) // 2})
    table = lake.Lake(lake.LakeTarget(str(tmp_path / "t"), str(tmp_path / "t")), data, None)
    table.workers.chunk_bytes = 32 << 10  # many chunks for each worker
    table.open()
    return table, record


def put_in_blocks(feed, lines: list[bytes], every=100, between=None):
    """The lines as the writer hands them over: blocks of `every`, the first half under T00, the rest under T01."""
    for start in range(0, len(lines), every):
        part = lines[start:start + every]
        feed.put(b"\n".join(part), len(part), hour("20251101T00" if start < len(lines) // 2 else "20251101T01"))
        if between:
            between(start)
    feed.end()


@pytest.mark.skipif(processes.worker_count() < 2, reason="conversion workers need two cores")
@pytest.mark.parametrize("expected_file, damage", [("f.jsonl", None), ("f.jsonl", "kill"),
                                                    pytest.param("g.jsonl", None, marks=pytest.mark.slow),
                                                    pytest.param("f.jsonl", "abort", marks=pytest.mark.slow)])
def test_a_window_followed_while_exported_is_committed_once_its_file_is_the_one_expected(tmp_path, caplog,
                                                                                       expected_file, damage):
    """The commit made as the events were converted; else (another file, a worker killed, an abort from the writer)
    nothing of that, and the file loaded once it is in place: the same rows either way, and the writer never held up."""
    caplog.set_level(logging.DEBUG, logger="fetch_data")
    lines = standin_lines(1200)
    table, record = followed_lake(tmp_path, lines)
    feed = table.follow(record.window, expected_file, b"\n")
    assert feed is not None

    def hurt(start):
        if start == 400 and damage == "kill":
            os.kill(feed.processes[1].pid, signal.SIGKILL)
        elif start == 400 and damage == "abort":  # a damaged archive: the writer rolls back
            feed.abort()

    put_in_blocks(feed, lines, between=hurt)
    table.send(record)
    assert table.failure is None and table.version == 1
    rows = table_rows(tmp_path / "t")
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(map(json.loads, lines))
    assert sum(row["export_hour"] == hour("20251101T01") for row in rows) == 600
    while_exporting = [r.message for r in caplog.records if "loaded as version" in r.message and
                       r.message.endswith("while exporting)")]
    assert bool(while_exporting) == (expected_file == "f.jsonl" and damage is None)
    assert [line["version"] for line in lake_lines_of(tmp_path / "data")] == [1]
    table.close()
    assert not processes_running(Path(lake.__file__).with_name("lake_worker.py"), parent=os.getpid())


def test_a_followed_window_never_saved_commits_nothing(tmp_path):
    """An export that failed after some events were converted (its window failed, the run was ending)."""
    lines = standin_lines(1000)
    table, record = followed_lake(tmp_path, lines)
    feed = table.follow(record.window, "f.jsonl", b"\n")
    if feed is None:
        pytest.skip("conversion workers need two cores")
    for start in range(0, 500, 100):
        feed.put(b"\n".join(lines[start:start + 100]), 100, hour("20251101T00"))
    table.close()
    assert DeltaTable(tmp_path / "t").version() == 0 and lake_lines_of(tmp_path / "data") == []


def lake_lines_of(data) -> list[dict]:
    manifest = data / "manifest.jsonl"
    return [json.loads(line) for line in manifest.read_text().splitlines()] if manifest.exists() else []


def test_delta_errors_come_without_colour_codes_or_secrets():
    target = lake.LakeTarget("/t", "/t", {"account_key": "S3cr3tKey"})
    with pytest.raises(lake.LakeError) as caught, lake.described(target, "open"):
        raise OSError("Generic error \x1b[31m↳\x1b[0m key S3cr3tKey\n  refused")
    assert str(caught.value) == "cannot open the lake at /t: OSError: Generic error ↳ key *** refused"


def test_delta_errors_come_without_the_rust_backtrace():
    """What delta-rs says of a damaged log, for one: the message, then the frames of its stack."""
    target = lake.LakeTarget("/t", "/t", {})
    with pytest.raises(lake.LakeError) as caught, lake.described(target, "open"):
        raise OSError("Kernel error: Json error: Encountered unexpected 'g' whilst parsing value\n   0: <unknown>\n"
                      "   1: <unknown>\n  12: start_thread\n             at ./nptl/pthread_create.c:442:8\n")
    assert str(caught.value) == ("cannot open the lake at /t: OSError: Kernel error: Json error: Encountered "
                                 "unexpected 'g' whilst parsing value")


def test_secrets_are_scrubbed_from_delta_errors():
    text = lake.scrub("GET https://acc.blob.core.windows.net/c/t?sv=1&sig=SECRETSIG failed: key S3cr3tKey",
                      ["S3cr3tKey"])
    assert "SECRETSIG" not in text and "S3cr3tKey" not in text


# Azure, against Azurite.


def test_an_azure_table_is_written_and_read_through_azurite(cli, standin, azurite, container_name, service):
    env = {"AZURE_STORAGE_CONNECTION_STRING": azurite["connection_string"]}
    result = cli.run(*DAY, "--lake", f"az://{container_name}/events", "--upload", "--json",
                     AZURE_STORAGE_CONTAINER=container_name, **env)
    assert result.returncode == 0, result.stderr
    options = {"account_name": azurite["account"], "account_key": azurite["key"],
               "azure_storage_endpoint": azurite["account_url"], "allow_http": "true"}
    rows = table_rows(f"az://{container_name}/events", **options)
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(exported_events(cli))
    names = [blob.name for blob in service.get_container_client(container_name).list_blobs()]
    assert any(name.startswith("events/_delta_log/") for name in names)
    assert any(name.startswith("amplitude/events/date=2025-11-01/") for name in names)  # --upload beside it
    for text in (result.stdout, result.stderr, cli.everything_written()):
        assert azurite["key"] not in text and API_KEY not in text and SECRET_KEY not in text
    assert lake_lines(cli)[0]["lake"] == f"az://{container_name}/events"


def test_an_azure_table_with_a_sas_and_one_with_a_wrong_key(cli, standin, azurite, container_name, service):
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(azurite["account"], azurite["key"], ResourceTypes(service=True, container=True, object=True),
                               AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True, add=True),
                               expiry=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    env = {"AZURE_STORAGE_ACCOUNT_URL": azurite["account_url"], "AZURE_STORAGE_SAS_TOKEN": sas}
    result = cli.run(*DAY, "--lake", f"az://{container_name}/sas", **env)
    assert result.returncode == 0, result.stderr
    assert sas not in result.stderr + cli.everything_written()
    wrong = azurite["connection_string"].replace(azurite["key"], "d3Jvbmcta2V5LXdyb25nLWtleQ==")
    result = cli.run(*DAY, "--lake", f"az://{container_name}/wrong", AZURE_STORAGE_CONNECTION_STRING=wrong)
    assert result.returncode == 1
    assert "d3Jvbmcta2V5" not in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error") or " - ERROR - " in line]) >= 1


def test_environment_is_not_needed_for_a_local_lake(cli, standin):
    env = {name: None for name in os.environ if name.startswith("AZURE_")}
    result = cli.run(*DAY, "--lake", str(cli.workdir / "abs lake"), **env)
    assert result.returncode == 0, result.stderr
    assert DeltaTable(cli.workdir / "abs lake").to_pyarrow_table().num_rows == len(exported_events(cli))


def test_the_lake_variable_is_relative_to_its_env_file(cli, standin):
    (cli.project / ".env").write_text("AMP_LAKE=tables/events\n")
    result = cli.run(*DAY)
    assert result.returncode == 0, result.stderr
    assert DeltaTable(cli.project / "tables" / "events").version() == 1


def test_a_file_of_many_chunks_is_converted_by_worker_processes_live_and_from_the_file(cli, standin):
    import lake_convert

    standin.events_per_part = 100  # 4,800 events: a file of a few chunks
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0, result.stderr
    (output,) = cli.outputs()
    assert output.stat().st_size > lake_convert.CHUNK_BYTES
    assert f"converted by {processes.worker_count()} process(es)" in result.stderr
    events = exported_events(cli)
    assert len(events) == 4800
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(events)
    import shutil

    shutil.rmtree(cli.workdir / "lake")
    result = cli.run(*DAY, "--lake", "lake")
    assert result.returncode == 0 and f"converted by {processes.worker_count()} process(es)" in result.stderr
    rows = table_rows(cli.workdir / "lake")
    assert canonical(map(lake_schema.rebuild_event, rows)) == canonical(events)
    per_hour = {}
    for row in rows:
        per_hour[row["export_hour"]] = per_hour.get(row["export_hour"], 0) + 1
    assert sorted(per_hour.values()) == [200] * 24  # every hour whole, none twice


@pytest.mark.parametrize("layout", [("--format", "jsonl"), ("--gzip",), ("--format", "jsonl", "--gzip")])
def test_every_file_layout_goes_in_live_and_from_the_files(cli, standin, layout):
    import gzip

    assert cli.run("--start", "2025-11-01", "--end", "2025-11-02", *layout, "--lake", "lake").returncode == 0
    events = []
    for output in cli.outputs():
        text = (gzip.decompress if output.name.endswith(".gz") else bytes)(output.read_bytes()).decode()
        events += json.loads(text) if ".json" in output.name and ".jsonl" not in output.name else [
            json.loads(line) for line in text.splitlines()]
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(events)
    import shutil

    shutil.rmtree(cli.workdir / "lake")  # refilled from the files, their sha256 checked as they are read
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", *layout, "--lake", "lake")
    assert result.returncode == 0 and "loading 2 file(s)" in result.stderr and "not the file" not in result.stderr
    assert canonical(map(lake_schema.rebuild_event, table_rows(cli.workdir / "lake"))) == canonical(events)
