"""The pytest plugin: one node per xdist worker, isolated nodes, per-test names, deadline helpers."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import anyio
import pytest

from slim_agents import NoRouteError, SessionConfig, open_app
from slim_agents.pytest_plugin import (
    AppFactory,
    NameFactory,
    SlimNode,
    SlimTimeoutError,
    slim_messages,
    slim_wait_until,
)

pytest_plugins = ["pytester"]

RELIABLE = SessionConfig(timeout=1.0, max_retries=5)

# -- in this process ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_isolated_node_is_another_node(slim_node: SlimNode, slim_isolated_node: SlimNode,
                                                slim_name: NameFactory) -> None:
    assert slim_isolated_node.url != slim_node.url
    assert slim_isolated_node.node.url == slim_isolated_node.url
    with pytest.raises(RuntimeError, match="own thread"):
        slim_node.node  # noqa: B018
    bob = slim_name("bob")
    async with open_app(bob, node=slim_node.url, secret=slim_node.secret), \
            open_app(slim_name("alice"), node=slim_isolated_node.url,
                     secret=slim_isolated_node.secret) as alice:
        with anyio.fail_after(5), pytest.raises(NoRouteError):
            await alice.create_session(bob, RELIABLE)


@pytest.mark.anyio
@pytest.mark.slim_isolated
async def test_the_marker_gives_a_test_its_own_node(
        slim_node: SlimNode, slim_test_node: SlimNode, slim_app: AppFactory,
        slim_name: NameFactory) -> None:
    assert slim_test_node.isolated and not slim_node.isolated
    assert slim_test_node.url != slim_node.url
    alice = await slim_app("alice")
    async with open_app(slim_name("bob"), node=slim_node.url, secret=slim_node.secret):
        with anyio.fail_after(5), pytest.raises(NoRouteError):
            await alice.create_session(slim_name("bob"), RELIABLE)


def test_names_are_namespaced_and_checked(slim_name: NameFactory) -> None:
    assert slim_name("alice") == f"org/{slim_name.namespace}/alice"
    assert slim_name("alice").startswith(slim_name.prefix)
    assert slim_name.namespace.startswith("main-") or slim_name.namespace.startswith("gw")
    for bad in ("", "a/b", "a b", "a:b"):
        with pytest.raises(ValueError, match="one component"):
            slim_name(bad)


@pytest.mark.anyio
async def test_slim_messages_times_out_with_what_it_got(slim_app: AppFactory,
                                                        slim_name: NameFactory) -> None:
    alice, bob = await slim_app("alice"), await slim_app("bob")
    session = await alice.create_session(slim_name("bob"), RELIABLE)
    with anyio.fail_after(5):
        incoming = await bob.listen_for_session()
    await session.publish(b"only")
    with pytest.raises(SlimTimeoutError) as info:
        await slim_messages(incoming, 2, timeout=0.3)
    assert str(info.value) == (f"timed out after 0.3 s waiting for 2 messages on session "
                               f"{incoming.id}: got 1 [b'only']")
    assert isinstance(info.value, AssertionError) and isinstance(info.value, TimeoutError)


@pytest.mark.anyio
async def test_slim_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(SlimTimeoutError, match=r"^timed out after 0.05 s waiting for the moon$"):
        await slim_wait_until(lambda: False, timeout=0.05, message="the moon")
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    await slim_wait_until(third_time, timeout=5)
    assert calls == 3


# -- example suites run by pytest (entry point loading, xdist fleets) ------------------------

EXAMPLE_CONFTEST = """
    import hashlib, json, os
    from pathlib import Path

    import pytest

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request):
        return request.param

    @pytest.fixture
    def record(request, slim_test_node):
        # What the outer test checks: which worker, which node, which names.
        data = {"test": request.node.nodeid, "url": slim_test_node.url,
                "node": hashlib.sha256(slim_test_node.secret.encode()).hexdigest()[:16],
                "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                "plugin_worker": slim_test_node.worker,
                "isolated": slim_test_node.isolated, "names": []}
        yield data
        out = Path(os.environ["SLIM_EXAMPLE_RECORDS"])
        key = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
        (out / f"{key}.json").write_text(json.dumps(data))
