"""Site configuration: one YAML file, validated with pydantic, errors that name the key and the fix.

``load_config(path)`` returns a :class:`SiteConfig` or raises :class:`ConfigError` whose ``problems`` lists every
problem found as ``(key path, message, hint)``, e.g. ``("routes[2].pipeline", "unknown pipeline 'foo'",
"use one of: cartesian_frames, ...")``. Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import re
import shutil
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

Problem = tuple[str, str, str]  # (key path, message, hint)


class ConfigError(ValueError):
    """The site configuration is not usable; ``problems`` holds every (key path, message, hint)."""

    def __init__(self, path: str | Path, problems: list[Problem]) -> None:
        self.path = str(path)
        self.problems = problems
        lines = [f"{k}: {m}" + (f" ({h})" if h else "") for k, m, h in problems]
        super().__init__(f"{path}: {len(problems)} problem(s) in the site config: " + "; ".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or any(ord(c) < 32 or ord(c) > 126 for c in v):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters without backslash")
    return v


class TLSSettings(_Model):
    """The node's TLS certificate (``node.tls``), used by the MRD TLS port (``mrd_tls_port``) and the DICOM TLS
    port (``dicom_tls_port``): PEM certificate + key; ``ca`` verifies client certificates, required with
    ``require_client_cert``."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


class LocalExecutorSettings(_Model):
    """``kind: local`` (default): ``node.workers`` threads in the node's process run the jobs."""

    kind: Literal["local"] = "local"


class RayExecutorSettings(_Model):
    """``kind: ray``: one Ray task per job on a Ray cluster (the ``ray`` extra: ``pip install "recon-node[ray]"``).

    The spool must be on a path every Ray node sees at the same place (a shared file system): tasks read their
    input there; results come back through Ray's object store and the node writes them. Site plugins
    (``node.plugins``) must be importable on every Ray node; the node's ``PYTHONPATH`` is passed on to the tasks.
    """

    kind: Literal["ray"]
    address: str = "auto"  # auto (the cluster this machine belongs to, `ray start`), host:port or ray://host:port
    max_in_flight: int = Field(4, ge=1, le=1024)  # jobs handed to the cluster at once; more wait in the job store
    namespace: str = "recon-node"
    runtime_env: dict[str, Any] | None = None  # Ray runtime_env for the tasks (env_vars, working_dir, ...)
    status_interval_s: float = Field(5.0, gt=0)  # how often the cluster's resources are written to run/cluster.json


def _executor_kind(v: Any) -> str:
    kind = v.get("kind", "local") if isinstance(v, dict) else getattr(v, "kind", "local")
    return str(kind)


# What runs the jobs: one model per module node/executors/<kind>.py, discriminated on ``kind`` (default local).
ExecutorSettings = Annotated[
    Annotated[LocalExecutorSettings, Tag("local")] | Annotated[RayExecutorSettings, Tag("ray")],
    Discriminator(
        _executor_kind,
        custom_error_type="executor_kind",
        custom_error_message="unknown executor kind (use local or ray)",
    ),
]


HttpRole = Literal["viewer", "operator"]  # viewer: read-only; operator: also retry / resend


class HttpUser(_Model):
    """A console user (``node.http.users``): HTTP basic or the login form. ``password_hash`` is an argon2 hash
    from ``recon-node hash-password``; the password itself is never in the file."""

    name: str = Field(min_length=1, max_length=64)
    password_hash: SecretStr
    role: HttpRole = "viewer"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if ":" in v or any(ord(c) < 32 for c in v) or v != v.strip():
            raise ValueError("a user name has no colon, control characters or surrounding spaces")
        return v

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("$argon2"):
            raise ValueError("not an argon2 hash (it starts with $argon2id$); make one with `recon-node hash-password`")
        return v


class HttpToken(_Model):
    """A bearer token (``node.http.tokens``) for scripts and scrapers: ``Authorization: Bearer <token>``. Only its
    SHA-256 (64 hex digits) is in the file; ``recon-node new-token`` makes both."""

    name: str = Field(min_length=1, max_length=64)
    sha256: str
    role: HttpRole = "viewer"

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("the token's SHA-256 as 64 hex digits; make one with `recon-node new-token`")
        return v


class HttpSettings(_Model):
    """The operator console and its JSON API (``node.http``; absent: off). Bound to ``node.bind``; ``port`` 0
    picks a free port (written to ``<spool>/run/node.json`` as ``http_port``). ``tls: true`` serves HTTPS with the
    ``node.tls`` certificate. Every page and API call needs a user or a token, except ``/health`` and ``/ready``
    (which reveal nothing about patients) and, with ``metrics_public``, ``/metrics``."""

    port: int = Field(8443, ge=0, le=65535)
    tls: bool = False
    users: list[HttpUser] = Field(default_factory=list)
    tokens: list[HttpToken] = Field(default_factory=list)
    metrics_public: bool = False  # let Prometheus scrape /metrics without a token
    session_hours: float = Field(8.0, gt=0, le=24 * 30)  # a login-form session ends after this many hours


