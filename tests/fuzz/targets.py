"""Fuzz targets: bytes in, and only the declared errors out.

Each :class:`Target` takes one input and may raise only its ``allowed`` errors;
anything else is a crash. The atheris runner (``python -m tests.fuzz``) drives
them coverage-guided; ``test_seeds.py`` replays their examples and the saved
regression seeds in the normal test run (no atheris needed).

Where a signature or MAC would stop random input at the door, a mode (the first
input byte) signs the fuzzed bytes with a key the target holds, so the parsing
behind the check is reached too (a malicious but authenticated peer).
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import hmac
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from node_lite import (
    AuthenticationError,
    JwtProvider,
    JwtVerifier,
    Limits,
    Name,
    NodeCore,
    ProtocolError,
    SharedSecretProvider,
    SharedSecretVerifier,
    instance_id_for,
)
from node_lite._auth import parse_unverified
from node_lite._jwt import _unverified_claims
from node_lite.wire import (
    FlowDecoding,
    FrameDecoder,
    Hello,
    Publish,
    Subscribe,
    check_publish,
    decode_frame,
    decode_message,
    encode,
    encode_frame,
    timestamp_marks,
)
from slim_agents._app_core import AppCore
from slim_agents._config import SessionConfig
from slim_agents._e2e import (
    Credential,
    E2EError,
    GroupState,
    SigningIdentity,
    decode_key_package,
    make_key_package,
)
from slim_agents._e2e_base import LABEL_COMMIT, LABEL_ENV, LABEL_WELCOME, seal_signed, unpack
from slim_agents._e2e_commit import open_commit, open_envelope, open_welcome
from slim_agents._e2e_epoch import parse_app
from slim_agents._errors import SessionClosedError
from slim_agents._protocol import (
    ProtocolViolation,
    decode_body,
    int_of,
    members_of,
    ranges_of,
    reliability_of,
)
from slim_agents._reliability import SendStream
from slim_agents._session_core import WindowFull
from tests.slim_agents.harness import Net

SECRET = "fuzz-secret-that-is-long-enough-for-hmac-0123456789"
NOW = 1_700_000_000.0
LIMITS = Limits()
AAD = b"fuzz-aad"


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    examples: Callable[[], list[bytes]]

    def check(self, data: bytes) -> None:
        """Run one input; a declared error is a pass, anything else propagates."""
        try:
            self.run(data)
        except self.allowed:
            pass


# Hostile msgpack bodies (section 3.4): container and bin headers claiming 2**32
# elements, deep nesting, ext types (the timestamp ext too), non-str and repeated
# keys, trailing bytes, a lone header.
HOSTILE_BODIES = [
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff" + b"x" * 16,
    b"\x91" * 10_000 + b"\xc0", b"\x81\xa1a" * 5_000 + b"\xc0",
    # Nested past Python's recursion limit, with a timestamp inside (found by fuzzing).
    b"\x83\xa1v\x01\xa1t\xa3pub\xa1x" + b"\x91" * 900 + b"\xd6\xff" + bytes(4),
    msgpack.packb({"v": 1, "t": "pub", "x": msgpack.Timestamp(1, 0)}),
    msgpack.packb({"v": 1, "t": "pub", "x": msgpack.ExtType(5, b"x")}),
    b"\x82\x01\x01\xa1t\xa3pub", b"\x83\xa1v\x01\xa1t\xa3pub\xa1t\xa5hello",
    msgpack.packb({"v": 1, "t": "pub"}) + b"\x00", b"\xde", b"",
    msgpack.packb({"v": 2, "t": "pub"}), msgpack.packb({"v": 1, "t": 7}),
    msgpack.packb({"v": 1, "t": "pub", "src": ["o", "n", "a", -1], "dst": ["o", "n", "b", 2**64 - 1],
                   "fan": 0, "ttl": 999, "body": "text", "meta": {"k": 1}}),
    msgpack.packb({"v": 1, "t": "hello", "role": "app", "tok": "x" * 9000,
                   "name": ["o" * 300, "n", "a", 1]}),
    msgpack.packb({"v": 1, "t": "sub", "name": ["o", "n", "a", None], "rid": 1,
                   "meta": {str(i): "v" for i in range(100)}}),
]


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _mode(data: bytes, modes: int) -> tuple[int, bytes]:
    return (data[0] % modes, data[1:]) if data else (0, b"")


# -- wire: frame splitting, envelope and schema ------------------------------------------


def wire(data: bytes) -> None:
    """Split a byte stream in chunks chosen by the first byte; decode every frame.

    A frame that decodes must survive a re-encode unchanged.
    """
    step, data = _mode(data, 256)
    size = max(1, len(data) if step < 128 else step % 17 + 1)
    decoder = FrameDecoder(LIMITS.max_frame_size)
    for i in range(0, len(data), size):
        for frame in decoder.feed(data[i:i + size]):
            d = decode_frame(frame[4:])
            msg = decode_message(d, LIMITS)
            if d["t"] == "pub":
                check_publish(dict(d), LIMITS, set())
            again = decode_message(decode_frame(encode(msg)), LIMITS)
            assert again == msg, (msg, again)


def _wire_examples() -> list[bytes]:
    a, b = Name("org", "ns", "a", 1), Name("org", "ns", "b", 2)
    frames = [
        Hello(token="tok", name=a), Subscribe(name=b.without_id(), request_id=7),
        Publish(source=a, destination=b, payload=b"x" * 40, session_id=5, message_id=9,
                metadata={"k": "v"}, payload_type="msg"),
    ]
    stream = b"".join(encode_frame(f) for f in frames)
    return [b"\x00" + stream, b"\x85" + stream, b"\x00" + encode_frame({"v": 1, "t": "zz"}),
            b"\x00\x7f\xff\xff\xff", b"\x00\x00\x00\x00\x64" + b"x" * 50,
            *(b"\x00" + _frame(b) for b in HOSTILE_BODIES)]


# -- flows: a connection's flow decoding against the full decoding -----------------------

_FLOW_HEAD = {"v": 1, "t": "pub", "src": ["org", "ns", "a", 1], "dst": ["org", "ns", "b", 2],
              "fan": 1, "ttl": 8, "sid": 5, "st": 1, "k": 1}


def _outcome(decode: Callable[[bytes], dict[str, Any]], frame: bytes) -> tuple[Any, ...]:
    try:
        return ("ok", decode(frame))
    except ProtocolError as exc:
        return ("error", type(exc), str(exc))


def flows(data: bytes) -> None:
    """A FlowDecoding taught a valid frame of 1 + (first byte % 4) tail fields, then
    given the rest: as a whole frame (mode < 128) or as that flow's tail. It must give
    what decode_frame gives (map or error), with the caller's timestamp marks or
    without, marked checked only when the map passes check_publish (an unmarked one
    is checked by its reader)."""
    mode, data = _mode(data, 256)
    extra = mode % 4
    fill = {f"f{i}": b"" for i in range(extra)}
    teacher = msgpack.packb({**_FLOW_HEAD, "mid": 1, **fill, "body": b"x"})
    frame = data if mode < 128 else teacher[:teacher.index(b"\xa3mid") + 4] + data
    decoder, lazy = FlowDecoding(LIMITS), FlowDecoding(LIMITS)
    decoder.decode(teacher, 0, len(teacher), check_ext=False)
    lazy.decode(teacher, 0, len(teacher))
    marks = bool(timestamp_marks(frame))
    got = _outcome(lambda f: decoder.decode(f, 0, len(f), check_ext=marks), frame)
    full = _outcome(lambda f: decode_frame(f, check_ext=marks), frame)
    assert got == full, (got, full)
    # Without the marks, the decoder finds the timestamps it must refuse itself.
    unmarked = _outcome(lambda f: lazy.decode(f, 0, len(f)), frame)
    assert unmarked == full, (unmarked, full)
    if got[0] == "ok" and getattr(got[1], "checked", None) is LIMITS:
        check_publish(dict(full[1]), LIMITS, set())


def _flow_examples() -> list[bytes]:
    tails = [b"\x02\xa4body\xc4\x01y", b"\x02\xa3src\xc0\xa4body\xc4\x00",
             b"\x02\xa2pt\xa1x\xa4body\xc4\x00", b"\xff\xa4body\xc4\x00",
             b"\x02\xa4body\xd6\xff\x00\x00\x00\x01", b"\x02\xa4body\xc4\x05ab"]
    whole = [msgpack.packb({**_FLOW_HEAD, "mid": 2, "body": b"y"}),
             msgpack.packb({**_FLOW_HEAD, "mid": 2, "meta": {"k": 1}, "body": b""})]
    return [b"\x80" + t for t in tails] + [b"\x00" + w for w in whole] + \
        [b"\x00" + b for b in HOSTILE_BODIES]


# -- node: a NodeCore's input path -------------------------------------------------------


class _Sink:
    pending_bytes = pending_frames = 0

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed: str | None = None

    def write(self, data: bytes | memoryview, frames: int = 1) -> None:
        self.out += data

    def close(self, code: str | None, message: str) -> None:
        self.closed = code or message


@functools.cache
def _node_frames() -> tuple[bytes, bytes, bytes]:
    def hello(app: str) -> tuple[bytes, Name]:
        p = SharedSecretProvider(f"org/ns/{app}", SECRET)
        name = Name("org", "ns", app, instance_id_for(p.subject))
        return encode_frame(Hello(token=p.get_token(now=NOW), name=name)), name

    sender, _ = hello("fz-a")
    receiver, name = hello("fz-b")
    peer = SharedSecretProvider("node/fuzz-peer", SECRET)
    return (sender, receiver + encode_frame(Subscribe(name=name.without_id(), request_id=1)),
            encode_frame(Hello(token=peer.get_token(now=NOW), role="peer",
                               node_id="fuzz-peer")))


_VERIFIER = SharedSecretVerifier(SECRET, replay_cache=0)


def node(data: bytes) -> None:
    """Bytes from one connection into a node that also serves a subscriber.

    Mode 0: before any hello; 1: after an app's hello; 2: after a peer node's hello.
    A node never raises on input (it answers with an error frame or closes), and
    everything it writes, to either connection, is a well-formed frame.
    """
    mode, data = _mode(data, 3)
    sender, receiver, peer = _node_frames()
    core = NodeCore("fuzz", verifier=_VERIFIER, rng=random.Random(0),
                    peer_token=SharedSecretProvider("node/fuzz", SECRET))
    sinks = [_Sink(), _Sink()]
    for conn, sink in zip((1, 2), sinks, strict=True):
        core.connection_made(conn, sink, NOW)
    core.data_received(2, receiver, NOW)
    if mode:
        core.data_received(1, sender if mode == 1 else peer, NOW)
    core.data_received(1, data, NOW)
    core.handle_timer(NOW + 60)
    core.connection_lost(1)
    core.connection_lost(2)
    for sink in sinks:
        for frame in FrameDecoder(LIMITS.max_frame_size).feed(bytes(sink.out)):
            decode_message(decode_frame(frame[4:]), LIMITS)


def _node_examples() -> list[bytes]:
    sender, _, _ = _node_frames()
    hello = decode_message(decode_frame(sender[4:]))
    assert isinstance(hello, Hello) and hello.name is not None
    pub = encode_frame(Publish(source=hello.name, destination=Name("org", "ns", "fz-b"),
                               payload=b"hi"))
    return [b"\x00" + sender + pub, b"\x01" + pub * 3, b"\x02" + encode_frame(
        {"v": 1, "t": "route", "add": [[["org", "ns", "x", None], ["p"]]], "del": []}),
        b"\x01\x7f\xff\xff\xff", *(b"\x01" + _frame(b) for b in HOSTILE_BODIES),
        *(b"\x00" + _frame(b) for b in HOSTILE_BODIES[:6])]


# -- session control bodies --------------------------------------------------------------


_PEER = Name("org", "ns", "peer", 1)


def session_body(data: bytes) -> None:
    d = decode_body(data)
    stream: SendStream[None] = SendStream(timeout=1.0, max_retries=1)
    for _ in range(8):
        stream.track(stream.allocate(), None, 1, [_PEER], 0.0)
    for key in ("a", "d", "m"):
        stream.ack_ranges(_PEER, ranges_of(d.get(key), key), 0.0, limit=1 << 12)
    for key in ("at", "dt"):
        if key in d:
            int_of(d[key], key)
    if "r" in d:
        members_of(d["r"], "r")
    reliability_of(d.get("rel"))


def _session_examples() -> list[bytes]:
    return [msgpack.packb(x) for x in (
        {"a": [[1, 5], [7, 7]], "d": [[2, 3]]}, {"m": [1, 2, 3], "d": True},
        {"a": [[9, 9]], "at": 9, "dt": -1},
        {"r": [[["org", "ns", "a", 1], "sub"]], "rel": [1000, 5]},
        {"a": [[1, 2**32 - 1]]}, {"a": [[5, 1]], "m": [[0, 0]]})] + HOSTILE_BODIES


# -- end-to-end encryption: decoders and group processing --------------------------------


def _token(sub: str, ident: SigningIdentity) -> str:
    return SharedSecretProvider(sub, SECRET, claims=ident.pubkey_claim(),
                                subject=sub).get_token(now=NOW)


def _verify(token: str) -> Any:
    return _VERIFIER.verify(token, now=NOW)


@dataclass
class _World:
    mod: GroupState
    mod_ident: SigningIdentity
    member: GroupState
    kp: bytes
    kp_secret: Any
    kp_ident: SigningIdentity
    samples: dict[str, bytes]


@functools.cache
def _world() -> _World:
    mod_ident = SigningIdentity.generate()
    mod = GroupState.create(mod_ident, _token("mod", mod_ident), "mod", NOW)
    ident = SigningIdentity.generate()
    kp, secret = make_key_package(ident, _token("m1", ident), "m1", NOW)
    _, welcome = mod.add(kp, _verify, NOW)
    member = GroupState.join(welcome, secret, ident, _verify, NOW, moderator="mod")
    ident2 = SigningIdentity.generate()
    kp2, _ = make_key_package(ident2, _token("m2", ident2), "m2", NOW)
    commit, _ = mod.add(kp2, _verify, NOW)
    member.apply_commit(commit, NOW)  # type: ignore[arg-type]
    refresh, envelopes = mod.refresh(NOW)
    member.apply_commit(refresh, NOW, envelopes.get("m1"))
    samples = {"kp": kp2, "commit": refresh,
               "app": mod.encrypt(b"hello", AAD), "kupd": member.key_update()}
    samples.update({f"env-{k}": v for k, v in envelopes.items()})
    # an unused key package for welcome parsing
    ident3 = SigningIdentity.generate()
    kp3, secret3 = make_key_package(ident3, _token("m3", ident3), "m3", NOW)
    other = GroupState.create(mod_ident, _token("mod", mod_ident), "mod", NOW)
    samples["welcome"] = other.add(kp3, _verify, NOW)[1]
    return _World(mod, mod_ident, member, kp3, secret3, ident3, samples)


def e2e_decode(data: bytes) -> None:
    """The stateless GK decoders, one per mode."""
    mode, data = _mode(data, 7)
    w = _world()
    if mode == 0:
        decode_key_package(data)
    elif mode == 1:
        parse_app(data)
    elif mode == 2:
        open_commit(data, w.mod_ident.public_key, w.mod.group_id)
    elif mode == 3:
        open_envelope(data, w.mod_ident.public_key, w.mod.group_id, w.member.leaf)
    elif mode == 4:
        open_welcome(data, w.kp_secret, w.kp_ident)
    elif mode == 5:
        Credential.from_wire(unpack(data, "cred"))
    else:
        unpack(data, "any")


def e2e_group(data: bytes) -> None:
    """A member (or the moderator) processing hostile input; modes 4-6 carry
    fuzzed contents under the moderator's valid signature."""
    mode, data = _mode(data, 7)
    w = _world()
    if mode == 0:
        w.member.decrypt(data, AAD, NOW)
    elif mode == 1:
        w.member.apply_commit(data, NOW)
    elif mode == 2:
        w.member.apply_envelope(data, NOW)
    elif mode == 3:
        w.mod.receive_key_update(data, NOW)
    elif mode == 4:
        commit = seal_signed("commit", data, w.mod_ident.sign(LABEL_COMMIT, data))
        copy.deepcopy(w.member).apply_commit(commit, NOW)
    elif mode == 5:
        env = seal_signed("env", data, w.mod_ident.sign(LABEL_ENV, data))
        copy.deepcopy(w.member).apply_envelope(env, NOW)
    else:
        welcome = seal_signed("welcome", data, w.mod_ident.sign(LABEL_WELCOME, data))
        GroupState.join(welcome, copy.deepcopy(w.kp_secret), w.kp_ident, _verify, NOW)


