"""The snapshot's typed accessors: one all-VMs list, paths joined once."""

from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.records.tcp import StorageConnections
from agent.records.vms import Vm, VmDisk, Vms


def _snap(**data):
    return Snapshot(1, 1.0, "h", 0.0, data, {"storage_tcp": SourceHealth("storage_tcp", Status.NODATA, 0.0, "none")})


def test_vms_from_libvirt_then_qmp():
    lv = Vms(vms=(Vm("a", "u1", "running", 10, (VmDisk("vda", "file"),)),))
    qmp = Vms(vms=(Vm("b", None, "running", 20, (VmDisk("vda", "network", protocol="iscsi"),), manager="qmp"),))
    s = _snap(qmp=qmp, libvirt=lv)
    assert [v.name for v in s.vms] == ["a", "b"]
    assert set(s.vm_disks) == {("a", "vda"), ("b", "vda")} and s.vm_by_pid == {10: "a", 20: "b"}
    assert [n for n, _ in s.vm_sets] == ["libvirt", "qmp"]
    assert _snap(libvirt=lv).vms == lv.vms and _snap().vms == ()


def test_absent_sources_read_as_empty_or_none():
    s = _snap()
    assert s.iscsi is None and s.iscsi_sessions == () and s.storage_connections == ()
    assert s.host_tcp is s.block_devices is s.interfaces is s.block_io is s.tcp_retrans is s.tcp_lifecycle is None
    assert s.is_nodata("storage_tcp") and not s.is_nodata("libvirt")
    assert _snap(storage_tcp=StorageConnections()).storage_connections == ()


def test_paths_joined_once_per_snapshot():
    lv = Vms(vms=(Vm("a", "u1", "running", 10, (VmDisk("vda", "network", protocol="iscsi", hosts=(("fd00::1", 3260),)),)),))
    s = _snap(libvirt=lv)
    first = s.paths
    assert s.paths is first and first[0].portal == "[fd00::1]:3260"
    assert first[0].unknown == ("no TCP connection from qemu pid 10 to [fd00::1]:3260",)