class NodeSettings(_Model):
    ae_title: str = "RECON_NODE"
    dicom_port: int = Field(11112, ge=0, le=65535)
    mrd_port: int = Field(9002, ge=0, le=65535)
    bind: str = "0.0.0.0"
    spool_dir: Path
    database: Path | None = None  # default <spool_dir>/jobs.sqlite
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=64)
    executor: ExecutorSettings = Field(default_factory=LocalExecutorSettings)
    threads: int | None = Field(None, ge=1, le=256)  # torch threads per process; default OMP_NUM_THREADS or cores
    disk_reserve_mb: int = Field(1024, ge=0)
    max_attempts: int = Field(3, ge=1, le=100)
    cache_dir: Path | None = None
    mrd_idle_timeout_s: float = Field(60.0, gt=0)
    mrd_max_message_mb: int = Field(256, ge=1)
    shutdown_grace_s: float = Field(10.0, ge=0)
    plugins: list[str] = Field(default_factory=list)  # Python modules imported at start (site pipelines)
    templates_dir: Path | None = None  # site copy of dicom_templates/ (default: the shipped templates)
    parametric_map: bool = False  # also send a float32 Parametric Map series per quantitative map
    audit_log: Path | None = None  # JSON-lines audit file (IHE ATNA spirit); None: no audit log
    # ---- hardening, DICOM side (issue 15) ----
    uid_root: str | None = None  # organisational UID root for output UIDs; None: random root kept in the spool
    file_group: str | None = None  # group that may read the spool/results (files 0640, folders 0750); None: own
    dicom_max_dataset_mb: float = Field(512.0, gt=0)  # largest DICOM dataset accepted (C-STORE refused above)
    dicom_accept_compressed: bool = True  # accept JPEG / JPEG-LS / JPEG 2000 / RLE when the decoders are installed
    tls: TLSSettings | None = None  # certificate for the TLS ports (cert, key, ca, require_client_cert)
    dicom_tls_port: int | None = Field(None, ge=0, le=65535)  # DICOM TLS SCP (usually 2762); None: off
    # ---- hardening, MRD side and jobs (issue 15) ----
    mrd_tls_port: int | None = Field(None, ge=0, le=65535)  # MRD over TLS (certificate from node.tls); None: off
    mrd_max_connections: int = Field(16, ge=1, le=4096)  # concurrent MRD connections; more are refused with ERR
    mrd_max_stream_mb: int = Field(65536, ge=1)  # one MRD stream (all messages) at most this many MB
    mrd_max_stream_s: float = Field(3600.0, gt=0)  # one MRD stream must end (CLOSE) within this many seconds
    mrd_max_text_messages: int = Field(64, ge=0)  # TEXT / config-text messages per stream
    mrd_max_text_kb: int = Field(1024, ge=1)  # one TEXT / config-text message at most this many KB
    mrd_disk_check_mb: int = Field(256, ge=1)  # re-check free spool space after every this many MB received
    max_node_deaths: int = Field(5, ge=1, le=1000)  # node crashes/kills during one job before it stays failed
    http: HttpSettings | None = None  # operator console + JSON API (the `web` extra); None: off

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return _check_ae(v)

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from node.uids import InvalidUID, validate_uid

        try:
            v = validate_uid(v, "uid_root")
        except InvalidUID as e:
            raise ValueError(f"{e}; use your organisation's registered root, e.g. 1.2.826.0.1.3680043.10.999") from None
        if len(v) > 40:
            raise ValueError(f"uid_root is {len(v)} characters; at most 40 leave room for the generated part")
        return v

    @property
    def database_path(self) -> Path:
        return self.database or self.spool_dir / "jobs.sqlite"

    @property
    def units_dir(self) -> Path:
        return self.spool_dir / "units"

    @property
    def results_dir(self) -> Path:
        return self.spool_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.spool_dir / "tmp"

    @property
    def outbox_path(self) -> Path:
        """The egress outbox (SQLite), next to the job database."""
        return self.database_path.with_name("outbox.sqlite")


SourceProtocol = Literal["dicom", "mrd"]


def _every_protocol() -> list[SourceProtocol]:
    return ["dicom", "mrd"]


class Source(_Model):
    name: str = Field(min_length=1)
    ae_title: str | None = None
    hosts: list[str] = Field(min_length=1)
    protocols: list[SourceProtocol] = Field(default_factory=_every_protocol, min_length=1)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return _check_ae(v)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            if not isinstance(h, str) or not h.strip():
                raise ValueError("each host is a host name, an IP address or a CIDR network like 10.1.0.0/16")
            if "/" in h:
                try:
                    ipaddress.ip_network(h.strip(), strict=False)
                except ValueError as e:
                    raise ValueError(f"{h!r} is not a valid CIDR network ({e})") from None
        return [h.strip() for h in hosts]


class _DestinationBase(_Model):
    """What every destination kind shares. Each kind is one model below, a member of :data:`Destination` (its
    sending side is ``node/egress/destinations/<kind>.py``), with its own fields, ``target`` (where, for people:
    status and logs), ``describe()`` (its line in ``check-config``'s summary) and, when its fields depend on each
    other, ``problems()``."""

    name: str = Field(min_length=1)

    # key -> hint, for a required key of this kind that is missing (``check-config`` prints it)
    hints: ClassVar[dict[str, str]] = {}
    purpose: ClassVar[str] = ""  # "to send to a PACS": ends the hint for a key that belongs to this kind

    def problems(self, key: str) -> list[Problem]:
        """Checks across this entry's fields (``key``: its path in the file, e.g. ``destinations[2]``)."""
        return []


