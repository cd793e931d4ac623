# What the two compat dialects (v0_6, v0_7) share: names that print as
# upstream's, identity and key value types, message contexts, and the façade
# bases over the native App and Session. No protocol logic lives here: every
# operation is a call into slim_agents' native API.
#
# Upstream's objects are handles into a Rust runtime that keeps running on its
# own, so ``await Slim.new(...)`` and ``await slim.connect(...)`` return with
# the connection alive and no ``async with`` block around it. Native apps and
# nodes live inside task groups; here they live in the task group of a
# *background runner*, one per event loop: a task started on the event loop
# through ``anyio.from_thread.run`` from a helper thread (a system task on
# trio, a plain task on asyncio). It ends when the event loop shuts down, or
# earlier for each app or node that is closed.
from __future__ import annotations

import abc
import datetime
import enum
import functools
import importlib
import itertools
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from node_lite import (
    AuthenticationError,
    ConfigError,
    Identity,
    JwtProvider,
    JwtVerifier,
    Node,
    NodeConfig,
    ServerConfig,
    SharedSecretProvider,
    SharedSecretVerifier,
    StaticJwtProvider,
    TlsConfig,
    TokenProvider,
    TokenVerifier,
    instance_id_for,
    open_node,
)
from node_lite import Name as NativeName

from .._app import App, open_app
from .._config import SessionConfig, SessionKind
from .._errors import SessionClosedError
from .._otel import enable_tracing, endpoint_from_config
from .._reports import DeliveryReport
from .._reports import MessageContext as NativeMessageContext
from .._session import Handle
from .._session import Session as NativeSession

log = logging.getLogger("slim_agents.compat")

T = TypeVar("T")
#: Upstream prints an unset (wildcard) instance id as all ones.
WILDCARD_ID = 0xFFFF_FFFF_FFFF_FFFF
_conn_ids = itertools.count(1)

# -- names -----------------------------------------------------------------------------

_xxh64: Callable[[bytes], int] | None
try:
    _xxhash: Any = importlib.import_module("xxhash")
except ImportError:  # optional: names then print without their hashes
    _xxh64 = None
else:
    def _xxh64(data: bytes) -> int:
        return int(_xxhash.xxh64_intdigest(data, seed=0))


@functools.lru_cache(maxsize=4096)
def component_hash(component: str) -> int | None:
    """Upstream's hash of a name component: XXH64 (seed 0) of its UTF-8 bytes and 0xFF.

    ``None`` when the ``xxhash`` package is not installed.
    """
    if _xxh64 is None:
        return None
    return _xxh64(component.encode() + b"\xff")


