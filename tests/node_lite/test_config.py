"""Node configuration: upstream's YAML files, our extensions, validation and TLS contexts."""
from __future__ import annotations

import copy
import math
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from node_lite import (
    ClientConfig,
    ConfigError,
    Limits,
    NodeConfig,
    ServerConfig,
    SlimError,
    SlowConsumerPolicy,
    TlsConfig,
    config_from_mapping,
    load_config,
)
from node_lite._config import parse_duration, split_endpoint
from tests.helpers import TUTORIAL_CONFIG

# The tutorial's config-slim.yaml: config.yaml with a controller client and token provider
# added to its last section (``controller:``).
TUTORIAL_CONTROLLER_CONFIG = TUTORIAL_CONFIG + """\
      clients:
        - endpoint: "http://host.docker.internal:50052"
          tls:
            insecure: true
      token_provider:
        shared_secret: "secret"
"""

SERVICE = "services.slim/0"


def minimal() -> dict[str, Any]:
    return {"services": {"slim/0": {"dataplane": {"servers": [{"endpoint": "0.0.0.0:46357"}]}}}}


def service(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["services"]["slim/0"]
    return result


def config_error(doc: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert isinstance(info.value, SlimError)
    assert isinstance(info.value, ValueError)
    assert info.value.code == "config"
    return str(info.value)


# -- the tutorial's files ---------------------------------------------------------------


def test_tutorial_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TUTORIAL_CONFIG)
    config = load_config(path)
    assert isinstance(config, NodeConfig)
    assert config.node_id == "slim/0"
    assert len(config.servers) == 1
    server = config.servers[0]
    assert server.endpoint == "0.0.0.0:46357"
    assert (server.host, server.port) == ("0.0.0.0", 46357)
    assert server.tls.insecure is True
    assert server.tls.server_context() is None
    assert config.links == ()
    assert config.controller_clients == ()
    assert config.log_level == "info"
    assert config.drain_timeout == 10.0
    assert config.shared_secret is None
    assert config.token_secret is None
    assert config.limits == Limits()


def test_tutorial_config_loads_from_str_path(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TUTORIAL_CONFIG)
    assert load_config(str(path)) == load_config(path)


def test_tutorial_controller_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config-slim.yaml"
    path.write_text(TUTORIAL_CONTROLLER_CONFIG)
    config = load_config(path)
    assert config.node_id == "slim/0"
    assert config.servers[0].endpoint == "0.0.0.0:46357"
    assert len(config.controller_clients) == 1
    controller = config.controller_clients[0]
    assert isinstance(controller, ClientConfig)
    assert controller.endpoint == "http://host.docker.internal:50052"
    assert (controller.host, controller.port) == ("host.docker.internal", 50052)
    assert controller.tls.insecure is True
    assert controller.ssl_context() is None
    assert config.token_secret == "secret"
    assert config.shared_secret is None
    assert config.links == ()
    assert config.drain_timeout == 10.0


def test_tutorial_config_from_mapping_matches_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TUTORIAL_CONFIG)
    assert config_from_mapping(yaml.safe_load(TUTORIAL_CONFIG)) == load_config(path)


# -- errors name the key path -----------------------------------------------------------


def _mutate(change: Any) -> dict[str, Any]:
    doc = minimal()
    change(doc)
    return doc


