"""Every ```python block in docs/*.md and the README runs.

A page's blocks run in order, in one namespace, in a temporary working directory.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]


LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)")


def test_every_page_is_linked_from_the_index_and_every_link_resolves():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {(DOCS / target).resolve() for target in LINK.findall(index)}
    pages = {page.resolve() for page in DOCS.glob("*.md")} - {(DOCS / "index.md").resolve()}
    assert pages <= linked, f"pages not linked from docs/index.md: {sorted(pages - linked)}"
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = {"__name__": f"docs_{page.stem}"}
    for index, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
        source = match.group(1)
        exec(compile(source, f"{page.name}[block {index}]", "exec"), namespace)