def _e2e_examples() -> list[bytes]:
    s = _world().samples
    out = [bytes([0]) + s["kp"], bytes([1]) + s["app"], bytes([2]) + s["commit"],
           bytes([4]) + s["welcome"], bytes([6]) + s["kupd"]]
    out += [bytes([3]) + v for k, v in s.items() if k.startswith("env-")]
    return out + [bytes([mode]) + b for mode in range(7) for b in HOSTILE_BODIES[:8]]


def _e2e_group_examples() -> list[bytes]:
    s = _world().samples
    tbs = unpack(s["commit"], "c")["tbs"]
    deep: Any = 0
    for _ in range(995):
        deep = [deep]
    # The moderator's next commit with a field nested past Python's recursion limit:
    # the transcript re-encodes the map, so decoding must refuse it.
    refresh, _ = copy.deepcopy(_world().mod).refresh(NOW)
    deep_commit = msgpack.packb({**unpack(unpack(refresh, "c")["tbs"], "t"), "x": deep},
                                use_bin_type=True)
    return [bytes([0]) + s["app"], bytes([1]) + s["commit"], bytes([3]) + s["kupd"],
            bytes([4]) + tbs, bytes([6]) + unpack(s["welcome"], "w")["tbs"],
            bytes([4]) + deep_commit]


