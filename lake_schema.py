"""The lake's schema: the table's columns, the export hour added to converted events, and rows back into events.

Every documented top-level key of an event has a column of its natural type; what does not fit stays, as JSON text
under its key, in `other_fields`, and the documented keys an event does not have are listed in `absent_fields`, so
that every row rebuilds its event exactly (`rebuild_event`). The conversion itself is in lake_worker.py.
"""

from __future__ import annotations

import datetime as dt
import json
import struct

import pyarrow as pa

UTC_MICROS = pa.timestamp("us", tz="UTC")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

TIMESTAMPS = ("event_time", "client_event_time", "client_upload_time", "server_upload_time", "server_received_time",
              "processed_time", "user_creation_time")
INTEGERS = ("amplitude_id", "app", "event_id", "session_id")
FLOATS = ("location_lat", "location_lng")
BOOLEANS = ("paying", "is_attribution_event")
STRINGS = ("uuid", "$insert_id", "event_type", "amplitude_event_type", "user_id", "device_id", "platform", "os_name",
           "os_version", "device_brand", "device_manufacturer", "device_model", "device_family", "device_type",
           "device_carrier", "city", "region", "country", "dma", "language", "library", "ip_address",
           "version_name", "start_version", "adid", "idfa")
JSON_TEXTS = ("event_properties", "user_properties", "group_properties", "groups", "data", "amplitude_attribution_ids")
KIND_OF = {**dict.fromkeys(TIMESTAMPS, "timestamp"), **dict.fromkeys(INTEGERS, "integer"),
           **dict.fromkeys(FLOATS, "float"), **dict.fromkeys(BOOLEANS, "boolean"), **dict.fromkeys(STRINGS, "string"),
           **dict.fromkeys(JSON_TEXTS, "json")}
DOCUMENTED = tuple(KIND_OF)
ARROW_TYPE = {"timestamp": UTC_MICROS, "integer": pa.int64(), "float": pa.float64(), "boolean": pa.bool_(),
              "string": pa.string(), "json": pa.string()}
OTHER_FIELDS, ABSENT_FIELDS, EXPORT_HOUR, EXPORT_DATE = "other_fields", "absent_fields", "export_hour", "export_date"
# The metadata of a converted batch: the values kept in other_fields, and the empty batch that ends a file.
MISFITS, END = b"misfits", b"end"
FRAME = struct.Struct("<Q")  # the length of each frame of text streamed to a conversion worker (lake_convert.Feed)


def column_of(key: str) -> str:
    """The column of a documented key: `$insert_id` is `insert_id`, the others keep their names."""
    return key.lstrip("$")


# A converted event's columns; the table adds the hour it was exported under.
EVENT_SCHEMA = pa.schema(
    [pa.field(column_of(key), ARROW_TYPE[KIND_OF[key]]) for key in DOCUMENTED]
    + [pa.field(OTHER_FIELDS, pa.string()), pa.field(ABSENT_FIELDS, pa.string())]
)
SCHEMA = EVENT_SCHEMA.append(pa.field(EXPORT_HOUR, UTC_MICROS, nullable=False)).append(
    pa.field(EXPORT_DATE, pa.date32(), nullable=False))
PARTITION_BY = [EXPORT_DATE]


def with_hours(events: pa.RecordBatch, hours: list[tuple[dt.datetime, int]]) -> pa.RecordBatch:
    """A batch of SCHEMA: the events with their export hour and date; `hours` gives runs of rows their hour."""
    return pa.RecordBatch.from_arrays([*events.columns, hour_column(hours, events.num_rows), date_column(hours)],
                                      schema=SCHEMA)


def hour_column(hours: list[tuple[dt.datetime, int]], rows: int) -> pa.TimestampArray:
    """Each run's hour repeated over its lines."""
    if sum(count for _, count in hours) != rows:
        raise ValueError(f"the hours cover {sum(count for _, count in hours)} lines, the batch has {rows}")
    return pa.concat_arrays([pa.repeat(pa.scalar(hour, UTC_MICROS), count) for hour, count in hours] or
                            [pa.array([], UTC_MICROS)])


def date_column(hours: list[tuple[dt.datetime, int]]) -> pa.Date32Array:
    """Each run's UTC date repeated over its lines (built here, not cast: the exporter need not load Arrow's
    compute functions, which cost it 11 MB and 45 ms)."""
    return pa.concat_arrays([pa.repeat(pa.scalar(hour.date(), pa.date32()), count) for hour, count in hours] or
                            [pa.array([], pa.date32())])


def rebuild_event(row: dict) -> dict:
    """The exported event of one row (as read with pyarrow's to_pylist), as json.loads gives it."""
    event = {}
    for key in DOCUMENTED:
        value = row[column_of(key)]
        kind = KIND_OF[key]
        if value is not None and kind == "timestamp":
            value = time_text(value)
        elif value is not None and kind == "json":
            value = json.loads(value)
        event[key] = value
    if row[OTHER_FIELDS]:
        event.update(json.loads(row[OTHER_FIELDS]))
    for key in json.loads(row[ABSENT_FIELDS] or "[]"):
        del event[key]
    return event


def time_text(value: dt.datetime) -> str:
    """A time as Amplitude writes it, `YYYY-MM-DD hh:mm:ss.ffffff` in UTC, the year in four digits (strftime's %Y
    gives `25` for the year 25)."""
    return value.astimezone(dt.UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
