"""The soak's short variant (`make soak` runs the long one): `kvmscope run` on the lab
under every kind of churn for a few minutes, then bounded resources, every collector
recovered, and every produced document in Elasticsearch exactly once.

Named to run after the other lab tests (only test_zz_down follows): it restarts VMs
and libvirtd.
"""

import pytest

from benchmarks.soak import render, soak

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_soak_short(lab, tmp_path):
    res = soak(minutes=2.5, every=8, seed=7, interval=2.0, real_es_restart=False, lab_up=False, work=tmp_path)
    report = render(res)
    print(report)
    every = {"vm_restart", "vm_transient", "sock_kill", "libvirtd_restart", "agent_kill9", "es_429", "es_down"}
    assert every <= set(res.actions), f"not every churn action ran: {res.actions}\n{report}"
    assert not res.action_errors, report
    assert res.agent_starts >= 2, report
    assert res.recovered, f"collectors or spool did not recover after the churn\n{report}"
    assert len(res.samples) >= 20, report
    broken = {k: v for k, v in res.bounds.items() if not v[2]}
    assert not broken, f"bounds broken: {broken}\n{report}"
    d = res.documents
    assert d["produced"] > 100, report
    assert d["lost"] == 0 and d["doubled"] == 0, report
    assert d["in_elasticsearch"] >= d["produced"] - d["dead_lettered"], report
    assert res.ok
