"""Pure decoders and renderers of the eBPF probes (no kernel needed)."""

from pathlib import Path

import pytest

from agent.ebpf import decode
from agent.ebpf.block_io import DeviceNames
from agent.ebpf.loader import LoadOptions, ProbeStats
from agent.ebpf.requirements import check_headers, check_privileges
from agent.exporters.render_ebpf import render_block_io, render_tcp_retrans
from agent.hostpaths import HostPaths
from agent.records.ebpf import BlockHistogram, BlockIoData
from agent.records.ebpf import TcpRetransData


def test_slot_to_bucket_bound_mapping_is_pinned():
    # bpf_log2l: slot 0 = 0 ns, slot s = [2^(s-1), 2^s) ns -> le = 2^s ns
    assert [decode.slot_upper_ns(s) for s in range(5)] == [1, 2, 4, 8, 16]
    assert decode.slot_bound_seconds(10) == 1.024e-06
    assert decode.slot_bound_seconds(20) == 0.001048576
    assert decode.slot_bound_seconds(36) == 68.719476736
    for ns in (1, 2, 3, 4, 1000, 1023, 1024, 123456789):
        s = decode.slot_of_ns(ns)
        assert decode.slot_upper_ns(s - 1) <= ns < decode.slot_upper_ns(s)
    assert decode.slot_of_ns(0) == 0


def test_cumulative_buckets_every_bound_and_overflow():
    b = decode.cumulative_buckets({0: 1, 3: 2, 5: 4, 7: 8}, slot_max=5)
    assert [le for le, _ in b] == ["1e-09", "2e-09", "4e-09", "8e-09", "1.6e-08", "3.2e-08", "+Inf"]
    assert [c for _, c in b] == [1, 1, 1, 3, 3, 7, 15]


def test_dev_t_and_uevent(tmp_path):
    assert decode.dev_major_minor((7 << 20) | 3) == (7, 3)
    assert decode.dev_major_minor((259 << 20) | 1048575) == (259, 1048575)
    d = tmp_path / "sys" / "dev" / "block" / "7:3"
    d.mkdir(parents=True)
    (d / "uevent").write_text("MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n")
    names = DeviceNames(HostPaths(sysfs=tmp_path / "sys"))
    assert names.name((7 << 20) | 3) == "loop3"
    assert names.name((8 << 20) | 0) == "8:0"  # unknown: MAJ:MIN, not cached


def test_addresses_and_states():
    assert decode.addr_text(2, bytes([198, 18, 93, 2]) + bytes(12)) == "198.18.93.2"
    assert decode.addr_text(10, bytes(15) + b"\x01") == "::1"
    assert decode.addr_text(10, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])) == "10.0.0.1"
    assert decode.tcp_state_name(1) == "ESTABLISHED" and decode.tcp_state_name(7) == "CLOSE"
    fmt = 'print fmt: "x", __print_symbolic(REC->newstate, { 1, "TCP_ESTABLISHED" }, { 7, "TCP_CLOSE" })'
    assert decode.parse_state_symbols(fmt) == {1: "ESTABLISHED", 7: "CLOSE"}


@pytest.mark.parametrize("rwbs,op", [("R", "read"), ("RA", "read"), ("WS", "write"), ("FWS", "write"),
                                     ("WFS", "write"), ("F", "flush"), ("FF", "flush"), ("D", "discard"),
                                     ("DE", "discard"), ("N", "other"), ("", "other")])
def test_rwbs_op(rwbs, op):
    assert decode.rwbs_op(rwbs) == op


def test_fdinfo_and_format_fields():
    info = decode.parse_fdinfo("pos:\t0\nflags:\t02000002\nprog_tag:\tfe34\nrun_time_ns:\t1200\nrun_cnt:\t4\n")
    assert info["run_time_ns"] == 1200 and info["run_cnt"] == 4
    fields = decode.parse_format_fields("\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;\n"
                                        "\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;\n")
    assert set(fields) == {"saddr", "err"}
    assert decode.counter_delta(None, 5) == 5 and decode.counter_delta(5, 9) == 4 and decode.counter_delta(9, 2) == 2


def test_loader_messages(tmp_path):
    c = check_headers(HostPaths(sysfs=tmp_path), tmp_path / "build")
    assert not c.ok and f"no kernel headers for bcc at {tmp_path / 'build'}" == c.detail and "linux-headers" in c.fix
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "status").write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    c = check_privileges(HostPaths(procfs=tmp_path / "proc"), euid=1000)
    assert not c.ok and "CAP_BPF" in c.fix
    (tmp_path / "proc" / "self" / "status").write_text("CapEff:\t000000c000000000\n")  # CAP_PERFMON+CAP_BPF
    assert check_privileges(HostPaths(procfs=tmp_path / "proc"), euid=1000).ok
    from agent.ebpf.tcp_retrans import TcpRetransProbe
    assert TcpRetransProbe(LoadOptions(storage_ports=(3260, 860))).storage_port_macro() == \
        "-DIS_STORAGE_PORT(p)=((p)==860||(p)==3260)"


def test_render_block_histogram():
    h = BlockHistogram("loop0", 7, 0, "read", "total", {10: 2, 12: 1}, 3, 5000, 12288)
    data = BlockIoData((h,), (), {}, slot_max=14, probe=ProbeStats(events=9, lost=1, run_time_ns=900, run_cnt=9))
    fams = {f.name: f for f in render_block_io(data)}
    lat = fams["kvmscope_block_io_latency_seconds"]
    buckets = [(s.labels["le"], s.value) for s in lat.samples if s.name.endswith("_bucket")]
    assert len(buckets) == 16 and buckets[-1] == ("+Inf", 3)
    assert dict(buckets)["1.024e-06"] == 2 and dict(buckets)["4.096e-06"] == 3
    assert [s.value for s in lat.samples if s.name.endswith("_sum")] == [5e-06]
    assert [s.value for s in fams["kvmscope_probe_events"].samples if s.name.endswith("_total")] == [9]


def test_render_tcp_retrans_bounded_labels():
    data = TcpRetransData((), {("10.0.0.5", 3260): {"retransmit": 4, "synack_retransmit": 0, "reset_sent": 1,
                                                    "reset_received": 0}},
                          {"retransmit": 7, "synack_retransmit": 1, "reset_sent": 0, "reset_received": 2},
                          {}, (), 0, None)
    fams = {f.name: f for f in render_tcp_retrans(data)}
    got = {tuple(s.labels.values()): s.value for s in fams["kvmscope_tcp_retransmits"].samples}
    assert got == {("10.0.0.5", "3260"): 4, ("other", "other"): 7}
