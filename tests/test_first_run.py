"""A first run and a first month: the demo kept apart, clear words for a wrong interpreter or a missing package,
.env found beside the script, nights that heal themselves, cron that speaks only on failure, systemd units."""

import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from settings import parse_settings
from tests.conftest import API_KEY, ROOT, SECRET_KEY, as_array, copy_project
from windows import HOUR, Window, format_hour, yesterday

NOW = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)  # for settings read in-process, where the clock is given


@pytest.fixture
def day_of():
    """The day N days before yesterday, yesterday being taken when the test starts, not when the suite does."""
    last = yesterday(dt.datetime.now(dt.UTC))

    def day(days_before_yesterday: int) -> Window:
        start = last.start - dt.timedelta(days=days_before_yesterday)
        return Window(start, start + 23 * HOUR)

    return day


def asked(standin) -> list[tuple[str, str]]:
    return [(r["start"], r["end"]) for r in standin.requests]


def labels(*windows: Window) -> list[tuple[str, str]]:
    return [(format_hour(w.start), format_hour(w.end)) for w in windows]


# 1. The demo never touches the real export


@pytest.mark.slow
def test_the_demo_never_writes_where_env_sends_the_real_export(cli, standin, day_of):
    (cli.workdir / ".env").write_text("AMP_DATA_DIR=real/data\nAMP_LOG_DIR=real/logs\n")
    real = cli.workdir / "real"  # a relative path in .env is relative to the folder of that .env
    result = cli.run("--demo", AMP_DATA_DIR=None, AMP_LOG_DIR=None)
    assert result.returncode == 0, result.stderr
    assert not real.exists() and not cli.data.exists() and not cli.logs.exists()
    demo_manifest = cli.project / "demo" / "data" / "manifest.jsonl"
    assert [json.loads(line)["start"] for line in demo_manifest.read_text().splitlines()]
    assert list((cli.project / "demo" / "logs").glob("log_*.log"))
    # The next real run still exports yesterday, where .env says.
    result = cli.run(AMP_DATA_DIR=None, AMP_LOG_DIR=None)
    assert result.returncode == 0, result.stderr
    assert asked(standin) == labels(day_of(0))
    manifest = [json.loads(line) for line in (real / "data" / "manifest.jsonl").read_text().splitlines()]
    assert [r["start"] for r in manifest] == [format_hour(day_of(0).start)]
    assert list((real / "logs").glob("log_*.log"))


@pytest.mark.slow
def test_environment_variables_do_not_move_the_demo_but_its_own_flags_do(cli):
    result = cli.run("--demo", AMP_DATA_DIR=str(cli.data), AMP_LOG_DIR=str(cli.logs))
    assert result.returncode == 0, result.stderr
    assert not cli.data.exists() and not cli.logs.exists()
    assert (cli.project / "demo" / "data" / "manifest.jsonl").exists()
    result = cli.run("--demo", "--data-dir", "elsewhere", "--log-dir", "elsewhere-logs")
    assert result.returncode == 0, result.stderr
    assert (cli.workdir / "elsewhere" / "manifest.jsonl").exists()
    assert list((cli.workdir / "elsewhere-logs").glob("log_*.log"))


