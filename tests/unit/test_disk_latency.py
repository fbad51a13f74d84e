"""Per-VM-disk latency: the join of the probes' histograms to VM disks (agent/records/disk_latency.py)
and its Prometheus rendering."""

from dataclasses import replace as dataclass_replace

from agent.exporters.exposition import write_exposition
from agent.exporters.render_inventory import render_vm_disk_latency
from agent.records.disk_latency import BLOCK, LIBISCSI, QMP, log2_bounds_ns, slots_to_counts
from agent.records.ebpf import SLOT_MAX, BlockIoData, LibiscsiContext, LibiscsiData, LibiscsiLatency
from agent.records.snapshot import Snapshot
from agent.records.vms import DiskStats, Vm, VmDisk, Vms

IQN = "iqn.2026-11.lab:vm0"
VDA = VmDisk("vda", "network", "iscsi", f"{IQN}/0", (("10.0.0.1", 3260),), IQN, 0)
VDB = VmDisk("vdb", "file", None, "/var/tmp/vdb.img", host_devno="254:0")


def snap(vms, **data):
    return Snapshot(1, 0.0, "h", 0.0, {"libvirt": Vms(tuple(vms)), **data})


def lib(latencies, contexts=(), inflight=None):
    return LibiscsiData(tuple(latencies), tuple(contexts), inflight or {}, {})


def test_log2_slots_become_buckets_with_the_overflow_last():
    assert log2_bounds_ns(3) == (1, 2, 4, 8)
    assert slots_to_counts({0: 1, 3: 2, 5: 7}, 3) == (1, 0, 0, 2, 7)  # slot 5 > slot_max: the overflow bucket


def test_libiscsi_by_pid_and_lun_when_the_login_was_not_seen():
    vm = Vm("vm0", None, "running", 100, (VDA, VDB))
    s = snap([vm], ebpf_libiscsi=lib([LibiscsiLatency(100, 0xAA, 0, "read", {10: 3, 12: 1}, 4, 5000),
                                      LibiscsiLatency(100, 0xAA, 0, "write", {20: 2}, 2, 2_000_000)],
                                     inflight={(100, 0xAA, 0): 2}))
    d = s.vm_disk_latency
    assert [(h.vm, h.disk, h.op, h.source, h.count, h.sum_ns) for h in d.histograms] == [
        ("vm0", "vda", "read", LIBISCSI, 4, 5000), ("vm0", "vda", "write", LIBISCSI, 2, 2_000_000)]
    read = d.histograms[0]
    assert read.cumulative()[10] == (1024 / 1e9, 3) and read.cumulative()[-1] == (float("inf"), 4)
    assert [(x.disk, x.inflight, x.pid) for x in d.iscsi] == [("vda", 2, 100)]
    assert d.unattributed == ()
    assert [(vm, disk) for vm, disk, _why in d.missing] == [("vm0", "vdb")]  # no block probe data


def test_two_contexts_of_one_disk_add_up_and_unknown_pids_are_reported():
    vm = Vm("vm0", None, "running", 100, (VDA,))
    s = snap([vm], ebpf_libiscsi=lib([LibiscsiLatency(100, 1, 0, "read", {10: 1}, 1, 600),
                                      LibiscsiLatency(100, 2, 0, "read", {11: 1}, 1, 1500),
                                      LibiscsiLatency(555, 3, 0, "read", {11: 1}, 1, 1500)],
                                     [LibiscsiContext(100, 1, "", "", None, 1, 2), LibiscsiContext(100, 2, "", "", None, 0, 1)]))
    d = s.vm_disk_latency
    assert [(h.disk, h.count, h.sum_ns) for h in d.histograms] == [("vda", 2, 2100)]
    assert [(x.aborts, x.reconnects) for x in d.iscsi] == [(1, 3)]
    assert [(u.pid, u.reason) for u in d.unattributed] == [(555, "pid 555 is not a known VM's QEMU")]


def test_same_lun_on_two_targets_is_ambiguous_unless_the_login_was_seen():
    other = VmDisk("vdc", "network", "iscsi", "iqn.other/0", (("10.0.0.2", 3260),), "iqn.other", 0)
    vm = Vm("vm0", None, "running", 100, (VDA, other))
    lat = [LibiscsiLatency(100, 7, 0, "read", {10: 1}, 1, 600)]
    d = snap([vm], ebpf_libiscsi=lib(lat)).vm_disk_latency
    assert d.histograms == ()
    assert "ambiguous: disks vda, vdc" in d.unattributed[0].reason
    seen = [LibiscsiContext(100, 7, "iqn.other", "10.0.0.2:3260", 0, 0, 0)]
    d = snap([vm], ebpf_libiscsi=lib(lat, seen)).vm_disk_latency
    assert [(h.disk, h.count) for h in d.histograms] == [("vdc", 1)]
    assert d.iscsi[0].target == "iqn.other" and d.iscsi[0].portal == "10.0.0.2:3260"