ERROR_CASES: list[Any] = [
    pytest.param(None, "services", id="empty-document"),
    pytest.param(["a"], "config", id="list-document"),
    pytest.param("text", "config", id="str-document"),
    pytest.param(_mutate(lambda d: d.pop("services")), "services", id="missing-services"),
    pytest.param(_mutate(lambda d: d.update(services={})), "services", id="empty-services"),
    pytest.param(_mutate(lambda d: d.update(services=["slim/0"])), "services",
                 id="services-list"),
    pytest.param(_mutate(lambda d: d["services"].update({"slim/1": {}})), "services",
                 id="two-services"),
    pytest.param(_mutate(lambda d: d["services"].update({"slim/0": "x"})), SERVICE,
                 id="service-not-mapping"),
    pytest.param(_mutate(lambda d: service(d).update(dataplane={"servers": []})),
                 f"{SERVICE}.dataplane.servers", id="no-servers"),
    pytest.param(_mutate(lambda d: service(d).pop("dataplane")),
                 f"{SERVICE}.dataplane.servers", id="no-dataplane"),
    pytest.param(_mutate(lambda d: service(d).update(dataplane={"servers": {"a": 1}})),
                 f"{SERVICE}.dataplane.servers", id="servers-not-list"),
    pytest.param(_mutate(lambda d: service(d).update(dataplane={"servers": [{}]})),
                 f"{SERVICE}.dataplane.servers[0].endpoint", id="server-without-endpoint"),
    pytest.param(_mutate(lambda d: service(d).update(dataplane={"servers": ["x"]})),
                 f"{SERVICE}.dataplane.servers[0]", id="server-not-mapping"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(endpoint=46357)),
                 f"{SERVICE}.dataplane.servers[0].endpoint", id="endpoint-int"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"].append(
        {"endpoint": "host:port"})), f"{SERVICE}.dataplane.servers[1].endpoint",
        id="endpoint-bad-port"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        endpoint="0.0.0.0:99999")), f"{SERVICE}.dataplane.servers[0].endpoint",
        id="endpoint-port-range"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        endpoint=":46357")), f"{SERVICE}.dataplane.servers[0].endpoint", id="endpoint-no-host"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        endpoint="ftp://h:1")), f"{SERVICE}.dataplane.servers[0].endpoint",
        id="endpoint-bad-scheme"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(endpoint="  ")),
                 f"{SERVICE}.dataplane.servers[0].endpoint", id="endpoint-blank"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        tls={"insecure": "yes"})), f"{SERVICE}.dataplane.servers[0].tls.insecure",
        id="tls-insecure-str"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        tls={"insecure": 1})), f"{SERVICE}.dataplane.servers[0].tls.insecure",
        id="tls-insecure-int"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(tls="on")),
                 f"{SERVICE}.dataplane.servers[0].tls", id="tls-not-mapping"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        tls={"cert_file": 5})), f"{SERVICE}.dataplane.servers[0].tls.cert_file",
        id="tls-cert-file-int"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"]["servers"][0].update(
        tls={"insecure_skip_verify": "no"})),
        f"{SERVICE}.dataplane.servers[0].tls.insecure_skip_verify", id="tls-skip-verify-str"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"].update(clients=[{}])),
                 f"{SERVICE}.dataplane.clients[0].endpoint", id="client-without-endpoint"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"].update(
        clients=[{"endpoint": "gopher://h:1"}])), f"{SERVICE}.dataplane.clients[0].endpoint",
        id="client-bad-scheme"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"].update(clients="x")),
                 f"{SERVICE}.dataplane.clients", id="clients-not-list"),
    pytest.param(_mutate(lambda d: service(d)["dataplane"].update(
        clients=[{"endpoint": "http://h:1", "tls": {"insecure": "no"}}])),
        f"{SERVICE}.dataplane.clients[0].tls.insecure", id="client-tls-insecure-str"),
    pytest.param(_mutate(lambda d: service(d).update(controller={"clients": [{}]})),
                 f"{SERVICE}.controller.clients[0].endpoint", id="controller-no-endpoint"),
    pytest.param(_mutate(lambda d: service(d).update(controller={"clients": [
        {"endpoint": "ftp://h:1"}]})), f"{SERVICE}.controller.clients[0].endpoint",
        id="controller-bad-endpoint"),
    pytest.param(_mutate(lambda d: service(d).update(controller={"token_provider": {
        "shared_secret": 5}})), f"{SERVICE}.controller.token_provider.shared_secret",
        id="token-secret-int"),
    pytest.param(_mutate(lambda d: service(d).update(controller=[1])), f"{SERVICE}.controller",
                 id="controller-not-mapping"),
    pytest.param(_mutate(lambda d: service(d).update(auth={"shared_secret": ["x"]})),
                 f"{SERVICE}.auth.shared_secret", id="auth-secret-list"),
    pytest.param(_mutate(lambda d: service(d).update(auth="secret")), f"{SERVICE}.auth",
                 id="auth-not-mapping"),
    pytest.param(_mutate(lambda d: service(d).update(node_id="")), f"{SERVICE}.node_id",
                 id="empty-node-id"),
    pytest.param(_mutate(lambda d: service(d).update(node_id=7)), f"{SERVICE}.node_id",
                 id="int-node-id"),
    pytest.param(_mutate(lambda d: d.update(runtime={"drain_timeout": "soon"})),
                 "runtime.drain_timeout", id="bad-duration"),
    pytest.param(_mutate(lambda d: d.update(runtime={"drain_timeout": -1})),
                 "runtime.drain_timeout", id="negative-duration"),
    pytest.param(_mutate(lambda d: d.update(runtime={"drain_timeout": "-1s"})),
                 "runtime.drain_timeout", id="negative-duration-str"),
    pytest.param(_mutate(lambda d: d.update(runtime={"drain_timeout": True})),
                 "runtime.drain_timeout", id="bool-duration"),
    pytest.param(_mutate(lambda d: d.update(runtime={"drain_timeout": "10 days"})),
                 "runtime.drain_timeout", id="unknown-unit"),
    pytest.param(_mutate(lambda d: d.update(runtime=[1])), "runtime", id="runtime-list"),
    pytest.param(_mutate(lambda d: d.update(tracing={"log_level": 3})), "tracing.log_level",
                 id="log-level-int"),
    pytest.param(_mutate(lambda d: d.update(tracing="debug")), "tracing",
                 id="tracing-not-mapping"),
    pytest.param(_mutate(lambda d: d.update(tracing={"log_level": "chatty"})), "log_level",
                 id="log-level-unknown"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"max_frame_sise": 1})),
                 f"{SERVICE}.limits", id="unknown-limit"),
    pytest.param(_mutate(lambda d: service(d).update(limits=[1])), f"{SERVICE}.limits",
                 id="limits-not-mapping"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"slow_consumer": "explode"})),
                 f"{SERVICE}.limits.slow_consumer", id="bad-slow-consumer"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"slow_consumer": ["drop"]})),
                 f"{SERVICE}.limits.slow_consumer", id="slow-consumer-list"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"write_deadline": "fast"})),
                 f"{SERVICE}.limits.write_deadline", id="bad-write-deadline"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"keepalive": "1 week"})),
                 f"{SERVICE}.limits.keepalive", id="bad-keepalive"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"hello_timeout": False})),
                 f"{SERVICE}.limits.hello_timeout", id="bool-hello-timeout"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"max_frame_size": 10})),
                 "max_frame_size", id="small-frame-size"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"max_frame_size": "big"})),
                 "max_frame_size", id="str-frame-size"),
    pytest.param(_mutate(lambda d: service(d).update(limits={"ttl": 300})), "ttl",
                 id="ttl-too-big"),
]


