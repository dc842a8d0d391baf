"""Every Python block of README.md and of each docs/*.md runs as written, in order, in one namespace per file,
from the repo root, and prints what its `print(...)  # -> EXPECTED` comments say (a line of the block's output
starts so).
A block that starts with "# with `kvcache-infer serve [OPTIONS]` running:" runs against a
`kvcache-infer serve OPTIONS` started for it (on port 8000 when that is free, else on a free port
substituted into the block)."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_MARK = re.compile(r"# with `kvcache-infer serve([^`]*)` running:")
EXPECT = re.compile(r"^\s*print\(.*\)\s*# -> (.+?)(?:\s{2,}|$)", re.M)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _port() -> int:
    for port in (8000, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


@contextlib.contextmanager
def served(options: list[str]):
    port = _port()
    p = subprocess.Popen([sys.executable, "-m", "kvcache_infer.cli", "serve", "--port", str(port), "--threads", "1",
                          *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            assert p.poll() is None, p.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() - t0 < 240, "kvcache-infer serve did not come up"
                time.sleep(0.1)
        yield port
    finally:
        p.terminate()
        p.wait(90)


def run_blocks(path: Path, capsys) -> tuple[str, int]:
    """Runs the file's Python blocks in order in one namespace; returns what they printed and how many
    `# -> EXPECTED` lines were checked."""
    blocks = python_blocks(path.read_text())
    name = str(path.relative_to(ROOT))
    namespace: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out, expected = "", 0
        for i, block in enumerate(blocks, 1):
            mark = SERVER_MARK.match(block)
            if mark:
                with served(mark[1].split()) as port:
                    exec(compile(block.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), f"{name} python block {i}",
                                 "exec"), namespace)
            else:
                exec(compile(block, f"{name} python block {i}", "exec"), namespace)
            printed = capsys.readouterr().out
            out += printed
            for want in EXPECT.findall(block):
                expected += 1
                assert any(line.startswith(want) for line in printed.splitlines()), \
                    f"{name} python block {i} should print a line starting {want!r}; it printed:\n{printed}"
    finally:
        os.chdir(cwd)
    return out, expected


def test_readme_python_blocks_run_as_written(capsys):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3 and any(SERVER_MARK.match(b) for b in blocks)
    out, expected = run_blocks(ROOT / "README.md", capsys)
    assert expected >= 4
    assert "first token" in out and "Engine KV cache memory" in out


DOCS = sorted(p.name for p in (ROOT / "docs").glob("*.md") if python_blocks(p.read_text()))


@pytest.mark.parametrize("doc", DOCS)
def test_docs_python_blocks_run_as_written(doc, capsys):
    path = ROOT / "docs" / doc
    out, expected = run_blocks(path, capsys)
    assert expected >= 1, f"docs/{doc}: no `print(...)  # -> EXPECTED` line checks what its blocks print"


def test_docs_with_python_blocks():
    """The pages that teach an API carry runnable blocks (a page that loses its blocks fails here)."""
    assert {"inferencer.md", "engine.md", "serving.md"} <= set(DOCS)