# -- tokens ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_AUDIENCE = SharedSecretVerifier(SECRET, audience="slim", replay_cache=8)


def token(data: bytes) -> None:
    """Shared-secret tokens. Mode 0: as given; 1: the fuzzed text with a valid MAC
    appended (reaches time, claims and audience checks); 2: the unverified read
    used by development-mode nodes (never raises)."""
    mode, data = _mode(data, 3)
    text = data.decode("utf-8", "surrogateescape")
    if mode == 0:
        _VERIFIER.verify(text, now=NOW)
    elif mode == 1:
        try:
            signed = text.encode()
        except UnicodeEncodeError:
            signed = data
        mac = _b64(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest())
        _AUDIENCE.verify(f"{text}:{mac}", now=NOW)
    else:
        parse_unverified(text)


AUD_5 = b'{"aud": 5}'
ALG_NONE = b'{"alg":"none"}'


def _token_examples() -> list[bytes]:
    tok = SharedSecretProvider("org/ns/app", SECRET, audience="slim").get_token(now=NOW)
    signed = tok.rpartition(":")[0]
    sub, ts, nonce, claims = signed.split(":")
    nasty = [f"{sub}:{ts}:{nonce}:{claims}:x:y", f"{sub}:{ts}:{nonce}", f"{sub}:{ts}:{nonce}:"
             f"{_b64(b'[' * 5000)}", f"{sub}:99999999999999999999:{nonce}:{claims}",
             f"{sub}:-1:{nonce}:{claims}", f"{sub}:{ts}:{nonce}:{_b64(AUD_5)}",
             "\udcff:1:2:3", "x" * 9000]
    return [b"\x00" + tok.encode(), b"\x01" + signed.encode(), b"\x02" + tok.encode(),
            *(bytes([m]) + t.encode("utf-8", "surrogateescape") for m in range(3)
              for t in nasty)]