@pytest.mark.parametrize(("doc", "path"), ERROR_CASES)
def test_errors_name_the_key_path(doc: Any, path: str) -> None:
    message = config_error(doc)
    assert path in message


@pytest.mark.parametrize("value", [float("nan"), ".nan"])
def test_nan_duration_is_refused(value: Any) -> None:
    doc = minimal()
    doc["runtime"] = {"drain_timeout": yaml.safe_load(value) if isinstance(value, str)
                      else value}
    assert "runtime.drain_timeout" in config_error(doc)
    with pytest.raises(ConfigError):
        parse_duration(float("nan"), "x")


def test_nan_limit_duration_is_refused() -> None:
    doc = minimal()
    service(doc)["limits"] = {"write_deadline": float("nan")}
    config_error(doc)


# -- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10.0), ("500ms", 0.5), ("300us", 0.0003), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("250", 250.0), (" 3s ", 3.0), ("0s", 0.0), ("0.25h", 900.0), (10, 10.0), (0, 0.0),
     (2.5, 2.5), ("10 s", 10.0)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value, "x") == pytest.approx(seconds)
    doc = minimal()
    doc["runtime"] = {"drain_timeout": value}
    assert config_from_mapping(doc).drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "10x", "ten seconds", "-5s", "1e3s", None, [],
                                   {}, True, -0.5])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "where.key")
    assert "where.key" in str(info.value)


def test_default_drain_timeout() -> None:
    assert config_from_mapping(minimal()).drain_timeout == 10.0


# -- busy polling -----------------------------------------------------------------------


def test_busy_poll_is_off_by_default_and_read_from_runtime() -> None:
    assert config_from_mapping(minimal()).busy_poll == 0.0
    assert NodeConfig().busy_poll == 0.0
    doc = minimal()
    doc["runtime"] = {"busy_poll": "300us"}
    assert config_from_mapping(doc).busy_poll == pytest.approx(300e-6)
    doc["runtime"] = {"busy_poll": "10ms"}  # the upper bound is allowed
    assert config_from_mapping(doc).busy_poll == pytest.approx(0.01)


