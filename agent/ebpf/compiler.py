"""Compile, load and attach a probe in a short-lived child process; hand the fds to the agent.

bcc (and with it LLVM, ~130 MB resident) is only ever imported by the child:
``python -m agent.ebpf.compiler <socket fd>`` reads one request (JSON on
stdin: the C text, the cflags, the attachments to make besides bcc's own
auto-attached ``tracepoint__*`` / ``raw_tracepoint__*`` functions), compiles
and loads it with bcc, attaches, and sends back over a Unix socket the
description (JSON) with every program, map and attachment fd (SCM_RIGHTS).
It exits without bcc's clean-up (which would detach what it attached): from
then on the agent's copies of the fds keep the programs loaded and attached,
and closing them (stop, or the agent's death) detaches.

:func:`compile_in_child` is the agent's side: it returns a
:class:`agent.ebpf.bpfsys.BpfObject`, or raises :class:`CompileError` with
the compiler's own message (bcc prints clang's diagnostics on stderr).

Attachments a probe declares (:class:`Attach`), made by the child with bcc:
``tracepoint`` (``cat:name``), ``raw_tracepoint`` (name), ``uprobe`` /
``uretprobe`` (binary path + symbol, one process (``pid``) or every process
(``pid=-1``)), ``tp_btf`` (a BTF-typed raw tracepoint: the function, compiled
by bcc but not loaded by it, is loaded with the tracepoint's BTF id
(``btf_id``) by :func:`agent.ebpf.bpfsys.load_tp_btf`; its arguments are
typed kernel pointers the program reads with plain loads); ``load``: a uprobe program
loaded but not attached (the agent attaches it itself and can detach it,
agent/ebpf/uprobes.py). ``optional=True``: a failed attachment is reported in
``skipped`` instead of failing the probe.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from agent.ebpf.bpfsys import Attachment, BpfObject, MapSpec, Program

MAX_FDS = 250  # SCM_RIGHTS carries at most 253 fds per message
_MSG = 1 << 20


class CompileError(Exception):
    """The child could not compile, load or attach the probe; ``str()`` holds its own message."""


@dataclass
class Attach:
    """An attachment the child makes with bcc besides the auto-attached ``tracepoint__cat__name`` and
    ``raw_tracepoint__name`` functions."""

    kind: str  # tracepoint | raw_tracepoint | uprobe | uretprobe | load (a kprobe-type program only loaded)
    fn_name: str
    target: str = ""  # tracepoint "cat:name", raw tracepoint name; a uprobe's label (default binary:symbol[:pid])
    binary: str = ""  # uprobe: path of the binary or library (or a library name bcc resolves)
    symbol: str = ""  # uprobe: symbol
    pid: int = -1  # uprobe: one process, or -1 for every process mapping the binary
    optional: bool = False
    btf_id: int = 0  # tp_btf: id of the tracepoint's btf_trace_<name> typedef in the kernel's BTF

    @property
    def label(self) -> str:
        return self.target if self.kind == "tracepoint" else f"{self.kind}:{self.target or f'{self.binary}:{self.symbol}'}"


# -- the agent's side ---------------------------------------------------------------------------------------


def _recv_all(sock: socket.socket) -> tuple[dict, list[int]]:
    """One message (description + fds), then the rest of the JSON if it was longer than one read."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, _MSG, MAX_FDS)
    chunks = [msg]
    while msg:
        msg = sock.recv(_MSG)
        chunks.append(msg)
    data = b"".join(chunks)
    if not data:
        return {}, list(fds)
    return json.loads(data), list(fds)


def compile_in_child(text: str, cflags: list[str], attach: list[Attach] = (), timeout: float = 60.0,
                     python: str | None = None) -> tuple[BpfObject, list[str]]:
    """Compile + load + attach in a child; returns the object (fds now owned by this process) and the labels
    of optional attachments that failed. Raises CompileError (the child's message) on failure."""
    obj, skipped, _recipe = compile_and_record(text, cflags, attach, timeout, python, record=False)
    return obj, skipped