def proc(tgid, device, op, slots):
    from agent.records.ebpf import BlockProcess

    n = sum(slots.values())
    return BlockProcess(tgid, "qemu-system-x86", device, op, n, 1000 * n, 4096 * n, slots=slots)


def test_block_disk_through_the_qemu_pid_and_the_device_under_the_file():
    from agent.records.block import BlockDevice, BlockDevices

    vm = Vm("vm0", None, "running", 100, (VDA, VDB))
    devs = BlockDevices((BlockDevice("vdx", "254:0", None, (), (), {}),))
    bio = BlockIoData((), (), {}, SLOT_MAX)
    d = snap([vm], block_devices=devs, ebpf_block_io=bio).vm_disk_latency
    assert "no per-process histograms" in dict(((v, k), w) for v, k, w in d.missing)[("vm0", "vdb")]
    bio = BlockIoData((), (proc(100, "vdx", "write", {10: 2}), proc(200, "vdx", "write", {9: 5}),
                           proc(100, "sda", "read", {9: 5})), {}, SLOT_MAX)
    d = snap([vm], block_devices=devs, ebpf_block_io=bio).vm_disk_latency
    assert [(h.disk, h.op, h.source, h.count, h.pid) for h in d.histograms] == [("vdb", "write", BLOCK, 2, 100)]


def test_two_disks_of_one_vm_on_one_host_device_are_ambiguous():
    from agent.records.block import BlockDevice, BlockDevices

    vdc = VmDisk("vdc", "file", None, "/var/tmp/vdc.img", host_devno="254:0")
    vm = Vm("vm0", None, "running", 100, (VDB, vdc))
    bio = BlockIoData((), (proc(100, "vdx", "write", {10: 2}),), {}, SLOT_MAX)
    d = snap([vm], block_devices=BlockDevices((BlockDevice("vdx", "254:0", None, (), (), {}),)), ebpf_block_io=bio).vm_disk_latency
    assert d.histograms == ()
    assert all(why.startswith("ambiguous: disks vdb, vdc") for _vm, _d, why in d.missing)


def test_qmp_histograms_and_the_exposition_carry_the_source():
    stats = DiskStats(rd_reqs=3, rd_time_ns=7_000_000, histograms={"rd": {"boundaries_ns": [1_000_000, 10_000_000],
                                                                        "bins": [1, 2, 0]}})
    vm = Vm("vm0", None, "running", 100, (VmDisk("vda", "file", source="/x", stats=stats),), manager="qmp")
    s = Snapshot(1, 0.0, "h", 0.0, {"qmp": Vms((vm,)),
                                    "ebpf_libiscsi": lib([LibiscsiLatency(100, 1, 0, "read", {1: 1}, 1, 1)])})
    d = s.vm_disk_latency
    assert [(h.source, h.counts, h.sum_ns) for h in d.histograms] == [(QMP, (1, 2, 0), 7_000_000)]
    text = write_exposition(render_vm_disk_latency(d)).decode()
    assert 'kvmscope_vm_disk_latency_seconds_bucket{disk="vda",le="0.001",op="read",source="qmp",vm="vm0"} 1.0' in text
    assert 'kvmscope_vm_disk_latency_seconds_bucket{disk="vda",le="+Inf",op="read",source="qmp",vm="vm0"} 3.0' in text
    assert 'kvmscope_vm_disk_latency_seconds_sum{disk="vda",op="read",source="qmp",vm="vm0"} 0.007' in text