@pytest.mark.parametrize("value", ["11ms", "1s", "-1us", "soon", True, float("nan")])
def test_bad_busy_poll_names_its_key(value: Any) -> None:
    doc = minimal()
    doc["runtime"] = {"busy_poll": value}
    assert "runtime.busy_poll" in config_error(doc)


@pytest.mark.parametrize("value", [-1e-6, 0.011, math.inf, math.nan, True, "300us", None])
def test_node_config_refuses_a_bad_busy_poll(value: Any) -> None:
    with pytest.raises(ConfigError, match="busy_poll"):
        NodeConfig(busy_poll=value)


# -- environment expansion --------------------------------------------------------------


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIM_TEST_PORT", "47000")
    monkeypatch.setenv("SLIM_TEST_SECRET", "from-the-environment")
    monkeypatch.setenv("SLIM_TEST_PEER", "peer.example")
    doc = yaml.safe_load("""
services:
  slim/0:
    dataplane:
      servers:
        - endpoint: "127.0.0.1:${env:SLIM_TEST_PORT}"
      clients:
        - endpoint: "http://${env:SLIM_TEST_PEER}:${env:SLIM_TEST_PORT}"
    controller:
      token_provider:
        shared_secret: ${env:SLIM_TEST_SECRET}
    auth:
      shared_secret: "prefix-${env:SLIM_TEST_SECRET}-suffix"
""")
    config = config_from_mapping(doc)
    assert config.servers[0].endpoint == "127.0.0.1:47000"
    assert config.servers[0].port == 47000
    assert config.links[0].endpoint == "http://peer.example:47000"
    assert config.token_secret == "from-the-environment"
    assert config.shared_secret == "prefix-from-the-environment-suffix"


def test_env_expansion_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIM_TEST_UNSET_VARIABLE", raising=False)
    doc = minimal()
    service(doc)["auth"] = {"shared_secret": "${env:SLIM_TEST_UNSET_VARIABLE}"}
    assert "SLIM_TEST_UNSET_VARIABLE" in config_error(doc)


def test_env_expansion_in_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIM_TEST_LEVEL", "debug")
    path = tmp_path / "config.yaml"
    path.write_text(TUTORIAL_CONFIG.replace("log_level: info", "log_level: ${env:SLIM_TEST_LEVEL}"))
    assert load_config(path).log_level == "debug"


def test_text_without_env_reference_is_kept() -> None:
    doc = minimal()
    service(doc)["auth"] = {"shared_secret": "$HOME ${notenv:X} ${env:} plain"}
    assert config_from_mapping(doc).shared_secret == "$HOME ${notenv:X} ${env:} plain"


# -- our extensions ---------------------------------------------------------------------


def test_auth_and_limits_extensions() -> None:
    doc = yaml.safe_load(TUTORIAL_CONFIG)
    service(doc)["auth"] = {"shared_secret": "a-secret-for-app-and-peer-tokens"}
    service(doc)["limits"] = {"max_frame_size": 2097152, "write_deadline": "2s",
                              "slow_consumer": "drop"}
    config = config_from_mapping(doc)
    assert config.shared_secret == "a-secret-for-app-and-peer-tokens"
    assert config.limits.max_frame_size == 2 * 1024 * 1024
    assert config.limits.write_deadline == 2.0
    assert config.limits.slow_consumer is SlowConsumerPolicy.DROP
    # Everything else keeps its default.
    assert config.limits.max_pending_bytes == Limits().max_pending_bytes
    assert config.limits.hello_timeout == Limits().hello_timeout


def test_extensions_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(TUTORIAL_CONFIG + """\
    auth:
      shared_secret: "a-secret-for-app-and-peer-tokens"
    limits:
      max_frame_size: 2097152
      write_deadline: 2s
      hello_timeout: 500ms
      keepalive: 1m
      slow_consumer: disconnect
""")
    config = load_config(path)
    assert config.shared_secret == "a-secret-for-app-and-peer-tokens"
    assert config.limits.max_frame_size == 2097152
    assert config.limits.write_deadline == 2.0
    assert config.limits.hello_timeout == 0.5
    assert config.limits.keepalive == 60.0
    assert config.limits.slow_consumer is SlowConsumerPolicy.DISCONNECT


