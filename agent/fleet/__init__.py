"""Fleet view: is a storage problem portal-wide or local to one host?

`kvmscope fleet --prometheus URL` asks the Prometheus server that scrapes every
host's agent for the per-connection TCP counters of the storage connections
(inet_diag ``tcp_info``, see :mod:`agent.sources.storage_tcp`), grouped by
host and portal, and judges each portal and each host:

* the same portal is bad from many hosts: the target or its network
  (``portal-wide``);
* a portal is bad from one host while other hosts reach it cleanly: that
  host's path (NIC, cable, switch port) (``host-local``).

:mod:`agent.fleet.prometheus` does the HTTP queries (read only, stdlib);
:mod:`agent.fleet.analysis` is the pure judgement, unit-tested on literal
samples. See docs/fleet.md.
"""