class DicomDestination(_DestinationBase):
    """``kind: dicom`` (the default): a PACS reached with C-STORE, optionally over DICOM TLS."""

    kind: Literal["dicom"] = "dicom"
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False  # C-STORE over DICOM TLS
    tls_ca: Path | None = None  # CA that signed the PACS certificate (None: the system store)
    tls_cert: Path | None = None  # our client certificate, when the PACS asks for one
    tls_key: Path | None = None

    purpose: ClassVar[str] = "to send to a PACS"
    hints: ClassVar[dict[str, str]] = {
        "ae_title": "the PACS's AE title, 1 to 16 characters, e.g. ORTHANC",
        "host": "the PACS's host name or IP address; or set `kind: folder` with a path",
        "port": "the PACS's DICOM port, 1-65535 (104 or 11112 are usual)",
    }

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return cast(str, _check_ae(v))

    @property
    def target(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def describe(self) -> str:
        return f"{self.ae_title} at {self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class FolderDestination(_DestinationBase):
    """``kind: folder``: files land durably as ``<path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``."""

    kind: Literal["folder"] = "folder"
    path: Path

    purpose: ClassVar[str] = "to write files to a share"
    hints: ClassVar[dict[str, str]] = {"path": "a folder the node may write to, e.g. /mnt/pacs-import"}

    @property
    def target(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"folder {self.path}"


class DicomwebDestination(_DestinationBase):
    """``kind: dicomweb``: STOW-RS to a DICOMweb server (``url``: its DICOMweb root, e.g.
    ``https://pacs.example.org/dicom-web``). ``auth_token`` (or ``auth_token_file``) is sent as the value of the
    ``auth_header`` header, e.g. ``Bearer eyJ...``; never logged. HTTPS: ``tls_ca`` verifies the server (default:
    the system store), ``tls_verify: false`` turns verification off (test servers only), ``tls_cert`` /
    ``tls_key`` are our client certificate. ``timeout_s``: per request (default: ``egress.timeout_s``)."""

    kind: Literal["dicomweb"] = "dicomweb"
    url: str
    auth_header: str = Field("Authorization", min_length=1)
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    tls_ca: Path | None = None
    tls_verify: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout_s: float | None = Field(None, gt=0)

    purpose: ClassVar[str] = "to send with DICOMweb STOW-RS"
    hints: ClassVar[dict[str, str]] = {
        "url": "the server's DICOMweb root, e.g. https://pacs.example.org/dicom-web "
        "(Orthanc: http://host:8042/dicom-web)",
    }

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{v!r}: the DICOMweb root takes no ?query or #fragment")
        if parts.username or parts.password:
            raise ValueError("put credentials in auth_token (or auth_token_file), not in the URL")
        return v.strip().rstrip("/")

    @property
    def target(self) -> str:
        return self.url

    def describe(self) -> str:
        auth = f", {self.auth_header} header" if self.auth_token or self.auth_token_file else ""
        return f"DICOMweb {self.url}{auth}"

    def problems(self, key: str) -> list[Problem]:
        problems: list[Problem] = []
        if self.auth_token is not None and self.auth_token_file is not None:
            problems.append(
                (
                    f"{key}.auth_token_file",
                    "both auth_token and auth_token_file are set",
                    "keep one: auth_token_file keeps the secret out of the config file",
                )
            )
        if self.auth_token_file is not None and not self.auth_token_file.is_file():
            problems.append(
                (
                    f"{key}.auth_token_file",
                    f"{self.auth_token_file} is not a readable file",
                    "a file holding the header's value, e.g. `Bearer eyJ...`, readable by the node",
                )
            )
        if not self.url.startswith("https://"):
            for field in ("tls_ca", "tls_cert", "tls_key"):
                if getattr(self, field) is not None:
                    problems.append((f"{key}.{field}", f"{field} needs an https:// url", "use https or remove it"))
        if self.tls_key is not None and self.tls_cert is None:
            problems.append(
                (f"{key}.tls_key", "a client key without its certificate", "add tls_cert or remove tls_key")
            )
        if self.tls_ca is not None and not self.tls_verify:
            problems.append(
                (
                    f"{key}.tls_verify",
                    "tls_verify is false, so tls_ca would not be used",
                    "remove tls_verify (the server is then checked against tls_ca) or tls_ca",
                )
            )
        return problems


def _destination_kind(v: Any) -> str:
    """The union's tag: an entry's ``kind``, ``dicom`` when omitted (the format before kinds existed)."""
    kind = v.get("kind", "dicom") if isinstance(v, dict) else getattr(v, "kind", "dicom")
    return str(kind)


# Every destination kind: adding one is a model here plus its module under node/egress/destinations/.
Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")]
    | Annotated[FolderDestination, Tag("folder")]
    | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(
        _destination_kind, custom_error_type="destination_kind", custom_error_message="unknown destination kind"
    ),
]
# kind -> model, read from the union above
DESTINATION_KINDS: dict[str, type[_DestinationBase]] = {
    get_args(member)[1].tag: get_args(member)[0] for member in get_args(get_args(Destination)[0])
}


class Egress(_Model):
    """How the sender retries: exponential backoff from ``backoff_base_s`` capped at ``backoff_max_s``."""

    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    max_attempts: int | None = Field(None, ge=1)  # None: retry until the destination takes it
    timeout_s: float = Field(30.0, gt=0)  # network / DIMSE timeout per association or request
    poll_interval_s: float = Field(1.0, gt=0)

    # Checked while validating (not after), so it is listed with the other fields' problems, e.g. a destination's.
    @field_validator("backoff_max_s")
    @classmethod
    def _max_not_below_base(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base_s")
        if base is not None and v < base:
            raise ValueError(f"{v:g} s is below backoff_base_s ({base:g} s)")
        return v


_REGEX_FIELDS = ("series_description", "protocol_name")


class RouteMatch(_Model):
    input: Literal["mrd", "dicom"] | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    source: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    series_description: str | None = None  # regex, re.search, case-insensitive
    protocol_name: str | None = None  # regex, re.search, case-insensitive
    trajectory: str | None = None  # MRD: cartesian, radial, spiral, other
    sequence: str | None = None  # MRD: userParameters mrf_sequence_name

    @field_validator(*_REGEX_FIELDS)
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a valid regular expression ({e})") from None
        return v


class RouteResources(_Model):
    """What one job of a route needs on a cluster (``node.executor.kind: ray``): Ray schedules it on a node that
    has it free, and a job that no node of the cluster could ever run waits, queued, saying so in ``recon-node
    status``. The local executor runs every job in the node's process and ignores this."""

    gpu: float = Field(0, ge=0)
    cpu: float = Field(1, gt=0)
    memory_gb: float = Field(0, ge=0)


class Route(_Model):
    name: str = Field(min_length=1)
    match: RouteMatch = Field(default_factory=RouteMatch)
    pipeline: str
    params: dict[str, Any] = Field(default_factory=dict)
    send_to: list[str] = Field(default_factory=list)
    reply_over_mrd: bool = False
    allow_partial: bool = False  # run even when the input is incomplete (fewer frames/slices than declared)
    # raw jobs of a pipeline that takes a measured B1 map: wait up to this long (from the data's arrival) for a
    # b1_map job of their study when none has come yet; 0: wait only for one already queued or running
    wait_for_b1_seconds: float = Field(0.0, ge=0, le=86400)
    resources: RouteResources = Field(default_factory=RouteResources)


class GroupingRule(_Model):
    by: Literal["study", "series"] = "study"
    quiet_seconds: float = Field(5.0, gt=0)


class Grouping(_Model):
    default: GroupingRule = Field(default_factory=GroupingRule)
    sources: dict[str, GroupingRule] = Field(default_factory=dict)
    # after a restart, groups found on disk wait at least this long for the rest of their study (senders back off)
    restart_grace_seconds: float = Field(120.0, ge=0)


class Retention(_Model):
    days: float = Field(7.0, gt=0)


class SiteConfig(_Model):
    node: NodeSettings
    sources: list[Source] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    grouping: Grouping = Field(default_factory=Grouping)
    retention: Retention = Field(default_factory=Retention)
    egress: Egress = Field(default_factory=Egress)
    reject_unknown_sources: bool = True

    # set by load_config
    path: Path | None = Field(default=None, exclude=True)

    def grouping_for(self, source_name: str | None) -> GroupingRule:
        return self.grouping.sources.get(source_name or "", self.grouping.default)

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


# ---- source matching -------------------------------------------------------------------------------------------
def _resolve(host: str) -> set[str]:
    try:
        # A host name resolves to IPv4/IPv6 sockaddrs, whose [0] is the address as a str (typeshed's union
        # also covers non-IP families, hence str()).
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return set()


def host_matches(pattern: str, peer_ip: str) -> bool:
    """``pattern`` is an IP, a CIDR network or a host name (resolved on each call)."""
    try:
        ip = ipaddress.ip_address(peer_ip.split("%")[0])
    except ValueError:
        return pattern == peer_ip
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    try:
        if "/" in pattern:
            return ip in ipaddress.ip_network(pattern, strict=False)
        return ip == ipaddress.ip_address(pattern)
    except ValueError:
        pass
    return str(ip) in _resolve(pattern)


def find_source(cfg: SiteConfig, protocol: str, peer_ip: str, ae_title: str | None) -> Source | None:
    """The first source that allows ``protocol`` from ``peer_ip`` (and, for DICOM, whose AE title matches)."""
    for src in cfg.sources:
        if protocol not in src.protocols:
            continue
        if protocol == "dicom" and src.ae_title and (ae_title or "").strip() != src.ae_title:
            continue
        if any(host_matches(h, peer_ip) for h in src.hosts):
            return src
    return None


def spool_space_problem(cfg: SiteConfig) -> str | None:
    """A sentence for people when the spool's disk has less free space than ``node.disk_reserve_mb``."""
    spool = cfg.node.spool_dir
    try:
        free_mb = shutil.disk_usage(spool if spool.exists() else spool.parent).free / 2**20
    except OSError as e:
        return f"cannot check free space of the spool {spool}: {e}"
    if free_mb < cfg.node.disk_reserve_mb:
        return (
            f"spool disk full: {free_mb:.0f} MB free in {spool}, node.disk_reserve_mb is "
            f"{cfg.node.disk_reserve_mb} MB; free space or run `recon-node status` to find old results"
        )
    return None


# ---- loading ---------------------------------------------------------------------------------------------------
def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_FIELD_HINTS = {
    "spool_dir": "a folder on a local disk with room for raw data, e.g. /var/lib/recon-node/spool",
    "hosts": "list host names, IP addresses or CIDR networks, e.g. [10.1.2.3, mr-scanner-1, 10.20.0.0/16]",
    "protocols": "use dicom, mrd or both",
    "ae_title": "1 to 16 characters, e.g. RECON_NODE; must match what the peer is configured with",
    "port": "a TCP port number 1-65535",
    "dicom_port": "a TCP port number 1-65535 (104 or 11112 are usual for DICOM)",
    "mrd_port": "a TCP port number 1-65535 (9002 is usual for MRD)",
    "device": "auto picks the GPU when present",
    "pipeline": "run `recon-node pipelines` to list them",
    "by": "study groups a whole study into one unit, series one unit per series",
    "kind": "dicom (a PACS: ae_title, host, port), folder (a share: path) or dicomweb (STOW-RS: url)",
    "templates_dir": "a copy of the shipped dicom_templates/ folder with your edits",
    "backoff_max_s": "seconds between retries at most, at least backoff_base_s, e.g. 60",
}


def _hint(err: dict[str, Any], model_fields: dict[str, list[str]]) -> str:
    etype = err.get("type", "")
    loc = err.get("loc", ())
    name = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
    if etype == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1] if isinstance(p, str))
        valid = model_fields.get(parent)
        close = difflib.get_close_matches(name.lower().replace("-", "_"), valid or [], n=1, cutoff=0.7)
        if close:
            return f"did you mean {close[0]!r}?"
        return (
            f"remove it or check the spelling; valid keys here: {', '.join(valid)}"
            if valid
            else "remove it or check the spelling"
        )
    if etype == "missing":
        return _FIELD_HINTS.get(name, "add this key")
    return _FIELD_HINTS.get(name, "")


