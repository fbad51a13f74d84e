"""Joins of VM disks to sessions, connections and portals (pure, over records)."""

from dataclasses import replace

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.records.block import BlockDevice, BlockDevices
from agent.records.paths import build_paths
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.records.tcp import TcpInfo
from agent.records.tcp import StorageConnection, StorageConnections
from agent.records.vms import Vm, VmDisk, Vms
from agent.sources import SourceContext
from agent.sources.iscsi_kernel import IscsiKernelSource
from tests.fixtures.sysfs_iscsi import Sess, build, stats_text

IQN = "iqn.2003-01.org.linux-iscsi.stor1:lun-db"


def conn(src, sport, dst, pid=None, rtt_us=400, retrans=0):
    return StorageConnection("ipv4", "ESTABLISHED", src, sport, dst, 3260, 1000 + sport, pid, "qemu-system-x86" if pid else None,
                             TcpInfo(rtt_us=rtt_us, total_retrans=retrans))


def snap(**data):
    return Snapshot(1, 0.0, "h", 0.0, data=data, health={k: SourceHealth(k, Status.OK, 0) for k in data})


def kernel_sessions(tmp_path):
    a = Sess(sid=1, host=7, target=IQN, portal="198.18.1.2", local_port=41001, disk="sdb", devno="8:16", lun=1)
    b = Sess(sid=2, host=8, target=IQN, portal="198.18.2.2", local_port=41002, disk="sdc", devno="8:32", lun=1,
             state="FAILED")
    build(tmp_path / "sys", [a, b], multipath={"dm-0:mpatha": ["sdb", "sdc"]})
    outputs = {1: stats_text(a), 2: stats_text(b)}
    src = IscsiKernelSource(SourceContext(Config(), HostPaths(sysfs=tmp_path / "sys")),
                            runner=lambda argv, t: outputs[int(argv[4])])
    return src.collect()


def test_multipath_vm_disk_gives_one_path_per_leg(tmp_path):
    sessions = kernel_sessions(tmp_path)
    blk = BlockDevices((
        BlockDevice("dm-0", "254:0", "mpatha", ("sdb", "sdc"), (), {}),
        BlockDevice("sdb", "8:16", None, (), ("dm-0",), {}),
        BlockDevice("sdc", "8:32", None, (), ("dm-0",), {}),
    ))
    vms = Vms((Vm("db01", "u1", "running", 4242, (VmDisk("vda", "block", source="/dev/mapper/mpatha", host_devno="254:0"),)),))
    conns = StorageConnections((conn("198.18.1.1", 41001, "198.18.1.2", rtt_us=350),))  # session 2's socket is gone (FAILED)
    paths = build_paths(snap(libvirt=vms, iscsi_kernel=sessions, block_devices=blk, storage_tcp=conns),
                        if_addrs={"198.18.1.1": "kvmslab-h1"})
    assert [(p.disk, p.scsi_device, p.session, p.session_state, p.portal) for p in paths] == [
        ("vda", "sdb", 1, "LOGGED_IN", "198.18.1.2:3260"),
        ("vda", "sdc", 2, "FAILED", "198.18.2.2:3260"),
    ]
    p1, p2 = paths
    assert (p1.backend, p1.multipath, p1.host_device, p1.target, p1.lun) == ("host-iscsi", "mpatha", "dm-0", IQN, 1)
    assert p1.connection == "198.18.1.1:41001->198.18.1.2:3260" and p1.rtt_seconds == 0.00035
    assert p1.interface == "kvmslab-h1" and p1.unknown == ()
    assert p2.connection is None and p2.unknown == ("TCP connection of session 2 not found (local port 41002)",)