_JWT_KEY = b"fuzz-jwt-hmac-key-that-is-long-enough-0123"


@functools.cache
def _jwt_verifier() -> JwtVerifier:
    return JwtVerifier(keys={"keys": [{"kty": "oct", "k": _b64(_JWT_KEY), "kid": "k1",
                                       "alg": "HS256"}]},
                       issuer="https://issuer", audience="slim", replay_cache=8)


def jwt(data: bytes) -> None:
    """JWTs. Mode 0: as given; 1: fuzzed header and claims (split at the first
    0xff) under a valid HS256 signature; 2: the unverified claims reader
    (documented to raise ValueError)."""
    mode, data = _mode(data, 3)
    if mode == 1:
        header, _, claims = data.partition(b"\xff")
        signing = f"{_b64(header)}.{_b64(claims)}"
        sig = hmac.new(_JWT_KEY, signing.encode(), hashlib.sha256).digest()
        _jwt_verifier().verify(f"{signing}.{_b64(sig)}", now=NOW)
        return
    text = data.decode("utf-8", "surrogateescape")
    if mode == 0:
        _jwt_verifier().verify(text, now=NOW)
    else:
        try:
            _unverified_claims(text)
        except ValueError:
            pass


def _jwt_examples() -> list[bytes]:
    provider = JwtProvider({"kty": "oct", "k": _b64(_JWT_KEY), "kid": "k1"}, algorithm="HS256",
                           subject="spiffe://example.org/a", issuer="https://issuer",
                           audience="slim")
    tok = provider.get_token(now=NOW)
    header = json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode()
    claims = json.dumps({"sub": "a", "iss": "https://issuer", "aud": "slim", "exp": NOW + 60,
                         "iat": NOW, "jti": "j"}).encode()
    none = f"{_b64(ALG_NONE)}.{tok.split('.')[1]}."
    nasty = [b'{"alg":"HS256","kid":5}', b'{"alg":"HS256","crit":["x"]}', b"[]", b"{" * 3000,
             b'{"alg":"HS256","kid":"k1"}\xff{"sub":"a","exp":1e400,"iat":"x"}',
             b'{"alg":"HS256"}\xff{"sub":"","aud":[1,2],"exp":9e18,"iat":0,"jti":[]}']
    return [b"\x00" + tok.encode(), b"\x01" + header + b"\xff" + claims, b"\x02" + tok.encode(),
            b"\x00" + none.encode(), b"\x02" + none.encode(),
            *(b"\x01" + n for n in nasty)]


