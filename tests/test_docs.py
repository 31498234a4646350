"""The README's example runs as written and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _run_readme_block(number: int, tmp_path: Path) -> list[str]:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[number]
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_readme_example_runs(tmp_path: Path) -> None:
    """The first Python block in the README runs and its outcomes match its comments."""
    lines = _run_readme_block(0, tmp_path)
    assert "a True 3" in lines
    assert "c True 2" in lines
    assert any(
        line.startswith("b False step 'b' (agent 'quitter') crashed")
        and "exited with code 3" in line
        for line in lines
    )
    assert any(line.startswith("StepProgress(") for line in lines)


def test_readme_guards_example_runs(tmp_path: Path) -> None:
    """The guards example prints, for each step, what its comment lines promise."""
    lines = _run_readme_block(1, tmp_path)
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    promised = [line.strip()[2:] for line in block.splitlines() if line.strip().startswith("# ")]
    promised = [line for line in promised if line.split()[0] in {"fine", "stuck", "hog", "noisy"}]
    assert len(promised) == len(lines) == 4
    for printed, promise in zip(lines, promised, strict=True):
        assert printed.startswith(promise), (printed, promise)


def _promised_output(block: str) -> list[str]:
    """The comment lines that directly follow a print() call: what it should print."""
    promised: list[str] = []
    after_print = False
    for line in block.splitlines():
        text = line.strip()
        if text.startswith("print("):
            after_print = True
        elif after_print and text.startswith("# "):
            promised.append(text[2:])
        else:
            after_print = False
    return promised


def test_readme_orchestration_example_runs(tmp_path: Path) -> None:
    """The orchestration example prints what its comments promise, line for line."""
    lines = _run_readme_block(2, tmp_path)
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[2]
    assert lines == _promised_output(block)


def test_readme_interfaces_example_runs(tmp_path: Path) -> None:
    """The asyncio, streaming and ProcessPool example prints what its comments promise."""
    lines = _run_readme_block(3, tmp_path)
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[3]
    assert lines == _promised_output(block)


def test_readme_command_line_example_runs(tmp_path: Path) -> None:
    """The shell example runs as shown: exit 1, and the summary it shows, pids aside."""
    block = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)[2]
    shown = re.findall(r"```text\n(.*?)```", README.read_text(), flags=re.S)[0]
    script = block.replace(".venv/bin/procorch", f"{sys.executable} -m procorch")
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr

    def stable(text: str) -> list[str]:
        """The summary without what changes from run to run (pids, timings)."""
        lines = []
        for line in text.splitlines():
            if line.lstrip().startswith(("slowest:", "procorch: 4 steps in")):
                continue
            lines.append(re.sub(r"pid \d+", "pid N", line))
        return lines

    assert stable(result.stderr) == stable(shown)
    first = (tmp_path / "outcomes.jsonl").read_text().splitlines()[0]
    assert (
        first == '{"task_id":"a","session_id":"s-a","agent":"counter","output":"3","success":true}'
    )


def test_readme_plain_functions_example_runs(tmp_path: Path) -> None:
    """The map, imap and ProcessPool example prints what its comments promise."""
    lines = _run_readme_block(4, tmp_path)
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[4]
    assert lines == _promised_output(block)
