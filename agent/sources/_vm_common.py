"""Helpers of the libvirt and QMP sources: the host device under a disk, iSCSI names and URLs."""

from __future__ import annotations

from agent.records.addr import canonical_host, fmt_host
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
        host, port = canonical_host(u.hostname), u.port or 3260
    except ValueError:
        return None, None, None, None
    iqn, lun = split_iscsi_name(u.path.lstrip("/"))
    return host, port, iqn, lun


# How deep a json: filename's "file" children are followed (format over protocol is 2)
_JSON_DEPTH = 8


def plain_qemu_filename(name: str) -> str:
    """QEMU's ``json:{...}`` pseudo-filename -> the plain filename it stands for.

    ``query-block`` reports ``inserted.file`` as a plain name only when QEMU
    can rebuild the node from one; otherwise (``bdrv_refresh_filename`` in
    block.c) it writes the node's options as ``json:``, e.g. for
    ``-drive file=iscsi://[fd00::2]:3260/IQN/1,format=raw`` (QEMU 7.2):
    ``json:{"driver": "raw", "file": {"driver": "iscsi", "portal":
    "[fd00::2]:3260", "target": "IQN", "lun": "1", "transport": "tcp"}}``.
    The ``file`` children are followed down to the protocol node: an
    ``iscsi`` node becomes ``iscsi://PORTAL/TARGET/LUN`` (the portal as QEMU
    wrote it, IPv6 in brackets), a ``file``/``host_device`` node its
    ``filename``. Anything else, or a value of the wrong type (QEMU's answers
    are outside input), returns ``name`` unchanged.
    """
    import json

    if not name.startswith("json:"):
        return name
    try:
        node = json.loads(name[5:])
    except ValueError:
        return name
    for _ in range(_JSON_DEPTH):
        if isinstance(node, str):
            return node
        if not isinstance(node, dict):
            return name
        driver = node.get("driver")
        if driver == "iscsi":
            portal, target, lun = node.get("portal"), node.get("target"), node.get("lun", 0)
            if not isinstance(portal, str) or not isinstance(target, str) or isinstance(lun, bool) \
                    or not isinstance(lun, (int, str)) or "/" in portal or "/" in target:
                return name
            if portal.count(":") > 1 and not portal.startswith("["):  # a bare IPv6 address, no port
                portal = fmt_host(portal)
            return f"iscsi://{portal}/{target}/{lun}"
        if driver in ("file", "host_device") and isinstance(node.get("filename"), str):
            return node["filename"]
        node = node.get("file")
    return name
