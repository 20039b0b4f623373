"""Every citation of docs/method.md names a section that the page has, so that the links the code gives resolve."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# `docs/method.md#a`, and the anchors listed after it in the same citation: `docs/method.md#a, #b, #c`.
CITATION = re.compile(r"docs/method\.md((?:#[\w-]+)(?:,\s*#[\w-]+)*)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section_anchors() -> list[str]:
    text = re.sub(r"^```.*?^```", "", METHOD.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    return [github_anchor(match) for match in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)]


def cited_anchors() -> dict[str, set[str]]:
    """Anchor -> files citing it, over the package, examples, tests and the documentation."""
    files = [
        *ROOT.glob("src/locatvit_hf/*.py"),
        *ROOT.glob("examples/*"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("model_cards/*.md"),
    ]
    cited: dict[str, set[str]] = {}
    for path in files:
        if not path.is_file() or path.suffix not in (".py", ".md") or path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        anchors = [a for group in CITATION.findall(text) for a in re.findall(r"#([\w-]+)", group)]
        if path == METHOD:
            anchors += re.findall(r"\]\(#([\w-]+)\)", text)
        for anchor in anchors:
            cited.setdefault(anchor, set()).add(str(path.relative_to(ROOT)))
    return cited


def test_section_anchors_are_unique():
    anchors = section_anchors()
    assert len(anchors) == len(set(anchors)), sorted(a for a in anchors if anchors.count(a) > 1)


def test_every_cited_section_exists():
    cited = cited_anchors()
    assert any(path.startswith("src/") for paths in cited.values() for path in paths)  # the scan reaches the package
    missing = {anchor: sorted(paths) for anchor, paths in cited.items() if anchor not in section_anchors()}
    assert not missing, missing


def test_page_cites_the_paper():
    text = METHOD.read_text()
    assert "Locality-Attending Vision Transformer" in text and "@inproceedings{" in text and "2603.04892" in text
