"""Records: the typed data sources produce and every output reads.

The bottom floor: sources (``agent.sources``, ``agent.ebpf``) build these
records; the agent loop puts them in a :class:`~agent.records.snapshot.Snapshot`;
exporters, shipping, diagnose, doctor, fleet and the CLI read them through the
snapshot's accessors (renderers and document builders are marked against an
accessor: ``@renderer(Snapshot.host_tcp)``, :mod:`agent.marks`). Modules here
import only the standard library and each other (``tests/unit/test_layers.py``
keeps it so).

* ``snapshot``: Snapshot (typed accessors, ``paths`` joined once), SourceHealth, Status, accessor_name
* ``vms``: Vm, VmDisk, DiskStats, Vms, QemuProcess
* ``iscsi``: IscsiSession(s), IscsiConnection, ScsiDisk
* ``tcp``: TcpInfo, StorageConnection(s), HostTcpCounters
* ``block``: BlockDevice(s); ``net``: NetIface(s)
* ``multipath``: Multipath, MultipathMap, MultipathGroup, MultipathPath (dm-multipath)
* ``storage_log``: StorageLogEvent(s), the storage-path log lines
* ``ebpf``: the probes' data (block I/O histograms, TCP retransmits, TCP lifecycle)
* ``paths``: StoragePath and the pure join ``build_paths``
* ``addr``: the one formatter of addresses, endpoints, portals, connections
* ``rates``: values over an interval between two snapshots (mean latency)
"""
