"""The README stays true: its session example runs, and CI runs its test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_session_and_agent_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    scripts = [c for c in EXAMPLES if c.startswith("import anyio") and "anyio.run" in c]
    assert len(scripts) == 2
    for example in scripts:
        exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "42\nb'you said hi'" in out


def test_the_pytest_example_passes_as_a_user_would_run_it(tmp_path: Path) -> None:
    (example,) = [c for c in EXAMPLES if "slim_app" in c and "def test_" in c]
    (tmp_path / "test_example.py").write_text(example)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-n", "2", "test_example.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[24] passed", result.stdout) and "failed" not in result.stdout


def test_ci_runs_the_readme_test_command_and_the_main_command_is_the_demo() -> None:
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2
    main, tests = commands
    assert main.endswith("slim-agents demo")
    assert tests in (ROOT / ".ci" / "run").read_text()