def test_libiscsi_disk_joins_qemu_socket():
    vms = Vms((
        Vm("vm0", "u0", "running", 100, (
            VmDisk("vda", "network", "iscsi", "iqn.x:vm0/1", (("198.18.1.2", 3260),), "iqn.x:vm0", 1),
            VmDisk("vdb", "file", source="/var/tmp/x.img", host_devno="254:0"),
        )),
        Vm("vm1", "u1", "running", 200, (
            VmDisk("vda", "network", "iscsi", "iqn.x:vm1/1", (("198.18.2.2", 3260),), "iqn.x:vm1", 1),)),
        Vm("vm2 'quoted' ü", "u2", "running", None, (
            VmDisk("vda", "network", "iscsi", "iqn.x:vm2/1", (("198.18.2.2", 3260),), "iqn.x:vm2", 1),)),
    ))
    conns = StorageConnections((
        conn("198.18.1.1", 50000, "198.18.1.2", pid=100, retrans=7),
        conn("198.18.2.1", 50001, "198.18.2.2", pid=200),
    ))
    blk = BlockDevices((BlockDevice("vda", "254:0", None, (), (), {}),))
    paths = build_paths(snap(libvirt=vms, storage_tcp=conns, block_devices=blk))
    by = {(p.vm, p.disk): p for p in paths}
    p = by[("vm0", "vda")]
    assert (p.backend, p.portal, p.target, p.lun, p.connection, p.retransmits_total) == (
        "libiscsi", "198.18.1.2:3260", "iqn.x:vm0", 1, "198.18.1.1:50000->198.18.1.2:3260", 7)
    assert by[("vm1", "vda")].connection == "198.18.2.1:50001->198.18.2.2:3260"
    host = by[("vm0", "vdb")]
    assert (host.backend, host.host_device, host.session, host.unknown) == ("host", "vda", None, ())
    assert by[("vm2 'quoted' ü", "vda")].unknown == ("qemu process of this VM not found",)


def test_ambiguous_two_disks_same_portal():
    vms = Vms((Vm("vm0", "u0", "running", 100, (
        VmDisk("vda", "network", "iscsi", "iqn.x:a/1", (("198.18.1.2", 3260),), "iqn.x:a", 1),
        VmDisk("vdc", "network", "iscsi", "iqn.x:b/1", (("198.18.1.2", 3260),), "iqn.x:b", 1),
    )),))
    conns = StorageConnections((conn("198.18.1.1", 1, "198.18.1.2", pid=100), conn("198.18.1.1", 2, "198.18.1.2", pid=100)))
    paths = build_paths(snap(libvirt=vms, storage_tcp=conns))
    assert len(paths) == 4
    assert all("ambiguous" in p.unknown[0] for p in paths)
    # one disk on that portal: its two sockets are both its own, nothing ambiguous
    one = Vms((replace(vms.vms[0], disks=vms.vms[0].disks[:1]),))
    paths = build_paths(snap(libvirt=one, storage_tcp=conns))
    assert len(paths) == 2 and all(p.unknown == () and p.connection for p in paths)


def test_missing_sources_say_why():
    vms = Vms((Vm("vm0", "u0", "running", 100, (
        VmDisk("vda", "network", "iscsi", "iqn.x:a/1", (("198.18.1.2", 3260),), "iqn.x:a", 1),
        VmDisk("vdb", "file", source="/nope", host_devno=None),
        VmDisk("vdc", "network", "rbd", "pool/img"),
    )),))
    s = Snapshot(1, 0.0, "h", 0.0, data={"libvirt": vms},
                 health={"libvirt": SourceHealth("libvirt", Status.OK, 0),
                         "storage_tcp": SourceHealth("storage_tcp", Status.FAILED, 0, "boom")})
    by = {p.disk: p for p in build_paths(s)}
    assert by["vda"].unknown == ("storage_tcp source failed: connection unknown",)
    assert by["vdb"].unknown == ("cannot stat '/nope': host device unknown",)
    assert by["vdc"].backend == "network:rbd"


