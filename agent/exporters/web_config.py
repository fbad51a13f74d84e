"""TLS and basic auth for the agent's HTTP server, in the Prometheus
exporter-toolkit ``web-config.yml`` format (the file node_exporter's
``--web.config.file`` reads), so one file serves a fleet of exporters:

    tls_server_config:
      cert_file: server.crt          # relative paths: from the file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default),
                                     # RequireAnyClientCert, VerifyClientCertIfGiven
      client_ca_file: clients-ca.crt
      min_version: TLS12             # TLS10..TLS13, default TLS12
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Passwords are only ever stored as bcrypt hashes (cost >= 10 is customary).
A successful check is cached in memory by a SHA-256 of user, password and
hash (as exporter-toolkit does), so a 15 s scrape does not pay bcrypt's
~50-100 ms every time; a failed check is never cached. An unknown user is
checked against a dummy hash so that timing does not reveal which users exist.

``RequireAnyClientCert`` and ``RequestClientCert`` differ from exporter-toolkit:
there they ask for a client certificate without verifying it; Python's ssl
module verifies every certificate it asks for and has no "accept any" mode, so
here they need ``client_ca_file`` (refused at load without it, rather than
refusing every client at run time) and the certificate is verified against it.

Not supported (refused with a clear error, not ignored): ``http_server_config``
and ``tls_server_config`` keys other than the ones above (cipher suites,
curves, client_allowed_sans).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent.errors import ConfigError

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# exporter-toolkit (Go's crypto/tls) asks for a client certificate but does not verify it with
# these two; Python's ssl has no "accept any" mode, so here they need client_ca_file and verify
# against it (RequireAnyClientCert behaves as RequireAndVerifyClientCert, RequestClientCert as
# VerifyClientCertIfGiven): stricter, never looser.
UNVERIFIED_CLIENT_AUTH = ("RequireAnyClientCert", "RequestClientCert")
# client certificates required and verified against client_ca_file: authentication enough to serve
# beyond loopback (agent.exporters.server.check_exposure)
VERIFIED_CLIENT_AUTH = ("RequireAndVerifyClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# bcrypt of a random string: spends the same time for an unknown user
_DUMMY_HASH = b"$2b$10$sJEMEV0a51vzDNqd/DjtUO9M72jkFbW.sfcRRSNXuLwIaw7akXJH2"


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"metrics.web_config: tls_server_config: cannot load {self.cert_file} / "
                              f"{self.key_file}: {e}") from None
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"metrics.web_config: tls_server_config.client_ca_file: cannot load "
                                  f"{self.client_ca_file}: {e}") from None
        return ctx


@dataclass
class BasicAuth:
    users: dict[str, bytes]  # user -> bcrypt hash
    _ok: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_header(self, header: str | None) -> str | None:
        """The user name if the Authorization header carries valid credentials, else None."""
        if not header or not header[:6].lower() == "basic ":
            return None
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        return user if self.check(user, password) else None

    def check(self, user: str, password: str) -> bool:
        import bcrypt

        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed or b""))).digest()
        with self._lock:
            if hashed is not None and key in self._ok:
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:  # malformed hash (refused at load time; belt and braces)
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) > 1000:
                    self._ok.clear()
                self._ok.add(key)
        return ok


@dataclass(frozen=True)
class WebConfig:
    tls: TlsSettings | None = None
    auth: BasicAuth | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def _err(path: Path, what: str) -> ConfigError:
    return ConfigError(f"metrics.web_config ({path}): {what}")


def parse_web_config(text: str, path: Path) -> WebConfig:
    """Parse web-config.yml text; relative file names are taken from ``path``'s directory."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise _err(path, f"got {type(doc).__name__}; allowed a mapping with tls_server_config, basic_auth_users")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users"}
    if unknown:
        raise _err(path, f"unsupported keys {sorted(unknown)}; allowed tls_server_config, basic_auth_users")
    base = path.parent
    tls = None
    t = doc.get("tls_server_config")
    if t is not None:
        if not isinstance(t, dict):
            raise _err(path, "tls_server_config: must be a mapping")
        bad = set(t) - TLS_KEYS
        if bad:
            raise _err(path, f"tls_server_config: unsupported keys {sorted(bad)}; allowed {sorted(TLS_KEYS)}")
        for k in ("cert_file", "key_file"):
            if not t.get(k):
                raise _err(path, f"tls_server_config.{k}: required when tls_server_config is set")
        cat = t.get("client_auth_type", "NoClientCert")
        if cat not in CLIENT_AUTH:
            raise _err(path, f"tls_server_config.client_auth_type: got {cat!r}; allowed {', '.join(CLIENT_AUTH)}")
        ca = t.get("client_ca_file")
        if cat in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") and not ca:
            raise _err(path, f"tls_server_config.client_ca_file: required with client_auth_type {cat}")
        if cat in UNVERIFIED_CLIENT_AUTH and not ca:
            raise _err(path, f"tls_server_config.client_ca_file: required with client_auth_type {cat} here: "
                             "exporter-toolkit accepts any client certificate without verifying it, which "
                             "Python's ssl module cannot do (it verifies every certificate it asks for, so "
                             "without a CA it would refuse every client); give client_ca_file (the client "
                             "certificate is then verified against it) or use NoClientCert with basic_auth_users")
        for k in ("min_version", "max_version"):
            if t.get(k) is not None and t[k] not in TLS_VERSIONS:
                raise _err(path, f"tls_server_config.{k}: got {t[k]!r}; allowed {', '.join(TLS_VERSIONS)}")
        tls = TlsSettings(
            cert_file=base / t["cert_file"],
            key_file=base / t["key_file"],
            client_auth_type=cat,
            client_ca_file=base / ca if ca else None,
            min_version=t.get("min_version") or "TLS12",
            max_version=t.get("max_version"),
        )
    auth = None
    users = doc.get("basic_auth_users")
    if users is not None:
        if not isinstance(users, dict) or not users:
            raise _err(path, "basic_auth_users: must map user names to bcrypt hashes")
        hashes = {}
        for user, h in users.items():
            if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60:
                raise _err(path, f"basic_auth_users.{user}: not a bcrypt hash (expected $2y$NN$... of 60 "
                                 "characters; make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')")
            hashes[str(user)] = h.encode()
        auth = BasicAuth(hashes)
    return WebConfig(tls, auth)


def load_web_config(path: str | Path) -> WebConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise _err(p, f"cannot read: {e.strerror or e}") from None
    wc = parse_web_config(text, p)
    if wc.tls:
        wc.tls.context()  # fail at start, not at the first scrape
    return wc

