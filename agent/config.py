"""Configuration: one YAML file, environment overrides, validated at start.

Sources, in order of precedence (last wins):

1. the built-in defaults (the classes below; ``kvmscope config show`` prints them),
2. the YAML file: ``--config PATH``, else ``$KVMSCOPE_CONFIG``, else
   ``/etc/kvmscope/config.yaml`` when it exists (a missing *default* file
   means "defaults"; a missing *named* file is an error),
3. environment overrides ``KVMSCOPE_<SECTION>__<KEY>=value`` (double
   underscore between levels), values read as YAML scalars or flow
   sequences: ``KVMSCOPE_AGENT__INTERVAL=2``,
   ``KVMSCOPE_STORAGE__PORTS='[3260, 860]'``.

Every problem is reported as a :class:`~agent.errors.ConfigError` whose text
names the key, the value found and what is allowed. Validation uses pydantic;
its messages are rewritten here into one house phrasing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from agent import health
from agent.errors import ConfigError

DEFAULT_PATH = Path("/etc/kvmscope/config.yaml")
ENV_PREFIX = "KVMSCOPE_"
MASK = "********"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_listen(value: str) -> str:
    """HOST:PORT, [IPV6]:PORT or :PORT (all addresses)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", value)
    if not m:
        raise ValueError("must be HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9847")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise ValueError("not a valid IPv6 address in brackets") from None
    elif m["host"] and not re.fullmatch(r"[A-Za-z0-9.\-]+", m["host"]):
        raise ValueError("host must be an IP address or a host name")
    return value


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class CollectorSelection(_Section):
    enable: list[str] = Field(default_factory=list, description="collectors to turn on beyond the defaults")
    disable: list[str] = Field(default_factory=list, description="collectors to turn off")


def default_collector_timeout(interval: float) -> float:
    """The collector deadline when none is configured: 4 s, at most 0.8 x the interval."""
    return min(4.0, round(0.8 * interval, 3))


class AgentConfig(_Section):
    interval: float = Field(5.0, ge=0.5, le=3600, description="seconds between collection cycles")
    collector_timeout: float = Field(
        4.0,
        gt=0,
        le=3600,
        description="deadline in seconds for one collector in one cycle (default: 4, at most 0.8 x interval)",
    )
    hostname: str | None = Field(None, description="host name to report (default: the system's)")
    history: int = Field(120, ge=1, le=100_000, description="snapshots kept in memory for diagnosis")
    collectors: CollectorSelection = Field(default_factory=CollectorSelection)

    @model_validator(mode="after")
    def _timeout_within_interval(self):
        if "collector_timeout" not in self.model_fields_set:
            # derived default; set through __dict__ to avoid re-validation
            self.__dict__["collector_timeout"] = default_collector_timeout(self.interval)
        elif self.collector_timeout > self.interval:
            raise ValueError(
                f"collector_timeout ({self.collector_timeout:g}) must not exceed interval ({self.interval:g})"
            )
        return self


class MetricsConfig(_Section):
    enabled: bool = True
    listen: str = Field("127.0.0.1:9847", description="address of the /metrics HTTP server")
    web_config: str | None = Field(
        None, description="TLS / basic-auth file in the Prometheus exporter-toolkit web-config.yml format")
    max_vms: int = Field(1000, ge=1, description="VMs exported at most (by name order); the rest is counted as dropped")
    max_disks: int = Field(4000, ge=1, description="VM disks exported at most; the rest is counted as dropped")
    max_connections: int = Field(2000, ge=1, description="storage connections / remotes exported at most")
    max_label_length: int = Field(256, ge=16, le=4096, description="longer label values are cut (with a hash suffix)")
    max_requests: int = Field(
        8, ge=1, le=1000, description="connections served at once (per listener); more are answered 503")
    request_timeout: float = Field(
        10.0, gt=0, le=600, description="seconds one connection may take in all (slow clients are cut off)")

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class ApiConfig(_Section):
    socket: str | None = Field(
        "/run/kvmscope/api.sock",
        description="unix socket serving the local API to the CLI (root only: directory 0700, socket 0600); "
                    "null: none")
    max_snapshots: int = Field(120, ge=1, le=100_000, description="snapshots one API request returns at most")
    max_response_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, description="JSON bytes one API response holds at most (newest kept)")


class StorageConfig(_Section):
    ports: list[int] = Field(default_factory=lambda: [3260], description="TCP ports of iSCSI portals")

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one port, e.g. [3260]")
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is outside 1..65535")
        return v


