"""ebpf.compile_timeout: how long a probe's compiler child may take (a host under an emulated CPU, such as
the lab's kernel-initiator host under TCG, needs minutes where 60 s is plenty elsewhere)."""

from __future__ import annotations

import time

import pytest

from agent.ebpf import loader
from agent.ebpf.compiler import CompileError, compile_in_child
from agent.ebpf.loader import FAILED, LoadOptions, Probe


def test_a_compiler_child_that_never_answers_is_killed_after_the_timeout(tmp_path):
    """A real child process that never answers (a stand-in for clang stuck on a slow CPU): the agent stops
    waiting after `timeout`, kills it and says so."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(CompileError) as e:
        compile_in_child("", [], timeout=0.5, python=str(slow))
    took = time.monotonic() - t0
    assert "no answer from the compiler process" in str(e.value)
    assert "killed after timeout" in str(e.value)
    assert took < 10, took


class _Probe(Probe):
    name = "timeout_test"
    source_file = "timeout_test.bpf.c"

    def read(self):
        return None


def test_load_or_compile_hands_its_timeout_to_the_compiler_child(tmp_path):
    """Through the object cache's entry (no cache: compile), the same real child that never answers."""
    from agent.ebpf import compiler
    from agent.ebpf.objcache import load_or_compile

    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    real = compiler.compile_and_record

    def with_slow_python(text, cflags, attach=(), timeout=60.0, python=None, record=True):
        return real(text, cflags, attach, timeout, str(slow), record)

    t0 = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "compile_and_record", with_slow_python)
        with pytest.raises(CompileError, match="killed after timeout"):
            load_or_compile("", [], [], None, timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_probe_load_hands_the_configured_timeout_to_the_compiler(tmp_path, monkeypatch):
    (tmp_path / "timeout_test.bpf.c").write_text("/* nothing */\n")
    seen = []

    def fake_compile(text, cflags, attach, cache, paths=None, kernel_build=None, timeout=60.0):
        seen.append(timeout)
        raise CompileError("no answer from the compiler process (TimeoutError: timed out)")

    monkeypatch.setattr(loader, "load_or_compile", fake_compile)
    monkeypatch.setattr(loader, "bcc_available", lambda: None)
    rep = _Probe(LoadOptions(probes_dir=tmp_path, tracepoints=set(), compile_timeout=7.5)).load()
    assert seen == [7.5]
    assert rep.state == FAILED and "no answer from the compiler process" in rep.reason
    assert LoadOptions().compile_timeout == 60.0