class Name:
    """A SLIM name: three strings and an instance id (unset means any instance).

    ``str()`` prints as upstream v0.6 does:
    ``169ca82eb17d6bc2/eef9769a4c6990d1/fc9bbc406957794b/ffffffffffffffff
    (agntcy/ns/moderator/ffffffffffffffff)``; without the ``xxhash`` package,
    only the part in parentheses.
    """

    __slots__ = ("_base", "_id")

    def __init__(self, component0: str, component1: str, component2: str,
                 id: int | None = None) -> None:
        self._base = NativeName(component0, component1, component2)
        self._id: int | None = None
        self.id = id

    @property
    def id(self) -> int:
        """The instance id; ``0xffffffffffffffff`` when unset."""
        return WILDCARD_ID if self._id is None else self._id

    @id.setter
    def id(self, value: int | None) -> None:
        if value is not None and (type(value) is not int or not 0 <= value <= WILDCARD_ID):
            raise ValueError(f"an instance id is an integer in [0, 2**64), got {value!r}")
        self._id = None if value == WILDCARD_ID else value

    def set_id(self, id: int) -> None:
        self.id = id

    def components(self) -> list[int]:
        """The four numeric components: three string hashes and the id.

        :raises RuntimeError: when the ``xxhash`` package is not installed.
        """
        hashes = [component_hash(c) for c in self._base.service]
        if None in hashes:
            raise RuntimeError("name hashes need the xxhash package (pip install xxhash)")
        return [h for h in hashes if h is not None] + [self.id]

    def components_strings(self) -> list[str]:
        return list(self._base.service)

    def equal_without_id(self, name: Name) -> bool:
        return self._base == name._base

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Name):
            return NotImplemented
        return self._base == other._base and self._id == other._id

    def __hash__(self) -> int:
        return hash((self._base, self._id))

    def __str__(self) -> str:
        strings = f"{'/'.join(self._base.service)}/{self.id:x}"
        hashes = [component_hash(c) for c in self._base.service]
        if any(h is None for h in hashes):
            return strings
        return f"{'/'.join(f'{h:x}' for h in hashes)}/{self.id:x} ({strings})"

    def __repr__(self) -> str:
        org, ns, app = self._base.service
        return f"{type(self).__name__}({org!r}, {ns!r}, {app!r}, id={self._id!r})"

    # -- native conversions ------------------------------------------------------------

    def to_native(self) -> NativeName:
        """The native :class:`slim_agents.Name` (an unset id becomes ``None``)."""
        return self._base.with_id(self._id)

    @classmethod
    def from_native(cls, name: NativeName) -> Self:
        return cls(name.org, name.ns, name.app, name.id)


def split_id(id: str) -> Name:
    """``Name`` from ``org/ns/app`` (the examples' helper; exactly three parts)."""
    try:
        organization, namespace, app = id.split("/")
    except ValueError:
        raise ValueError(
            f"IDs must be in the format organization/namespace/app-or-stream, got {id!r}"
        ) from None
    return Name(organization, namespace, app)


# -- keys and identities -----------------------------------------------------------------


class Algorithm(enum.Enum):
    """JWT signature algorithms (upstream ``PyAlgorithm`` / ``Algorithm``)."""

    HS256 = "HS256"
    HS384 = "HS384"
    HS512 = "HS512"
    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    PS384 = "PS384"
    PS512 = "PS512"
    ES256 = "ES256"
    ES384 = "ES384"
    EdDSA = "EdDSA"


class KeyFormat(enum.Enum):
    """How key data is encoded (upstream ``PyKeyFormat`` / ``KeyFormat``)."""

    Pem = "pem"
    Jwk = "jwk"
    Jwks = "jwks"


class KeyData:
    """Where key data is: ``KeyData.File(path)`` or ``KeyData.Content(content)``."""

    __slots__ = ("content", "path")

    def __init__(self, *, path: str | None = None, content: str | None = None) -> None:
        if (path is None) == (content is None):
            raise ConfigError("key data is either a file path or a content string")
        self.path = path
        self.content = content

    @classmethod
    def File(cls, path: str) -> Self:
        return cls(path=str(path))

    @classmethod
    def Content(cls, content: str) -> Self:
        return cls(content=content)

    def read(self) -> str:
        if self.content is not None:
            return self.content
        assert self.path is not None
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read key file {self.path}: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"KeyData.File({self.path!r})" if self.path is not None else \
            "KeyData.Content(...)"


class Key:
    """A key for JWT signing or verification: algorithm, format and data."""

    __slots__ = ("algorithm", "format", "key")

    def __init__(self, algorithm: Algorithm, format: KeyFormat, key: KeyData) -> None:
        if not isinstance(algorithm, Algorithm) or not isinstance(format, KeyFormat) \
                or not isinstance(key, KeyData):
            raise ConfigError("Key(algorithm=Algorithm.X, format=KeyFormat.Y, key=KeyData...)")
        self.algorithm = algorithm
        self.format = format
        self.key = key

    def material(self) -> Any:
        """The key as node_lite's JWT classes take it: PEM text, a JWK or a JWKS."""
        text = self.key.read()
        if self.format is KeyFormat.Pem:
            return text
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ConfigError(f"{self.format.name} key data is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{self.format.name} key data must be a JSON object")
        return value

    def __repr__(self) -> str:
        return f"Key({self.algorithm.name}, {self.format.name}, {self.key!r})"


