"""The code's layout: one module per stage, imports in one direction, each file readable in one sitting."""

import ast
import subprocess
import sys

import pytest

import fetch_data
from tests.conftest import ROOT, copy_project

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path) -> set[str]:
    """The project's own modules that `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


GRAPH = {name: project_imports(path) - {name} for name, path in MODULES.items()}


def test_no_module_imports_the_entry_point():
    assert sorted(name for name, imported in GRAPH.items() if "fetch_data" in imported) == []


def test_imports_run_one_way():
    done, visiting = set(), []

    def visit(name):
        if name in visiting:
            pytest.fail(f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}")
        if name in done:
            return
        visiting.append(name)
        for imported in sorted(GRAPH[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_each_file_reads_in_one_sitting():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert lengths["fetch_data"] <= 430
    assert {name: n for name, n in lengths.items() if n > 600} == {}


def test_every_module_of_the_project_is_known_as_one():
    """A missing module is named as a file of the project only if fetch_data.py knows it as one."""
    assert set(fetch_data.PROJECT_MODULES) == set(MODULES) - {"fetch_data"}


@pytest.mark.quick
def test_a_missing_file_of_the_project_is_named_as_such(tmp_path):
    project = copy_project(tmp_path / "broken copy")
    (project / "store.py").unlink()
    result = subprocess.run([sys.executable, str(project / "fetch_data.py")], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: store.py, a file of this project, is missing or broken beside {project / 'fetch_data.py'}: "
        "restore it (git checkout -- store.py) or clone the project again"
    )
    assert "Python package" not in result.stderr