"""

EXAMPLE_CHAT = """
    import pytest
    from slim_agents import SessionConfig
    from slim_agents.pytest_plugin import slim_messages, slim_wait_until

    pytestmark = pytest.mark.anyio
    RELIABLE = SessionConfig(timeout=1.0, max_retries=5)

    async def test_two_apps_talk(slim_app, slim_name, record):
        alice, bob = await slim_app("alice"), await slim_app("bob")
        record["names"] += [slim_name("alice"), slim_name("bob")]
        session = await alice.create_session(slim_name("bob"), RELIABLE)
        await session.publish(b"hi 0")
        incoming = await bob.listen_for_session()
        await session.publish(b"hi 1")
        got = await slim_messages(incoming, 2)
        assert [m.payload for m in got] == [b"hi 0", b"hi 1"]
        await incoming.publish(b"back")
        assert [m.payload for m in await slim_messages(session, 1)] == [b"back"]
        await session.close()
        await slim_wait_until(lambda: incoming.is_closed, message="bob's end to close")

    @pytest.mark.parametrize("i", range(4))
    async def test_many_small_ones(slim_app, slim_name, record, i):
        app = await slim_app("alice")
        record["names"].append(slim_name("alice"))
        assert str(app.name).startswith(slim_name("alice") + "/")

    def test_a_sync_test_sees_the_node(slim_node, record):
        assert slim_node.url.startswith("http://127.0.0.1:")
"""

EXAMPLE_AGENTS = """
    import pytest
    from slim_agents import Agent

    pytestmark = pytest.mark.anyio

    async def test_an_agent_calls_another_agents_tool(slim_agent, slim_name, record):
        calc = Agent(slim_name("calc"))

        @calc.tool
        async def add(a: int, b: int) -> int:
            \"\"\"Add two numbers.

            :param a: the first
            :param b: the second
            \"\"\"
            return a + b

        await slim_agent(calc)
        user = await slim_agent("user")
        record["names"] += [slim_name("calc"), slim_name("user")]
        assert await user.call(slim_name("calc"), "add", a=2, b=40) == 42
        assert calc.plugins is None

    @pytest.mark.slim_isolated
    async def test_a_marked_test_has_its_own_node(slim_test_node, slim_node, slim_agent,
                                                  slim_name, record):
        assert slim_test_node.isolated and slim_test_node.url != slim_node.url
        running = await slim_agent("loner")
        record["names"].append(slim_name("loner"))
        assert str(running.name).startswith(slim_name("loner"))
"""

# Unrelated plugins installed with the test extras; blocking them halves each start.
QUIET = ("-p", "no:langsmith_plugin", "-p", "no:hypothesispytest")

EXAMPLE_INI = """
    [pytest]
    addopts = --strict-markers --strict-config
    filterwarnings = error
    timeout = 60
"""


@pytest.fixture
def example_records(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    records = pytester.mkdir("records")
    monkeypatch.setenv("SLIM_EXAMPLE_RECORDS", str(records))
    # The example suites rely on entry points loading this plugin, anyio's and xdist.
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makeini(EXAMPLE_INI)
    pytester.makeconftest(EXAMPLE_CONFTEST)
    return records


def test_a_fleet_of_two_workers_has_one_node_each_and_disjoint_names(
        pytester: pytest.Pytester, example_records: Path) -> None:
    pytester.makepyfile(test_chat=EXAMPLE_CHAT, test_agents=EXAMPLE_AGENTS)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "-q", *QUIET, timeout=120)
    # 2 backends x (1 + 4 + 1 + 1 async tests); the sync test is not parametrized.
    result.assert_outcomes(passed=15)
    records = [json.loads(p.read_text()) for p in example_records.iterdir()]
    assert len(records) == 15
    assert all(r["worker"] == r["plugin_worker"] for r in records)

    shared: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for r in records:
        if not r["isolated"]:
            shared[r["worker"]].add((r["url"], r["node"]))
    assert sorted(shared) == ["gw0", "gw1"]
    assert all(len(nodes) == 1 for nodes in shared.values()), shared
    (gw0,), (gw1,) = shared["gw0"], shared["gw1"]
    assert gw0[0] != gw1[0] and gw0[1] != gw1[1]

    # Each marked test had a node of its own (told apart by its fresh secret).
    isolated = [r["node"] for r in records if r["isolated"]]
    assert len(isolated) == 2 and len(set(isolated)) == 2
    assert not set(isolated) & {gw0[1], gw1[1]}

    names = [n for r in records for n in set(r["names"])]
    assert len(names) == len(set(names)) == 2 * (2 + 4 + 2 + 1)


def test_a_helper_timeout_fails_the_test_with_a_clear_message(
        pytester: pytest.Pytester, example_records: Path) -> None:
    pytester.makepyfile(test_quiet="""
        import pytest
        from slim_agents import SessionConfig
        from slim_agents.pytest_plugin import slim_messages

        @pytest.mark.anyio
        @pytest.mark.parametrize("anyio_backend", ["asyncio"])
        async def test_nobody_writes(slim_app, slim_name, anyio_backend):
            alice, bob = await slim_app("alice"), await slim_app("bob")
            await alice.create_session(slim_name("bob"), SessionConfig())
            incoming = await bob.listen_for_session()
            await slim_messages(incoming, 1, timeout=0.2)
    """)
    result = pytester.runpytest_subprocess("-p", "no:xdist", *QUIET, timeout=60)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*SlimTimeoutError: timed out after 0.2 s waiting for 1 message on session *: got 0",
    ])
