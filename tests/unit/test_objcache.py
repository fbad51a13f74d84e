"""The eBPF object cache's pure parts: map references in bytecode, the key, and who may be trusted."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest

from agent.ebpf import objcache
from agent.ebpf.compiler import Attach
from agent.ebpf.objcache import CacheMiss, ObjCache, cache_key, map_refs
from agent.hostpaths import HostPaths


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map(dst: int, fd: int) -> bytes:
    return insn(0x18, dst, objcache.PSEUDO_MAP_FD, 0, fd) + insn(0, 0, 0, 0, 0)


# r1 = map(7); call bpf-to-bpf (src 1, not a map); r2 = 64-bit constant whose second half looks like a map load;
# r3 = map(9); exit
PROG = (ld_map(1, 7) + insn(0x85, 0, 1, 0, 3) + insn(0x18, 2, 0, 0, 5) + insn(0x18, 0, 1, 0, 7)
        + ld_map(3, 9) + insn(0x95))


def test_map_refs_are_the_ld_imm64_with_an_object_source():
    assert map_refs(PROG) == [(0, 1, 7), (5, 1, 9)]


def recipe(prog: bytes = PROG) -> dict:
    return {"format": objcache.FORMAT, "license": "GPL", "kern_version": 0, "auto": [],
            "maps": [{"name": "a", "type": 2, "key_size": 4, "value_size": 8, "max_entries": 1, "flags": 0},
                     {"name": "b", "type": 1, "key_size": 4, "value_size": 8, "max_entries": 8, "flags": 0}],
            "programs": [{"name": "p", "type": objcache.TRACEPOINT, "insns": base64.b64encode(prog).decode(),
                          "maps": [[0, "a"], [5, "b"]], "attach_btf_id": 0}]}


def test_patch_puts_the_new_map_fds_in_and_nothing_else():
    out = objcache._patch(recipe()["programs"][0], {"a": 41, "b": 42})
    assert map_refs(out) == [(0, 1, 41), (5, 1, 42)]
    assert out[16:40] == PROG[16:40]  # the call and the constant are untouched
    assert len(out) == len(PROG)


@pytest.mark.parametrize("refs", [[[0, "a"]], [[0, "a"], [5, "b"], [2, "a"]], [[0, "a"], [5, "zz"]]])
def test_patch_refuses_references_the_code_does_not_have(refs):
    p = recipe()["programs"][0]
    p["maps"] = refs
    with pytest.raises(CacheMiss):
        objcache._patch(p, {"a": 41, "b": 42})


def test_patch_refuses_a_truncated_program():
    p = recipe(PROG[:-3])["programs"][0]
    with pytest.raises(CacheMiss):
        objcache._patch(p, {"a": 41, "b": 42})


# -- the key ---------------------------------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path):
    sysfs = tmp_path / "sys"
    (sysfs / "kernel" / "btf").mkdir(parents=True)
    (sysfs / "kernel" / "btf" / "vmlinux").write_bytes(b"\x9f\xeb\x01\x00 one kernel")
    inc = tmp_path / "probes"
    inc.mkdir()
    (inc / "common.h").write_text("#define X 1\n")
    return HostPaths(sysfs=sysfs), inc


def test_key_is_stable_and_changes_with_everything_the_programs_depend_on(host):
    paths, inc = host
    text, cflags, attach = "int f(void *c) { return X; }", [f"-I{inc}", "-DY=2"], [Attach("tp_btf", "f", "t", btf_id=5)]
    base = cache_key(text, cflags, attach, paths)
    assert base == cache_key(text, list(cflags), [Attach("tp_btf", "f", "t", btf_id=5)], paths)
    changed = {
        "text": cache_key(text + " ", cflags, attach, paths),
        "cflags": cache_key(text, cflags[:1] + ["-DY=3"], attach, paths),
        "attach": cache_key(text, cflags, [Attach("tp_btf", "f", "t", btf_id=6)], paths),
    }
    (inc / "common.h").write_text("#define X 2\n")
    changed["header"] = cache_key(text, cflags, attach, paths)
    (inc / "common.h").write_text("#define X 1\n")
    assert cache_key(text, cflags, attach, paths) == base
    (paths.sysfs / "kernel" / "btf" / "vmlinux").write_bytes(b"\x9f\xeb\x01\x00 another kernel")
    changed["btf"] = cache_key(text, cflags, attach, paths)
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_key_changes_with_the_kernel_release(host, monkeypatch):
    paths, inc = host
    base = cache_key("x", [], [], paths)
    real = os.uname()
    monkeypatch.setattr(objcache.os, "uname", lambda: os.uname_result(
        (real.sysname, real.nodename, real.release + "-other", real.version, real.machine)))
    assert cache_key("x", [], [], paths) != base


# -- the directory -----------------------------------------------------------------------------------------------


def test_put_then_get_with_private_modes(tmp_path):
    c = ObjCache(tmp_path / "bpf")
    r = recipe()
    p = c.put("k1", r)
    assert p == tmp_path / "bpf" / "k1.json"
    assert oct(os.stat(tmp_path / "bpf").st_mode & 0o777) == "0o700"
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"
    assert c.get("k1") == r
    assert [f.name for f in (tmp_path / "bpf").iterdir()] == ["k1.json"]  # no temporary file left
    with pytest.raises(CacheMiss, match="no entry"):
        c.get("k2")


def corrupt_garbage(p):
    p.write_bytes(b"\x00not json")


def corrupt_truncated(p):
    p.write_bytes(p.read_bytes()[:200])


def corrupt_bytecode(p):  # one instruction changed, the digest left as it was
    e = json.loads(p.read_text())
    raw = bytearray(base64.b64decode(e["recipe"]["programs"][0]["insns"]))
    raw[8 * 7] = 0x07
    e["recipe"]["programs"][0]["insns"] = base64.b64encode(bytes(raw)).decode()
    p.write_text(json.dumps(e))


def corrupt_other_key(p):  # a good entry of another key copied under this name
    e = json.loads(p.read_text())
    e["key"] = "k-other"
    p.write_text(json.dumps(e))


@pytest.mark.parametrize("corrupt", [corrupt_garbage, corrupt_truncated, corrupt_bytecode, corrupt_other_key])
def test_a_corrupt_entry_is_a_miss(tmp_path, corrupt):
    c = ObjCache(tmp_path / "bpf")
    p = c.put("k1", recipe())
    corrupt(p)
    with pytest.raises(CacheMiss):
        c.get("k1")


def test_an_entry_others_can_write_is_not_trusted(tmp_path):
    c = ObjCache(tmp_path / "bpf")
    p = c.put("k1", recipe())
    os.chmod(p, 0o620)
    with pytest.raises(CacheMiss, match="writable by it alone"):
        c.get("k1")
    os.chmod(p, 0o600)
    assert c.get("k1")
    os.chmod(tmp_path / "bpf", 0o777)
    with pytest.raises(CacheMiss, match="writable by others"):
        c.get("k1")
    assert c.put("k2", recipe()) is None  # nor written to
    assert not (tmp_path / "bpf" / "k2.json").exists()


def test_a_symlinked_entry_or_directory_is_not_followed(tmp_path):
    c = ObjCache(tmp_path / "bpf")
    p = c.put("k1", recipe())
    p.rename(tmp_path / "elsewhere.json")
    p.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CacheMiss):
        c.get("k1")
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CacheMiss, match="not a directory"):
        ObjCache(tmp_path / "link").get("k1")


def test_an_entry_of_another_user_is_not_trusted(tmp_path, monkeypatch):
    c = ObjCache(tmp_path / "bpf")
    c.put("k1", recipe())
    me = os.geteuid()
    monkeypatch.setattr(objcache.os, "geteuid", lambda: me + 1)  # the agent as another user than the files'
    with pytest.raises(CacheMiss, match=f"owned by uid {me}"):
        c.get("k1")
    assert c.put("k2", recipe()) is None
    monkeypatch.setattr(objcache.os, "geteuid", lambda: me)
    assert c.get("k1")


def test_a_directory_under_a_parent_others_can_write_is_not_trusted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    c = ObjCache(shared / "bpf")
    assert c.put("k1", recipe())
    os.chmod(shared, 0o777)  # anyone could rename bpf/ away and put their own in its place
    with pytest.raises(CacheMiss, match="parent"):
        c.get("k1")
    os.chmod(shared, 0o1777)  # sticky, like /tmp: only the owner may rename it
    assert c.get("k1")


def test_prune_removes_entries_unused_for_a_month_and_dead_temporaries(tmp_path):
    c = ObjCache(tmp_path / "bpf")
    for k in ("old", "used", "new"):
        c.put(k, recipe())
    month = objcache.KEEP_SECONDS + 60
    t = os.stat(c.path("old")).st_mtime - month
    os.utime(c.path("old"), (t, t))
    os.utime(c.path("used"), (t, t))
    assert c.get("used")  # read at this start: touched, kept
    stale_tmp = tmp_path / "bpf" / ".gone.123.tmp"
    stale_tmp.write_text("{")
    os.utime(stale_tmp, (t, t))
    fresh_tmp = tmp_path / "bpf" / ".busy.456.tmp"
    fresh_tmp.write_text("{")
    assert sorted(c.prune()) == [".gone.123.tmp", "old.json"]
    assert sorted(p.name for p in (tmp_path / "bpf").iterdir()) == [".busy.456.tmp", "new.json", "used.json"]


def test_key_changes_with_the_kernel_headers_bcc_compiles_with(host, tmp_path):
    paths, _inc = host
    builds = []
    for n in ("6.1.0-56", "6.1.0-57"):
        b = tmp_path / f"linux-headers-{n}"
        (b / "include" / "generated" / "uapi" / "linux").mkdir(parents=True)
        (b / "include" / "generated" / "uapi" / "linux" / "version.h").write_text(f"#define LINUX_VERSION_CODE {n}\n")
        builds.append(b)
    link = tmp_path / "build"
    link.symlink_to(builds[0])
    first = cache_key("x", [], [], paths, link)
    assert cache_key("x", [], [], paths, link) == first
    link.unlink()
    link.symlink_to(builds[1])  # another headers package linked as the build directory
    assert cache_key("x", [], [], paths, link) != first
