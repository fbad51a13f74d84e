"""Helpers of the libvirt and QMP sources: the host device under a disk, iSCSI names and URLs."""

from __future__ import annotations

from agent.sources._values import ascii_uint


def host_devno(kind: str, source: str | None) -> str | None:
    """MAJ:MIN of the host block device a file or block disk sits on.

    A block disk is the device itself (st_rdev); a file disk sits on the
    device of its file system (st_dev). None when the path is unreadable.
    """
    import os

    if not source or kind not in ("file", "block"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    dev = st.st_rdev if kind == "block" else st.st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def split_iscsi_name(name: str | None) -> tuple[str | None, int | None]:
    """libvirt iSCSI source name ``IQN/LUN`` (LUN defaults to 0; an IQN has no '/').

    A LUN that is not plain ASCII decimal (``"²"``, ``"-1"``) or over 2**64-1 is None.
    """
    if not name:
        return None, None
    iqn, sep, lun = name.rpartition("/")
    if sep:
        return iqn, ascii_uint(lun)
    return name, 0


def parse_iscsi_url(url: str) -> tuple[str | None, int | None, str | None, int | None]:
    """QEMU ``iscsi://[user[%pass]@]host[:port]/IQN/LUN`` -> (host, port, iqn, lun)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        host, port = u.hostname, u.port or 3260
    except ValueError:
        return None, None, None, None
    iqn, lun = split_iscsi_name(u.path.lstrip("/"))
    return host, port, iqn, lun
