"""The probes' C layouts and constants against their Python mirrors.

What user space reads from the kernel (map keys and values, ring buffer
records, totals indexes, kinds, flags) is declared once in C, in
probes/common.h and probes/<probe>.h, and mirrored by ctypes Structures and
constants in agent/ebpf/. Here the C side is compiled with the host's cc
(the headers build as plain C with u8..u64 typedefs) into a program that
prints the offset, size, element size and signedness of every field of
every struct and the value of every constant, as the compiler lays them
out; each is compared with the Python mirror. The map declarations of each
probes/<probe>.bpf.c are also checked against the types the Python side
reads each map with (``TABLES``).
"""

from __future__ import annotations

import ctypes
import fnmatch
import re
import subprocess
import tomllib

import pytest

from agent.ebpf import block_io, decode, libiscsi, tcp_lifecycle, tcp_retrans
from tests.conftest import ROOT

PROBES = ROOT / "probes"

PRELUDE = """\
#include <stddef.h>
#include <stdio.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed int s32;
#ifndef __always_inline /* glibc defines it */
#define __always_inline inline
#endif
"""

# header -> (Python module holding its mirror, -D flags the loader passes)
HEADERS = {
    "common.h": (decode, []),
    "tcp_retrans.h": (tcp_retrans, []),
    "tcp_lifecycle.h": (tcp_lifecycle, []),
    "block_io.h": (block_io, [f"-DSLOT_MAX={block_io.SLOT_MAX}"]),
    "libiscsi.h": (libiscsi, [f"-DSLOT_MAX={libiscsi.SLOT_MAX}"]),
}
PROBE_MODULES = {"tcp_retrans": tcp_retrans, "tcp_lifecycle": tcp_lifecycle, "block_io": block_io, "libiscsi": libiscsi}
# maps only the kernel side uses (never read from Python)
KERNEL_ONLY_MAPS = {"block_io": {"inflight", "owners", "devcache"}, "libiscsi": {"lat_zero", "ctx_zero"}, "tcp_retrans": {"events"}, "tcp_lifecycle": {"events"}}


# -- reading the C (declarations only; the compiler decides every number) -----

def strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", " ", text, flags=re.S))


def c_structs(text: str) -> dict[str, list[tuple[str, str, bool]]]:
    """struct name -> [(field, type, is_array)] in declaration order."""
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", strip_comments(text), flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            m = re.fullmatch(r"(?P<type>.+?)\s+(?P<name>\w+)\s*(?P<dim>\[[^\]]+\])?", decl)
            assert m, f"struct {name}: cannot read field declaration {decl!r}"
            fields.append((m["name"], m["type"], bool(m["dim"])))
        out[name] = fields
    return out


def c_enums(text: str) -> dict[str, list[str]]:
    """enum name -> member names in declaration order."""
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{([^}]*)\}", strip_comments(text)):
        out[name] = [m.split("=")[0].strip() for m in body.split(",") if m.strip()]
    return out


def c_defines(text: str) -> list[str]:
    """Object-like #defines with a value (not function-like, not include guards)."""
    return re.findall(r"^\s*#\s*define\s+(\w+)[ \t]+\S", strip_comments(text), flags=re.M)


def c_maps(text: str) -> dict[str, tuple[str, str]]:
    """map name -> (key type, leaf type) from the bcc map declarations."""
    text = strip_comments(text)
    out = {}
    for key, leaf, name in re.findall(r"BPF_F?_?TABLE\(\s*\"\w+\"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*(\w+)", text):
        out[name] = (key, leaf)
    for name, leaf in re.findall(r"BPF_(?:PERCPU_)?ARRAY\(\s*(\w+)\s*,\s*([^,]+?)\s*,", text):
        out[name] = ("int", leaf)
    for name in re.findall(r"BPF_RINGBUF_OUTPUT\(\s*(\w+)", text):
        out[name] = ("", "")
    return out


