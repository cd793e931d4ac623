# Node configuration: frozen dataclasses, validated on creation, and the
# loader for upstream's YAML format (the tutorial's file is accepted as
# written). Extensions of ours live under the service: `auth`, `limits` and
# `acl` (subscribe rules and moderated channels, see _acl.py).
from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ._acl import AclRule, SubscribeAcl
from ._errors import ConfigError
from ._limits import Limits, RatePolicy, SlowConsumerPolicy

DEFAULT_NODE_ID = "slim/0"
# Upstream's data-plane port, used when an endpoint gives none.
DEFAULT_PORT = 46357
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
# Longer polling only burns CPU: a reply slower than this pays its wake-up anyway.
MAX_BUSY_POLL = 0.01
_LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")


def parse_duration(value: object, where: str) -> float:
    """Seconds from ``10s``, ``500ms``, ``300us``, ``2m``, ``1h`` or a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: a duration must be finite and not negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            scale = {"us": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
            return float(m.group(1)) * scale
    raise ConfigError(f"{where}: expected a duration such as '10s', got {value!r}")


def _check_busy_poll(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= MAX_BUSY_POLL:
        raise ConfigError(f"{where}: a duration from 0 to {MAX_BUSY_POLL * 1e3:g}ms, "
                          f"got {value!r}")


def split_endpoint(endpoint: str, where: str, *, default_port: int = DEFAULT_PORT
                   ) -> tuple[str, int, str | None]:
    """``(host, port, scheme)`` from ``host:port``, ``[v6]:port`` or ``scheme://host:port``."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigError(f"{where}: expected an endpoint such as '127.0.0.1:46357'")
    text = endpoint.strip()
    scheme = None
    if "://" not in text:
        text = "tcp://" + text
    else:
        scheme = text.split("://", 1)[0].lower()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid endpoint {endpoint!r}: {exc}") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"{where}: endpoint {endpoint!r} has no host")
    if scheme not in (None, "http", "https", "tcp", "tls"):
        raise ConfigError(f"{where}: unsupported scheme {scheme!r} (use http, https or none)")
    return host, port if port is not None else default_port, scheme


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """TLS settings of a server or a client connection.

    ``insecure=True`` means plain TCP, as in upstream's files.
    """

    insecure: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False

    def server_context(self) -> ssl.SSLContext | None:
        """An SSL context for a listener, or ``None`` for plain TCP."""
        if self.insecure and not self.cert_file:
            return None
        if not (self.cert_file and self.key_file):
            raise ConfigError("tls: a server needs cert_file and key_file (or insecure: true)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.ca_file:
                ctx.load_verify_locations(self.ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot load certificates: {exc}") from exc
        return ctx

    def client_context(self, scheme: str | None) -> ssl.SSLContext | None:
        """An SSL context for dialing, or ``None`` for plain TCP."""
        if scheme == "http" or (self.insecure and scheme != "https" and not self.ca_file):
            return None
        ctx = ssl.create_default_context()
        try:
            if self.ca_file:
                ctx.load_verify_locations(self.ca_file)
            if self.cert_file and self.key_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot load certificates: {exc}") from exc
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """A listener: ``endpoint`` is ``host:port`` (port 0 picks a free port)."""

    endpoint: str = "127.0.0.1:0"
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        split_endpoint(self.endpoint, "server endpoint", default_port=0)

    @property
    def host(self) -> str:
        return split_endpoint(self.endpoint, "server endpoint", default_port=0)[0]

    @property
    def port(self) -> int:
        return split_endpoint(self.endpoint, "server endpoint", default_port=0)[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """An outbound connection: ``endpoint`` is ``http://host:port`` or ``https://...``."""

    endpoint: str
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        split_endpoint(self.endpoint, "client endpoint")

    @property
    def host(self) -> str:
        return split_endpoint(self.endpoint, "client endpoint")[0]

    @property
    def port(self) -> int:
        return split_endpoint(self.endpoint, "client endpoint")[1]

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.client_context(split_endpoint(self.endpoint, "client endpoint")[2])


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    """Everything a node needs to run.

    :param shared_secret: verifies app and peer hello tokens; ``None`` runs
        the node in development mode (tokens are read, not checked).
    :param token_secret: the node's own identity secret for links and the
        controller (the tutorial's ``controller.token_provider.shared_secret``).
    :param acl: who may subscribe to what; the default allows everything.
    :param busy_poll: seconds the node keeps polling its sockets after each read
        instead of sleeping (see :class:`~node_lite._transport.BusyPoll`): lower
        request/reply latency for CPU time that would otherwise sit idle. Off (0) by
        default; a few hundred microseconds suits a latency-bound deployment.
    """

    node_id: str = DEFAULT_NODE_ID
    servers: tuple[ServerConfig, ...] = (ServerConfig(),)
    links: tuple[ClientConfig, ...] = ()
    controller_clients: tuple[ClientConfig, ...] = ()
    shared_secret: str | None = None
    token_secret: str | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    drain_timeout: float = 10.0
    acl: SubscribeAcl = field(default_factory=SubscribeAcl)
    busy_poll: float = 0.0

    def __post_init__(self) -> None:
        if not self.node_id or not isinstance(self.node_id, str):
            raise ConfigError("node_id must be a non-empty string")
        if not isinstance(self.acl, SubscribeAcl):
            raise ConfigError("acl must be a SubscribeAcl")
        _check_busy_poll(self.busy_poll, "busy_poll")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


# -- YAML loading ------------------------------------------------------------------------


def _map(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _bool(value: object, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _opt_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _tls(raw: object, where: str) -> TlsConfig:
    d = _map(raw, where)
    return TlsConfig(
        insecure=_bool(d.get("insecure"), f"{where}.insecure", not d),
        cert_file=_opt_str(d.get("cert_file"), f"{where}.cert_file"),
        key_file=_opt_str(d.get("key_file"), f"{where}.key_file"),
        ca_file=_opt_str(d.get("ca_file") or d.get("client_ca_file"), f"{where}.ca_file"),
        insecure_skip_verify=_bool(d.get("insecure_skip_verify"),
                                   f"{where}.insecure_skip_verify", False),
    )


def _expand_env(value: Any) -> Any:
    # Upstream files may say ${env:NAME}; resolve it where it appears.
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(f"environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return re.sub(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def _limits(raw: object, where: str) -> Limits:
    d = dict(_map(raw, where))
    known = {f.name for f in dataclasses.fields(Limits)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{where}: unknown limits {sorted(unknown)}")
    for key in ("write_deadline", "hello_timeout", "keepalive", "read_timeout"):
        if key in d:
            d[key] = parse_duration(d[key], f"{where}.{key}")
    if "slow_consumer" in d:
        try:
            d["slow_consumer"] = SlowConsumerPolicy(d["slow_consumer"])
        except ValueError:
            raise ConfigError(f"{where}.slow_consumer: one of wait, drop, disconnect") from None
    if "rate_policy" in d:
        try:
            d["rate_policy"] = RatePolicy(d["rate_policy"])
        except ValueError:
            raise ConfigError(f"{where}.rate_policy: one of pause, drop") from None
    try:
        return Limits(**d)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _acl(raw: object, where: str) -> SubscribeAcl:
    d = _map(raw, where)
    unknown = set(d) - {"default", "moderated", "rules"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    rules = []
    for i, r in enumerate(_list(d.get("rules"), f"{where}.rules")):
        w = f"{where}.rules[{i}]"
        rd = _map(r, w)
        extra = set(rd) - {"subjects", "allow", "deny"}
        if extra:
            raise ConfigError(f"{w}: unknown keys {sorted(extra)}")
        try:
            rules.append(AclRule(subjects=tuple(_list(rd.get("subjects", ["*"]), f"{w}.subjects")),
                                 allow=tuple(_list(rd.get("allow"), f"{w}.allow")),
                                 deny=tuple(_list(rd.get("deny"), f"{w}.deny"))))
        except ConfigError as exc:
            raise ConfigError(f"{w}: {exc}") from None
    kwargs: dict[str, Any] = {"rules": tuple(rules)}
    for key in ("default", "moderated"):
        if key in d:
            kwargs[key] = tuple(_list(d[key], f"{where}.{key}"))
    try:
        return SubscribeAcl(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_mapping(doc: object) -> NodeConfig:
    """Build a :class:`NodeConfig` from a parsed YAML document.

    :raises ConfigError: naming the offending key.
    """
    doc = _expand_env(_map(doc, "config"))
    assert isinstance(doc, dict)
    tracing = _map(doc.get("tracing"), "tracing")
    log_level = tracing.get("log_level", "info")
    if not isinstance(log_level, str):
        raise ConfigError("tracing.log_level: expected a string")
    runtime = _map(doc.get("runtime"), "runtime")
    drain = parse_duration(runtime.get("drain_timeout", "10s"), "runtime.drain_timeout")
    busy_poll = parse_duration(runtime.get("busy_poll", 0), "runtime.busy_poll")
    _check_busy_poll(busy_poll, "runtime.busy_poll")
    services = _map(doc.get("services"), "services")
    if not services:
        raise ConfigError("services: at least one service (such as slim/0) is required")
    if len(services) > 1:
        raise ConfigError(f"services: one service per node process, got {sorted(services)}")
    (service_id, raw_service), = services.items()
    where = f"services.{service_id}"
    service = _map(raw_service, where)
    node_id = service.get("node_id", service_id)
    if not isinstance(node_id, str) or not node_id:
        raise ConfigError(f"{where}.node_id: expected a non-empty string")
    dataplane = _map(service.get("dataplane"), f"{where}.dataplane")
    servers = []
    for i, raw in enumerate(_list(dataplane.get("servers"), f"{where}.dataplane.servers")):
        w = f"{where}.dataplane.servers[{i}]"
        s = _map(raw, w)
        endpoint = s.get("endpoint")
        if not isinstance(endpoint, str):
            raise ConfigError(f"{w}.endpoint: required, such as '0.0.0.0:46357'")
        split_endpoint(endpoint, f"{w}.endpoint")
        servers.append(ServerConfig(endpoint=endpoint, tls=_tls(s.get("tls"), f"{w}.tls")))
    if not servers:
        raise ConfigError(f"{where}.dataplane.servers: at least one server is required")
    links = []
    for i, raw in enumerate(_list(dataplane.get("clients"), f"{where}.dataplane.clients")):
        w = f"{where}.dataplane.clients[{i}]"
        c = _map(raw, w)
        endpoint = c.get("endpoint")
        if not isinstance(endpoint, str):
            raise ConfigError(f"{w}.endpoint: required, such as 'http://127.0.0.1:46357'")
        split_endpoint(endpoint, f"{w}.endpoint")
        links.append(ClientConfig(endpoint=endpoint, tls=_tls(c.get("tls"), f"{w}.tls")))
    controller = _map(service.get("controller"), f"{where}.controller")
    ctl_clients = []
    for i, raw in enumerate(_list(controller.get("clients"), f"{where}.controller.clients")):
        w = f"{where}.controller.clients[{i}]"
        c = _map(raw, w)
        endpoint = c.get("endpoint")
        if not isinstance(endpoint, str):
            raise ConfigError(f"{w}.endpoint: required")
        split_endpoint(endpoint, f"{w}.endpoint")
        ctl_clients.append(ClientConfig(endpoint=endpoint, tls=_tls(c.get("tls"), f"{w}.tls")))
    token_provider = _map(controller.get("token_provider"), f"{where}.controller.token_provider")
    token_secret = _opt_str(token_provider.get("shared_secret"),
                            f"{where}.controller.token_provider.shared_secret")
    auth = _map(service.get("auth"), f"{where}.auth")
    shared_secret = _opt_str(auth.get("shared_secret"), f"{where}.auth.shared_secret")
    limits = _limits(service.get("limits"), f"{where}.limits")
    acl = _acl(service.get("acl"), f"{where}.acl")
    return NodeConfig(
        node_id=node_id, servers=tuple(servers), links=tuple(links),
        controller_clients=tuple(ctl_clients), shared_secret=shared_secret,
        token_secret=token_secret, limits=limits, log_level=log_level.lower(),
        drain_timeout=drain, acl=acl, busy_poll=busy_poll,
    )


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read a node configuration file (upstream's YAML format).

    :raises ConfigError: when the file cannot be read or is invalid.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    return config_from_mapping(doc)