def _fields_by_parent() -> dict[str, list[str]]:
    out = {"": list(SiteConfig.model_fields.keys() - {"path"})}
    pairs: list[tuple[str, type[BaseModel]]] = [
        ("node", NodeSettings),
        ("sources", Source),
        ("routes", Route),
        ("routes.match", RouteMatch),
        ("grouping", Grouping),
        ("grouping.default", GroupingRule),
        ("grouping.sources", GroupingRule),
        ("retention", Retention),
        ("egress", Egress),
        ("node.http", HttpSettings),
        ("node.http.users", HttpUser),
        ("node.http.tokens", HttpToken),
    ]
    for key, model in pairs:
        out[key] = sorted(model.model_fields)
    return out


def _cross_check(cfg: SiteConfig, check_pipelines: bool) -> list[Problem]:
    problems: list[Problem] = []
    for what, items in (("sources", cfg.sources), ("destinations", cfg.destinations), ("routes", cfg.routes)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append((f"{what}[{i}].name", f"{item.name!r} is used twice", "give each entry its own name"))
            seen.add(item.name)
    src_names = [s.name for s in cfg.sources]
    dst_names = [d.name for d in cfg.destinations]
    problems += _check_destinations(cfg)
    problems += _check_mrd_tls(cfg)
    problems += _check_http(cfg)
    problems += _check_templates(cfg.node.templates_dir)
    problems += _check_executor(cfg)
    for name in cfg.grouping.sources:
        if name not in src_names:
            problems.append(
                (
                    f"grouping.sources.{name}",
                    f"no source is called {name!r}",
                    f"use one of the names under sources: {', '.join(src_names) or '(none defined)'}",
                )
            )
    if check_pipelines:
        for i, mod in enumerate(cfg.node.plugins):
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001 - any import failure is a config problem
                problems.append(
                    (
                        f"node.plugins[{i}]",
                        f"cannot import module {mod!r}: {type(e).__name__}: {e}",
                        "install the module or fix PYTHONPATH for the node's service",
                    )
                )
    registry = None
    if check_pipelines:
        from pipelines import definitions as registry_mod

        registry = registry_mod
    for i, r in enumerate(cfg.routes):
        key = f"routes[{i}]"
        if r.match.source is not None and r.match.source not in src_names:
            problems.append(
                (
                    f"{key}.match.source",
                    f"no source is called {r.match.source!r}",
                    f"use one of: {', '.join(src_names) or '(none defined)'}",
                )
            )
        for j, dest in enumerate(r.send_to):
            if dest not in dst_names:
                problems.append(
                    (
                        f"{key}.send_to[{j}]",
                        f"no destination is called {dest!r}",
                        f"add it under destinations or use one of: {', '.join(dst_names) or '(none)'}",
                    )
                )
        if r.reply_over_mrd and r.match.input != "mrd":
            problems.append(
                (
                    f"{key}.reply_over_mrd",
                    "reply_over_mrd needs a route for MRD input",
                    "add `input: mrd` under match, or remove reply_over_mrd",
                )
            )
        if registry is None:
            continue
        try:
            spec = registry.get_pipeline(r.pipeline)
        except ValueError:
            names = ", ".join(s.name for s in registry.list_pipelines())
            problems.append((f"{key}.pipeline", f"unknown pipeline {r.pipeline!r}", f"use one of: {names}"))
            continue
        want = "mrd" if spec.input_kind == "raw" else "dicom"
        if r.match.input is not None and r.match.input != want:
            problems.append(
                (
                    f"{key}.match.input",
                    f"pipeline {spec.name!r} takes {want} input but the route matches {r.match.input}",
                    f"set `input: {want}` or choose a pipeline for {r.match.input} data",
                )
            )
        try:
            resolved = spec.resolve_params(r.params)
        except ValueError as e:
            bad = [p for p in r.params if p not in spec.params]
            sub = f".params.{bad[0]}" if bad else ".params"
            valid = ", ".join(f"{n} (default {p.default!r})" for n, p in spec.params.items()) or "none"
            problems.append((f"{key}{sub}", str(e), f"parameters of {spec.name}: {valid}"))
            continue
        if r.wait_for_b1_seconds > 0 and resolved.get("b1_measured", "off") == "off":
            problems.append(
                (
                    f"{key}.wait_for_b1_seconds",
                    f"pipeline {spec.name!r} does not use a measured B1 map"
                    + (" (b1_measured is 'off')" if "b1_measured" in spec.params else ""),
                    "remove wait_for_b1_seconds, or route to a pipeline with b1_measured auto or required",
                )
            )
        if r.wait_for_b1_seconds > 0 and r.reply_over_mrd:
            problems.append(
                (
                    f"{key}.wait_for_b1_seconds",
                    "a route that replies over MRD runs its job while the scanner waits on the connection; "
                    "it cannot wait for a B1 series",
                    "remove wait_for_b1_seconds or reply_over_mrd",
                )
            )
    return problems


def _check_executor(cfg: SiteConfig) -> list[Problem]:
    """``kind: ray`` needs the optional ``ray`` package (the embedded default needs nothing)."""
    import importlib.util

    if cfg.node.executor.kind != "ray" or importlib.util.find_spec("ray") is not None:
        return []
    return [
        (
            "node.executor.kind",
            "kind ray needs the ray package, which is not installed",
            'pip install "recon-node[ray]" (or use kind: local)',
        )
    ]


# what the console imports (module name -> the distribution that provides it)
WEB_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2", "argon2": "argon2-cffi"}


def _check_http(cfg: SiteConfig) -> list[Problem]:
    """The console (``node.http``) needs the ``web`` extra, someone to log in, the certificate for TLS, a port of
    its own."""
    import importlib.util

    n, h = cfg.node, cfg.node.http
    if h is None:
        return []
    problems: list[Problem] = []
    missing = [dist for mod, dist in WEB_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        problems.append(
            (
                "node.http",
                f"the web console needs {', '.join(missing)}, which is not installed",
                'pip install "recon-node[web]" (or remove node.http)',
            )
        )
    if not h.users and not h.tokens:
        problems.append(
            (
                "node.http.users",
                "the console is on but nobody can log in (no users, no tokens)",
                "add a user: {name: alice, role: operator, password_hash: <`recon-node hash-password`>}",
            )
        )
    if h.tls and n.tls is None:
        problems.append(
            (
                "node.http.tls",
                "HTTPS needs the node's certificate",
                "add node.tls with cert and key (PEM files), or set node.http.tls: false",
            )
        )
    elif h.tls and n.tls is not None and n.tls.require_client_cert and n.tls.ca is None:
        problems.append(
            (
                "node.tls.ca",
                "require_client_cert needs the CA that signs the client certificates",
                "set node.tls.ca to that CA's PEM file, or set require_client_cert: false",
            )
        )
    for what, names in (("users", [u.name for u in h.users]), ("tokens", [t.name for t in h.tokens])):
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"node.http.{what}[{i}].name", f"{name!r} is used twice", "give each its own name"))
    others = {
        "node.mrd_port": n.mrd_port,
        "node.dicom_port": n.dicom_port,
        "node.mrd_tls_port": n.mrd_tls_port,
        "node.dicom_tls_port": n.dicom_tls_port,
    }
    for key, port in others.items():
        if h.port and port == h.port:
            problems.append(("node.http.port", f"the same port as {key} ({port})", "use another port, e.g. 8443"))
    return problems


