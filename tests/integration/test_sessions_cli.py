"""`kvmscope sessions` and `paths` end to end on a fixture sysfs tree and a stand-in iscsiadm
that prints open-iscsi's exact statistics format. Whole outputs are golden files."""

import json
import os
import subprocess
import sys

from tests.fixtures.sysfs_iscsi import Sess, build, stats_text

IQN = "iqn.2003-01.org.linux-iscsi.stor1:lun-db"
A = Sess(sid=1, host=7, target=IQN, portal="198.18.1.2", local_port=41001, disk="sdb", devno="8:16", lun=1)
B = Sess(sid=2, host=8, target=IQN, portal="198.18.2.2", local_port=41002, disk="sdc", devno="8:32", lun=1,
         state="FAILED", conn_state="failed", disk_state="blocked", recovery_tmo="5")


def setup_host(tmp_path):
    build(tmp_path / "sys", [A, B], multipath={"dm-0:mpatha": ["sdb", "sdc"]})
    outs = tmp_path / "iscsiadm-out"
    outs.mkdir()
    (outs / "1").write_text(stats_text(A, digest_err=2, timeout_err=1))
    (outs / "2").write_text(stats_text(B, timeout_err=17))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "iscsiadm"
    # iscsiadm -m session -r SID -s  ->  the recorded output for SID
    script.write_text(f'#!/bin/sh\nexec cat "{outs}/$4"\n')
    script.chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  sysfs: {tmp_path / 'sys'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return cfg, env


def run(cfg, env, *args):
    r = subprocess.run([sys.executable, "-m", "agent", "-c", str(cfg), *args], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r


def test_sessions_table_golden(tmp_path, golden):
    cfg, env = setup_host(tmp_path)
    golden("sessions-multipath.txt", run(cfg, env, "sessions").stdout)


def test_sessions_json(tmp_path, golden):
    cfg, env = setup_host(tmp_path)
    data = json.loads(run(cfg, env, "sessions", "--json").stdout)
    assert [(s["sid"], s["state"], s["portal"]) for s in data] == [
        (1, "LOGGED_IN", "198.18.1.2:3260"), (2, "FAILED", "198.18.2.2:3260")]
    assert data[0]["stats"]["digest_err"] == 2 and data[1]["stats"]["timeout_err"] == 17
    assert data[0]["disks"][0]["holder_names"] == ["mpatha"]
    golden("sessions-multipath.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