@pytest.mark.parametrize("policy", list(SlowConsumerPolicy))
def test_slow_consumer_policies(policy: SlowConsumerPolicy) -> None:
    doc = minimal()
    service(doc)["limits"] = {"slow_consumer": policy.value}
    assert config_from_mapping(doc).limits.slow_consumer is policy


def test_dataplane_clients_become_links() -> None:
    doc = minimal()
    service(doc)["dataplane"]["clients"] = [
        {"endpoint": "http://10.0.0.2:46357"},
        {"endpoint": "https://peer.example:4443", "tls": {"ca_file": "/ca.pem"}},
        {"endpoint": "peer-three"},
    ]
    config = config_from_mapping(doc)
    assert [link.endpoint for link in config.links] == [
        "http://10.0.0.2:46357", "https://peer.example:4443", "peer-three"]
    assert [(link.host, link.port) for link in config.links] == [
        ("10.0.0.2", 46357), ("peer.example", 4443), ("peer-three", 46357)]
    assert config.links[0].tls.insecure is True
    assert config.links[0].ssl_context() is None
    assert config.links[1].tls.insecure is False
    assert config.links[1].tls.ca_file == "/ca.pem"
    assert config.controller_clients == ()


def test_node_id_override_and_log_level_case() -> None:
    doc = minimal()
    service(doc)["node_id"] = "edge-1"
    doc["tracing"] = {"log_level": "DEBUG"}
    config = config_from_mapping(doc)
    assert config.node_id == "edge-1"
    assert config.log_level == "debug"


def test_tls_defaults_from_yaml() -> None:
    doc = minimal()
    servers = service(doc)["dataplane"]["servers"]
    servers.append({"endpoint": "0.0.0.0:4443",
                    "tls": {"cert_file": "/c.pem", "key_file": "/k.pem",
                            "client_ca_file": "/ca.pem"}})
    servers.append({"endpoint": "[::1]:4444", "tls": {}})
    config = config_from_mapping(doc)
    assert config.servers[0].tls == TlsConfig()
    assert config.servers[1].tls == TlsConfig(insecure=False, cert_file="/c.pem",
                                              key_file="/k.pem", ca_file="/ca.pem")
    assert config.servers[2].tls.insecure is True
    assert (config.servers[2].host, config.servers[2].port) == ("::1", 4444)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [("127.0.0.1:46357", ("127.0.0.1", 46357, None)),
     ("http://h:1", ("h", 1, "http")),
     ("HTTPS://h:2", ("h", 2, "https")),
     ("[::1]:9", ("::1", 9, None)),
     ("localhost", ("localhost", 46357, None)),
     ("tls://h", ("h", 46357, "tls"))],
)
def test_split_endpoint(endpoint: str, expected: tuple[str, int, str | None]) -> None:
    assert split_endpoint(endpoint, "x") == expected


def test_dataclass_validation() -> None:
    with pytest.raises(ConfigError):
        NodeConfig(node_id="")
    with pytest.raises(ConfigError):
        NodeConfig(log_level="loud")
    with pytest.raises(ConfigError):
        ServerConfig(endpoint="ftp://h:1")
    with pytest.raises(ConfigError):
        ClientConfig(endpoint="")
    config = NodeConfig()
    assert config.replace(node_id="x").node_id == "x"
    assert config.node_id == "slim/0"


# -- TLS contexts -----------------------------------------------------------------------


def test_insecure_tls_has_no_context() -> None:
    tls = TlsConfig(insecure=True)
    assert tls.server_context() is None
    assert tls.client_context(None) is None
    assert tls.client_context("http") is None
    assert tls.client_context("tcp") is None


def test_server_needs_cert_and_key() -> None:
    with pytest.raises(ConfigError):
        TlsConfig(insecure=False).server_context()
    with pytest.raises(ConfigError):
        TlsConfig(insecure=False, cert_file="/c.pem").server_context()


def test_missing_cert_files(tmp_path: Path) -> None:
    missing = TlsConfig(insecure=False, cert_file=str(tmp_path / "nope.pem"),
                        key_file=str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError) as info:
        missing.server_context()
    assert "certificates" in str(info.value)
    with pytest.raises(ConfigError):
        TlsConfig(insecure=False, ca_file=str(tmp_path / "ca.pem")).client_context("https")
    with pytest.raises(ConfigError):
        missing.client_context("https")


