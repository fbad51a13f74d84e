"""eBPF readiness: can the agent's probes run on this host?

Reuses the loader's requirement checks (:meth:`agent.ebpf.loader.Probe.check`:
privileges, tracefs, kernel headers for bcc, BTF, each required
tracepoint) without compiling or attaching anything, and never mounts
tracefs (doctor changes nothing). Adds whether the bcc Python module
(Debian python3-bpfcc) can be found, without importing it (importing bcc
loads LLVM).
"""

from __future__ import annotations

import importlib.util

from agent.doctor import DoctorInput, Result, check

REF_EBPF = "docs/probes.md (requirements and fixes); kvmscope probes check; bcc INSTALL.md (kernel headers)"


def bcc_status() -> tuple[bool, str]:
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as e:
        return False, f"bcc not importable: {e}"
    if spec is None:
        return False, "python module bcc not found (Debian python3-bpfcc; the venv needs --system-site-packages)"
    return True, f"bcc at {spec.origin}"


@check("ebpf_readiness", 80, "eBPF probe requirements")
def ebpf_readiness(inp: DoctorInput) -> list[Result]:
    """Every probe's requirements (the checks `kvmscope probes check` runs before compiling), plus bcc.

    Without the probes kvmscope still reports iSCSI sessions, TCP state and
    libvirt/QMP latency, but loses per-request block latency histograms,
    per-connection retransmit events and connection lifecycle events.
    """
    from agent.ebpf import probe_classes
    from agent.ebpf.source import load_options
    from agent.sources import SourceContext

    name = "ebpf_readiness"
    opts = load_options(SourceContext(inp.config, inp.paths))
    opts.mount_tracefs = False
    checks: dict[str, tuple[bool, str, str]] = {}
    per_probe: dict[str, dict] = {}
    for pname, cls in probe_classes().items():
        probe = cls(opts)
        found, present = probe.check()
        bad = [c for c in found if not c.ok]
        per_probe[pname] = {"ready": not bad, "failed": [c.name for c in bad],
                            "optional_missing": [tp for tp in probe.optional if tp not in present]}
        for c in found:
            checks.setdefault(c.name, (c.ok, c.detail, c.fix))
    ok_bcc, bcc_detail = (inp.bcc_status or bcc_status)()
    checks["bcc"] = (ok_bcc, bcc_detail, "" if ok_bcc else "apt-get install python3-bpfcc (deploy/setup.sh)")
    failed = {k: v for k, v in checks.items() if not v[0]}
    values = {"checks": {k: {"ok": v[0], "detail": v[1]} for k, v in checks.items()}, "probes": per_probe}
    if not failed:
        return [Result(name, "ok", "host",
                       f"all {len(per_probe)} probes' requirements met ({', '.join(sorted(per_probe))}); "
                       f"{len([k for k in checks if k.startswith('tracepoint ')])} required tracepoints present; {bcc_detail}",
                       reference=REF_EBPF, values=values)]
    tracefs_only = set(failed) == {"tracefs"} or all(k == "tracefs" or k.startswith("tracepoint ") for k in failed)
    privileged = checks.get("privileges", (False,))[0]
    if tracefs_only and privileged and "tracefs" in failed:
        return [Result(
            name, "info", "host", f"tracefs not mounted ({failed['tracefs'][1]}); tracepoints not verified",
            why="the agent mounts tracefs itself when it starts (it has the privileges); the probes' tracepoints "
                "can only be checked once it is mounted",
            reference=REF_EBPF, fix=failed["tracefs"][2], values=values)]
    return [Result(
        name, "warning", "host",
        "not ready: " + "; ".join(f"{k}: {v[1]}" for k, v in failed.items()),
        why="the eBPF probes cannot run: per-request block latency, retransmit events and connection "
            "lifecycle events will be missing (the other sources still work)",
        reference=REF_EBPF, fix="; ".join(v[2] for v in failed.values() if v[2]), values=values)]
