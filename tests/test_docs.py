"""The documentation agrees with what it documents, without running any benchmark:
- every generated table (README.md, docs/*.md, benchmarks/RESULTS.md) is what `python -m benchmarks.report --docs`
  renders from the committed JSON (that is, nobody edited a number by hand and no JSON changed without it);
- docs/reliability.md's table of bad inputs lists the catalog that tests/test_bad_inputs.py runs;
- relative links in README.md and docs/*.md point at files that exist."""
from __future__ import annotations

import re
from pathlib import Path

from benchmarks import doc_tables as report

ROOT = Path(__file__).resolve().parents[1]


def test_generated_blocks_are_up_to_date():
    stale = report.render_docs(check=True)
    assert not stale, (f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}: "
                       "run `python -m benchmarks.report --docs` (numbers come from benchmarks/results/*.json)")


def test_generated_blocks_present():
    """The README's leaders table and docs/performance.md's tables are generated, and every block names a
    known generator (render_docs raises on an unknown one)."""
    names = {m[2] for p in report.doc_files() for m in report.BLOCK.finditer(p.read_text())}
    assert "leaders" in {m[2] for m in report.BLOCK.finditer((ROOT / "README.md").read_text())}
    assert names <= set(report.BLOCKS)
    assert set(report.BLOCKS) <= names, f"generators no page uses: {set(report.BLOCKS) - names}"


def test_bad_inputs_table_lists_the_catalog():
    from tests.bad_inputs import CASES
    rows = re.findall(r"^\| (\d+) \| (.+?) \| `(\w+)` \|", (ROOT / "docs" / "reliability.md").read_text(), re.M)
    assert [(int(i), what, exc) for i, what, exc in rows] == \
        [(i, c.what, c.exc.__name__) for i, c in enumerate(CASES, 1)]


def test_relative_links_resolve():
    missing = []
    for page in report.doc_files() + [ROOT / "benchmarks" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing
