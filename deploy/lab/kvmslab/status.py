"""`lab status [--json]`: what exists, what each host does, the faults in force.

The JSON document (schema 1, deploy/lab/README.md) is built by status_doc()
from what was observed; render_text() prints the same document for humans.
Each host kind adds its records under its own key (`vms` today).
"""

from . import faults, hosts, target
from .common import ISCSI_PORT, LIBVIRT_URI, NETNS, PORTALS, lab_path
from . import common
from .libvirtd import libvirtd_up
from .network import link_exists, netns_exists
from .state import load_state

STATUS_SCHEMA = 1


def base_doc(interval, fault_state, ns_exists, links_up):
    """The part of the document that does not need the lab to be up. Pure:
    links_up is {portal index: bool}."""
    fault_state = faults.fill_defaults(dict(fault_state))
    return {
        "schema": STATUS_SCHEMA,
        "up": False,
        "lab_dir": common.LAB_DIR,
        "namespace": {"name": NETNS, "exists": ns_exists},
        "tgtd": {"pid": None, "running": False, "control_port": target.TGT_CONTROL_PORT,
                 "log": lab_path("tgtd.log")},
        "libvirt": {"uri": LIBVIRT_URI, "reachable": False,
                    "libvirtd_started_by_lab": False, "virtlogd_started_by_lab": False},
        "portals": [{
            "index": idx, "address": p["address"], "port": ISCSI_PORT,
            "host_addr": p["host_addr"], "host_if": p["host_if"], "ns_if": p["ns_if"],
            "link_up": links_up[idx],
            "loss_pct": float(fault_state["loss_pct"].get(str(idx), 0) or 0),
            "loss_direction": fault_state["loss_direction"].get(str(idx), faults.BOTH),
            "offline": idx in fault_state["offline_portals"],
            "shape_rate_kbit": fault_state["shape_rate_kbit"].get(str(idx)),
            "flap_down": idx in fault_state["flaps"]["down"],
        } for idx, p in PORTALS.items()],
        "vms": [],
        "faults": fault_state,
        "sample_interval_s": interval,
    }


def collect_status(interval):
    st = load_state()
    if st is not None:
        faults.fill_defaults(st.setdefault("faults", {}))
    res = base_doc(interval, st["faults"] if st else faults.empty_faults(),
                   netns_exists(), {idx: link_exists(p["host_if"]) for idx, p in PORTALS.items()})
    if st is None:
        return res
    res["tgtd"]["pid"] = st.get("tgtd_pid")
    res["tgtd"]["running"] = bool(st.get("tgtd_pid") and target.is_lab_tgtd(st["tgtd_pid"]))
    res["libvirt"]["reachable"] = libvirtd_up()
    res["libvirt"]["libvirtd_started_by_lab"] = bool(st.get("started_libvirtd"))
    res["libvirt"]["virtlogd_started_by_lab"] = bool(st.get("started_virtlogd"))
    res["kernel"] = st.get("kernel")
    all_ok = res["namespace"]["exists"] and res["tgtd"]["running"]
    for kind in hosts.host_kinds():
        records, kind_ok = kind.status(st, interval)
        res[kind.state_key] = records
        all_ok = all_ok and kind_ok
    res["up"] = bool(all_ok)
    annotate_throttles(res)
    return res


def annotate_throttles(res):
    """Each iSCSI disk gets `target_throttle_iops`: the blkio limit of its
    LUN's backing device from the fault state (null = none). Pure."""
    per_lun = res["faults"].get("throttle_iops_by_lun") or {}
    every = res["faults"].get("throttle_iops")
    for kind in hosts.host_kinds():
        for rec in res.get(kind.state_key, []):
            for d in rec.get("disks", []):
                if d.get("backend") == "iscsi":
                    d["target_throttle_iops"] = per_lun.get(d.get("iqn"), every) or None
    return res


def render_text(res):
    """The human summary of a status document."""
    lines = [f"lab dir: {res['lab_dir']}   up: {'yes' if res['up'] else 'no'}",
             f"namespace {res['namespace']['name']}: "
             f"{'present' if res['namespace']['exists'] else 'absent'}   "
             f"tgtd: {'running pid %s' % res['tgtd']['pid'] if res['tgtd']['running'] else 'not running'}"]
    for p in res["portals"]:
        way = p.get("loss_direction", faults.BOTH)
        extra = "".join([
            f" {way}" if p["loss_pct"] and way != faults.BOTH else "",
            f"  shaped {faults.fmt_rate(p['shape_rate_kbit'])}" if p.get("shape_rate_kbit") else "",
            "  FLAP DOWN" if p.get("flap_down") else ""])
        lines.append(f"portal {p['index']}: {p['address']}:{p['port']} via {p['host_if']} "
                     f"(host {p['host_addr']}) link {'up' if p['link_up'] else 'absent'}  "
                     f"loss {p['loss_pct']:g}%  {'OFFLINE' if p['offline'] else 'online'}"
                     + extra)
    thr = res["faults"]["throttle_iops"]
    lines.append(f"target throttle: {str(thr) + ' IOPS/device' if thr else 'off'}")
    for iqn, iops in sorted((res["faults"].get("throttle_iops_by_lun") or {}).items()):
        lines.append(f"  LUN {iqn}: {iops} IOPS")
    for fl in res["faults"].get("flaps", {}).get("periods", [])[-5:]:
        end = fl["end_iso"] or "(still down)"
        took = f" ({fl['seconds']:.2f}s)" if fl["seconds"] is not None else ""
        lines.append(f"flap portal {fl['portal']} {fl['n']}/{fl['count']}: down "
                     f"{fl['start_iso']} -> {end}{took}")
    for vm in res["vms"]:
        lines.append(f"{vm['name']}: {'running' if vm['running'] else 'NOT running'}, load "
                     f"{'progressing' if vm['load_progressing'] else 'NOT progressing'} "
                     f"(console {vm['console']})")
        for d in vm["disks"]:
            if d["backend"] == "iscsi":
                be = (f"iSCSI {d['address']}:{d['port']} {d['iqn']} LUN {d['lun']} "
                      f"(portal {d['portal']}, target dev {d['target_backing_device']})")
            else:
                be = f"file {d['path']} on {d['host_device']}"
            lat = "-" if d["avg_latency_ms"] is None else f"{d['avg_latency_ms']:.2f} ms"
            lines.append(f"  {d['dev']}: {be}")
            lines.append(f"       {d['ops_per_s']:.0f} ops/s, avg {lat} "
                         f"over {res['sample_interval_s']:g}s")
    for kh in res.get("kernel_hosts", []):
        lines.append(f"{kh['name']}: {'running' if kh['running'] else 'NOT running'}, agent "
                     f"{'answers' if kh['agent'] else 'NOT answering'} on {kh['mgmt_addr']}:"
                     f"{kh['agent_port']} (console {kh['console']})")
        for s in kh.get("sessions", []):
            lines.append(f"  session {s['sid']}: {s['portal']} {s['iqn']}")
        for p in kh.get("paths", []):
            lines.append(f"  path {p['dev']} ({p['hcil']}) of {p['map']}: {p['dm_state']} "
                         f"{p['checker']} {p['dev_state']}")
    return "".join(line + "\n" for line in lines)