# -- sessions: an app reading hostile envelopes from its peer ------------------------------


def _app_world(mode: int) -> tuple[Net, AppCore, AppCore, dict[str, Any]]:
    """(net, source, target, a genuine data envelope from source to target).

    Mode bits: 1, a group (the target a member, the source its moderator) instead
    of point-to-point; 2, reliable; 4, end-to-end encrypted.
    """
    net = Net()
    kw: dict[str, Any] = {"timeout": 1.0, "max_retries": 3} if mode & 2 else {}
    kw["mls_enabled"] = bool(mode & 4)
    src, target = net.add_app("source"), net.add_app("target")
    net.pump()
    if mode & 1:
        session, _ = src.create_session(Name("org", "ns", "fuzz-chan"),
                                        SessionConfig.group(**kw), net.now)
        session.invite(target.name.without_id(), net.now)
        src.operate(session)
    else:
        session, _ = src.create_session(target.name.without_id(), SessionConfig(**kw),
                                        net.now)
    net.pump()
    session.publish(b"genuine", net.now)
    src.operate(session)
    (frame,) = src.take_frames()
    return net, src, target, decode_frame(frame[4:])


def _objects(data: bytes, limit: int) -> list[Any]:
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), strict_map_key=False)
    unpacker.feed(data)
    out: list[Any] = []
    while len(out) < limit:
        try:
            out.append(unpacker.unpack())
        except msgpack.OutOfData:
            break
        except (ValueError, TypeError, msgpack.UnpackException):
            break  # the rest is not msgpack: the input ends here
    return out