def _flat_strings(value: str | Sequence[Any] | None) -> list[str]:
    # The examples pass ``audience=[aud]`` where aud is itself a list.
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    for item in value:
        out.extend(_flat_strings(item))
    return out


def _seconds(value: datetime.timedelta | float | None, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a non-negative duration, got {value!r}")
    return seconds


class IdentityProvider:
    """Makes this app's identity tokens (upstream ``PyIdentityProvider``).

    Each Slim instance gets its own native provider: for a shared secret, its
    subject (and so the instance id) is ``<identity>_<random suffix>``.
    """

    __slots__ = ("_factory", "kind")

    def __init__(self, kind: str, factory: Callable[[], TokenProvider]) -> None:
        self.kind = kind
        self._factory = factory
        factory()  # refuse bad settings now, not at connect time

    @classmethod
    def SharedSecret(cls, identity: str, shared_secret: str) -> Self:
        return cls("SharedSecret", lambda: SharedSecretProvider(identity, shared_secret))

    @classmethod
    def StaticJwt(cls, path: str) -> Self:
        return cls("StaticJwt", lambda: StaticJwtProvider(path))

    @classmethod
    def Jwt(cls, private_key: Key,
            duration: datetime.timedelta = datetime.timedelta(hours=1),
            issuer: str | None = None, audience: Sequence[str] | str | None = None,
            subject: str | None = None) -> Self:
        if subject is None:
            raise ConfigError("a signing JWT provider needs a subject (the identity)")
        seconds = _seconds(duration, "duration") or 3600.0
        auds = _flat_strings(audience)
        return cls("Jwt", lambda: JwtProvider(
            private_key.material(), algorithm=private_key.algorithm.value, subject=subject,
            issuer=issuer, audience=auds or None, duration=seconds))

    def native(self) -> TokenProvider:
        """A new native token provider."""
        return self._factory()

    def __repr__(self) -> str:
        return f"IdentityProvider.{self.kind}(...)"


class _SubjectVerifier:
    """Accepts only tokens of one subject (upstream's verifier ``subject=``)."""

    def __init__(self, inner: TokenVerifier, subject: str) -> None:
        self._inner = inner
        self._subject = subject

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        identity = self._inner.verify(token, now=now)
        if identity.subject != self._subject:
            raise AuthenticationError("subject", detail=f"subject {identity.subject!r} "
                                      "not accepted")
        return identity


class IdentityVerifier:
    """Checks the identity tokens of peers (upstream ``PyIdentityVerifier``)."""

    __slots__ = ("_factory", "kind")

    def __init__(self, kind: str, factory: Callable[[], TokenVerifier]) -> None:
        self.kind = kind
        self._factory = factory
        factory()

    @classmethod
    def SharedSecret(cls, identity: str, shared_secret: str) -> Self:
        # Upstream does not check the identity either; tokens ride on many
        # messages, so no replay cache (duplicates are caught by message id).
        return cls("SharedSecret", lambda: SharedSecretVerifier(shared_secret, replay_cache=0))

    @classmethod
    def Jwt(cls, public_key: Key | None = None, autoresolve: bool = False,
            issuer: str | None = None, audience: Sequence[Any] | str | None = None,
            subject: str | None = None, require_iss: bool = False, require_aud: bool = False,
            require_sub: bool = False) -> Self:
        if public_key is None:
            raise ConfigError("JWKS auto-resolution (autoresolve=True) is not supported: "
                              "give public_key=Key(...)" if autoresolve else
                              "a JWT verifier needs public_key=Key(...)")
        auds = _flat_strings(audience)
        require = ["exp", "iat", "sub"]
        if require_iss:
            require.append("iss")
        if require_aud:
            require.append("aud")

        def make() -> TokenVerifier:
            material = public_key.material()
            # A JWKS names its keys' algorithms; the tutorial hard-codes RS256 with one.
            algorithms = None if public_key.format is KeyFormat.Jwks else \
                [public_key.algorithm.value]
            verifier: TokenVerifier = JwtVerifier(
                keys=material, algorithms=algorithms, issuer=issuer,
                audience=auds or None, require=require)
            return verifier if subject is None else _SubjectVerifier(verifier, subject)

        return cls("Jwt", make)

    def native(self) -> TokenVerifier:
        return self._factory()

    def __repr__(self) -> str:
        return f"IdentityVerifier.{self.kind}(...)"


# -- messages and configurations -----------------------------------------------------------


class SessionType(enum.Enum):
    """Kinds of session (upstream ``PySessionType`` / ``SessionType``)."""

    PointToPoint = "PointToPoint"
    Group = "Group"


class MessageContext:
    """What arrives with a message's bytes (upstream ``PyMessageContext``)."""

    __slots__ = ("_native", "destination_name", "identity", "input_connection", "metadata",
                 "payload_type", "source_name")

    def __init__(self, native: NativeMessageContext) -> None:
        self._native = native
        self.source_name = Name.from_native(native.source_name)
        self.destination_name = (None if native.destination_name is None
                                 else Name.from_native(native.destination_name))
        self.payload_type = native.payload_type or "msg"
        self.metadata: dict[str, str] = dict(native.metadata)
        self.input_connection = native.input_connection
        self.identity = native.identity

    @property
    def native(self) -> NativeMessageContext:
        return self._native

    def __repr__(self) -> str:
        return (f"MessageContext(source_name={self.source_name}, destination_name="
                f"{self.destination_name}, payload_type={self.payload_type!r}, "
                f"metadata={self.metadata!r})")


class _ConfigBase:
    """Fields shared by both dialects' session configurations."""

    __slots__ = ("destination_name", "max_retries", "metadata", "mls_enabled", "session_type",
                 "timeout")

    def __init__(self, session_type: SessionType, destination_name: Name | None,
                 timeout: datetime.timedelta | None, max_retries: int | None,
                 mls_enabled: bool, metadata: Mapping[str, str] | None) -> None:
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            timeout = datetime.timedelta(seconds=float(timeout))
        self.session_type = session_type
        self.destination_name = destination_name
        self.timeout = timeout
        self.max_retries = max_retries
        self.mls_enabled = mls_enabled
        self.metadata: dict[str, str] = dict(metadata or {})
        self.native()  # validate now

    def native(self) -> SessionConfig:
        kind = (SessionKind.GROUP if self.session_type is SessionType.Group
                else SessionKind.POINT_TO_POINT)
        timeout = None if self.timeout is None else self.timeout.total_seconds()
        return SessionConfig(kind=kind, timeout=timeout, max_retries=self.max_retries,
                             mls_enabled=self.mls_enabled, metadata=self.metadata)

    def _key(self) -> tuple[Any, ...]:
        return (self.session_type, self.destination_name, self.timeout, self.max_retries,
                self.mls_enabled, self.metadata)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _ConfigBase)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.session_type, self.destination_name, self.timeout,
                     self.max_retries, self.mls_enabled, tuple(sorted(self.metadata.items()))))

    def __repr__(self) -> str:
        dest = "peer_name" if self.session_type is SessionType.PointToPoint else "channel_name"
        return (f"{self.session_type.value}({dest}={self.destination_name}, "
                f"timeout={self.timeout}, max_retries={self.max_retries}, "
                f"mls_enabled={self.mls_enabled}, metadata={self.metadata})")

    __str__ = __repr__