class LibvirtConfig(_Section):
    uri: str = Field("qemu:///system", description="libvirt connection URI (opened read-only)")


class QmpConfig(_Section):
    sockets: list[str] = Field(
        default_factory=list,
        description="glob patterns of QMP sockets of stand-alone QEMU processes (not managed by libvirt)",
    )
    timeout: float = Field(1.0, gt=0, le=60, description="deadline in seconds for one QMP socket per cycle")
    latency_histograms: bool = Field(
        False, description="enable QEMU's block latency histograms (block-latency-histogram-set) on each drive"
    )
    histogram_boundaries_ns: list[int] = Field(
        default_factory=lambda: [100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
                                 25_000_000, 50_000_000, 100_000_000, 250_000_000, 1_000_000_000],
        description="histogram bucket bounds in nanoseconds",
    )


class PathsConfig(_Section):
    procfs: str = "/proc"
    sysfs: str = "/sys"
    tracefs: str = "/sys/kernel/tracing"
    debugfs: str = "/sys/kernel/debug"
    etc: str = Field("/etc", description="the host's /etc (iscsid.conf, multipath.conf), read by kvmscope doctor")


class ElasticsearchConfig(_Section):
    enabled: bool = False
    hosts: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:9200"])
    username: str | None = None
    password: SecretStr | None = None
    api_key: SecretStr | None = None
    api_key_file: str | None = Field(None, description="file holding the API key (preferred over api_key)")
    ca_certs: str | None = None
    verify_certs: bool = True
    namespace: str = Field("default", pattern=r"^[a-z0-9_]{1,100}$")
    spool_dir: str = "/var/lib/kvmscope/spool"
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    spool_fsync: Literal["batch", "always", "never"] = Field(
        "batch", description="fsync the spool after each cycle's documents (batch), each document, or never"
    )
    batch_max_docs: int = Field(1000, ge=1, le=100_000, description="documents per bulk request, at most")
    batch_max_bytes: int = Field(5 * 1024 * 1024, ge=1024, description="bytes per bulk request, at most")
    request_timeout: float = Field(10.0, gt=0, le=300, description="seconds for one bulk request")
    retry_initial: float = Field(0.5, gt=0, le=60, description="first retry back-off in seconds (doubles, jittered)")
    retry_max: float = Field(30.0, gt=0, le=3600, description="longest retry back-off in seconds")
    item_max_retries: int = Field(
        5, ge=0, le=1000,
        description="retries of one document answered 429/5xx while others are accepted, then it goes to the "
        "dead-letter file (a request whose every document gets 429 is back pressure: retried without limit)",
    )
    stop_timeout: float = Field(5.0, ge=0, le=300, description="seconds to keep flushing at shutdown")


class FileOutputConfig(_Section):
    enabled: bool = False
    path: str = Field("/var/log/kvmscope/kvmscope.ndjson", description="JSON-lines file, rotated to PATH.1 ... PATH.N")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="rotate when the file would grow past this")
    keep: int = Field(5, ge=0, le=1000, description="rotated files kept")


class StorageLogConfig(_Section):
    qemu_logs: list[str] = Field(
        default_factory=lambda: ["/var/log/libvirt/qemu/*.log"], description="globs of per-VM QEMU log files"
    )
    kernel_logs: list[str] = Field(
        default_factory=lambda: ["/var/log/kern.log", "/var/log/syslog", "/var/log/messages"],
        description="syslog-style files with kernel and iscsid lines (read when present)",
    )
    kernel_source: Literal["auto", "kmsg", "journal", "files"] = Field(
        "auto", description="where kernel messages come from: auto = /dev/kmsg if readable, else the systemd journal "
        "(_TRANSPORT=kernel), else kernel lines of kernel_logs (which any local user can forge)")
    kmsg: bool | None = Field(None, description="deprecated: false keeps auto from choosing /dev/kmsg")
    state_dir: str = Field("/var/lib/kvmscope/storage_log", description="where read positions are kept")
    start_at_end: bool = Field(True, description="on the first sight of a file, skip what it already holds")
    max_lines: int = Field(10_000, ge=1, description="lines read per file per cycle, at most")
    max_events: int = Field(
        1000, ge=1, le=1_000_000, description="events kept per cycle, at most; the rest are counted as dropped "
        "(event_cap) and not read again")


# the distributions' shared library directories (Debian multiarch first)
LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib", "/lib")