def test_paths_table_golden(tmp_path, golden):
    import io

    from agent.cli.inventory import print_paths_table

    sessions = kernel_sessions(tmp_path)
    blk = BlockDevices((
        BlockDevice("dm-0", "254:0", "mpatha", ("sdb", "sdc"), (), {}),
        BlockDevice("vda", "254:16", None, (), (), {}),
    ))
    vms = Vms((
        Vm("db01", "u1", "running", 4242, (VmDisk("vda", "block", source="/dev/mapper/mpatha", host_devno="254:0"),)),
        Vm("web 'q' ü\nnewline", "u2", "running", 77, (
            VmDisk("vda", "network", "iscsi", "iqn.x:web/1", (("198.18.2.2", 3260),), "iqn.x:web", 1),
            VmDisk("vdb", "file", source="/var/lib/img/web.img", host_devno="254:16"))),
    ))
    conns = StorageConnections((conn("198.18.1.1", 41001, "198.18.1.2", rtt_us=350),
                                conn("198.18.2.1", 50001, "198.18.2.2", pid=77, rtt_us=1200, retrans=42)))
    paths = build_paths(snap(libvirt=vms, iscsi_kernel=sessions, block_devices=blk, storage_tcp=conns),
                        if_addrs={"198.18.1.1": "eth1", "198.18.2.1": "eth2"})
    buf = io.StringIO()
    print_paths_table(paths, out=buf)
    assert "web 'q' ü\\nnewline" in buf.getvalue()  # a newline in a name cannot break the table
    golden("paths-mixed.txt", buf.getvalue())


def test_multipath_legs_carry_their_map_state(tmp_path):
    """VM disk -> dm -> sdX -> session -> portal, with each leg's state in its multipath map."""
    from agent.records.multipath import Multipath, MultipathMap, MultipathPath

    sessions = kernel_sessions(tmp_path)
    blk = BlockDevices((
        BlockDevice("dm-0", "254:0", "mpatha", ("sdb", "sdc"), (), {}),
        BlockDevice("sdb", "8:16", None, (), ("dm-0",), {}),
        BlockDevice("sdc", "8:32", None, (), ("dm-0",), {}),
    ))
    mp = Multipath((MultipathMap("mpatha", dm="dm-0", queue_if_no_path=True, paths=(
        MultipathPath("8:16", "sdb", 1, "active", 0, "ready"),
        MultipathPath("8:32", "sdc", 1, "failed", 1, "faulty"))),))
    vms = Vms((Vm("db01", "u1", "running", 4242, (VmDisk("vda", "block", source="/dev/mapper/mpatha", host_devno="254:0"),)),))
    paths = build_paths(snap(libvirt=vms, iscsi_kernel=sessions, block_devices=blk, storage_tcp=StorageConnections(()),
                             multipath=mp), if_addrs={})
    assert [(p.scsi_device, p.portal, p.path_state, p.checker_state, p.map_active_paths) for p in paths] == [
        ("sdb", "198.18.1.2:3260", "active", "ready", 1),
        ("sdc", "198.18.2.2:3260", "failed", "faulty", 1),
    ]
    # without the multipath source the join still stands, the map's view is unknown
    bare = build_paths(snap(libvirt=vms, iscsi_kernel=sessions, block_devices=blk, storage_tcp=StorageConnections(())))
    assert [(p.scsi_device, p.path_state) for p in bare] == [("sdb", None), ("sdc", None)]
    assert not [u for p in bare for u in p.unknown if "multipath" in u]  # not collected (not enabled): nothing to say
    # the source failed this cycle (dmsetup and multipathd both timed out on a slow host): null with the reason
    failed = snap(libvirt=vms, iscsi_kernel=sessions, block_devices=blk, storage_tcp=StorageConnections(()))
    failed = replace(failed, health={**failed.health, "multipath": SourceHealth(
        "multipath", Status.FAILED, 6.0, "RuntimeError: neither dmsetup (timed out) nor multipathd (timed out) answered")})
    got = build_paths(failed, if_addrs={})
    assert [(p.scsi_device, p.path_state) for p in got] == [("sdb", None), ("sdc", None)]
    assert all(p.unknown[-1] == "multipath source failed (RuntimeError: neither dmsetup (timed out) nor multipathd "
                                "(timed out) answered): path state unknown" for p in got), [p.unknown for p in got]