# -- errors and tracing -----------------------------------------------------------------------


class SLIMTimeoutError(TimeoutError):
    """Upstream's timeout error type (exported by upstream, raised by nothing there)."""

    def __init__(self, message_id: int, session_id: int, message: str = "SLIM timeout error",
                 original_exception: BaseException | None = None) -> None:
        super().__init__(f"{message} for message {message_id} in session {session_id}")
        self.message_id = message_id
        self.session_id = session_id
        self.message = message
        self.original_exception = original_exception


class _Done:
    """An awaitable that is already finished (``init_tracing`` may or may not be awaited)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator

    def __repr__(self) -> str:
        return "<done>"


_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def init_tracing(config: Mapping[str, Any] | None = None) -> Awaitable[None]:
    """Set the log level of this package's loggers from ``config["log_level"]``.

    With ``{"opentelemetry": {"enabled": True, "http": {"endpoint": ...}}}``
    agents' spans are exported over OTLP/HTTP (the ``otel`` extra). Returns an
    awaitable that is already done, so both ``init_tracing(...)`` and
    ``await init_tracing(...)`` work.
    """
    level = _LEVELS.get(str((config or {}).get("log_level", "info")).lower(), logging.INFO)
    for name in ("slim_agents", "node_lite"):
        logging.getLogger(name).setLevel(level)
    endpoint = endpoint_from_config(config)
    if endpoint is not None:
        try:
            enable_tracing(endpoint=endpoint)
        except ConfigError as exc:  # the extra is not installed: say so, run without
            logging.getLogger("slim_agents").warning("%s", exc)
    return _Done()


def get_version() -> str:
    """The installed slim-agents version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slim-agents")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


