"""Spark 4 (pyspark in local mode, its own virtual environment) reads the lake's active Parquet files: what a
Spark without the delta-spark jars can do, and what Databricks, Fabric and Synapse do through the Delta log."""

import json
import os
import subprocess

import pytest
from deltalake import DeltaTable

from tests.conftest import environment_python

pytestmark = pytest.mark.slow

READ = r"""
import json, sys
from pyspark.sql import SparkSession, functions as F
files = json.loads(sys.argv[1])
spark = (SparkSession.builder.master("local[1]").appName("lake-test")
         .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC").getOrCreate())
frame = spark.read.parquet(*files)
types = {field.name: field.dataType.simpleString() for field in frame.schema.fields}
first = frame.orderBy("uuid").first()
row = frame.agg(F.count("*").alias("rows"), F.sum("event_id").alias("event_ids"),
                F.min("event_time").alias("first_time"), F.max("amplitude_id").alias("top_id")).first()
print(json.dumps({"types": types, "rows": row["rows"], "event_ids": row["event_ids"],
                  "first_time": row["first_time"].strftime("%Y-%m-%d %H:%M:%S.%f"), "top_id": row["top_id"],
                  "first_uuid": first["uuid"], "first_amplitude_id": first["amplitude_id"]}))
spark.stop()
"""


@pytest.fixture(scope="module")
def spark_python():
    return environment_python("SPARK_PYTHON", "pyspark")


def test_spark_reads_timestamps_and_longs_from_the_active_files(cli, standin, spark_python, folder_without_spaces):
    table = folder_without_spaces / "lake"  # Spark, like Polars, takes the files' paths as delta-rs gives them
    assert cli.run("--date", "2025-11-01", "--lake", str(table)).returncode == 0
    assert cli.run("--start", "20251101T05", "--end", "20251101T05", "--refetch", "--lake", str(table),
                   "--window-hours", "1").returncode == 0  # a replace: the folder now holds files no longer active
    active = DeltaTable(table)
    expected = active.to_pyarrow_table().to_pylist()
    assert len(list(table.rglob("*.parquet"))) > len(active.file_uris())

    result = subprocess.run([spark_python, "-c", READ, json.dumps(active.file_uris())], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYSPARK_PYTHON": spark_python,
                                              # Java's performance files would go to /tmp/hsperfdata_<user>
                                              "JAVA_TOOL_OPTIONS": "-XX:-UsePerfData"})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["types"]["event_time"] == "timestamp" and seen["types"]["amplitude_id"] == "bigint"
    assert seen["types"]["export_hour"] == "timestamp" and seen["types"]["location_lat"] == "double"
    assert seen["rows"] == len(expected)
    assert seen["event_ids"] == sum(row["event_id"] for row in expected)
    assert seen["top_id"] == max(row["amplitude_id"] for row in expected) > 2**53  # no float on the way
    assert seen["first_time"] == min(row["event_time"] for row in expected).strftime("%Y-%m-%d %H:%M:%S.%f")
    first = min(expected, key=lambda row: row["uuid"])
    assert (seen["first_uuid"], seen["first_amplitude_id"]) == (first["uuid"], first["amplitude_id"])
