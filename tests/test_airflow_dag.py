"""deploy/airflow/amplitude_export_dag.py as Airflow 3 loads it (DagBag, in Airflow's own virtual environment),
and the command it renders run against the stand-in, its last line read back as Airflow's XCom would be."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, environment_python

pytestmark = pytest.mark.slow

DAG_FOLDER = ROOT / "deploy" / "airflow"

LOAD = r"""
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.timetables.base import TimeRestriction

bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("amplitude_export")
facts = {"errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags)}
if dag is not None:
    export = dag.get_task("export")
    first = dag.timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=True))
    interval = dag.timetable.infer_manual_data_interval(run_after=pendulum.datetime(2025, 11, 2, 3, 30, tz="UTC"))
    ds = interval.start.strftime("%Y-%m-%d")
    facts.update(
        timetable=type(dag.timetable).__name__, summary=dag.timetable.summary, catchup=dag.catchup,
        first_run_after=first.run_after.isoformat(), first_interval=[first.data_interval.start.isoformat(),
                                                                     first.data_interval.end.isoformat()],
        ds=ds, command=export.render_template(export.bash_command, {"ds": ds}),
        retries=export.retries, retry_delay=export.retry_delay.total_seconds(), do_xcom_push=export.do_xcom_push,
        downstream=sorted(export.downstream_task_ids),
    )
print(json.dumps(facts))
"""

READ_SUMMARY = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

dag = DagBag(dag_folder=sys.argv[1]).dags["amplitude_export"]
try:
    print(json.dumps({"result": dag.get_task("read_summary").python_callable(sys.argv[2])}))
except ValueError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.fixture(scope="module")
def airflow_python():
    return environment_python("AIRFLOW_PYTHON", "Airflow")


def in_airflow(python: str, script: str, *args: str, home: Path, project: Path) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AMPLITUDE_EXPORT_HOME": str(project),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "false"}
    result = subprocess.run([python, "-c", script, str(DAG_FOLDER), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_airflow_loads_the_dag_and_its_command_exports_the_day_it_names(cli, standin, airflow_python, tmp_path):
    (cli.project / ".venv").symlink_to(ROOT / ".venv")  # the project as deployed: its own .venv beside it
    facts = in_airflow(airflow_python, LOAD, home=tmp_path / "airflow", project=cli.project)
    assert facts["errors"] == {} and facts["dag_ids"] == ["amplitude_export"]
    assert facts["timetable"] == "CronDataIntervalTimetable" and facts["summary"] == "30 3 * * *"
    # The run for a day starts after the day has ended, and {{ ds }} names that day.
    assert facts["first_interval"] == ["2025-01-01T03:30:00+00:00", "2025-01-02T03:30:00+00:00"]
    assert facts["first_run_after"] == "2025-01-02T03:30:00+00:00"
    assert facts["ds"] == "2025-11-01"
    python, script = cli.project / ".venv" / "bin" / "python", cli.project / "fetch_data.py"
    assert facts["command"] == f"'{python}' '{script}' --date 2025-11-01 --json --quiet"
    assert facts["retries"] >= 1 and facts["retry_delay"] > 0 and facts["do_xcom_push"] is True
    assert facts["downstream"] == ["read_summary"] and facts["catchup"] is False

    result = subprocess.run(["bash", "-c", facts["command"]], cwd=cli.workdir, env=cli.env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    xcom = result.stdout.strip().splitlines()[-1]  # what BashOperator pushes
    read = in_airflow(airflow_python, READ_SUMMARY, xcom, home=tmp_path / "airflow", project=cli.project)
    assert read["result"]["events"] == json.loads(xcom)["events"] > 0
    assert read["result"]["files"] == [str(path) for path in cli.outputs()]

    failed = json.dumps({**json.loads(xcom), "status": "failed", "hours": {"missing": 3}, "failures": ["x"]})
    read = in_airflow(airflow_python, READ_SUMMARY, failed, home=tmp_path / "airflow", project=cli.project)
    assert "3 hour(s) missing" in read["error"]