def compile_and_record(text: str, cflags: list[str], attach: list[Attach] = (), timeout: float = 60.0,
                       python: str | None = None, record: bool = True) -> tuple[BpfObject, list[str], dict | None]:
    """:func:`compile_in_child`, and with ``record`` the recipe to load the same object again without
    LLVM (:mod:`agent.ebpf.objcache`), or None when the child could not make one."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = json.dumps({"text": text, "cflags": list(cflags), "attach": [asdict(a) for a in attach],
                          "record": bool(record)}).encode()
    errfile = tempfile.TemporaryFile()  # clang's diagnostics: a file, so a chatty compiler never blocks on a pipe
    try:
        proc = subprocess.Popen([python or sys.executable, "-m", "agent.ebpf.compiler", str(child.fileno())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errfile,
                                pass_fds=(child.fileno(),), close_fds=True)
    except OSError as e:
        parent.close()
        child.close()
        errfile.close()
        raise CompileError(f"cannot start the compiler process: {e}") from e
    child.close()
    fds: list[int] = []
    try:
        try:
            proc.stdin.write(request)
            proc.stdin.close()
            parent.settimeout(timeout)
            desc, fds = _recv_all(parent)
            parent.sendall(b"k")  # the child may exit: the fds are ours
        except (OSError, ValueError) as e:
            desc = {"error": f"no answer from the compiler process ({type(e).__name__}: {e})"}
        err = ""
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err = "(compiler process killed after timeout)"
        errfile.seek(0)
        err = errfile.read().decode(errors="replace") + err
        if not desc or "error" in desc:
            msg = (desc or {}).get("error") or f"compiler process exited with status {proc.returncode}"
            raise CompileError(_with_stderr(msg, err))
        return _object(desc, fds), list(desc.get("skipped", [])), desc.get("recipe")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        parent.close()
        errfile.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _with_stderr(msg: str, err: str | None) -> str:
    lines = [ln for ln in (err or "").splitlines() if ln.strip()]
    if not lines:
        return msg
    tail = "\n".join(lines[-20:])
    return f"{msg}\n{tail}"


def _object(desc: dict, fds: list[int]) -> BpfObject:
    def fd(i: int) -> int:
        return fds[i]

    obj = BpfObject(
        programs={p["name"]: Program(p["name"], fd(p["fd"])) for p in desc["programs"]},
        maps={m["name"]: MapSpec(m["name"], fd(m["fd"]), m.get("key_desc"), m.get("leaf_desc")) for m in desc["maps"]},
        attachments=[Attachment(a["kind"], a["target"], a["fn_name"], fd(a["fd"])) for a in desc["attachments"]],
    )
    return obj


# -- the child ----------------------------------------------------------------------------------------------


def _child(sock_fd: int) -> int:
    sock = socket.socket(fileno=sock_fd)
    req = json.loads(sys.stdin.buffer.read())
    try:
        desc, fds = _build(req)
    except BaseException as e:  # everything goes back to the agent as a message
        desc, fds = {"error": f"{str(e).strip() or type(e).__name__}"}, []
    if len(fds) > MAX_FDS:
        desc, fds = {"error": f"{len(fds)} fds to hand over, more than {MAX_FDS}"}, []
    data = json.dumps(desc).encode()
    socket.send_fds(sock, [data[:_MSG]], fds)
    if len(data) > _MSG:
        sock.sendall(data[_MSG:])
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(30)
    try:
        sock.recv(1)  # the agent has them
    except OSError:
        pass
    sys.stderr.flush()
    os._exit(0)  # no atexit: bcc's clean-up would detach and close what the agent now holds


def _build(req: dict) -> tuple[dict, list[int]]:
    import bcc
    from bcc.libbcc import lib

    t0 = time.monotonic()
    b = bcc.BPF(text=req["text"].encode(), cflags=list(req["cflags"]))
    attachments: list[dict] = []
    skipped: list[str] = []
    for tp, fd in b.tracepoint_fds.items():
        name = tp.decode()
        attachments.append({"kind": "tracepoint", "target": name, "fn_name": "tracepoint__" + name.replace(":", "__"),
                            "fd": fd})
    for tp, fd in b.raw_tracepoint_fds.items():
        attachments.append({"kind": "raw_tracepoint", "target": tp.decode(), "fn_name": "raw_tracepoint__" + tp.decode(),
                            "fd": fd})
    for a in req.get("attach", []):
        spec = Attach(**a)
        if spec.kind == "load":  # loaded, not attached: the agent attaches it itself (agent/ebpf/uprobes.py)
            b.load_func(spec.fn_name.encode(), bcc.BPF.KPROBE)
            continue
        try:
            attachments.append(_attach(b, spec))
        except Exception as e:
            if not spec.optional:
                raise RuntimeError(f"attaching {spec.fn_name} to {spec.label} failed: {e}") from e
            skipped.append(spec.label)
            print(f"optional attachment {spec.label} skipped: {e}", file=sys.stderr)
    from agent.ebpf.objcache import bcc_tables

    maps = []
    for name, fd in bcc_tables(b):
        kd, ld = lib.bpf_table_key_desc(b.module, name), lib.bpf_table_leaf_desc(b.module, name)
        maps.append({"name": name.decode(), "fd": fd, "key_desc": json.loads(kd) if kd else None,
                     "leaf_desc": json.loads(ld) if ld else None})
    programs = [{"name": (n.decode() if isinstance(n, bytes) else n), "fd": f.fd} for n, f in b.funcs.items()]
    recipe = None
    if req.get("record"):
        from agent.ebpf.objcache import record

        try:
            recipe = record(b, {a["fn_name"]: a["btf_id"] for a in req.get("attach", []) if a["kind"] == "tp_btf"})
        except Exception as e:  # the probe works; it is only not cached
            print(f"not cached: {e}", file=sys.stderr)
    fds: list[int] = []

    def slot(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    for p in programs:
        p["fd"] = slot(p["fd"])
    for m in maps:
        m["fd"] = slot(m["fd"])
    for a in attachments:
        a["fd"] = slot(a["fd"])
    return {"programs": programs, "maps": maps, "attachments": attachments, "skipped": skipped,
            "seconds": round(time.monotonic() - t0, 3), "recipe": recipe}, fds


def _attach(b, spec: Attach) -> dict:
    if spec.kind == "tp_btf":
        import bcc

        from agent.ebpf.bpfsys import load_tp_btf
        fn = spec.fn_name.encode()
        prog_fd, link_fd = load_tp_btf(b.dump_func(fn), spec.fn_name, spec.btf_id)
        b.funcs[fn] = bcc.BPF.Function(b, fn, prog_fd)  # handed over with bcc's own programs
        return {"kind": spec.kind, "target": spec.target, "fn_name": spec.fn_name, "fd": link_fd}
    if spec.kind == "tracepoint":
        before = dict(b.tracepoint_fds)
        b.attach_tracepoint(tp=spec.target.encode(), fn_name=spec.fn_name.encode())
        new = {k: v for k, v in b.tracepoint_fds.items() if k not in before}
        target = spec.target
    elif spec.kind == "raw_tracepoint":
        before = dict(b.raw_tracepoint_fds)
        b.attach_raw_tracepoint(tp=spec.target.encode(), fn_name=spec.fn_name.encode())
        new = {k: v for k, v in b.raw_tracepoint_fds.items() if k not in before}
        target = spec.target
    elif spec.kind in ("uprobe", "uretprobe"):
        before = dict(b.uprobe_fds)
        fn = b.attach_uprobe if spec.kind == "uprobe" else b.attach_uretprobe
        fn(name=spec.binary.encode(), sym=spec.symbol.encode(), fn_name=spec.fn_name.encode(), pid=spec.pid)
        new = {k: v for k, v in b.uprobe_fds.items() if k not in before}
        target = spec.target or (f"{spec.binary}:{spec.symbol}" + (f":{spec.pid}" if spec.pid != -1 else ""))
    else:
        raise ValueError(f"unknown attachment kind {spec.kind!r}")
    if len(new) != 1:
        raise RuntimeError(f"expected one new attachment for {spec.label}, bcc made {len(new)}")
    return {"kind": spec.kind, "target": target, "fn_name": spec.fn_name, "fd": next(iter(new.values()))}


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