def compile_and_run(tmp_path, header: str, flags: list[str]) -> dict[str, list[int]]:
    """Build a program that prints every struct field's offset, size, element
    size and signedness (-1: not an integer) and every constant of
    ``header`` (after common.h) as the compiler sees them."""
    text = (PROBES / header).read_text()
    lines = [PRELUDE, '#include "common.h"', f'#include "{header}"', "int main(void) {"]

    def signed(expr: str, ctype: str) -> str:
        if ctype.startswith("struct ") or ctype == "char":
            return "-1"  # a struct, or char whose signedness is the platform's
        return f"(int)((__typeof__({expr}))-1 < 0)"

    for s, fields in c_structs(text).items():
        lines.append(f'printf("struct {s} %zu\\n", sizeof(struct {s}));')
        for f, ctype, is_array in fields:
            member = f"((struct {s} *)0)->{f}"
            elem = f"{member}[0]" if is_array else member
            lines.append(f'printf("field {s}.{f} %zu %zu %zu %d\\n", offsetof(struct {s}, {f}), sizeof({member}), '
                         f'sizeof({elem}), {signed(elem, ctype)});')
    for name in c_defines(text):  # only those this build defines
        lines += [f"#ifdef {name}", f'printf("const {name} %lld\\n", (long long)({name}));', "#endif"]
    for members in c_enums(text).values():
        lines += [f'printf("const {m} %lld\\n", (long long)({m}));' for m in members]
    lines += ["return 0;", "}"]
    src = tmp_path / "layouts.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layouts"
    cc = subprocess.run(["cc", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function", f"-I{PROBES}", *flags,
                         "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        kind, name, *nums = line.split()
        out[f"{kind} {name}"] = [int(n) for n in nums]
    return out


# -- reading the Python mirrors -------------------------------------------------

def py_field(cls: type[ctypes.Structure], name: str, ctype) -> list[int]:
    desc = getattr(cls, name)
    elem = ctype._type_ if issubclass(ctype, ctypes.Array) else ctype
    if issubclass(elem, (ctypes.Structure, ctypes.Array)) or elem is ctypes.c_char:
        sign = -1
    else:
        sign = int(elem(-1).value < 0)
    return [desc.offset, desc.size, ctypes.sizeof(elem), sign]


# -- the tests ------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """header -> what the compiler printed (each header built once)."""
    cache = {}

    def get(header: str) -> dict[str, list[int]]:
        if header not in cache:
            cache[header] = compile_and_run(tmp_path_factory.mktemp("layouts"), header, HEADERS[header][1])
        return cache[header]
    return get


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_struct_layouts_match_the_c(compiled, header):
    module = HEADERS[header][0]
    c = compiled(header)
    structs = c_structs((PROBES / header).read_text())
    assert structs, f"no struct read from {header}"
    assert set(module.STRUCTS) == set(structs), f"{module.__name__}.STRUCTS must mirror every struct of {header}"
    for name, fields in structs.items():
        cls = module.STRUCTS[name]
        py_fields = [(f, t) for f, t, *_ in cls._fields_]
        assert [f for f, _ in py_fields] == [f for f, *_ in fields], f"struct {name}: field names/order"
        for f, ctype in py_fields:
            assert py_field(cls, f, ctype) == c[f"field {name}.{f}"], \
                f"struct {name}.{f}: [offset, size, element size, signed] differ from the C"
        assert ctypes.sizeof(cls) == c[f"struct {name}"][0], f"sizeof(struct {name})"


def enum_names(c_members: list[str], prefix: str) -> list[str]:
    return [m.removeprefix(prefix).lower() for m in c_members if not m.endswith("_N")]


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_constants_match_the_c(compiled, tmp_path, header):
    module = HEADERS[header][0]
    c = compiled(header)
    text = (PROBES / header).read_text()
    consts = {k.split()[1]: v[0] for k, v in c.items() if k.startswith("const ")}
    assert consts, f"no constant read from {header}"
    for name in c_defines(text):
        if name.startswith(("TOT_", "F_")):
            assert getattr(module, name, None) == consts[name], f"{module.__name__}.{name} != {header} {name}"
    py_consts = {n for n in vars(module) if re.fullmatch(r"(TOT|F)_[A-Z_]+", n)}
    assert py_consts <= set(consts), f"{module.__name__} has constants {header} does not define"
    enums = c_enums(text)
    for enum, members in enums.items():
        # every enum is 0..n-1 in declaration order, its *_N member the count
        assert [consts[m] for m in members] == list(range(len(members))), f"enum {enum} values"
    if "kind" in enums:
        prefix = "KIND_" if header == "block_io.h" else "K_"
        assert tuple(enum_names(enums["kind"], prefix)) == module.KINDS, f"enum kind of {header} vs KINDS"
        assert consts[prefix + "N"] == len(module.KINDS)
    if header == "block_io.h":
        assert tuple(enum_names(enums["op"], "OP_")) == decode.BLOCK_OPS
        assert consts["OP_N"] == len(decode.BLOCK_OPS)
        assert consts["SLOT_MAX"] == block_io.SLOT_MAX and consts["NSLOTS"] == block_io.NSLOTS
        # the default the C falls back to without -DSLOT_MAX is the same number
        assert compile_and_run(tmp_path, header, [])["const SLOT_MAX"] == [block_io.SLOT_MAX]
    if header == "libiscsi.h":
        assert tuple(enum_names(enums["iscsi_op"], "IOP_")) == decode.BLOCK_OPS
        assert consts["SLOT_MAX"] == libiscsi.SLOT_MAX and consts["NSLOTS"] == libiscsi.NSLOTS
        assert (consts["TARGET_LEN"], consts["PORTAL_LEN"]) == (libiscsi.TARGET_LEN, libiscsi.PORTAL_LEN)
    if header == "common.h":
        assert (consts["KS_AF_INET"], consts["KS_AF_INET6"]) == (decode.AF_INET, decode.AF_INET6)
        states = {n.removeprefix("KS_TCP_"): v for n, v in consts.items() if n.startswith("KS_TCP_")}
        assert states and all(decode.TCP_STATES[v] == n for n, v in states.items())


@pytest.mark.parametrize("probe", sorted(PROBE_MODULES))
def test_python_reads_each_map_with_the_c_types(probe):
    module = PROBE_MODULES[probe]
    text = (PROBES / f"{probe}.bpf.c").read_text()
    if re.search(r"^#define KS_EVENT_STREAM\b", text, flags=re.M):  # common.h then declares the ring buffer
        text += (PROBES / "common.h").read_text()
    maps = c_maps(text)
    assert maps, f"no map declaration read from {probe}.bpf.c"
    assert set(module.TABLES) == set(maps) - KERNEL_ONLY_MAPS.get(probe, set()), \
        f"{module.__name__}.TABLES must name every map user space reads"
    scalars = {"int": ctypes.c_int, "u64": ctypes.c_uint64, "u32": ctypes.c_uint32}

    def py_type(ctype: str):
        if ctype.startswith("struct "):
            name = ctype.removeprefix("struct ")
            return module.STRUCTS.get(name) or decode.STRUCTS[name]
        return scalars[ctype]

    for name, (key, leaf) in module.TABLES.items():
        assert (key, leaf) == (py_type(maps[name][0]), py_type(maps[name][1])), f"map {name}: key/leaf types"


def test_every_included_header_is_in_probes_and_ships():
    """bcc compiles each probe alone with -I<probes dir>: what a probe
    includes must be in probes/ and match the wheel's package data."""
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["agent.ebpf.probes"]
    included = set()
    for src in PROBES.glob("*"):
        included |= set(re.findall(r'^#include "([^"]+)"', src.read_text(), flags=re.M))
    assert {"common.h", "tcp_retrans.h", "tcp_lifecycle.h", "block_io.h", "libiscsi.h"} <= included
    for name in included:
        assert (PROBES / name).is_file(), name
        assert any(fnmatch.fnmatch(name, pat) for pat in shipped), f"{name} not in the wheel's package data"


def test_stream_totals_summed_over_cpus():
    """decode.sum_totals over per-CPU values laid out as the C's totals_val."""
    cpus = (tcp_lifecycle.TotalsVal * 2)()
    cpus[0].t[tcp_lifecycle.TOT_TRANSITIONS] = 5
    cpus[1].t[tcp_lifecycle.TOT_TRANSITIONS] = 7
    cpus[1].t[tcp_lifecycle.TOT_UNTRACKED_CLOSE] = 2
    cpus[0].stream.sent, cpus[0].stream.capped, cpus[1].stream.full = 4, 1, 3
    t, sent, dropped = decode.sum_totals(cpus, tcp_lifecycle.TOT_N)
    assert t == [12, 0, 2] and sent == 4 and dropped == 4
