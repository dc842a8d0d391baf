"""Every Python block of the README runs as written, in order, in one namespace, from the repo root."""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(capsys):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, block in enumerate(blocks, 1):
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "first token" in out and "Engine KV cache memory" in out