# -- the background runner ---------------------------------------------------------------------


class _Runner:
    """A task group that outlives the caller's tasks (see the module comment)."""

    def __init__(self) -> None:
        self.tg: TaskGroup | None = None
        self.ready = anyio.Event()
        self.error: BaseException | None = None

    def thread_main(self, token: anyio.lowlevel.EventLoopToken) -> None:
        try:
            anyio.from_thread.run(self.main, token=token)
        except BaseException as exc:  # the loop is gone: nothing is left to run
            self.error = exc

    async def main(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                self.ready.set()
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            # The event loop is shutting down; what ran here has been closed.
            # Ending normally keeps asyncio.run() from reporting this task.
            pass
        finally:
            self.tg = None
            self.ready.set()


_runner_var: anyio.lowlevel.RunVar[_Runner] = anyio.lowlevel.RunVar("slim_agents_compat_runner")


async def _runner() -> TaskGroup:
    """The background task group of the current event loop (started on first use)."""
    try:
        runner = _runner_var.get()
    except LookupError:
        runner = _Runner()
        _runner_var.set(runner)
        threading.Thread(target=runner.thread_main, args=(anyio.lowlevel.current_token(),),
                         name="slim-agents-compat", daemon=True).start()
    await runner.ready.wait()
    if runner.tg is None:
        raise RuntimeError(f"the background runner has stopped: {runner.error!r}")
    return runner.tg


class _Hosted(Generic[T]):
    """An object living in the runner (an app or a node) until :meth:`stop`."""

    def __init__(self, value: T, stop: anyio.Event, stopped: anyio.Event) -> None:
        self.value = value
        self._stop = stop
        self._stopped = stopped

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


async def _host(open_cm: Callable[[], Any], what: str,
                *, task_status: TaskStatus[_Hosted[Any]]) -> None:
    stop, stopped = anyio.Event(), anyio.Event()
    started = False
    try:
        async with open_cm() as value:
            task_status.started(_Hosted(value, stop, stopped))
            started = True
            await stop.wait()
    except Exception:
        if not started:
            raise
        log.exception("%s stopped on an error", what)
    finally:
        stopped.set()


async def _start_hosted(open_cm: Callable[[], Any], what: str) -> _Hosted[Any]:
    tg = await _runner()
    hosted: _Hosted[Any] = await tg.start(functools.partial(_host, open_cm, what))
    return hosted


class _Operation(Generic[T]):
    """An operation run in the runner, so that it goes on without its caller."""

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    @classmethod
    async def start(cls, fn: Callable[[], Awaitable[T]]) -> _Operation[T]:
        op = cls()
        tg = await _runner()
        tg.start_soon(op._run, fn)
        return op

    async def _run(self, fn: Callable[[], Awaitable[T]]) -> None:
        try:
            self._result = await fn()
        except Exception as exc:
            self._error = exc
        except BaseException:
            self._error = RuntimeError("the operation was cancelled (event loop shutting down)")
            raise
        finally:
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


# -- façade bases -------------------------------------------------------------------------------


def _tls(raw: object) -> TlsConfig:
    if raw is None:
        return TlsConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tls: expected a mapping, got {type(raw).__name__}")
    return TlsConfig(
        insecure=bool(raw.get("insecure", not raw)),
        cert_file=raw.get("cert_file"), key_file=raw.get("key_file"),
        ca_file=raw.get("ca_file") or raw.get("client_ca_file"),
        insecure_skip_verify=bool(raw.get("insecure_skip_verify", False)))


def _endpoint(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping) or not isinstance(config.get("endpoint"), str):
        raise ConfigError('expected a mapping with an "endpoint" string')
    endpoint: str = config["endpoint"]
    return endpoint


class _SessionBase(abc.ABC):
    """Properties and receiving, common to ``PySession`` (v0.6) and ``Session`` (v0.7)."""

    def __init__(self, native: NativeSession, created: Handle[Any] | None,
                 config: _ConfigBase | None, destination: Name | None = None) -> None:
        self._native = native
        self._created = created
        self._config = config
        self._destination = destination if destination is not None else \
            config.destination_name if config is not None else None
        self._deleted = False

    # -- properties ----------------------------------------------------------------------

    @property
    def native(self) -> NativeSession:
        """The native :class:`slim_agents.Session` behind this one."""
        return self._native

    @property
    def id(self) -> int:
        return self._native.id

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._native.metadata)

    @property
    def session_type(self) -> SessionType:
        return (SessionType.Group if self._native.kind is SessionKind.GROUP
                else SessionType.PointToPoint)

    @property
    def src(self) -> Name:
        return Name.from_native(self._native.src)

    @property
    def dst(self) -> Name | None:
        dst = self._native.dst
        if dst is None:  # a point-to-point session still discovering its peer
            return self._destination
        return Name.from_native(dst)

    @property
    def session_config(self) -> _ConfigBase:
        if self._config is None:
            self._config = self._config_from_native(self._native.config, self.dst)
        return self._config

    @abc.abstractmethod
    def _config_from_native(self, config: SessionConfig, dst: Name | None) -> _ConfigBase:
        """The dialect's configuration object for a native one."""

    # -- internals -----------------------------------------------------------------------

    def _check_deleted(self) -> None:
        if self._deleted:
            raise SessionClosedError(self._native.id, "deleted")

    async def _ready(self) -> NativeSession:
        """The native session once established (raising why it could not be)."""
        self._check_deleted()
        if self._created is not None:
            await self._created
        return self._native

    def _mark_deleted(self) -> None:
        self._check_deleted()
        if self._native.is_closed:
            raise SessionClosedError(self._native.id, self._native.close_reason or "closed")
        self._deleted = True

    async def _get_message(self, timeout: datetime.timedelta | float | None  # noqa: ASYNC109
                           ) -> tuple[MessageContext, bytes]:
        self._check_deleted()
        seconds = _seconds(timeout, "timeout")
        if seconds is None:
            msg = await self._native.get_message()
        else:
            with anyio.move_on_after(seconds):
                msg = await self._native.get_message()
                return MessageContext(msg.context), msg.payload
            raise TimeoutError("receive timed out waiting for a message")
        return MessageContext(msg.context), msg.payload

    async def _publish(self, msg: bytes, payload_type: str | None,
                       metadata: Mapping[str, str] | None,
                       to: MessageContext | None = None) -> Handle[DeliveryReport]:
        native = await self._ready()
        if to is None:
            return await native.publish(msg, payload_type=payload_type, metadata=metadata)
        return await native.publish_to(to.native, msg, payload_type=payload_type,
                                       metadata=metadata)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.id} {self.session_type.value} "
                f"dst={self.dst}{' deleted' if self._deleted else ''}>")


