"""The README is a front door (issue 40 item 4): short, every docs/ page one click from it, and every relative link
in README.md, docs/ and the other top-level pages resolves, anchors included, as GitHub renders them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "EXPERIMENTS.md", ROOT / "BENCHMARKS.md",
         ROOT / "research" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped except - and _, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    body = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", body, flags=re.M)}


def links(page: Path) -> list[str]:
    body = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(body) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short_and_reaches_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    targets = {(ROOT / t.split("#")[0]).resolve() for t in links(ROOT / "README.md")}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in targets]
    assert not missing, f"docs pages not linked from the README: {missing}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_github_anchor():
    assert github_anchor("7.1 Under SPEC's reward the chosen pair cancels") == \
        "71-under-specs-reward-the-chosen-pair-cancels"
    assert github_anchor("The memory plan") == "the-memory-plan"
