"""The README is the manual: every flag and variable is in it, and .env.example lists exactly what the code reads."""

import re

import fetch_data as fd
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
CODE = "".join(p.read_text() for p in ROOT.glob("*.py") if p.name != "amplitude_standin.py")
VARIABLES_READ = set(re.findall(r'"((?:AMP|AZURE)_[A-Z_]+)"', CODE))


def flags():
    return {option for action in fd.build_parser()._actions for option in action.option_strings if option.startswith("--")}


def test_every_flag_is_in_the_readme():
    missing = sorted(flag for flag in flags() if f"`{flag}" not in README)
    assert missing == []


def test_every_variable_is_in_the_readme():
    assert len(VARIABLES_READ) >= 14
    assert sorted(v for v in VARIABLES_READ if f"`{v}`" not in README) == []


def test_env_example_lists_exactly_the_variables_the_code_reads():
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert listed == VARIABLES_READ


def test_the_quick_start_commands_are_the_ones_ci_runs():
    assert "bash test.sh" in README
    assert "bash test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "fetch_data.py --demo" in README