class EbpfConfig(_Section):
    kernel_build: str | None = Field(
        None, description="kernel headers for bcc (default: /lib/modules/$(uname -r)/build)")
    probes_dir: str | None = Field(None, description="directory of the probes' C files (default: the installed probes/)")
    uprobe_budget: float = Field(
        0.02, gt=0, le=1, description="most CPU the libiscsi uprobes may take from one QEMU process, as a share of one "
        "CPU while attached; above it they are attached one cycle in N (sampled), so a busy VM loses at most this "
        "share of its I/O throughput (docs/probes.md); 1 = always attached")
    library_dirs: list[str] = Field(
        list(LIBRARY_DIRS), description="where the uprobe probes look for their shared library (libiscsi.so.7: QEMU's "
        "iSCSI initiator), the first that has it")
    events_per_second: int = Field(
        1000, ge=1, le=1_000_000, description="cap of each probe's event stream (retransmits, connection events)")
    cache_dir: str = Field(
        "/var/cache/kvmscope/bpf", description="where compiled probes are kept per kernel, loaded at the next start "
        "without compiling (a directory of the agent's own user, 0700); empty: compile at every start")
    compile_timeout: float = Field(
        60.0, gt=0, le=3600, description="most seconds one probe's compile, load and attach (bcc's clang, in a "
        "child process) may take before the probe is reported failed; the probes compile in parallel at start. "
        "A host much slower than usual (an emulated CPU: the lab's kernel-initiator host under TCG takes minutes) "
        "needs more")


