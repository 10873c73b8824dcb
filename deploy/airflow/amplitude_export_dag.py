"""Airflow 3: the nightly Amplitude export, one run per day, each after its day has ended.

Copy this file into the DAGs folder and set AMPLITUDE_EXPORT_HOME (on the workers) to the project's folder, the
one holding fetch_data.py and .venv/ (default /opt/amplitude-export). Credentials stay in that folder's .env.

The run for day D starts at 03:30 UTC on D+1 with {{ ds }} = D: a data interval of 24 h from 03:30 to 03:30
(CronDataIntervalTimetable). With "@daily", Airflow 3 would start the run of D at the start of D, before any of
its events exist. 03:30 leaves Amplitude the two hours it needs to make the day's last hour exportable.
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, task
from airflow.timetables.interval import CronDataIntervalTimetable

PROJECT = os.environ.get("AMPLITUDE_EXPORT_HOME", "/opt/amplitude-export")
EXPORT = (f"{shlex.quote(os.path.join(PROJECT, '.venv', 'bin', 'python'))} "
          f"{shlex.quote(os.path.join(PROJECT, 'fetch_data.py'))} --date {{{{ ds }}}} --json --quiet")

with DAG(
    dag_id="amplitude_export",
    description="Yesterday's raw Amplitude events, exactly once per hour",
    schedule=CronDataIntervalTimetable("30 3 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,  # a history goes in with one --start/--end run, not a run per day
    max_active_runs=1,  # one run per data folder at a time: the exporter's lock would fail a second one
    default_args={"retries": 3, "retry_delay": timedelta(minutes=30), "retry_exponential_backoff": True},
    tags=["amplitude", "export"],
) as dag:
    # The last line of stdout is the run's JSON summary: BashOperator pushes it to XCom. A failed run exits 1 (or 2
    # for a settings problem) and the task fails; a retry exports only the hours still missing.
    export = BashOperator(task_id="export", bash_command=EXPORT, do_xcom_push=True)

    @task
    def read_summary(summary: str) -> dict:
        """The export's summary from XCom, for the tasks after it: files, events, hours missing."""
        document = json.loads(summary)
        if document["status"] != "ok" or document["hours"]["missing"]:
            raise ValueError(f"the export left {document['hours']['missing']} hour(s) missing: {document['failures']}")
        return {"files": document["files"], "events": document["events"], "lake_version": document["lake_version"]}

    read_summary(export.output)