def _check_mrd_tls(cfg: SiteConfig) -> list[Problem]:
    """MRD over TLS needs the certificate block; a client-certificate requirement needs the CA that signs them."""
    n = cfg.node
    if n.mrd_tls_port is None:
        return []
    problems: list[Problem] = []
    if n.tls is None:
        problems.append(
            (
                "node.mrd_tls_port",
                "MRD over TLS needs the node's certificate",
                "add node.tls with cert and key (PEM files), or remove node.mrd_tls_port",
            )
        )
    elif n.tls.require_client_cert and n.tls.ca is None:
        problems.append(
            (
                "node.tls.ca",
                "require_client_cert needs the CA that signs the client certificates",
                "set node.tls.ca to that CA's PEM file, or set require_client_cert: false",
            )
        )
    if n.mrd_tls_port != 0 and n.mrd_tls_port == n.mrd_port:
        problems.append(
            (
                "node.mrd_tls_port",
                f"the same port as node.mrd_port ({n.mrd_port})",
                "use another port for MRD over TLS, e.g. 9003",
            )
        )
    return problems


def _check_destinations(cfg: SiteConfig) -> list[Problem]:
    return [p for i, d in enumerate(cfg.destinations) for p in d.problems(f"destinations[{i}]")]


def _check_templates(folder: Path | None) -> list[Problem]:
    """The site's templates (None: the shipped ones) parse, and cover every output kind a pipeline can return in
    its unit, so a missing template fails here and not after a job ran."""
    from node.egress.templates import (
        TemplateError,
        available_kinds,
        catalogue_problems,
        default_templates_dir,
        template_for,
    )

    try:
        shipped = str(default_templates_dir())
    except TemplateError as e:
        if folder is None:
            return [("node.templates_dir", str(e), "reinstall recon-node or set node.templates_dir")]
        shipped = "recon-node's dicom_templates"
    if folder is not None and not folder.is_dir():
        return [("node.templates_dir", f"{folder} is not a folder", f"copy {shipped} there and edit the copies")]
    problems: list[Problem] = []
    for kind in available_kinds(folder):
        try:
            template_for(kind, folder)
        except TemplateError as e:
            problems.append(("node.templates_dir", str(e), "fix the template or copy the shipped one again"))
    problems += [
        ("node.templates_dir", msg, f"copy the missing or wrong templates from {shipped}")
        for msg in catalogue_problems(folder)
    ]
    return problems


