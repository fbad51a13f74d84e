"""Reading the host's configuration files for the checks (thin I/O over the parsers).

All paths go through :meth:`HostPaths.etc` (``paths.etc`` in the
configuration), so tests and containers point doctor at another /etc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.doctor.parsers import IscsidConf, MpSection, MultipathConf, Setting, parse_iscsid_conf, parse_multipath_conf
from agent.hostpaths import HostPaths


@dataclass
class EtcFile:
    path: Path
    text: str | None  # None: absent
    error: str | None = None  # unreadable (permission, not a file...)


def read_file(paths: HostPaths, p: Path) -> EtcFile:
    """Read p; the record names it as the host sees it (/etc/...), wherever paths.etc points."""
    try:
        shown = Path("/etc") / p.relative_to(paths.etcdir)
    except ValueError:
        shown = p
    try:
        return EtcFile(shown, paths.read_text(p))
    except FileNotFoundError:
        return EtcFile(shown, None)
    except OSError as e:
        return EtcFile(shown, None, f"cannot read {shown}: {e.strerror or e}")


@dataclass
class IscsidInfo:
    file: EtcFile
    conf: IscsidConf | None  # None when absent or unreadable


def read_iscsid(paths: HostPaths) -> IscsidInfo:
    f = read_file(paths, paths.etc("iscsi", "iscsid.conf"))
    return IscsidInfo(f, parse_iscsid_conf(f.text) if f.text is not None else None)


@dataclass
class MultipathInfo:
    files: list[EtcFile] = field(default_factory=list)  # multipath.conf then conf.d/*.conf that exist
    conf: MultipathConf | None = None  # None when no file exists
    errors: list[str] = field(default_factory=list)

    @property
    def main(self) -> Path | None:
        return self.files[0].path if self.files else None

    def effective(self, device: MpSection | None = None) -> dict[str, Setting]:
        """defaults < device section < overrides (multipath.conf(5) precedence; multipaths entries aside)."""
        out: dict[str, Setting] = {}
        if self.conf is None:
            return out
        d = self.conf.section("defaults")
        if d:
            out.update(d.values)
        if device is not None:
            out.update(device.values)
        o = self.conf.section("overrides")
        if o:
            out.update(o.values)
        return out


def read_multipath(paths: HostPaths) -> MultipathInfo:
    """multipath.conf plus conf.d/*.conf (config_dir default /etc/multipath/conf.d), in name order."""
    info = MultipathInfo()
    candidates = [paths.etc("multipath.conf")]
    confd = paths.etc("multipath", "conf.d")
    try:
        candidates += sorted(p for p in confd.iterdir() if p.name.endswith(".conf"))
    except OSError:
        pass
    conf = None
    for p in candidates:
        f = read_file(paths, p)
        if f.error:
            info.errors.append(f.error)
        if f.text is None:
            continue
        info.files.append(f)
        conf = parse_multipath_conf(f.text, conf, origin=p.name)
    info.conf = conf
    if conf is not None:
        info.errors.extend(conf.errors)
    return info