S = TypeVar("S", bound=_SessionBase)


class _SlimBase(Generic[S]):
    """The ``Slim`` façade, minus what differs between v0.6 and v0.7."""

    _session_type: ClassVar[type[_SessionBase]]

    def __init__(self, name: Name, provider: IdentityProvider, verifier: IdentityVerifier,
                 local_service: bool = False) -> None:
        if not isinstance(name, Name):
            raise TypeError(f"name must be a Name, got {type(name).__name__}")
        if not isinstance(provider, IdentityProvider) or \
                not isinstance(verifier, IdentityVerifier):
            raise TypeError("provider and verifier must be an IdentityProvider and an "
                            "IdentityVerifier")
        self._base = name.to_native().without_id()
        self._provider = provider.native()
        self._verifier = verifier.native()
        self._id = instance_id_for(self._provider.subject)
        self.local_service = local_service
        self._app: _Hosted[App] | None = None
        self._app_node: Node | None = None
        self._servers: dict[str, _Hosted[Node]] = {}
        #: Connection ids by endpoint, and the one connection routes use (as upstream).
        self.conn_ids: dict[str, int] = {}
        self.conn_id: int | None = None

    # -- identity ------------------------------------------------------------------------

    @property
    def id(self) -> int:
        """This instance's numeric id (from its identity)."""
        return self._id

    @property
    def id_str(self) -> str:
        """``org/ns/app/<decimal id>``."""
        return f"{self._base}/{self._id}"

    @property
    def local_name(self) -> Name:
        """This app's full name (with its id)."""
        return Name.from_native(self._base.with_id(self._id))

    @property
    def app(self) -> App | None:
        """The native :class:`slim_agents.App` while connected."""
        return self._app.value if self._app is not None else None

    @property
    def server_endpoints(self) -> list[str]:
        """The bound ``host:port`` of each server started by :meth:`run_server`."""
        return sorted({hosted.value.endpoint for hosted in self._servers.values()})

    def _require_app(self) -> App:
        if self._app is None:
            raise RuntimeError("No active connection. Please connect first.")
        return self._app.value

    async def _start_app(self, target: str | Node, tls: TlsConfig | None) -> None:
        base, provider, verifier = self._base, self._provider, self._verifier
        self._app = await _start_hosted(
            lambda: open_app(base, node=target, provider=provider, verifier=verifier, tls=tls,
                             reconnect=not isinstance(target, Node)),
            f"app {self.id_str}")
        # Another network (upstream SLIM) may give its own instance id: that one counts.
        self._id = self._app.value.id
        self._app_node = target if isinstance(target, Node) else None

    # -- connections and servers ---------------------------------------------------------

    async def connect(self, client_config: Mapping[str, Any]) -> int:
        """Connect to a node, e.g. ``{"endpoint": "http://127.0.0.1:46357", "tls":
        {"insecure": True}}``; returns a connection id.

        One connection per instance, as upstream's façade.
        """
        endpoint = _endpoint(client_config)
        if self._app is not None:
            raise RuntimeError("already connected (one connection per Slim instance)"
                               if self._app_node is None else
                               "this instance serves its own node (run_server); connecting "
                               "it to another node is not supported")
        await self._start_app(endpoint, _tls(client_config.get("tls")))
        conn_id = next(_conn_ids)
        self.conn_ids[endpoint] = conn_id
        self.conn_id = conn_id
        return conn_id

    async def disconnect(self, endpoint: str) -> None:
        """Close the connection made by :meth:`connect` (and every session on it)."""
        if endpoint not in self.conn_ids:
            raise KeyError(f"not connected to {endpoint}")
        del self.conn_ids[endpoint]
        self.conn_id = None
        await self._stop_app()

    async def _stop_app(self) -> None:
        hosted, self._app, self._app_node = self._app, None, None
        if hosted is not None:
            await hosted.stop()

    async def run_server(self, config: Mapping[str, Any]) -> str:
        """Start a node in this process listening on ``config["endpoint"]`` (port 0
        picks a free port); returns the bound ``host:port``.

        This instance's own app is attached to the node when it has no connection yet.
        """
        endpoint = _endpoint(config)
        node_config = NodeConfig(servers=(ServerConfig(endpoint=endpoint,
                                                       tls=_tls(config.get("tls"))),))
        hosted: _Hosted[Node] = await _start_hosted(lambda: open_node(node_config),
                                                    f"server {endpoint}")
        bound = hosted.value.endpoint
        self._servers[endpoint] = self._servers[bound] = hosted
        if self._app is None:
            await self._start_app(hosted.value, None)
        return bound

    async def stop_server(self, endpoint: str) -> None:
        """Stop a server started by :meth:`run_server` (by the endpoint given or bound)."""
        hosted = self._servers.get(endpoint)
        if hosted is None:
            raise KeyError(f"no server at {endpoint}")
        for key in [k for k, v in self._servers.items() if v is hosted]:
            del self._servers[key]
        if self._app_node is hosted.value:
            await self._stop_app()
        await hosted.stop()

    async def aclose(self) -> None:
        """Close the connection and stop the servers of this instance (an extension:
        upstream instances live until the process ends)."""
        self.conn_ids.clear()
        self.conn_id = None
        await self._stop_app()
        for hosted in list(dict.fromkeys(self._servers.values())):
            await hosted.stop()
        self._servers.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- routes --------------------------------------------------------------------------

    def _require_connection(self) -> App:
        if self.conn_id is None:
            raise RuntimeError("No active connection. Please connect first.")
        return self._require_app()

    async def set_route(self, name: Name) -> None:
        """Accepted as upstream (routes are automatic on node_lite); needs :meth:`connect`."""
        await self._require_connection().set_route(name.to_native())

    async def remove_route(self, name: Name) -> None:
        await self._require_connection().remove_route(name.to_native())

    async def subscribe(self, name: Name) -> None:
        """Receive what is sent to ``name`` too."""
        await self._require_app().subscribe(name.to_native())

    async def unsubscribe(self, name: Name) -> None:
        await self._require_app().unsubscribe(name.to_native())

    # -- sessions ------------------------------------------------------------------------

    def _wrap(self, native: NativeSession, created: Handle[Any] | None,
              config: _ConfigBase | None) -> S:
        session: S = self._session_type(native, created, config)  # type: ignore[assignment]
        return session

    async def listen_for_session(self, timeout: datetime.timedelta | float | None = None  # noqa: ASYNC109
                                 ) -> S:
        """Wait for a session another app created with this one.

        :raises TimeoutError: ("listen_for_session timed out") after ``timeout``.
        """
        app = self._require_app()
        seconds = _seconds(timeout, "timeout")
        if seconds is None:
            return self._wrap(await app.listen_for_session(), None, None)
        with anyio.move_on_after(seconds):
            return self._wrap(await app.listen_for_session(), None, None)
        raise TimeoutError("listen_for_session timed out")

    async def _start_session(self, destination: Name, config: _ConfigBase
                             ) -> tuple[NativeSession, Handle[Any]]:
        app = self._require_app()
        return await app.start_session(destination.to_native(), config.native())

    def __repr__(self) -> str:
        state = "connected" if self._app is not None else "not connected"
        return f"<{type(self).__name__} {self.id_str} {state}>"