def test_demo_uploads_go_under_a_prefix_of_their_own():
    pytest.importorskip("azure.storage.blob")
    connection = "DefaultEndpointsProtocol=https;AccountName=lake;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    env = {"AZURE_STORAGE_CONNECTION_STRING": connection, "AZURE_BLOB_PREFIX": "lake/amplitude"}
    demo = parse_settings(["--demo", "--upload"], env, NOW)
    assert demo.upload.prefix == "demo/amplitude/events"
    assert parse_settings(["--demo", "--upload", "--blob-prefix", "try/me"], env, NOW).upload.prefix == "try/me"
    real = parse_settings(["--upload"], {**env, "AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}, NOW)
    assert real.upload.prefix == "lake/amplitude"


def test_env_example_sets_no_value():
    values = re.findall(r"^[A-Z_]+=(.*)$", (ROOT / ".env.example").read_text(), re.MULTILINE)
    assert values and all(value == "" for value in values)


# 2. A wrong interpreter or a missing package: one line and exit 2


def test_a_missing_package_is_one_line_naming_it_and_a_fix_that_pastes(tmp_path):
    project = copy_project(tmp_path / "my projects" / "amplitude export")
    # -S: no site-packages, as with a system python outside the virtual environment.
    result = subprocess.run([sys.executable, "-S", str(project / "fetch_data.py")], cwd=tmp_path, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    found = re.fullmatch(rf"Error: the Python package \S+ is missing for {re.escape(sys.executable)}; (.*)", lines[0])
    assert found
    # The command as printed is what a shell runs: the paths with spaces come back whole.
    assert shlex.split(found.group(1)) == [sys.executable, "-m", "pip", "install", "-r",
                                           str(project / "requirements.txt")]


def older_python() -> str | None:
    """A Python 3.8 to 3.10 that really runs (a pyenv shim may exist without its version)."""
    pyenv = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.[89]*/bin/python"))
    pyenv += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python"))
    candidates = [*reversed(pyenv), *filter(None, map(shutil.which, ["python3.10", "python3.9", "python3.8"]))]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; assert sys.version_info < (3, 11)"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def test_an_interpreter_older_than_3_11_is_one_line_and_exit_2(tmp_path):
    python = older_python()
    if python is None:
        pytest.skip("no Python older than 3.11 on this machine")
    result = subprocess.run([python, str(ROOT / "fetch_data.py"), "--demo"], cwd=tmp_path, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: fetch_data.py needs Python 3.11 or newer; ")
    assert "-m venv" in result.stderr


# 3. .env beside fetch_data.py


@pytest.fixture
def installed(tmp_path):
    """The program as installed elsewhere (/opt/x), run from another folder."""
    home = copy_project(tmp_path / "opt" / "x")
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    return home, elsewhere


def run_installed(installed, cli, *args, **env):
    home, elsewhere = installed
    return subprocess.run([sys.executable, str(home / "fetch_data.py"), *args], cwd=elsewhere,
                          env=cli.env(AMP_API_KEY=None, AMP_SECRET_KEY=None, **env), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.quick
def test_dotenv_beside_the_script_is_read_when_run_from_elsewhere(cli, standin, installed):
    home, elsewhere = installed
    (home / ".env").write_text(f"AMP_API_KEY={API_KEY}\nAMP_SECRET_KEY={SECRET_KEY}\n")
    result = run_installed(installed, cli, "--date", "2025-11-01")
    assert result.returncode == 0, result.stderr
    # Exactly where a run from the project folder writes, and it says so.
    assert (home / "data" / "manifest.jsonl").exists() and (home / "logs").is_dir()
    assert not (elsewhere / "data").exists() and not (elsewhere / "logs").exists()
    assert f"Data folder: {home / 'data'}" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"Log file: {home / 'logs' / 'log_'}")


def test_the_current_folders_dotenv_wins_and_the_environment_over_both(cli, standin, installed):
    home, elsewhere = installed
    (home / ".env").write_text(f"AMP_API_KEY=wrong\nAMP_SECRET_KEY={SECRET_KEY}\nAMP_DATA_OUTFILE=beside\n")
    (elsewhere / ".env").write_text(f"AMP_API_KEY={API_KEY}\nAMP_DATA_OUTFILE=current\n")
    result = run_installed(installed, cli, "--date", "2025-11-01", AMP_DATA_OUTFILE="environment")
    assert result.returncode == 0, result.stderr
    assert [p.name[14:] for p in (home / "data").glob("*.json")] == ["environment.json"]


def test_missing_keys_say_where_dotenv_was_looked_for(cli, installed):
    home, elsewhere = installed
    result = run_installed(installed, cli, "--date", "2025-11-01")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: AMP_API_KEY and AMP_SECRET_KEY not set: put them in .env (looked in {elsewhere / '.env'} and "
        f"{home / '.env'}) or the environment; see .env.example"
    )


def test_help_names_the_keys_and_dotenv(cli):
    result = cli.run("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "AMP_API_KEY" in text and "AMP_SECRET_KEY" in text and ".env" in text


# 4. A missed night heals itself


def test_catch_up_exports_each_missing_stretch_and_nothing_present(cli, standin, day_of):
    assert cli.run("--date", f"{day_of(2).start:%Y-%m-%d}").returncode == 0
    standin.requests.clear()
    result = cli.run("--catch-up", "3")
    assert result.returncode == 0, result.stderr
    assert asked(standin) == labels(day_of(3), day_of(1), day_of(0))
    names = sorted(p.name[14:] for p in cli.outputs())
    for window in (day_of(3), day_of(1), day_of(0)):
        assert f"ampl_dump_{window.label}.json" in names
    for window in (day_of(3), day_of(2), day_of(1), day_of(0)):
        record = next(r for r in cli.manifest() if r["start"] == format_hour(window.start))
        assert (cli.data / record["file"]).read_bytes() == as_array(standin.expected_lines(window.start, window.end))
    standin.requests.clear()
    assert cli.run(AMP_CATCH_UP_DAYS="3").returncode == 0
    assert standin.requests == []


def test_catch_up_fills_a_missing_part_of_a_day_alone(cli, standin, day_of):
    day = day_of(1)
    assert cli.run("--start", format_hour(day.start), "--end", format_hour(day.start + 9 * HOUR)).returncode == 0
    standin.requests.clear()
    result = cli.run("--catch-up", "1")
    assert result.returncode == 0, result.stderr
    assert asked(standin) == labels(Window(day.start + 10 * HOUR, day.end), day_of(0))


def test_with_nothing_to_catch_up_the_night_keeps_the_seeds_file_name(cli, standin, day_of):
    assert cli.run("--start", f"{day_of(2).start:%Y-%m-%d}", "--end", f"{day_of(1).start:%Y-%m-%d}").returncode == 0
    standin.requests.clear()
    result = cli.run("--catch-up", "2")
    assert result.returncode == 0, result.stderr
    assert asked(standin) == labels(day_of(0))
    assert re.fullmatch(r"\d{8}_\d{4}_ampl_dump\.json", cli.manifest()[-1]["file"])


def test_catch_up_goes_with_the_nightly_default_only(cli, standin):
    result = cli.run("--date", "2025-11-01", "--catch-up", "3")
    assert result.returncode == 2
    assert "--catch-up goes with the nightly default" in result.stderr
    # From the environment (a .env made for cron) it does not get in the way of a one-off --date.
    result = cli.run("--date", "2025-11-01", AMP_CATCH_UP_DAYS="3")
    assert result.returncode == 0, result.stderr
    assert asked(standin) == [("20251101T00", "20251101T23")]


# 5. Cron speaks up only on failure


def test_quiet_prints_nothing_on_success_and_the_log_keeps_everything(cli, standin):
    result = cli.run("--date", "2025-11-01", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    log = next(cli.logs.glob("log_*.log")).read_text()
    assert "INFO - Fetching 20251101T00-20251101T23" in log and "INFO - Summary:" in log


def test_quiet_prints_warnings_and_errors(cli, standin):
    standin.add_fault(503)
    standin.add_fault(418, start="20251102T00")
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", AMP_QUIET="1")
    assert result.returncode == 1
    *logged, last = result.stderr.splitlines()
    assert {line.split(" - ")[1] for line in logged} == {"WARNING", "ERROR"}
    assert last.startswith(f"Log file: {cli.logs / 'log_'}")
    assert "server error (HTTP 503)" in result.stderr and "Amplitude answered HTTP 418" in result.stderr


def test_a_quiet_setting_that_is_not_a_yes_or_no_is_a_usage_error(cli, standin):
    result = cli.run(AMP_QUIET="sometimes")
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: AMP_QUIET: expected 1/true/yes/on or 0/false/no/off, got 'sometimes'"


# 6. Scheduling


def readme_cron_lines() -> list[str]:
    pages = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "scheduling.md").read_text()]
    blocks = [block for page in pages for block in re.findall(r"```cron\n(.*?)```", page, re.DOTALL)]
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_cron_line_catches_up_reports_failures_and_claims_no_cron_tz():
    lines = readme_cron_lines()
    assert lines
    assert all("CRON_TZ" not in line for line in lines)
    for line in lines:
        assert "--quiet" in line and "--catch-up" in line
        assert "2>" not in line  # stderr reaches cron's mail
        words = shlex.split(line.split(None, 5)[5])
        assert words[0].endswith("/.venv/bin/python") and words[1].endswith("/fetch_data.py")
        parse_settings(words[2:], {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}, NOW)


def unit_value(text: str, key: str) -> str:
    return re.search(rf"^{key}=(.*)$", text, re.MULTILINE).group(1).strip()


def test_the_timer_runs_at_0330_utc_and_catches_up_after_downtime():
    timer = (ROOT / "deploy" / "amplitude-export.timer").read_text()
    assert unit_value(timer, "OnCalendar") == "*-*-* 03:30:00 UTC"
    assert unit_value(timer, "Persistent") == "true"
    service = (ROOT / "deploy" / "amplitude-export.service").read_text()
    command = shlex.split(unit_value(service, "ExecStart"))
    assert command[1].endswith("/fetch_data.py")
    settings = parse_settings(command[2:], {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s"}, NOW)
    assert settings.quiet and settings.windows[0].start < yesterday(NOW).start


def test_systemd_accepts_the_units(tmp_path, folder_without_spaces):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not on this machine")
    checkout = folder_without_spaces / "amplitude-export"  # the units name /opt/amplitude-export, without spaces
    checkout.symlink_to(ROOT)
    python = sys.executable.replace(str(ROOT), str(checkout), 1)  # the checkout's own .venv, if it is there
    for name in ("amplitude-export.service", "amplitude-export.timer", "amplitude-export-failure.service"):
        text = (ROOT / "deploy" / name).read_text()
        # Installed at /opt/amplitude-export; here the checkout and its interpreter stand in for it.
        text = text.replace("/opt/amplitude-export/.venv/bin/python", python)
        (tmp_path / name).write_text(text.replace("/opt/amplitude-export", str(checkout)))
    result = subprocess.run(["systemd-analyze", "verify", "amplitude-export.timer", "amplitude-export.service",
                             "amplitude-export-failure.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "amplitude-export" in line]
    assert problems == []
    calendar = subprocess.run(["systemd-analyze", "calendar", "*-*-* 03:30:00 UTC"], capture_output=True, text=True)
    assert "Normalized form: *-*-* 03:30:00 UTC" in calendar.stdout


def test_a_failed_run_is_told_to_the_journal_and_mailed(tmp_path):
    """deploy/on-failure.sh with stand-ins for logger and mail on PATH, which record how they were called."""
    bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    logs.mkdir()
    for tool in ("logger", "mail"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/{tool}.args"\ncat > "{tmp_path}/{tool}.stdin"\n'
                          if tool == "mail" else f'#!/bin/sh\necho "$@" > "{tmp_path}/{tool}.args"\n')
        script.chmod(0o755)
    (logs / "log_20251106_033000.log").write_text("old run\n")
    latest = logs / "log_20251107_033000.log"
    latest.write_text("".join(f"line {n}\n" for n in range(80)) + "ERROR - Window failed\n")
    os.utime(logs / "log_20251106_033000.log", (1, 1))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MAILTO": "data-team@example.com"}
    result = subprocess.run(["sh", str(ROOT / "deploy" / "on-failure.sh"), str(logs)], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "logger.args").read_text().strip() == (
        f"-p user.err -t amplitude-export The nightly Amplitude export failed; log: {latest}")
    assert (tmp_path / "mail.args").read_text().startswith("-s Amplitude export failed on ")
    assert (tmp_path / "mail.args").read_text().strip().endswith("data-team@example.com")
    mailed = (tmp_path / "mail.stdin").read_text()
    assert mailed.endswith("line 79\nERROR - Window failed\n") and "line 29\n" not in mailed
