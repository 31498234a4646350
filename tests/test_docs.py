"""The README's example runs as written and prints what it promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_to_end

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.slow  # each example runs in a fresh interpreter


def _run_readme_block(number: int, tmp_path: Path) -> list[str]:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[number]
    return _run_block(code, tmp_path)


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


def _section_block(heading: str) -> str:
    """The first Python block of the README section whose heading starts with ``heading``."""
    text = README.read_text()
    start = text.index(f"## {heading}")
    return re.findall(r"```python\n(.*?)```", text[start:], flags=re.S)[0]


def _run_block(code: str, tmp_path: Path) -> list[str]:
    script = tmp_path / "example.py"
    script.write_text(code)
    result = run_to_end([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_readme_orchestration_example_runs(tmp_path: Path) -> None:
    """The orchestration example prints what its comments promise, line for line."""
    block = _section_block("Orchestration")
    assert _run_block(block, tmp_path) == _promised_output(block)


def test_readme_interfaces_example_runs(tmp_path: Path) -> None:
    """The asyncio, streaming and ProcessPool example prints what its comments promise."""
    block = _section_block("The doors Python users already use")
    assert _run_block(block, tmp_path) == _promised_output(block)


def test_readme_containment_example_runs(tmp_path: Path) -> None:
    """The sandbox example prints, for each step, what its comment lines promise."""
    block = _section_block("What procorch contains")
    lines = _run_block(block, tmp_path)
    promised = [line.strip()[2:] for line in block.splitlines() if line.strip().startswith("# ")]
    promised = [line for line in promised if line.split()[0] in {"fine", "leaky", "slow", "nosy"}]
    printed = [line for line in lines if line.split()[0] in {"fine", "leaky", "slow", "nosy"}]
    assert len(promised) == len(printed) == 4, lines
    for shown, promise in zip(printed, promised, strict=True):
        assert shown.startswith(promise), (shown, promise)


def _command_line_examples() -> list[tuple[str, str]]:
    """The README's command-line section: each shell block with the text block that follows it."""
    text = README.read_text()
    section = text[text.index("## From the command line") : text.index("## Guards for steps")]
    return re.findall(r"```sh\n(.*?)```\n+(?:.(?!```sh))*?```text\n(.*?)```", section, flags=re.S)


def _stable(text: str) -> list[str]:
    """Output without what changes from run to run: pids, timings."""
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("slowest:") or re.match(r"procorch: \d+ steps? in ", line):
            continue
        lines.append(re.sub(r"pid \d+", "pid N", line))
    return lines


def test_readme_command_line_examples_run_as_shown(tmp_path: Path) -> None:
    """Each shell example of the command-line section, in turn, prints what the README shows."""
    examples = _command_line_examples()
    assert len(examples) == 4
    installed = shutil.which("procorch", path=str(Path(sys.executable).parent))
    command = installed or f"{sys.executable} -m procorch"
    statuses = []
    for script, shown in examples:
        result = run_to_end(
            ["bash", "-c", script.replace(".venv/bin/procorch", command)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        statuses.append(result.returncode)
        assert _stable(result.stdout) == _stable(shown), script
    assert statuses == [1, 0, 1, 0]
    first = (tmp_path / "outcomes.jsonl").read_text().splitlines()[0]
    assert (
        first == '{"task_id":"a","session_id":"s-a","agent":"counter","output":"3","success":true}'
    )


def test_readme_plain_functions_example_runs(tmp_path: Path) -> None:
    """The map, imap and ProcessPool example prints what its comments promise."""
    lines = _run_readme_block(4, tmp_path)
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[4]
    assert lines == _promised_output(block)


def test_readme_report_example_runs(tmp_path: Path) -> None:
    """The run report example writes its page, which holds the batch's 13 attempts."""
    block = _section_block("See a run")
    (tmp_path / "example.py").write_text(block)
    result = run_to_end(
        [sys.executable, "example.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == _promised_output(block)
    page = (tmp_path / "run.html").read_text()
    assert page.count('"t1"') == 1 and '"boom"' in page and "crash" in page
