"""`slim-agents demo`: the README's main command."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_tutorial_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from slim_agents._cli import main; sys.exit(main())",
         "demo"], capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for expected in ("Created app", "Creating new group session (moderator)",
                     "-> add", "Welcome to the group", "> Hello everyone, welcome to the chat!",
                     "[client-2] session closed (removed)",
                     "[client-1] session closed (closed by moderator)",
                     "saw a message body in clear never"):
        assert expected in out, (expected, out)
    # each scripted line reaches the two other members
    assert out.count("> Hi! Glad to be here.") == 3