def test_garbage_cert_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    with pytest.raises(ConfigError):
        TlsConfig(insecure=False, cert_file=str(cert), key_file=str(cert)).server_context()
    with pytest.raises(ConfigError):
        TlsConfig(ca_file=str(cert)).client_context("https")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.example")
    base = tmp_path_factory.mktemp("pki")
    paths = {name: str(base / f"{name}.pem") for name in
             ("ca", "server_cert", "server_key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["server_cert"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              hostname: str = "localhost") -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake over memory BIOs (no sockets)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return server, client
    raise AssertionError("TLS handshake did not finish")


def test_trustme_contexts(pki: dict[str, str]) -> None:
    server_tls = TlsConfig(insecure=False, cert_file=pki["server_cert"],
                           key_file=pki["server_key"])
    client_tls = TlsConfig(insecure=False, ca_file=pki["ca"])
    server_ctx = server_tls.server_context()
    client_ctx = client_tls.client_context("https")
    assert isinstance(server_ctx, ssl.SSLContext)
    assert isinstance(client_ctx, ssl.SSLContext)
    assert client_ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_ctx.check_hostname is True
    _, client = handshake(server_ctx, client_ctx)
    peer = client.getpeercert()
    assert peer is not None
    assert ("DNS", "localhost") in peer["subjectAltName"]


def test_tls_enabled_by_ca_or_cert_even_when_insecure(pki: dict[str, str]) -> None:
    # A ca_file on an "insecure" client config still enables TLS for https and tls.
    ctx = TlsConfig(insecure=True, ca_file=pki["ca"]).client_context(None)
    assert isinstance(ctx, ssl.SSLContext)
    assert TlsConfig(insecure=True, ca_file=pki["ca"]).client_context("http") is None
    # An insecure server config with a certificate serves TLS.
    server_ctx = TlsConfig(insecure=True, cert_file=pki["server_cert"],
                           key_file=pki["server_key"]).server_context()
    assert isinstance(server_ctx, ssl.SSLContext)


def test_trustme_mutual_tls(pki: dict[str, str]) -> None:
    server_ctx = TlsConfig(insecure=False, cert_file=pki["server_cert"],
                           key_file=pki["server_key"], ca_file=pki["ca"]).server_context()
    assert server_ctx is not None
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED
    client_ctx = TlsConfig(insecure=False, ca_file=pki["ca"], cert_file=pki["client_cert"],
                           key_file=pki["client_key"]).client_context("https")
    assert client_ctx is not None
    server, _ = handshake(server_ctx, client_ctx)
    peer = server.getpeercert()
    assert peer is not None
    assert ("DNS", "client.example") in peer["subjectAltName"]


def test_client_verifies_the_server(pki: dict[str, str]) -> None:
    server_ctx = TlsConfig(insecure=False, cert_file=pki["server_cert"],
                           key_file=pki["server_key"]).server_context()
    assert server_ctx is not None
    # Without the CA, the default trust store refuses trustme's certificate.
    strict = TlsConfig(insecure=False).client_context("https")
    assert strict is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_ctx, strict)
    # insecure_skip_verify turns verification off.
    lax = TlsConfig(insecure=False, insecure_skip_verify=True).client_context("https")
    assert lax is not None
    assert lax.verify_mode == ssl.CERT_NONE
    handshake(server_ctx, lax)
    # The wrong host name is refused.
    good = TlsConfig(ca_file=pki["ca"]).client_context("https")
    assert good is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_ctx, good, hostname="other.example")


def test_client_config_ssl_context(pki: dict[str, str]) -> None:
    client = ClientConfig(endpoint="https://localhost:4443",
                          tls=TlsConfig(insecure=False, ca_file=pki["ca"]))
    assert isinstance(client.ssl_context(), ssl.SSLContext)
    plain = ClientConfig(endpoint="http://localhost:4443",
                         tls=TlsConfig(insecure=False, ca_file=pki["ca"]))
    assert plain.ssl_context() is None


# -- load_config failures ---------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["services: [unclosed", "a: b: c", "key: 'open", "\t- x: :"])
def test_load_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "services" in str(info.value)


def test_load_non_mapping_document(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_config_is_immutable() -> None:
    config = config_from_mapping(minimal())
    with pytest.raises(AttributeError):
        config.node_id = "x"  # type: ignore[misc]
    assert math.isclose(config.drain_timeout, 10.0)
    assert copy.deepcopy(config) == config
