import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from amplitude_standin import StandIn

ROOT = Path(__file__).resolve().parents[1]

API_KEY = "test-api-key-5f2a81"
SECRET_KEY = "test-secret-9c1d77"
UTC = dt.UTC


def wait_for(condition, timeout: float = 30):
    """Poll until `condition()` holds, and give its value; a test fails rather than hangs when it never does."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def processes_running(script: Path, parent: int | None = None) -> list[int]:
    """The processes running `script`, children of `parent` only if given (a test's own copy of the project's file
    names only its own processes; the project's own file is shared by the tests running at once, on other cores); an
    ended one whose parent has not reaped it has no command line and is not among them."""
    wanted = str(script).encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if wanted not in cmdline.read().split(b"\0"):
                    continue
            if parent is None or parent_of(int(entry)) == parent:
                found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[1])  # the name before ")" may hold spaces


def hour(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y%m%dT%H").replace(tzinfo=UTC)


def as_array(lines: list[bytes]) -> bytes:
    """The exporter's JSON array layout for these event lines."""
    return b"[\n" + b",\n".join(lines) + b"\n]\n" if lines else b"[]\n"


def as_jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


@pytest.fixture
def standin():
    with StandIn(API_KEY, SECRET_KEY) as server:
        yield server


# fetch_data.py run with its clock set: windows.now_utc, which every module takes the time from, answers `now`.
AT_A_GIVEN_TIME = (
    "import datetime, runpy, sys; sys.path.insert(0, sys.argv[1]); import windows; "
    "moment = datetime.datetime.fromisoformat(sys.argv[2]); windows.now_utc = lambda: moment; "
    "sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture
def folder_without_spaces():
    """A new folder whose path holds no space, on this machine's own temporary space, removed afterwards. The suite
    may run from a clone whose path holds spaces, and Polars cannot read a local Delta table whose path holds one
    (delta-rs hands it percent-encoded file paths: pola-rs/polars#20944); nor can a systemd unit name such a path
    unquoted."""
    folder = Path(tempfile.mkdtemp(prefix="amplitude-export-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"))
    assert " " not in str(folder)
    yield folder
    shutil.rmtree(folder)


def copy_project(destination: Path) -> Path:
    """The project's code as a fresh clone has it, in `destination`: what a run writes by default lands there."""
    destination.mkdir(parents=True)
    for source in [*ROOT.glob("*.py"), *ROOT.glob("requirements*.txt")]:
        shutil.copy2(source, destination / source.name)
    shutil.copytree(ROOT / "templates", destination / "templates")
    return destination


class Cli:
    """fetch_data.py run as a user runs it: a subprocess started in a folder of its own (`workdir`), from a copy of
    the project whose path holds a space, talking HTTP to the stand-in."""

    def __init__(self, tmp_path: Path, standin: StandIn):
        self.workdir = tmp_path / "work dir"
        self.workdir.mkdir()
        self.project = copy_project(tmp_path / "amplitude export")
        self.standin = standin
        self.data = self.project / "data"
        self.logs = self.project / "logs"

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMP_", "AZURE_"))}
        env.update(
            AMP_API_KEY=API_KEY, AMP_SECRET_KEY=SECRET_KEY, AMP_BASE_URL=self.standin.base_url, AMP_DELAY_SECONDS="0",
        )
        env.pop("PYTHONPATH", None)
        env.update({k: v for k, v in extra.items() if v is not None})
        for key in [k for k, v in extra.items() if v is None]:
            env.pop(key, None)
        return env

    def command(self, *args, now: dt.datetime | None = None) -> list[str]:
        script = str(self.project / "fetch_data.py")
        if now is None:
            return [sys.executable, script, *args]
        return [sys.executable, "-c", AT_A_GIVEN_TIME, str(self.project), now.isoformat(), script, *args]

    def run(self, *args, timeout=120, now=None, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args, now=now), cwd=self.workdir, env=self.env(**env), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def start(self, *args, now=None, **env) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args, now=now), cwd=self.workdir, env=self.env(**env), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )

    def outputs(self) -> list[Path]:
        """Export files under their final names, oldest window first."""
        if not self.data.exists():
            return []
        own = ("manifest.jsonl", "report.html")
        return sorted(p for p in self.data.iterdir() if not p.name.startswith(".") and p.name not in own)

    def manifest(self) -> list[dict]:
        import json

        path = self.data / "manifest.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def leftovers(self) -> list[Path]:
        return sorted(self.data.glob(".ampl-*")) if self.data.exists() else []

    def everything_written(self) -> str:
        """All text the run left behind, to look for secrets in."""
        chunks = []
        for folder in (self.data, self.logs):
            if folder.exists():
                chunks += [p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()]
        return "\n".join(chunks)


@pytest.fixture
def cli(tmp_path, standin):
    return Cli(tmp_path, standin)


def missing(what: str) -> None:
    """A service or tool test.sh provides is not there: the test fails under CI, and is skipped elsewhere."""
    message = f"{what}: run the tests with `bash test.sh`"
    pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def environment_python(variable: str, what: str) -> str:
    """The interpreter of a tool's own virtual environment (test.sh makes them under .test-envs/)."""
    python = os.environ.get(variable, "")
    if not Path(python).is_file():
        missing(f"{what}'s environment is missing")
    return python


# Azurite, started by test.sh: its address and key come in AZURITE_* variables.


@pytest.fixture(scope="session")
def azurite():
    names = ("AZURITE_BLOB_ENDPOINT", "AZURITE_ACCOUNT", "AZURITE_KEY")
    if not all(os.environ.get(n) for n in names):
        missing("Azurite is not running")
    endpoint, account, key = (os.environ[n] for n in names)
    return {
        "account": account,
        "key": key,
        "account_url": f"{endpoint}/{account}",
        "connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};BlobEndpoint={endpoint}/{account};"
        ),
    }


@pytest.fixture
def container_name():
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def service(azurite):
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azurite["connection_string"])


def assert_no_secrets(result: subprocess.CompletedProcess, cli: Cli) -> None:
    for text in (result.stdout, result.stderr, cli.everything_written()):
        assert API_KEY not in text
        assert SECRET_KEY not in text
        assert "Authorization" not in text
        assert "Basic " not in text


def pytest_collection_modifyitems(items):
    """Markers from what a test uses: `e2e` (fetch_data.py as a subprocess), `azure` (Azurite), `browser`
    (Chromium). `bash test.sh --quick` runs the unit tests and the end-to-end tests marked `quick`."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "cli" in fixtures:
            item.add_marker(pytest.mark.e2e)
        if "azurite" in fixtures:
            item.add_marker(pytest.mark.azure)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)
