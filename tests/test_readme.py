"""The README stays true: its session example runs, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_session_example_runs() -> None:
    (example,) = [c for c in re.findall(r"```python\n(.*?)```", README, re.S)
                  if "create_session" in c]
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command_and_the_main_command_is_the_demo() -> None:
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2
    main, tests = commands
    assert main.endswith("slim-agents demo")
    assert tests in (ROOT / ".ci" / "run").read_text()
