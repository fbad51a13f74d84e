"""The diagnosis scoreboard: every fault of the lab's matrix, judged by a running agent (issue 13).

    make scoreboard                     # as root; about 10 minutes
    python -m benchmarks.scoreboard --only flap-portal2,shape-portal1 --no-doc

Holds the lab lock (/run/kvmscope-lab.lock, like the lab tests), brings up
the lab with 4 VMs (VMs 0 and 2 on portal 1, VMs 1 and 3 on portal 2),
starts `kvmscope run` on it (its own config: interval, live diagnosis window,
API socket in a temporary directory, no Elasticsearch) and, for each
scenario: waits until the live findings are clean, applies the fault, reads
the agent's live findings every half second (`/api/v1/findings` on its
socket) until they name the fault right or a deadline passes, clears the
fault. A verdict is right when:

* **cause**: a warning/critical finding of the expected class (network,
  target, path) blames the fault (the rule's class: `CAUSE_OF_RULE`, a rule
  not listed there is classed by the words in its name);
* **scope**: its scope says the expected extent (one VM, all VMs on portal
  X, all VMs on the host);
* **named VMs**: the VMs it explains are exactly the affected ones;
* **no blame on healthy VMs**: no warning/critical finding names a VM the
  fault does not touch.

Time to verdict = the agent cycles between the fault and the first cycle
whose findings are right (the `seq` of `/api/v1/findings`), in intervals.
A flap's verdict can only come once the path is back (it is a verdict about
an ended outage): counted from the start of the flap, and its incident
(`/api/v1/incidents`) is checked too: exactly one for the portal, its
duration against the down time the lab applied.

The table goes into docs/diagnose.md between its markers, with the date and
the configuration; failures are shown as measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = ["/usr/bin/python3", str(ROOT / "deploy" / "lab" / "lab")]
DOC = ROOT / "docs" / "diagnose.md"
BEGIN, END = "<!-- scoreboard:begin -->", "<!-- scoreboard:end -->"
P1, P2 = "198.18.1.2:3260", "198.18.2.2:3260"
ON_P1, ON_P2 = ["kvmslab-vm0", "kvmslab-vm2"], ["kvmslab-vm1", "kvmslab-vm3"]
ALL = sorted(ON_P1 + ON_P2)

CAUSE_OF_RULE = {
    "packet_loss": "network", "network_queueing": "network", "interface_errors": "network",
    "slow_target": "target", "path_down": "path", "path_outage": "path", "saturating_vm": "vm",
    "slow_unexplained": "undetermined", "blind_spots": None,
}


def cause_class(rule: str) -> str | None:
    if rule in CAUSE_OF_RULE:
        return CAUSE_OF_RULE[rule]
    if re.search(r"net|rtt|queue|loss|link|latency_path|congest", rule):
        return "network"
    if re.search(r"target|lun|storage|backing", rule):
        return "target"
    if re.search(r"path|outage|down", rule):
        return "path"
    if re.search(r"undetermined|unknown|unexplained", rule):
        return "undetermined"
    return rule


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lab(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run(LAB + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"lab {' '.join(map(str, args))}: {p.stderr.strip()[-500:]}")
    return p


@dataclass
class Scenario:
    name: str
    label: str
    apply: list  # lab argument lists, run one after the other (a list of lists run at once: in threads)
    clear: list
    cause: str | None  # expected class; None: healthy (no warning/critical finding at all)
    vms: list[str] = field(default_factory=list)
    scope: str | None = None  # a substring the scope must contain
    flap: float | None = None  # seconds down, for the incident check
    flap_portals: tuple[str, ...] = ()
    rule: str | None = None  # a rule the verdict must come from (a flap: the outage's, once it is over)


SCENARIOS = [
    Scenario("healthy", "healthy (observed for the whole deadline)", [], [], None),
    Scenario("shape-portal1", "shaped link 2 Mbit/s on portal 1 (queueing, no loss)",
             [["shape", "2mbit", "--portal", 1]], [["shape", "off"]], "network", ON_P1, f"portal {P1}"),
    Scenario("loss-portal1", "5% loss on portal 1, both directions",
             [["loss", 5, "--portal", 1]], [["loss", 0]], "network", ON_P1, f"portal {P1}"),
    Scenario("loss-to-host-portal1", "5% loss on portal 1 toward the host only",
             [["loss", 5, "--portal", 1, "--direction", "to-host"]], [["loss", 0]], "network", ON_P1,
             f"portal {P1}"),
    Scenario("loss-both", "5% loss on both portals", [["loss", 5]], [["loss", 0]], "network", ALL, "host"),
    Scenario("throttle-all", "target throttled to 40 IOPS per LUN", [["throttle-target", 40]],
             [["throttle-target", "off"]], "target", ALL, None),
    Scenario("throttle-one-lun", "one LUN throttled (kvmslab-vm0's, 30 IOPS)",
             [["throttle-target", 30, "--vm", "kvmslab-vm0"]], [["throttle-target", "off"]], "target",
             ["kvmslab-vm0"], "one VM"),
    Scenario("offline-portal2", "portal 2 offline (stays down)", [["target-offline", "--portal", 2]],
             [["target-online", "--portal", 2]], "path", ON_P2, f"portal {P2}"),
    Scenario("flap-portal2", "portal 2 flaps: down 4 s, back", [["flap", "--portal", 2, "--down", 4]], [], "path",
             ON_P2, f"portal {P2}", flap=4.0, flap_portals=(P2,), rule="path_outage"),
    Scenario("flap-both", "both portals flap together: down 4 s, back",
             [[["flap", "--portal", 1, "--down", 4], ["flap", "--portal", 2, "--down", 4]]], [], "path", ALL,
             "host", flap=4.0, flap_portals=(P1, P2), rule="path_outage"),
]


# -- the agent ----------------------------------------------------------------------------------------


class Agent:
    def __init__(self, interval: float, window: float, workdir: Path, recent: int | None = None):
        self.sock = str(workdir / "api.sock")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = workdir / "config.yaml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "agent": {"interval": interval},
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "api": {"socket": self.sock},
            "diagnose": {"window_seconds": window, **({} if recent is None else {"recent_intervals": recent})},
            "storage_log": {"state_dir": str(workdir / "positions")},
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
        self.log = open(workdir / "agent.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def get(self, path: str):
        conn = http.client.HTTPConnection("localhost", timeout=10)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.sock)
        conn.sock = s
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"{path}: HTTP {r.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def findings(self) -> dict:
        for attempt in range(5):  # a busy 2-CPU machine may miss the socket's 10 s deadline once
            try:
                return self.get("/api/v1/findings")
            except (OSError, RuntimeError, ValueError):
                if attempt == 4:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if self.findings().get("seq") is not None:
                    return
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError("the agent's live diagnosis did not answer")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -- judging -----------------------------------------------------------------------------------------


def problems(served: dict) -> list[dict]:
    return [f for f in served["findings"] if f["severity"] in ("warning", "critical")]


def named_vms(f: dict) -> set[str]:
    vms = set(f.get("vms") or ())
    kind, ident = f["subject"].get("kind"), str(f["subject"].get("id"))
    if kind == "disk" and "/" in ident:
        vms.add(ident.rsplit("/", 1)[0])
    elif kind == "vm":
        vms.add(ident)
    for key in ("disks", "stalled_disks"):
        v = f.get("evidence", {}).get(key)
        if isinstance(v, dict):
            vms.update(k.rsplit("/", 1)[0] for k in v if "/" in k)
    return vms


def judge(sc: Scenario, served: dict) -> dict:
    """Each criterion on one cycle's findings."""
    ps = problems(served)
    if sc.cause is None:
        return {"ok": not ps, "cause": not ps, "scope": True, "vms": True, "healthy": not ps, "found": ps}
    want = set(sc.vms)
    right = [f for f in ps if cause_class(f["rule"]) == sc.cause and sc.rule in (None, f["rule"])]
    blamed = set().union(*[named_vms(f) for f in ps]) if ps else set()
    best = max(right, key=lambda f: len(named_vms(f) & want), default=None)
    cause_ok = best is not None and bool(named_vms(best) & want)
    vms_ok = best is not None and named_vms(best) == want
    scope_ok = best is not None and (sc.scope is None or sc.scope in (best.get("scope") or ""))
    healthy_ok = not (blamed - want)
    return {"ok": cause_ok and vms_ok and scope_ok and healthy_ok, "cause": cause_ok, "scope": scope_ok,
            "vms": vms_ok, "healthy": healthy_ok, "found": ps, "best": best}


