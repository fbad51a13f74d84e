"""The no-skip rule (tests/conftest.py): under KVMSCOPE_REQUIRE_REAL=1 (make test) a skip
fails the run unless the machine truly lacks what the test needs; without it, skips stay
skips. Checked on a tiny test file run by a real pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import MACHINE_LACKS, ROOT

INNER = '''
import pytest
from tests.conftest import skip_lacking

@pytest.fixture(scope="session")
def component():
    pytest.skip("not root")

def test_passes():
    assert True

def test_skips_in_body():
    pytest.skip("promtool not installed")

@pytest.mark.skipif(True, reason="qemu-system-x86_64 not installed")
def test_skipif_marker():
    pass

def test_skips_in_fixture(component):
    pass

def test_allowed():
    skip_lacking("kernel-iscsi-initiator", "the lab's guests have one")

@pytest.mark.xfail(strict=True, reason="defect 99")
def test_known_defect():
    assert False
'''


def run_inner(tmp_path, require: str | None, body: str = INNER, name: str = "test_inner.py"):
    (tmp_path / name).write_text(textwrap.dedent(body))
    # the hooks come from the project's conftest, imported into the temp dir's own
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport, "
                                          "pytest_make_collect_report  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KVMSCOPE_REQUIRE_REAL", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(ROOT)
    if require is not None:
        env["KVMSCOPE_REQUIRE_REAL"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def summary(out: str) -> str:
    return out.strip().splitlines()[-1]


@pytest.mark.parametrize("require", [None, "0", ""])
def test_without_the_rule_skips_stay_skips(tmp_path, require):
    r = run_inner(tmp_path, require)
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(r.stdout)
    assert "1 passed" in s and "4 skipped" in s and "1 xfailed" in s and "fail" not in s.replace("xfail", ""), s


def test_under_the_rule_every_unlisted_skip_fails(tmp_path):
    r = run_inner(tmp_path, "1")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    s = summary(out)
    # body skip -> failed; marker and fixture skips happen at setup -> errors; the allow-listed one stays a skip
    assert "1 failed" in s and "1 passed" in s and "2 error" in s and "1 skipped" in s and "1 xfailed" in s, s
    for test, reason in (("test_skips_in_body", "promtool not installed"),
                         ("test_skipif_marker", "qemu-system-x86_64 not installed"),
                         ("test_skips_in_fixture", "not root")):
        assert test in out and f"skipped under KVMSCOPE_REQUIRE_REAL=1 (make test): {reason}" in out, out
    assert f"SKIPPED [1] test_inner.py:23: machine lacks: {MACHINE_LACKS['kernel-iscsi-initiator']}" in out, out


def test_under_the_rule_a_module_level_skip_fails_collection(tmp_path):
    body = '''
    import pytest
    pytest.importorskip("surely_not_a_module_kvmscope", reason="needs the surely module")

    def test_never():
        pass
    '''
    r = run_inner(tmp_path, "1", body, name="test_mod.py")
    assert r.returncode != 0 and "skipped under KVMSCOPE_REQUIRE_REAL=1" in r.stdout, r.stdout + r.stderr
    r = run_inner(tmp_path, None, body, name="test_mod.py")
    assert r.returncode == 5 and "1 skipped" in summary(r.stdout), r.stdout + r.stderr  # 5: no test ran


def test_makefile_test_target_sets_the_rule_and_unit_does_not():
    text = (ROOT / "Makefile").read_text()
    recipes = {}
    for block in text.split("\n\n"):
        for i, line in enumerate(block.splitlines()):
            if line and not line.startswith(("\t", "#", " ")) and ":" in line:
                recipes[line.split(":")[0]] = "\n".join(block.splitlines()[i + 1:])
    assert "KVMSCOPE_REQUIRE_REAL=1" in recipes["test"] and "pytest" in recipes["test"]
    assert "KVMSCOPE_REQUIRE_REAL" not in recipes["unit"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
