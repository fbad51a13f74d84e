"""Pure parsers of the host's storage configuration files (no I/O).

* ``/etc/iscsi/iscsid.conf`` and open-iscsi node records
  (``/etc/iscsi/nodes/<IQN>/<portal>,<tpgt>,<iface>/default``): ``name = value``
  lines, ``#`` comment lines (open-iscsi usr/idbm.c reads one ``name = value``
  per line; the last assignment of a name wins). Values are single tokens;
  quotes around them are tolerated and removed.
* ``/etc/multipath.conf`` and ``/etc/multipath/conf.d/*.conf``: the
  multipath-tools grammar (libmultipath/parser.c, multipath.conf(5)):
  ``keyword value...`` lines grouped in brace sections ``defaults``,
  ``blacklist``, ``blacklist_exceptions``, ``devices { device {...} }``,
  ``multipaths { multipath {...} }`` and ``overrides``; ``#`` or ``!`` start
  a comment outside double quotes; a brace may sit on the keyword's line or
  on its own line. One value per keyword: a "quoted string" or one token
  (libmultipath ignores, with a warning, anything after it on the line).

Every problem found while parsing is kept as a message with its line number
(never an exception): a half-broken file still yields what can be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# open-iscsi defaults (usr/iscsi_settings.h DEF_*, and the shipped iscsid.conf)
ISCSID_DEFAULTS = {
    "node.session.timeo.replacement_timeout": 120,
    "node.conn[0].timeo.noop_out_interval": 5,
    "node.conn[0].timeo.noop_out_timeout": 5,
}
# multipath-tools built-in defaults (multipath.conf(5); hwtable entries may differ)
MULTIPATH_DEFAULTS = {"polling_interval": "5", "no_path_retry": "fail", "features": "0"}


@dataclass(frozen=True)
class Setting:
    value: str
    line: int


@dataclass(frozen=True)
class IscsidConf:
    settings: dict[str, Setting] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    def get(self, key: str) -> Setting | None:
        return self.settings.get(key)


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    return v


def parse_iscsid_conf(text: str) -> IscsidConf:
    """``name = value`` settings of iscsid.conf or a node record."""
    settings: dict[str, Setting] = {}
    errors: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or " " in name:
            errors.append(f"line {n}: not 'name = value': {raw.strip()[:80]!r}")
            continue
        if value and value[0] in "\"'":  # ("" is in every string: `name =` has an empty value)
            end = value.find(value[0], 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = value.split()[0] if value.split() else ""
        settings[name] = Setting(value, n)
    return IscsidConf(settings, tuple(errors))


def int_setting(conf: IscsidConf, key: str) -> tuple[int | None, str]:
    """(value, origin) of an integer setting; origin says where it came from.

    Unset → open-iscsi's default with origin "default"; unparsable → (None, "invalid 'x' (line N)").
    """
    s = conf.get(key)
    if s is None:
        return ISCSID_DEFAULTS.get(key), "default"
    try:
        return int(s.value), f"line {s.line}"
    except ValueError:
        return None, f"invalid {s.value!r} (line {s.line})"


# --------------------------------------------------------------------------
# multipath.conf


@dataclass
class MpSection:
    name: str
    line: int
    values: dict[str, Setting] = field(default_factory=dict)
    children: list["MpSection"] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        s = self.values.get(key)
        return s.value if s else None


@dataclass
class MultipathConf:
    sections: list[MpSection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def section(self, name: str) -> MpSection | None:
        """The first top-level section of that name, merged with later ones (later keys win)."""
        found = [s for s in self.sections if s.name == name]
        if not found:
            return None
        merged = MpSection(name, found[0].line)
        for s in found:
            merged.values.update(s.values)
            merged.children.extend(s.children)
        return merged

    def devices(self) -> list[MpSection]:
        d = self.section("devices")
        return [c for c in d.children if c.name == "device"] if d else []

    def multipaths(self) -> list[MpSection]:
        d = self.section("multipaths")
        return [c for c in d.children if c.name == "multipath"] if d else []


def _tokens(line: str) -> list[str]:
    """Split a multipath.conf line: whitespace-separated, "quoted strings" kept whole, # or ! comments."""
    out: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
        elif c in "#!":
            break
        elif c in "{}":
            out.append(c)
            i += 1
        elif c == '"':
            j = line.find('"', i + 1)
            if j < 0:
                out.append('"' + line[i + 1:])  # unterminated: keep the rest, marked
                break
            out.append('"' + line[i + 1:j] + '"')
            i = j + 1
        else:
            j = i
            while j < n and not line[j].isspace() and line[j] not in '{}"':
                j += 1
            out.append(line[i:j])
            i = j
    return out


