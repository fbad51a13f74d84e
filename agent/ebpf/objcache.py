"""Compiled probes kept per kernel and loaded again without LLVM.

Compiling a probe costs ~0.45 s of clang per probe (docs/performance.md, "Footprint"), every start.
What the compiler child loads is plain BPF bytecode once bcc has compiled it: so on the first start
on a kernel the child (:mod:`agent.ebpf.compiler`) also sends a *recipe* back, and the agent keeps it
in the cache directory (``ebpf.cache_dir``, default ``/var/cache/kvmscope/bpf``); the next start
loads the recipe with plain bpf(2) calls, no child, no bcc, no LLVM. A recipe holds:

* every map: type, key and value size, max_entries, flags, name, and bcc's description of the key
  and value types (the agent's tables are built from it, as from the child's answer);
* every program bcc loaded: its instructions as bcc relocated them (``BPF.dump_func``), its program
  type, license and kernel version, and where it refers to a map: the index of each ``ld_imm64``
  instruction with ``src_reg = BPF_PSEUDO_MAP_FD`` and the name of the map whose fd the child had
  put there (the agent puts in the fd of the map it created);
* the tracepoints and raw tracepoints bcc attached by itself (``tracepoint__*`` /
  ``raw_tracepoint__*`` functions). The probe's own attachments (:class:`agent.ebpf.compiler.Attach`)
  are made again from the request: tracepoints by ``perf_event_open`` on the tracepoint's id and
  ``PERF_EVENT_IOC_SET_BPF``, raw and BTF tracepoints by ``BPF_RAW_TRACEPOINT_OPEN``, uprobes on the
  uprobe PMU (:mod:`agent.ebpf.uprobes`).

The key (the file name) is a SHA-256 over the cache format, the kernel's release and build string,
a hash of the kernel's BTF (``/sys/kernel/btf/vmlinux``), the kernel headers bcc compiles with (the
build directory's real path and version header), bcc's version, the probe's C text, the headers of
every ``-I`` directory, the cflags and the attachments asked for. Any of them changing is
another file: the old one is never read again.

Trust: the programs still go through the kernel's verifier, but a verified program can still be the
wrong program, so an entry is read only from a directory and a file owned by the agent's own user and
writable by no one else, under parents no one else can swap it in (the directory is made 0700, files
0600, written to a temporary name and renamed: never half-written), and only when its own SHA-256
digest and key match. Anything else
(foreign owner, loose mode, unreadable, bad JSON, digest or key mismatch, a map reference that is not
where the recipe says, a program the kernel refuses) is a miss: the probe is compiled as without a
cache and a good entry written in its place (:func:`load_or_compile`). Reading an entry touches it;
writing one removes the entries no start has touched for 30 days (other kernels, older probe sources).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import logging
import os
import stat
import struct
import time
from dataclasses import asdict
from pathlib import Path

from agent.ebpf import bpfsys, uprobes
from agent.hostpaths import HostPaths

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_DIR = Path("/var/cache/kvmscope/bpf")
KEEP_SECONDS = 30 * 86400  # an entry no start has used for this long is removed when another is written

LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD = 1
PERF_TYPE_TRACEPOINT = 2

# prog types (include/uapi/linux/bpf.h) a recipe may hold
KPROBE, TRACEPOINT, RAW_TRACEPOINT, TRACING = 2, 5, 17, 26
PROG_TYPES = {KPROBE, TRACEPOINT, RAW_TRACEPOINT, TRACING}
# map types a recipe may create (the probes' own: no map of maps, no program array, no perf buffer)
MAP_TYPES = {bpfsys.HASH, bpfsys.ARRAY, bpfsys.PERCPU_HASH, bpfsys.PERCPU_ARRAY, bpfsys.LRU_HASH,
             bpfsys.LRU_PERCPU_HASH, bpfsys.RINGBUF}


class CacheMiss(Exception):
    """No usable entry (or it could not be loaded): compile."""


# -- the key ---------------------------------------------------------------------------------------------------

_btf_digest: dict[str, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the kernel's BTF), computed once per process while its size and mtime stay."""
    try:
        st = path.stat()
    except OSError:
        return "none"
    memo = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if memo not in _btf_digest:
        try:
            with open(path, "rb") as f:  # in chunks: the BTF is ~6 MB, never held whole for this
                _btf_digest[memo] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return "unreadable"
    return _btf_digest[memo]