def _absolutize(data: dict[str, Any], base: Path) -> None:
    def absolute(v: Any) -> Any:
        if isinstance(v, str) and v:
            p = Path(v).expanduser()
            return str(p if p.is_absolute() else (base / p))
        return v

    node = data.get("node")
    if isinstance(node, dict):
        for k in ("spool_dir", "database", "cache_dir", "templates_dir", "audit_log"):
            if k in node:
                node[k] = absolute(node[k])
        if isinstance(node.get("tls"), dict):
            node["tls"] = {k: (absolute(v) if k in ("cert", "key", "ca") else v) for k, v in node["tls"].items()}
    dests = data.get("destinations")
    if isinstance(dests, list):
        data["destinations"] = [
            {**d, "path": absolute(d["path"])} if isinstance(d, dict) and "path" in d else d for d in dests
        ]
        data["destinations"] = [
            {**d, **{k: absolute(d[k]) for k in ("tls_ca", "tls_cert", "tls_key", "auth_token_file") if k in d}}
            if isinstance(d, dict)
            else d
            for d in data["destinations"]
        ]


def parse_config(
    data: Any, where: str | Path = "<config>", base: Path | None = None, check_pipelines: bool = True
) -> SiteConfig:
    """Validate an already-parsed YAML mapping; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            where, [("(top level)", "the file is not a YAML mapping", "start from deploy/site.example.yaml")]
        )
    data = dict(data)
    if isinstance(data.get("node"), dict):
        data["node"] = dict(data["node"])
    _absolutize(data, base or Path.cwd())
    try:
        cfg = SiteConfig.model_validate(data)
    except ValidationError as e:
        fields = _fields_by_parent()
        problems = []
        for err in e.errors():
            if err.get("loc", ())[:1] == ("destinations",):
                problems.append(_destination_error(err))
                continue
            loc = tuple(err.get("loc", ()))
            msg = err.get("msg", "invalid")
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if err.get("type") == "extra_forbidden":
                msg = "unknown key"
            elif err.get("type") == "missing":
                msg = "required key is missing"
            plain = tuple(p for p in loc if isinstance(p, str))
            problems.append((_key_path(loc), msg, _hint({**err, "loc": _strip_indices(plain, loc)}, fields)))
        raise ConfigError(where, problems) from None
    problems = _cross_check(cfg, check_pipelines)
    if problems:
        raise ConfigError(where, problems)
    return cfg


def _destination_error(err: Any) -> Problem:
    """A validation error inside ``destinations``, worded for the entry's kind (the union's tag is dropped
    from the key path: ``destinations[1].path``, not ``destinations[1].folder.path``)."""
    loc = tuple(err["loc"])
    if len(loc) < 2 or not isinstance(loc[1], int):
        return (_key_path(loc), str(err.get("msg", "invalid")), "a list of destinations, each with name and kind")
    if err.get("type") == "destination_kind":  # the union's tag matched no kind; ``input`` is the entry
        entry = err.get("input")
        given = entry.get("kind") if isinstance(entry, dict) else None
        return (
            f"{_key_path(loc)}.kind",
            f"unknown destination kind {given!r} (kinds: {', '.join(DESTINATION_KINDS)})",
            _FIELD_HINTS["kind"],
        )
    kind = loc[2] if len(loc) > 2 and loc[2] in DESTINATION_KINDS else None
    model = DESTINATION_KINDS[kind] if kind else None
    rest = loc[3:] if kind else loc[2:]
    key = _key_path(loc[:2] + rest)
    field = str(rest[0]) if rest else ""
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if model is None or not field:
        return (key, msg, "")
    if err.get("type") == "missing":
        name = err.get("input", {}).get("name") if isinstance(err.get("input"), dict) else None
        return (
            key,
            f"required for a {kind} destination" + (f" ({name!r})" if name else ""),
            model.hints.get(field, _FIELD_HINTS.get(field, "add this key")),
        )
    if err.get("type") == "extra_forbidden":
        owners = [k for k, m in DESTINATION_KINDS.items() if field in m.model_fields]
        if owners:
            return (
                key,
                f"a {kind} destination has no {field}",
                "remove it, or set " + " or ".join(f"`kind: {k}` {DESTINATION_KINDS[k].purpose}" for k in owners),
            )
        close = difflib.get_close_matches(field.lower().replace("-", "_"), sorted(model.model_fields), n=1, cutoff=0.7)
        keys = ", ".join(sorted(model.model_fields))
        return (
            key,
            "unknown key",
            f"did you mean {close[0]!r}?"
            if close
            else f"remove it or check the spelling; keys of a {kind} destination: {keys}",
        )
    return (key, msg, model.hints.get(field, _FIELD_HINTS.get(field, "")))


def _strip_indices(plain: tuple[str, ...], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # grouping.sources.<name>.<field> -> grouping.sources.<field> for the key list lookup
    if len(plain) >= 3 and plain[0] == "grouping" and plain[1] == "sources":
        return ("grouping", "sources", *plain[3:])
    return plain


def load_config(path: str | Path, check_pipelines: bool = True) -> SiteConfig:
    """Read and validate a site config. ``check_pipelines=False`` skips the pipeline registry (fast, for status)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            path, [("(file)", f"cannot read the config: {e.strerror or e}", "check the path given with --config")]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            path,
            [
                (
                    f"(yaml {where})",
                    f"not valid YAML: {getattr(e, 'problem', e)}",
                    "check indentation (spaces, not tabs) and quoting around that line",
                )
            ],
        ) from None
    cfg = parse_config(data, path, base=path.resolve().parent, check_pipelines=check_pipelines)
    cfg.path = path
    return cfg