def parse_multipath_conf(text: str, merge_into: MultipathConf | None = None, origin: str = "") -> MultipathConf:
    """Sections and keyword values of multipath.conf (values unquoted)."""
    conf = merge_into if merge_into is not None else MultipathConf()
    where = f"{origin} " if origin else ""
    stack: list[MpSection] = []
    pending: tuple[str, int] | None = None  # a keyword whose '{' is on a later line
    for n, raw in enumerate(text.splitlines(), 1):
        toks = _tokens(raw)
        while toks:
            t = toks.pop(0)
            if t == "{":
                if pending is None:
                    conf.errors.append(f"{where}line {n}: '{{' without a section name")
                    stack.append(MpSection("?", n))
                    continue
                sec = MpSection(pending[0], pending[1])
                (stack[-1].children if stack else conf.sections).append(sec)
                stack.append(sec)
                pending = None
            elif t == "}":
                if pending is not None:
                    conf.errors.append(f"{where}line {pending[1]}: {pending[0]!r} has no value and opens no section")
                    pending = None
                if not stack:
                    conf.errors.append(f"{where}line {n}: '}}' without an open section")
                else:
                    stack.pop()
            else:
                if pending is not None:
                    conf.errors.append(f"{where}line {pending[1]}: {pending[0]!r} has no value and opens no section")
                    pending = None
                rest = []
                while toks and toks[0] not in "{}":
                    rest.append(toks.pop(0))
                if not rest and (not toks or toks[0] == "{"):
                    pending = (t, n)
                    continue
                if not rest:  # `blacklist { wwid }`: a keyword right before the closing brace
                    conf.errors.append(f"{where}line {n}: {t!r} has no value")
                    continue
                if t.startswith('"'):
                    conf.errors.append(f"{where}line {n}: quoted keyword {t}")
                    continue
                if not stack:
                    conf.errors.append(f"{where}line {n}: keyword {t!r} outside any section")
                    continue
                first = rest[0]
                if first.startswith('"') and (len(first) < 2 or not first.endswith('"')):
                    conf.errors.append(f"{where}line {n}: unterminated quote")
                if len(rest) > 1:
                    # libmultipath takes one value per keyword and ignores the rest of the line
                    conf.errors.append(f"{where}line {n}: {t}: extra data ignored: {' '.join(rest[1:])[:60]!r}")
                stack[-1].values[t] = Setting(_unquote(first) if first.startswith('"') else first, n)
    if pending is not None:
        conf.errors.append(f"{where}line {pending[1]}: {pending[0]!r} has no value and opens no section")
    if stack:
        conf.errors.append(f"{where}section {stack[0].name!r} (line {stack[0].line}) is not closed")
    return conf


@dataclass(frozen=True)
class Queueing:
    """What multipath does when every path of a map has failed."""

    mode: str  # fail | queue | retry
    retries: int | None  # no_path_retry N
    polling_interval: int | None
    seconds: int | None  # retries × polling_interval for mode retry
    source: str  # where the deciding setting came from


def queueing(values: dict[str, Setting], where: str) -> Queueing:
    """Effective queueing from a merged keyword map (no_path_retry beats features queue_if_no_path)."""

    def val(k):
        s = values.get(k)
        return (s.value, f"{where} line {s.line}") if s else (MULTIPATH_DEFAULTS.get(k), "built-in default")

    poll_s, _ = val("polling_interval")
    try:
        poll = int(poll_s)
    except (TypeError, ValueError):
        poll = None
    npr, npr_src = val("no_path_retry")
    feats, feats_src = val("features")
    if "no_path_retry" not in values and feats and "queue_if_no_path" in feats.split():
        return Queueing("queue", None, poll, None, f"features \"{feats}\" ({feats_src})")
    v = (npr or "fail").strip().lower()
    if v == "queue":
        return Queueing("queue", None, poll, None, f"no_path_retry queue ({npr_src})")
    if v == "fail" or v == "0":
        return Queueing("fail", 0, poll, 0, f"no_path_retry {npr} ({npr_src})")
    try:
        n = int(v)
    except ValueError:
        return Queueing("fail", None, poll, None, f"no_path_retry {npr!r} is not queue|fail|N ({npr_src})")
    return Queueing("retry", n, poll, n * poll if poll else None, f"no_path_retry {n} ({npr_src})")
