"""Attaching and detaching a loaded program as a uprobe from the agent itself, without bcc.

The compiler child (agent/ebpf/compiler.py) attaches a probe's uprobes once; a probe that samples
(agent/ebpf/libiscsi.py) detaches them by closing their perf event fds and attaches them again
with the same program fd, the way bcc does it, with plain syscalls:

* the symbol's file offset: its ``st_value`` in the ELF dynamic symbol table (``.dynsym``), moved
  from a virtual address to a file offset through the ``PT_LOAD`` segment that holds it (what
  ``uprobe_events`` calls the offset);
* ``perf_event_open`` on the ``uprobe`` PMU (``/sys/bus/event_source/devices/uprobe/type``, 4.17+):
  ``config1`` = the path, ``config2`` = the offset, ``pid`` -1 with ``cpu`` 0 (every process; the
  program is tied to the probe, it runs on whichever CPU hits it), then ``PERF_EVENT_IOC_SET_BPF``
  and ``PERF_EVENT_IOC_ENABLE``. Closing the fd removes the breakpoint once nothing else holds it.

A uprobe is a breakpoint written into the file's pages of every process mapping it: attached, each
call of the function traps into the kernel (the cost docs/performance.md measures); detached, the
instruction is restored and the call costs nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

from agent.hostpaths import HostPaths

_SYS_perf_event_open = {"x86_64": 298, "aarch64": 241}.get(platform.machine(), 298)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_FLAG_FD_CLOEXEC = 8
SHT_DYNSYM = 11
PT_LOAD = 1


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to config2 (PERF_ATTR_SIZE_VER1, 72 bytes: the kernel takes any known size)."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64)]


def symbol_offset(data: bytes, symbol: str) -> int:
    """File offset of exported ``symbol`` in ELF64 little-endian ``data`` (a shared library); KeyError if absent."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    want = symbol.encode()
    value = None
    for _name, typ, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if typ != SHT_DYNSYM:
            continue
        stroff = sections[link][4]
        for j in range(size // (entsize or 24)):
            st_name, _st_info, _o, st_shndx, st_value, _st_size = struct.unpack_from("<IBBHQQ", data, off + j * 24)
            if st_shndx == 0 or not st_value:
                continue  # undefined (imported)
            end = data.index(b"\0", stroff + st_name)
            if data[stroff + st_name:end] == want:
                value = st_value
                break
    if value is None:
        raise KeyError(symbol)
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD and p_vaddr <= value < p_vaddr + p_filesz:
            return value - p_vaddr + p_offset
    raise KeyError(f"{symbol}: address {value:#x} in no loadable segment")


def uprobe_pmu_type(paths: HostPaths) -> int:
    return int(paths.read_text(paths.sys("bus", "event_source", "devices", "uprobe", "type")).strip())


# The kernel keeps one uprobe per (inode, offset) and refuses another registration of it with a
# different reference-counter offset (config bits 32-63; EINVAL). bcc 0.26's attach_uprobe registers
# with 6 there (seen in strace on this machine: its Python binding leaves the argument undefined), so
# next to a uprobe bcc attached (another agent's probe) ours must say the same.
BCC_REF_CTR_OFFSET = 6


def attach(prog_fd: int, library: Path, offset: int, pmu_type: int) -> int:
    """A uprobe at ``library`` + ``offset`` for every process, running ``prog_fd``; returns its perf event fd."""
    path = ctypes.create_string_buffer(str(library).encode())
    fd = -1
    for ref_ctr in (0, BCC_REF_CTR_OFFSET):
        attr = PerfEventAttr(type=pmu_type, size=ctypes.sizeof(PerfEventAttr), config=ref_ctr << 32, sample_period=1,
                             wakeup_events=1, config1=ctypes.addressof(path), config2=offset)
        fd = _libc.syscall(_SYS_perf_event_open, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
        e = ctypes.get_errno() if fd < 0 else 0
        if fd >= 0 or e != 22:
            break
    if fd < 0:
        hint = ""
        if e in (1, 13):  # EPERM, EACCES: the uprobe PMU asks for more than CAP_BPF + CAP_PERFMON
            hint = ("; the kernel's uprobe PMU needs CAP_SYS_ADMIN: under the systemd unit add it with a "
                    "drop-in (README 'Running as a service'), else the libiscsi disks' latency comes from "
                    "libvirt's means only")
        raise OSError(e, f"perf_event_open(uprobe {library}+{offset:#x}): {os.strerror(e)}{hint}")
    for req, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
        if _libc.ioctl(fd, req, ctypes.c_ulong(arg)) != 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise OSError(e, f"ioctl {req:#x} on the uprobe of {library}+{offset:#x}: {os.strerror(e)}")
    return fd