def summary_of(ps: list[dict]) -> str:
    if not ps:
        return "no finding"
    return "; ".join(f"{f['rule']} ({f['severity']}) {f['subject'].get('kind')} {f['subject'].get('id')} "
                     f"[{', '.join(sorted(named_vms(f))) or '-'}]" for f in ps)


def run_lab_steps(steps: list) -> None:
    for step in steps:
        if step and isinstance(step[0], list):  # at once
            threads = [threading.Thread(target=lab, args=tuple(s)) for s in step]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            lab(*step)


def wait_clean(agent: Agent, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not problems(agent.findings()):
            return True
        time.sleep(1)
    return False


def run_scenario(agent: Agent, sc: Scenario, interval: float, deadline_intervals: int) -> dict:
    log(f"{sc.name}: waiting for clean findings")
    clean = wait_clean(agent, 90)
    start_seq = agent.findings()["seq"]
    t0 = time.time()
    applier = threading.Thread(target=run_lab_steps, args=(sc.apply,))
    log(f"{sc.name}: applying {sc.apply}")
    applier.start()
    verdict_seq, first, seen = None, None, {}
    end = time.monotonic() + deadline_intervals * interval + (sc.flap or 0)
    last = None
    while time.monotonic() < end:
        served = agent.findings()
        if served["seq"] != (last or {}).get("seq"):
            last = served
            j = judge(sc, served)
            key = summary_of(j["found"])
            seen[key] = seen.get(key, 0) + 1
            if sc.cause is None:
                if not j["ok"] and first is None:
                    first = (served["seq"], j)
            elif j["ok"] and verdict_seq is None:
                verdict_seq, first = served["seq"], (served["seq"], j)
                if not sc.flap:
                    break
        if sc.flap and verdict_seq is not None and not applier.is_alive():
            break
        time.sleep(0.5)
    applier.join()
    incidents = None
    if sc.flap:
        time.sleep(interval * 2)
        incidents = [i for i in agent.get(f"/api/v1/incidents?seconds={time.time() - t0 + 5:.0f}")["incidents"]
                     if i["start"] >= t0 - 30]
    # the observation the row reports: the right verdict, else the most frequent set of findings
    final = judge(sc, last) if last else {"ok": False, "found": []}
    if sc.cause is None:
        res = {"ok": first is None, "intervals": None, "seen": summary_of(first[1]["found"]) if first else "no finding"}
        crit = {k: first is None for k in ("cause", "scope", "vms", "healthy")}
    elif verdict_seq is not None:
        j = first[1]
        res = {"ok": True, "intervals": verdict_seq - start_seq, "seen": summary_of(j["found"])}
        crit = {k: j[k] for k in ("cause", "scope", "vms", "healthy")}
    else:
        common = max(seen, key=seen.get) if seen else "no finding"
        res = {"ok": False, "intervals": None, "seen": common}
        crit = {k: final.get(k, False) for k in ("cause", "scope", "vms", "healthy")}
    res.update(crit)
    res["clean_before"] = clean
    if incidents is not None:
        mine = [i for i in incidents if i.get("portal") in sc.flap_portals]
        res["incidents"] = [{"key": i["key"], "state": i["state"], "duration_s": i["duration_seconds"],
                             "stalled_vms": i["stalled_vms"],
                             "stall_s": max((d.get("stalled_s") or 0 for d in i["disks"].values()), default=0)}
                            for i in mine]
        res["incident_ok"] = (len(mine) == len(sc.flap_portals) and all(i["state"] == "resolved" for i in mine)
                              and sorted({v for i in mine for v in i["stalled_vms"]}) == sorted(sc.vms))
        res["ok"] = res["ok"] and res["incident_ok"]
    log(f"{sc.name}: {'OK' if res['ok'] else 'FAIL'} {res}")
    log(f"{sc.name}: clearing")
    run_lab_steps(sc.clear)
    return res


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _recent_default() -> int:
    from agent.config import DiagnoseConfig

    return DiagnoseConfig().recent_intervals


def render(results: dict, interval: float, window: float, deadline: int, took: float, when: str | None = None,
           recent: int | None = None) -> str:
    today = when or _now()
    yes = {True: "yes", False: "**no**"}
    out = [BEGIN, "", f"Measured {today} by `make scoreboard` ({took / 60:.1f} min): lab of 4 VMs (VMs 0 and 2 "
           f"on portal 1 `{P1}`, VMs 1 and 3 on portal 2 `{P2}`), `kvmscope run` with `agent.interval` "
           f"{interval:g} s, `diagnose.window_seconds` {window:g} and `diagnose.recent_intervals` "
           f"{_recent_default() if recent is None else recent}, verdicts read from its live findings "
           f"(`/api/v1/findings`) every 0.5 s for at most {deadline} intervals after the fault.", "",
           "| scenario | right | cause | scope | named VMs | healthy VMs clean | time to verdict (intervals) | "
           "what the agent said |", "|---|---|---|---|---|---|---|---|"]
    for sc in SCENARIOS:
        r = results.get(sc.name)
        if r is None:
            continue
        if "error" in r:
            out.append(f"| {sc.label} | **error** | | | | | | {r['error']} |")
            continue
        t = "-" if r["intervals"] is None else str(r["intervals"])
        seen = r["seen"].replace("|", "\\|")
        if r.get("incidents") is not None:
            inc = "; ".join(f"incident {i['key']} {i['state']} {i['duration_s']:.1f} s, stalled "
                            f"{', '.join(i['stalled_vms'])} {i['stall_s']:.1f} s" for i in r["incidents"]) or "no incident"
            seen += f" — {inc} (applied: down {sc.flap:g} s)"
        out.append(f"| {sc.label} | {yes[r['ok']]} | {yes[r['cause']]} | {yes[r['scope']]} | {yes[r['vms']]} | "
                   f"{yes[r['healthy']]} | {t} | {seen} |")
    out += ["", END]
    return "\n".join(out)


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Scoreboard\n\n" + section + "\n"
    DOC.write_text(text)
    log(f"written to {DOC}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n  python -m benchmarks.scoreboard\n"
                                        "  python -m benchmarks.scoreboard --only loss-portal1 --no-doc")
    ap.add_argument("--interval", type=float, default=2.0, help="agent interval, seconds (default 2)")
    ap.add_argument("--window", type=float, default=10.0, help="live diagnosis window, seconds (default 10)")
    ap.add_argument("--deadline", type=int, default=15, help="intervals to wait for a verdict (default 15)")
    ap.add_argument("--recent", type=int, default=None,
                    help="diagnose.recent_intervals of the agent (default: the configuration's, 2; 0 = off)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--results", type=Path, help="also write the results as JSON here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/diagnose.md")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only render a --results file of an earlier run")
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(a.render.read_text())
        section = render(saved["results"], saved["interval"], saved["window"], saved["deadline"], saved["took"],
                         saved.get("when"), saved.get("recent"))
        print(section)
        if not a.no_doc:
            write_doc(section)
        return 0
    chosen = [s for s in SCENARIOS if not a.only or s.name in a.only.split(",")]
    lock = open("/run/kvmscope-lab.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log("waiting for the lab lock /run/kvmscope-lab.lock")
        fcntl.flock(lock, fcntl.LOCK_EX)
    t0 = time.monotonic()
    results: dict = {}
    agent = None
    try:
        lab("down")
        log("lab up --vms 4")
        lab("up", "--vms", 4, "--timeout", 300)
        with tempfile.TemporaryDirectory(prefix="kvmscope-scoreboard-") as tmp:
            agent = Agent(a.interval, a.window, Path(tmp), a.recent)
            try:
                agent.wait_ready()
                for sc in chosen:
                    try:
                        results[sc.name] = run_scenario(agent, sc, a.interval, a.deadline)
                    except Exception as e:  # one broken scenario is a row, not the end of the board
                        log(f"{sc.name}: error {e}")
                        results[sc.name] = {"error": str(e)[:200]}
                        for step in sc.clear:
                            lab(*step, check=False)
            finally:
                agent.stop()
    finally:
        lab("down", check=False)
        lock.close()
    took = time.monotonic() - t0
    section = render(results, a.interval, a.window, a.deadline, took, recent=a.recent)
    print(section)
    if a.results:
        a.results.write_text(json.dumps({"results": results, "interval": a.interval, "window": a.window, "recent": a.recent,
                                         "deadline": a.deadline, "took": took, "when": _now()}, indent=1, default=str))
    if not a.no_doc:
        write_doc(section)
    return 0 if all(r.get("ok") for r in results.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