class DiagnoseConfig(_Section):
    # defaults: the health model (agent/health.py, docs/diagnose.md "What lossy, slow and stalled mean")
    slow_ms: float = Field(health.SLOW_MS, gt=0, description="mean latency per request (ms) above which a VM disk is slow")
    critical_ms: float = Field(health.CRITICAL_MS, gt=0,
                               description="mean latency per request (ms) above which it is critical")
    min_ops: int = Field(health.MIN_OPS, ge=1,
                         description="requests a disk needs in the window before its latency is judged")
    retrans_per_second: float = Field(
        health.LOSS_MIN_RETRANS_PER_S, ge=0,
        description="a storage connection is lossy when it retransmits at least this many segments per second "
                    "and at least retrans_ratio of what it sent"
    )
    retrans_ratio: float = Field(
        health.LOSS_MIN_RATIO, ge=0, le=1,
        description="retransmitted / sent (bytes, else segments) a lossy connection reaches, with retrans_per_second"
    )
    saturation_factor: float = Field(
        3.0, gt=1, description="a disk doing this many times the median ops of its path's other disks saturates it"
    )
    live: bool = Field(True, description="run the rules inside `kvmscope run` every cycle (metrics, shipped findings)")
    window_seconds: float = Field(60.0, ge=1, le=86400, description="history the agent's live diagnosis looks at")
    recent_intervals: int = Field(
        2, ge=0, le=1000,
        description="the live diagnosis also judges the window's last this many intervals (the same thresholds) "
                    "and reports what either shows: a fault that started inside the window is named without "
                    "waiting for it to outweigh the healthy part; 0 = the whole window only")
    baseline_seconds: float = Field(
        600.0, ge=0, le=86400,
        description="history before the window that teaches the baselines (a disk's usual latency, a portal's "
                    "usual RTT): the agent's own history, or what `diagnose` fetches from it; 0 = none")
    incidents_kept: int = Field(500, ge=1, le=100_000,
                                description="resolved incidents the agent keeps (beyond agent.history) for "
                                            "/api/v1/incidents and `diagnose --window`")


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    agent: AgentConfig = Field(default_factory=AgentConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    libvirt: LibvirtConfig = Field(default_factory=LibvirtConfig)
    qmp: QmpConfig = Field(default_factory=QmpConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    elasticsearch: ElasticsearchConfig = Field(default_factory=ElasticsearchConfig)
    file_output: FileOutputConfig = Field(default_factory=FileOutputConfig)
    storage_log: StorageLogConfig = Field(default_factory=StorageLogConfig)
    diagnose: DiagnoseConfig = Field(default_factory=DiagnoseConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    ebpf: EbpfConfig = Field(default_factory=EbpfConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)


# --------------------------------------------------------------------------
# loading


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (a path of field names)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return sorted(model.model_fields)


def _describe(err: Mapping[str, Any]) -> str:
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    simple = {
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "int_parsing": "expected an integer",
        "int_type": "expected an integer",
        "int_from_float": "expected an integer",
        "bool_parsing": "expected true or false",
        "bool_type": "expected true or false",
        "string_type": "expected a string",
        "list_type": "expected a list, e.g. [a, b]",
        "dict_type": "expected a mapping of keys",
        "model_type": "expected a mapping of keys",
        "model_attributes_type": "expected a mapping of keys",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return msg


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@]*)@")


def redact_url(url: str) -> str:
    """``url`` with the password of its user info masked: ``https://u:********@host`` (logs, errors, ``config show``)."""

    def mask(m: re.Match) -> str:
        user, colon, _password = m.group(2).partition(":")
        return f"{m.group(1)}{user}{':' + MASK if colon else ''}@"

    return _USERINFO.sub(mask, url, count=1)


def _redact_value(v: Any) -> Any:
    if isinstance(v, str):
        return redact_url(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_redact_value(x) for x in v)
    return v


def _field_at(parts: tuple) -> Any:
    """The annotation of the configuration key at ``parts`` (field names), or None when there is none."""
    model: Any = Config
    ann = None
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or not fields or part not in fields:
            return None
        ann = fields[part].annotation
        model = ann
    return ann


def _bare(ann: Any) -> set:
    """The types an annotation admits, with Optional/Union unwrapped."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(ann) if a is not type(None)}
    return {ann}


def _is_secret(loc: tuple) -> bool:
    return SecretStr in _bare(_field_at(loc))


def _wants_text(parts: tuple) -> bool:
    """True when the key at ``parts`` holds text only (str or a secret), so an override is taken verbatim."""
    kinds = _bare(_field_at(parts))
    return bool(kinds) and kinds <= {str, SecretStr}


def format_validation_error(exc: ValidationError, origin: str, env_keys: Mapping[tuple, str]) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = env_keys.get(loc, origin)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc[:-1])
            lines.append(f"{where}: {key}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        if err["type"] == "missing":
            lines.append(f"{where}: {key}: required key is missing")
            continue
        value = err.get("input")
        if isinstance(value, (dict, BaseModel)):
            shown = "(section)"
        elif _is_secret(loc):
            shown = "(a secret, not shown)"
        else:
            shown = repr(_redact_value(value))
        lines.append(f"{where}: {key}: got {shown}; {_describe(err)}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found (pass an existing file, or leave --config out for the defaults)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory, expected a YAML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of sections "
            f"({', '.join(Config.model_fields)}), got {type(data).__name__}"
        )
    return data


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict, dict[tuple, str]]:
    """``KVMSCOPE_A__B=v`` → ``{"a": {"b": v}}``, plus where each came from."""
    tree: dict = {}
    origins: dict[tuple, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        if not all(parts):
            raise ConfigError(f"environment {name}: empty key part; use KVMSCOPE_SECTION__KEY=value")
        raw = environ[name]
        if _wants_text(parts):
            value = raw  # taken as written: YAML would eat "s3cret #2" to "s3cret" and "#x" to None
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            if isinstance(value, dict):
                value = raw  # a mapping is never meant here; keep the text
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: conflicts with another override")
        node[parts[-1]] = value
        origins[parts] = f"environment {name}"
    return tree, origins


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> tuple[Config, str]:
    """Load and validate. Returns the config and a description of its origin."""
    environ = os.environ if environ is None else environ
    explicit = path if path is not None else environ.get("KVMSCOPE_CONFIG") or None
    data: dict = {}
    origin = "built-in defaults"
    if explicit is not None:
        p = Path(explicit)
        data = _read_yaml(p)
        origin = str(p)
    elif DEFAULT_PATH.exists():
        data = _read_yaml(DEFAULT_PATH)
        origin = str(DEFAULT_PATH)
    env_tree, env_origins = _env_overrides(environ)
    if env_tree:
        data = _merge(data, env_tree)
        origin += " + environment"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"config {origin.split(' + ')[0]}", env_origins)) from None
    return cfg, origin


def masked_dict(cfg: Config) -> dict:
    """The effective configuration as plain data, secrets masked."""

    def walk(model: BaseModel) -> dict:
        out = {}
        for name in type(model).model_fields:
            v = getattr(model, name)
            if isinstance(v, BaseModel):
                out[name] = walk(v)
            elif isinstance(v, SecretStr):
                out[name] = MASK
            else:
                out[name] = _redact_value(v)
        return out

    return walk(cfg)
