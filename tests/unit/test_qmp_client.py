"""The QMP client on literal byte streams (agent/sources/qmp_vms.py): answers a hostile
or broken QEMU can give. Each case below was found by tests/fuzz/test_fuzz_qmp.py and
used to escape as TypeError/AttributeError instead of the source's QmpError."""

from __future__ import annotations

import socket
import time

import pytest

from agent.sources.qmp_vms import QmpClient, QmpError


def client(*answers: bytes) -> QmpClient:
    """A QmpClient whose socket is one end of a pair; the other end has already sent ``answers``."""
    c = QmpClient("/nonexistent", time.monotonic() + 2.0)
    c.sock.close()
    c.sock, peer = socket.socketpair()
    peer.sendall(b"".join(answers))
    peer.shutdown(socket.SHUT_WR)
    c._peer = peer  # kept open for the client's writes
    return c


@pytest.mark.parametrize("line", [b"null\n", b"1\n", b'"QMP"\n', b'["QMP"]\n'])
def test_a_message_that_is_not_an_object(line):
    c = client(line)
    with pytest.raises(QmpError, match="not a JSON object"):
        c._read_msg()


@pytest.mark.parametrize("reply", [b"null\n", b'{"event": "X"}\n7\n'])
def test_execute_reply_that_is_not_an_object(reply):
    with pytest.raises(QmpError, match="not a JSON object"):
        client(reply).execute("query-name")


@pytest.mark.parametrize("error", [b'{"error": null}\n', b'{"error": "boom"}\n', b'{"error": [1]}\n'])
def test_execute_error_that_is_not_an_object(error):
    with pytest.raises(QmpError, match="query-name: error"):
        client(error).execute("query-name")


def test_a_well_formed_exchange_still_works():
    c = client(b'{"event": "RESUME"}\n', b'{"return": {"name": "vm0"}}\n',
               b'{"error": {"class": "CommandNotFound", "desc": "no"}}\n')
    assert c.execute("query-name") == {"name": "vm0"}
    with pytest.raises(QmpError, match="query-x: CommandNotFound: no"):
        c.execute("query-x")


def test_query_block_entry_that_is_not_an_object_with_histograms_on(tmp_path):
    """query-block answering [1] made the histogram set-up call 1.get() (AttributeError)."""
    from agent.config import Config
    from agent.hostpaths import HostPaths
    from agent.records.vms import Vm
    from agent.sources import SourceContext
    from agent.sources.qmp_vms import QmpSource
    from tests.fuzz.test_fuzz_qmp import GREETING, FakeQmp, line

    srv = FakeQmp(tmp_path / "vm.qmp")
    srv.script = (line(GREETING), {"query-block": line({"return": [1, {"qdev": "d"}]})})
    cfg = Config()
    cfg.qmp.sockets, cfg.qmp.timeout, cfg.qmp.latency_histograms = [str(srv.path)], 2.0, True
    vm = QmpSource(SourceContext(cfg, HostPaths()))._query(str(srv.path))[0]
    srv.srv.close()
    assert isinstance(vm, Vm) and vm.name == "vm0" and vm.disks == ()