def bcc_version() -> str:
    """bcc's version, read from its package without importing it (the agent never loads bcc)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        return "none"
    if spec is None or not spec.origin:
        return "none"
    try:
        return (Path(spec.origin).parent / "version.py").read_text().strip()
    except OSError:
        return "unknown"


def _headers(cflags: list[str]) -> list[list[str]]:
    out = []
    for f in cflags:
        if not f.startswith("-I"):
            continue
        d = Path(f[2:])
        for h in sorted(d.glob("*.h")) if d.is_dir() else ():
            try:
                out.append([str(h), hashlib.sha256(h.read_bytes()).hexdigest()])
            except OSError:
                out.append([str(h), "unreadable"])
    return out


def _kernel_headers(build: Path) -> list:
    """Which kernel headers bcc compiles with (``/lib/modules/<release>/build``, bcc's own default: the
    compiler child sets no other): the build directory's real path and its version header (another
    headers package linked there is another key)."""
    version = build / "include" / "generated" / "uapi" / "linux" / "version.h"
    try:
        return [os.path.realpath(build), hashlib.sha256(version.read_bytes()).hexdigest(), version.stat().st_mtime_ns]
    except OSError:
        return [os.path.realpath(build), "none"]


def cache_key(text: str, cflags: list[str], attach: list, paths: HostPaths | None = None,
              kernel_build: Path | None = None) -> str:
    """The entry's name: what the compiled programs depend on (module docstring)."""
    paths = paths or HostPaths()
    u = os.uname()
    parts = {
        "format": FORMAT, "release": u.release, "version": u.version, "machine": u.machine,
        "btf": file_digest(paths.sys("kernel", "btf", "vmlinux")), "bcc": bcc_version(),
        "text": hashlib.sha256(text.encode()).hexdigest(), "headers": _headers(list(cflags)),
        "cflags": list(cflags), "attach": [a if isinstance(a, dict) else asdict(a) for a in attach],
        "kernel_headers": _kernel_headers(kernel_build or Path("/lib/modules") / u.release / "build"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# -- the directory -----------------------------------------------------------------------------------------------


class ObjCache:
    """The cache directory: entries ``<key>.json``, trusted only as the module docstring says."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _dir_ok(self) -> str:
        """'' when the directory may be trusted, else why not."""
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return "no entry (no cache directory yet)"
        except OSError as e:
            return f"{self.dir}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.dir} is not a directory"
        if st.st_uid != os.geteuid():
            return f"{self.dir} is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}"
        if st.st_mode & 0o022:
            return f"{self.dir} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        # nor may anyone else swap the directory for another: every parent is root's or ours, and writable
        # by others only with the sticky bit (/tmp), where they cannot rename what is not theirs
        for parent in Path(os.path.abspath(self.dir)).parents:
            try:
                pst = os.stat(parent)
            except OSError as e:
                return f"{parent}: {e.strerror}"
            if pst.st_uid not in (0, os.geteuid()):
                return f"{parent} (a parent of {self.dir}) is owned by uid {pst.st_uid}"
            if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
                return f"{parent} (a parent of {self.dir}) is writable by others"
        return ""

    def get(self, key: str) -> dict:
        """The recipe stored under ``key``; CacheMiss (with the reason) when there is none to trust."""
        why = self._dir_ok()
        if why:
            raise CacheMiss(why)
        p = self.path(key)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CacheMiss(f"no entry {p.name}") from None
        except OSError as e:
            raise CacheMiss(f"{p}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise CacheMiss(f"{p}: not a regular file of uid {os.geteuid()} writable by it alone")
            data = f.read()
            try:
                os.utime(f.fileno())  # in use: kept by prune()
            except OSError:
                pass
        try:
            entry = json.loads(data)
            recipe = entry["recipe"]
            digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        except (ValueError, KeyError, TypeError) as e:
            raise CacheMiss(f"{p}: unreadable entry ({type(e).__name__})") from None
        if entry.get("digest") != digest:
            raise CacheMiss(f"{p}: digest mismatch (corrupt entry)")
        if entry.get("key") != key or recipe.get("format") != FORMAT:
            raise CacheMiss(f"{p}: an entry for another key or format")
        return recipe

    def put(self, key: str, recipe: dict) -> Path | None:
        """Store atomically (temporary file + rename); returns the path, or None when the directory is
        not ours (then nothing is written: an entry there would not be read either)."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            log.info("eBPF object cache: cannot create %s: %s", self.dir, e.strerror)
            return None
        why = self._dir_ok()
        if why:
            log.warning("eBPF object cache not used: %s", why)
            return None
        body = {"key": key, "digest": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest(),
                "written": time.time(), "recipe": recipe}
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(body).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except OSError as e:
            log.warning("eBPF object cache: cannot write %s: %s", self.path(key), e.strerror)
            try:
                tmp.unlink()
            except OSError:
                pass
            return None
        self.prune()
        return self.path(key)

    def prune(self, max_age: float = KEEP_SECONDS) -> list[str]:
        """Remove the entries no start has read or written for ``max_age`` seconds (another kernel's, an
        older probe revision's) and temporary files left by a writer that died; returns their names."""
        gone = []
        now = time.time()
        try:
            names = os.listdir(self.dir)
        except OSError:
            return gone
        for name in names:
            p = self.dir / name
            tmp = name.startswith(".") and name.endswith(".tmp")
            if not (name.endswith(".json") or tmp):
                continue
            try:
                age = now - os.lstat(p).st_mtime
                if age > (3600 if tmp else max_age):
                    p.unlink()
                    gone.append(name)
            except OSError:
                pass
        return gone

    def drop(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except OSError:
            pass


# -- recording (the compiler child, with bcc loaded) -------------------------------------------------------------


def map_refs(insns: bytes) -> list[tuple[int, int, int]]:
    """(instruction index, src_reg, imm) of every ld_imm64 that refers to a kernel object (src_reg != 0)."""
    out = []
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if code == LD_IMM64:
            if regs >> 4:
                out.append((i, regs >> 4, imm))
            i += 2
            continue
        i += 1
    return out


def bcc_tables(b) -> list[tuple[bytes, int]]:
    """(name, fd) of every table a loaded ``bcc.BPF`` created (libbcc through ctypes: the compiler child only)."""
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_ulonglong, [ctypes.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]
    tables = []
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i)
        fd = lib.bpf_table_fd(b.module, name)
        if fd >= 0:
            tables.append((name, fd))
    return tables


def record(b, tp_btf: dict[str, int]) -> dict:
    """The recipe of a loaded ``bcc.BPF`` (called in the child after loading and attaching).
    ``tp_btf``: function name -> BTF id of the probe's tp_btf programs. Raises ValueError when something
    cannot be replayed (then nothing is cached)."""
    from bcc.libbcc import lib

    fd_name: dict[int, str] = {}
    maps = []
    for name, fd in bcc_tables(b):
        info = bpfsys.obj_info(fd, bpfsys.MapInfo())
        if info.type not in MAP_TYPES:
            raise ValueError(f"map {name.decode()}: type {info.type} is not cached")
        kd, ld = lib.bpf_table_key_desc(b.module, name), lib.bpf_table_leaf_desc(b.module, name)
        fd_name[fd] = name.decode()
        maps.append({"name": name.decode(), "type": int(info.type), "key_size": int(info.key_size),
                     "value_size": int(info.value_size), "max_entries": int(info.max_entries),
                     "flags": int(info.map_flags), "key_desc": json.loads(kd) if kd else None,
                     "leaf_desc": json.loads(ld) if ld else None})
    programs = []
    for n, f in b.funcs.items():
        name = n.decode() if isinstance(n, bytes) else n
        insns = b.dump_func(name.encode())
        ptype = int(bpfsys.obj_info(f.fd, bpfsys.ProgInfo()).type)
        if ptype not in PROG_TYPES:
            raise ValueError(f"program {name}: type {ptype} is not cached")
        refs = []
        for idx, src, imm in map_refs(insns):
            if src != PSEUDO_MAP_FD or imm not in fd_name:
                raise ValueError(f"program {name}: instruction {idx} refers to an object that is not a probe map")
            refs.append([idx, fd_name[imm]])
        programs.append({"name": name, "type": ptype, "insns": base64.b64encode(insns).decode(), "maps": refs,
                         "attach_btf_id": int(tp_btf.get(name, 0))})
    auto = [{"kind": "tracepoint", "target": tp.decode(), "fn_name": "tracepoint__" + tp.decode().replace(":", "__")}
            for tp in b.tracepoint_fds]
    auto += [{"kind": "raw_tracepoint", "target": tp.decode(), "fn_name": "raw_tracepoint__" + tp.decode()}
             for tp in b.raw_tracepoint_fds]
    return {"format": FORMAT, "license": (lib.bpf_module_license(b.module) or b"GPL").decode(),
            "kern_version": int(lib.bpf_module_kern_version(b.module)), "maps": maps, "programs": programs,
            "auto": auto}


# -- loading (the agent, no bcc) -----------------------------------------------------------------------------------


def _tracepoint_id(paths: HostPaths, target: str) -> int:
    cat, _, name = target.partition(":")
    return int(paths.read_text(paths.tracefs / "events" / cat / name / "id").strip())


def attach_tracepoint(prog_fd: int, tp_id: int) -> int:
    """A classic tracepoint (id from tracefs) running ``prog_fd``, as bcc attaches it: a perf event on CPU 0
    for every process; returns the perf event fd (closing it detaches)."""
    attr = uprobes.PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ctypes.sizeof(uprobes.PerfEventAttr), config=tp_id,
                                 sample_period=1, wakeup_events=1)
    fd = uprobes._libc.syscall(uprobes._SYS_perf_event_open, ctypes.byref(attr), -1, 0, -1,
                               uprobes.PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"perf_event_open(tracepoint {tp_id}): {os.strerror(e)}")
    for req, arg in ((uprobes.PERF_EVENT_IOC_SET_BPF, prog_fd), (uprobes.PERF_EVENT_IOC_ENABLE, 0)):
        if uprobes._libc.ioctl(fd, req, ctypes.c_ulong(arg)) != 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise OSError(e, f"ioctl {req:#x} on tracepoint {tp_id}: {os.strerror(e)}")
    return fd


def _patch(prog: dict, map_fds: dict[str, int]) -> bytes:
    insns = bytearray(base64.b64decode(prog["insns"], validate=True))
    if not insns or len(insns) % 8:
        raise CacheMiss(f"program {prog['name']}: {len(insns)} bytes of instructions")
    want = {int(i): name for i, name in prog["maps"]}
    found = {i for i, _src, _imm in map_refs(bytes(insns))}
    if found != set(want):
        raise CacheMiss(f"program {prog['name']}: map references at {sorted(found)}, the recipe says {sorted(want)}")
    for i, name in want.items():
        if insns[i * 8 + 1] >> 4 != PSEUDO_MAP_FD or name not in map_fds:
            raise CacheMiss(f"program {prog['name']}: instruction {i} is no reference to map {name}")
        struct.pack_into("<i", insns, i * 8 + 4, map_fds[name])
    return bytes(insns)


def load_recipe(recipe: dict, attach: list, paths: HostPaths | None = None) -> tuple[bpfsys.BpfObject, list[str]]:
    """Create the maps, load the programs, attach: the object a compiler child would have handed over and the
    labels of optional attachments that failed. Everything made is closed again on failure."""
    from agent.ebpf.compiler import Attach  # the request's type (compiler imports this module)

    paths = paths or HostPaths()
    obj = bpfsys.BpfObject()
    try:
        for m in recipe["maps"]:
            if m["type"] not in MAP_TYPES:
                raise CacheMiss(f"map {m['name']}: type {m['type']}")
            fd = bpfsys.map_create(m["type"], m["key_size"], m["value_size"], m["max_entries"], m["flags"], m["name"])
            obj.maps[m["name"]] = bpfsys.MapSpec(m["name"], fd, m.get("key_desc"), m.get("leaf_desc"))
        map_fds = {n: s.fd for n, s in obj.maps.items()}
        lic = recipe.get("license", "GPL").encode()
        for p in recipe["programs"]:
            if p["type"] not in PROG_TYPES:
                raise CacheMiss(f"program {p['name']}: type {p['type']}")
            insns = _patch(p, map_fds)
            eat = bpfsys.TRACE_RAW_TP if p["type"] == TRACING else 0
            fd = bpfsys.load_program(insns, p["name"], p["type"], expected_attach_type=eat,
                                     attach_btf_id=p.get("attach_btf_id", 0), license=lic,
                                     kern_version=recipe.get("kern_version", 0))
            obj.programs[p["name"]] = bpfsys.Program(p["name"], fd)
        skipped: list[str] = []
        specs = [dict(a, optional=False) for a in recipe["auto"]]
        specs += [a if isinstance(a, dict) else asdict(a) for a in attach]
        for a in specs:
            spec = Attach(**{k: v for k, v in a.items() if k in Attach.__dataclass_fields__})
            if spec.kind == "load":
                continue
            try:
                obj.attachments.append(_attach(obj, spec, paths))
            except (OSError, KeyError, ValueError) as e:
                if not spec.optional:
                    raise CacheMiss(f"attaching {spec.fn_name} to {spec.label} failed: {e}") from e
                skipped.append(spec.label)
                log.info("optional attachment %s skipped: %s", spec.label, e)
        return obj, skipped
    except BaseException:
        obj.cleanup()
        raise


def _attach(obj: bpfsys.BpfObject, spec, paths: HostPaths) -> bpfsys.Attachment:
    prog = obj.programs.get(spec.fn_name)
    if prog is None:
        raise KeyError(f"no program {spec.fn_name}")
    if spec.kind == "tracepoint":
        fd = attach_tracepoint(prog.fd, _tracepoint_id(paths, spec.target))
        target = spec.target
    elif spec.kind == "raw_tracepoint":
        fd = bpfsys.raw_tracepoint_open(prog.fd, spec.target)
        target = spec.target
    elif spec.kind == "tp_btf":
        fd = bpfsys.raw_tracepoint_open(prog.fd, None)
        target = spec.target
    elif spec.kind == "uprobe":
        if spec.pid != -1:
            raise ValueError("a uprobe on one process is not replayed from the cache")
        library = Path(spec.binary)
        offset = uprobes.symbol_offset(library.read_bytes(), spec.symbol)
        fd = uprobes.attach(prog.fd, library, offset, uprobes.uprobe_pmu_type(paths))
        target = spec.target or f"{spec.binary}:{spec.symbol}"
    else:
        raise ValueError(f"attachment kind {spec.kind!r} is not replayed from the cache")
    return bpfsys.Attachment(spec.kind, target, spec.fn_name, fd)


# -- the loader's entry --------------------------------------------------------------------------------------------


def load_or_compile(text: str, cflags: list[str], attach: list, cache: ObjCache | None,
                    paths: HostPaths | None = None, kernel_build: Path | None = None, timeout: float = 60.0
                    ) -> tuple[bpfsys.BpfObject, list[str], str]:
    """The probe's object from the cache when there is a good entry, else compiled (and the entry written):
    (object, skipped optional attachments, how: ``cache`` or ``compiled``). CompileError as
    :func:`agent.ebpf.compiler.compile_in_child` (``timeout``: its compiler child's, ebpf.compile_timeout)."""
    from agent.ebpf.compiler import compile_and_record

    if cache is None:
        obj, skipped, _ = compile_and_record(text, cflags, attach, timeout, record=False)
        return obj, skipped, "compiled"
    key = cache_key(text, cflags, attach, paths, kernel_build)
    try:
        recipe = cache.get(key)
        obj, skipped = load_recipe(recipe, attach, paths)
        return obj, skipped, "cache"
    except CacheMiss as e:
        log.debug("eBPF object cache: %s", e)
        if "no entry" not in str(e):
            log.info("eBPF object cache entry %s not used: %s; compiling", key[:12], e)
    except (OSError, KeyError, ValueError, TypeError) as e:  # a map or program the kernel refused, a malformed recipe
        log.warning("eBPF object cache entry %s could not be loaded (%s: %s); compiling", key[:12], type(e).__name__, e)
    obj, skipped, recipe = compile_and_record(text, cflags, attach, timeout, record=True)
    if recipe is not None:
        cache.put(key, recipe)
    else:
        cache.drop(key)
    return obj, skipped, "compiled"
