"""The node as a subprocess and as the standalone `slim-agents node` server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from node_lite import READY_PREFIX, open_node_process
from node_lite.wire import Error, Publish
from tests.helpers import TUTORIAL_CONFIG, app_connection

SLIM_AGENTS = [sys.executable, "-c", "import sys; from slim_agents._cli import main; "
               "sys.exit(main())"]


def start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(READY_PREFIX), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split()[-1]


def finish(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("backend", ["asyncio", "trio", "uvloop"])
def test_subprocess_ready_line_and_clean_exit(sig: int, backend: str) -> None:
    proc, endpoint = start([sys.executable, "-m", "node_lite", "--endpoint", "127.0.0.1:0",
                            "--backend", backend])
    host, port = endpoint.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    code, err = finish(proc, sig)
    assert code == 0, err
    assert f"received {signal.Signals(sig).name}, shutting down" in err


def test_tutorial_yaml_starts_a_node_with_the_tutorial_log_lines(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(TUTORIAL_CONFIG)
    # As written the file binds 0.0.0.0:46357; tests take a free port instead.
    proc, endpoint = start([*SLIM_AGENTS, "node", "--config", str(config),
                            "--endpoint", "0.0.0.0:0"])
    assert endpoint.startswith("0.0.0.0:")
    code, err = finish(proc, signal.SIGTERM)
    assert code == 0, err
    for expected in ("Runtime started", "Starting service: slim/0",
                     f"starting server {endpoint}"):
        assert expected in err, err
    assert " INFO " in err


def test_tutorial_yaml_as_written_binds_its_port(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(TUTORIAL_CONFIG)
    proc = subprocess.Popen([*SLIM_AGENTS, "node", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY_PREFIX):
        _, err = proc.communicate(timeout=10)
        if "cannot listen" in err:
            pytest.skip("port 46357 is taken on this machine")
        raise AssertionError(err)
    assert line.split()[-1] == "0.0.0.0:46357"
    code, err = finish(proc, signal.SIGTERM)
    assert code == 0, err


def test_bad_config_is_reported_with_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("services:\n  slim/0:\n    dataplane:\n      servers: []\n")
    result = subprocess.run([*SLIM_AGENTS, "node", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert "servers" in result.stderr
    missing = subprocess.run([*SLIM_AGENTS, "node", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("extra", [(), ("--busy-poll", "300us")], ids=["default", "busy-poll"])
async def test_open_node_process_serves_apps_and_warns_them_on_shutdown(
        extra: tuple[str, ...]) -> None:
    async with open_node_process(("--endpoint", "127.0.0.1:0", *extra)) as node:
        async with app_connection(node.url, "a") as (a, a_name), \
                app_connection(node.url, "b") as (b, b_name):
            await a.send(Publish(source=a_name, destination=b_name, payload=b"hi"))
            with anyio.fail_after(5):
                msg = await b.receive()
            assert isinstance(msg, Publish)
            assert msg.payload == b"hi"
            node.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                notice = await a.receive()
            assert isinstance(notice, Error)
            assert notice.code == "shutting_down"
            assert await node.process.wait() == 0


def test_cli_help_lists_node() -> None:
    result = subprocess.run([*SLIM_AGENTS, "--help"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0
    assert "node" in result.stdout
