"""pyflakes over the package: undefined names and unused imports fail the build
(a NameError in a rarely used branch is a crash an operator finds at 3 a.m.)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_pyflakes_clean():
    pytest.importorskip("pyflakes", reason="pyflakes is in the test extras; make test installs it")
    r = subprocess.run([sys.executable, "-m", "pyflakes", "agent", "benchmarks", "deploy/lab/lab", "deploy/lab/kvmslab",
                        "deploy/install.py", "deploy/dist.py", "tests/deploy", "tests/fuzz"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