def app(data: bytes) -> None:
    """An app holding a session (kind by the first byte, see :func:`_app_world`)
    reads hostile envelopes from its peer: each msgpack map in the rest overlays
    the peer's genuine data envelope (a body or ack that is not bytes is packed).
    What the node would refuse (check_publish) is skipped; after each envelope the
    network runs on (replies, timers, a publish from both ends). Nothing may escape
    the app core, and the exchange must settle."""
    mode, data = _mode(data, 8)
    net, src, target, template = _app_world(mode)
    for obj in _objects(data, 12):
        if not isinstance(obj, dict):
            continue
        d = dict(template)
        for key, value in obj.items():
            if key in ("body", "ack") and not isinstance(value, bytes):
                value = msgpack.packb(value, use_bin_type=True)
            d[key] = value
        try:
            check_publish(d, LIMITS)
        except ProtocolError:
            continue
        target.receive([d], net.now)
        net.pump()
        net.advance(0.4)
        for core in (src, target):
            for session in list(core.sessions.values()):
                try:
                    session.publish(b"after", net.now)
                except (SessionClosedError, WindowFull):
                    continue
                core.operate(session)
        net.pump()
    net.settle(10.0)


def _recorded(core: AppCore) -> list[dict[str, Any]]:
    """Every envelope ``core`` reads from now on."""
    seen: list[dict[str, Any]] = []
    receive = core.receive

    def recording(envelopes: Any, now: float, **kw: Any) -> None:
        seen.extend(dict(e) for e in envelopes)
        receive(envelopes, now, **kw)

    core.receive = recording  # type: ignore[method-assign]
    return seen