def test_percentiles_over_an_interval_from_the_preferred_source():
    from agent.records.disk_latency import DiskLatency, VmDiskLatencies, disk_percentiles, quantile_ns

    assert quantile_ns((10, 20), (1, 0, 0), 0.99) == 10.0 and quantile_ns((10, 20), (0, 0, 1), 0.5) == float("inf")
    assert quantile_ns((10, 20), (0, 0, 0), 0.5) is None
    b = (1_000_000, 2_000_000, 4_000_000)

    def h(counts, s, op="read", source=LIBISCSI, pid=1):
        return DiskLatency("vm0", "vda", op, source, b, counts, sum(counts), s, pid)
    before = VmDiskLatencies((h((100, 0, 0, 0), 50_000_000), h((0, 0, 0, 5), 0, op="flush")))
    after = VmDiskLatencies((h((190, 9, 1, 0), 180_000_000), h((0, 0, 0, 9), 0, op="flush"),
                             h((0, 0, 5, 0), 0, op="write", source=BLOCK)))
    p = disk_percentiles(before, after)[("vm0", "vda")]
    # libiscsi before block; in the interval 90 under 1 ms, 9 under 2 ms, 1 under 4 ms (flushes left out)
    assert (p.source, p.requests, p.p50_ms, p.p90_ms, p.p99_ms, p.mean_ms) == (LIBISCSI, 100, 1.0, 1.0, 2.0, 1.3)
    assert disk_percentiles(before, after, sources=(BLOCK,))[("vm0", "vda")].p50_ms == 4.0  # one source asked for
    # a new process (VM restarted): its histogram counts from zero, not as a negative delta
    p = disk_percentiles(before, VmDiskLatencies((h((3, 0, 0, 0), 3_000_000, pid=2),)))[("vm0", "vda")]
    assert (p.requests, p.p99_ms) == (3, 1.0)


def test_duty_cycle_keeps_a_busy_process_within_the_budget():
    from agent.ebpf.libiscsi import DutyCycle

    d = DutyCycle(0.02)
    assert d.off_cycles(200, 30_000) == 0  # a lab VM: 200 commands/s x 30 us = 0.6 % of its time, always on
    assert d.off_cycles(666, 30_000) == 0  # 1.998 %
    # the benchmark's depth-32 initiator: 18 000/s x 30 us = 54 %: attached 1 cycle in 27 -> 2 % on average
    off = d.off_cycles(18_000, 30_000)
    assert off == 26 and 0.54 / (off + 1) <= 0.02
    assert d.off_cycles(10_000_000, 30_000) == 49  # never less than one cycle in 50


def test_symbol_offsets_from_the_elf_dynamic_symbols(tmp_path):
    """A shared library built here, with its text segment at a virtual address above its file offset."""
    import shutil
    import subprocess

    import pytest

    from agent.ebpf.uprobes import symbol_offset

    if shutil.which("cc") is None or shutil.which("nm") is None:
        pytest.fail("cc and nm are needed (build-essential, binutils)")
    src = tmp_path / "lib.c"
    src.write_text("int kvmscope_one(int x) { return x + 1; }\nint kvmscope_two(int x) { return x * 2; }\n")
    so = tmp_path / "libt.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wl,-z,separate-code", "-o", str(so), str(src)], check=True)
    nm = dict(line.split()[::-2] for line in subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                                                          text=True, check=True).stdout.splitlines() if " T " in line)
    segs = subprocess.run(["readelf", "-lW", str(so)], capture_output=True, text=True, check=True).stdout
    loads = [ln.split() for ln in segs.splitlines() if ln.strip().startswith("LOAD")]
    data = so.read_bytes()
    for name in ("kvmscope_one", "kvmscope_two"):
        vaddr = int(nm[name], 16)
        off, va, size = next((int(x[1], 16), int(x[2], 16), int(x[4], 16)) for x in loads
                             if int(x[2], 16) <= vaddr < int(x[2], 16) + int(x[4], 16))
        assert symbol_offset(data, name) == vaddr - va + off
    with pytest.raises(KeyError):
        symbol_offset(data, "kvmscope_three")


def test_an_unchanged_disk_histogram_is_the_last_snapshots_object():
    """Every snapshot of the history keeps its own vm_disk_latency: an idle disk's histogram there is the
    previous build's object (equal either way), a busy disk's a new one."""
    vm = Vm("vm0", None, "running", 100, (VDA,))
    read = LibiscsiLatency(100, 0xAA, 0, "read", {10: 3}, 3, 5000)
    one = snap([vm], ebpf_libiscsi=lib([read, LibiscsiLatency(100, 0xAA, 0, "write", {20: 2}, 2, 9000)])).vm_disk_latency
    two = snap([vm], ebpf_libiscsi=lib([read, LibiscsiLatency(100, 0xAA, 0, "write", {20: 5}, 5, 20000)])).vm_disk_latency
    assert two.histograms[0] is one.histograms[0]
    assert two.histograms[1] is not one.histograms[1] and (one.histograms[1].count, two.histograms[1].count) == (2, 5)
    other = Vm("vm1", None, "running", 100, (VDA,))  # another VM with the same numbers: its own record
    three = snap([other], ebpf_libiscsi=lib([read])).vm_disk_latency
    assert three.histograms[0].vm == "vm1" and three.histograms[0] == dataclass_replace(one.histograms[0], vm="vm1")