def summary(cfg: SiteConfig) -> str:
    """A human summary of a valid config (check-config prints it)."""
    n = cfg.node
    unknown = "rejected" if cfg.reject_unknown_sources else "accepted"
    lines = [
        f"node {n.ae_title}: DICOM port {n.dicom_port}, MRD port {n.mrd_port} on {n.bind}; "
        f"spool {n.spool_dir}; device {n.device}; "
        + (
            f"Ray cluster {n.executor.address} (up to {n.executor.max_in_flight} jobs at once)"
            if isinstance(n.executor, RayExecutorSettings)
            else f"{n.workers} worker(s)"
        )
        + f"; max attempts {n.max_attempts}",
        f"sources ({len(cfg.sources)}; unknown sources {unknown}):",
    ]
    for s in cfg.sources:
        g = cfg.grouping_for(s.name)
        lines.append(
            f"  {s.name}: {'/'.join(s.protocols)} from {', '.join(s.hosts)}"
            + (f", AE {s.ae_title}" if s.ae_title else "")
            + f"; grouping by {g.by}, quiet {g.quiet_seconds:g} s"
        )
    lines.append(f"routes ({len(cfg.routes)}, first match wins):")
    for r in cfg.routes:
        conds = ", ".join(f"{k}={v}" for k, v in r.match.model_dump(exclude_none=True).items()) or "anything"
        extra = (
            (f" params {r.params}" if r.params else "")
            + (f" -> {', '.join(r.send_to)}" if r.send_to else "")
            + (" (reply over MRD)" if r.reply_over_mrd else "")
            + (f" (waits up to {r.wait_for_b1_seconds:g} s for the study's B1 series)" if r.wait_for_b1_seconds else "")
        )
        lines.append(f"  {r.name}: [{conds}] => {r.pipeline}{extra}")
    lines.append(f"destinations ({len(cfg.destinations)}):")
    for d in cfg.destinations:
        lines.append(f"  {d.name}: {d.describe()}")
    e = cfg.egress
    lines.append(
        f"egress: retry backoff {e.backoff_base_s:g}..{e.backoff_max_s:g} s, "
        + (f"give up after {e.max_attempts} attempts" if e.max_attempts else "retry until delivered")
        + (f"; templates {n.templates_dir}" if n.templates_dir else "")
        + ("; parametric maps" if n.parametric_map else "")
    )
    if n.http is not None:
        lines.append(
            f"console: {'https' if n.http.tls else 'http'}://{n.bind}:{n.http.port}/ "
            f"({len(n.http.users)} user(s), {len(n.http.tokens)} token(s)"
            + (", /metrics public" if n.http.metrics_public else "")
            + ")"
        )
    lines.append(f"retention: {cfg.retention.days:g} days")
    return "\n".join(lines)