def _app_examples() -> list[bytes]:
    """Per mode, the envelopes the target reads while its session is used and closed
    (replayed over the template they are the genuine traffic)."""
    out = []
    for mode in range(8):
        net, src, target, template = _app_world(mode)
        seen = _recorded(target)
        target.receive([template], net.now)
        net.pump()
        for session in list(src.sessions.values()):
            session.close(net.now)
            src.operate(session)
        net.settle(10.0)
        packed = b"".join(msgpack.packb(e, use_bin_type=True) for e in seen[:12])
        out.append(bytes([mode]) + packed)
        out.append(bytes([mode]) + msgpack.packb({"body": HOSTILE_BODIES[3]}) +
                   msgpack.packb({"ack": HOSTILE_BODIES[4], "k": template["k"] + 1}))
    return out


# -- the registry ------------------------------------------------------------------------

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("wire", wire, (ProtocolError,), _wire_examples),
    Target("flows", flows, (), _flow_examples),
    Target("node", node, (), _node_examples),
    Target("session_body", session_body, (ProtocolViolation,), _session_examples),
    Target("app", app, (), _app_examples),
    Target("e2e_decode", e2e_decode, (E2EError,), _e2e_examples),
    Target("e2e_group", e2e_group, (E2EError,), _e2e_group_examples),
    Target("token", token, (AuthenticationError,), _token_examples),
    Target("jwt", jwt, (AuthenticationError,), _jwt_examples),
)}
