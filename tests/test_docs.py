"""The README's example runs as written and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(tmp_path: Path) -> None:
    """The Python block in the README runs and its outcomes match its comments."""
    [code] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "a True 3" in lines
    assert "c True 2" in lines
    assert any(
        line.startswith("b False step 'b' (agent 'quitter') crashed")
        and "exited with code 3" in line
        for line in lines
    )
    assert any(line.startswith("StepProgress(") for line in lines)
