"""Every finding the code cites resolves in docs/FINDINGS.md, the project's numbered catalogue, and
nothing cites a document outside the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "FINDINGS.md"
OUTSIDE_DOC = "PAPER" + ".md"  # the source document, which lives outside the repository

HEADING = re.compile(r"^### (?:Finding (\d+)|([PS]\d+))\. \S", re.M)
# "finding 4", "findings 2-3", "findings 5, 8 and 9", "findings 1 to 11", "Finding 2 / ..."
NUMBERED = re.compile(r"\b[Ff]indings?\s+(\d+(?:\s*(?:-|–|,|/|and|or|to)\s*\d+)*)")
RANGE = re.compile(r"(\d+)\s*(?:-|–|to)\s*(\d+)")
# "docs/FINDINGS.md, P1", "P1 to P5", "P1-P3", "S2": the catalogue's lettered entries
SECTION = re.compile(r"\b([PS])(\d+)(?:\s*(?:-|–|to)\s*(?:[PS])?(\d+))?\b")


def catalogue() -> set[str]:
    """The entries of docs/FINDINGS.md: "finding N" for its findings, "P1", "S1"... for its sections."""
    return {f"finding {n}" if n else s for n, s in HEADING.findall(CATALOGUE.read_text())}


def citations(text: str) -> set[str]:
    """The catalogue entries `text` cites, in the catalogue's spelling."""
    found = set()
    for group in NUMBERED.findall(text):
        numbers = {int(n) for n in re.findall(r"\d+", group)}
        for a, b in RANGE.findall(group):
            numbers |= set(range(int(a), int(b) + 1))
        found |= {f"finding {n}" for n in numbers}
    for kind, a, b in SECTION.findall(text):
        found |= {f"{kind}{n}" for n in range(int(a), int(b or a) + 1)}
    return found


def _text(path: Path) -> str:
    if path.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
    return path.read_text()


def scanned_files() -> list[Path]:
    files = [p for folder in ("mechlrmc", "analyses", "benchmarks", "docs") for p in (ROOT / folder).rglob("*.py")]
    files += [ROOT / "README.md", *(ROOT / "benchmarks").glob("*.md"), *(ROOT / "docs").rglob("*.md"),
              *(ROOT / "notebooks").glob("*.ipynb")]  # docs/*.md: the site's pages and CATALOGUE
    return sorted({p for p in files if "__pycache__" not in p.parts})


def test_the_catalogue_numbers_findings_1_to_11_and_the_plateau_phenomena():
    entries = catalogue()
    assert {f"finding {n}" for n in range(1, 12)} <= entries
    assert {f"P{k}" for k in range(1, 6)} | {"S1", "S2"} <= entries


def test_the_catalogue_quotes_the_thresholds_the_findings_table_uses():
    from analyses.family import findings

    text = CATALOGUE.read_text()
    for name in ("PLATEAU_TOL", "COPY_RATIO", "NUCLEAR_RATIO", "ABLATION_FLOOR", "ABLATION_GAIN", "PERMUTE_BREAKS",
                 "PERMUTE_HARMLESS", "PATCH_RECOVERS", "PATCH_NOTHING", "PROBE_VALUE", "PROBE_GAIN", "SWAP_LOSS"):
        assert f"`{name} = {getattr(findings, name)!r}`" in text, name
    for key in findings.CRITERIA:
        assert f"**{key}**" in text, key  # every counted finding is described with its criterion


def test_every_cited_finding_resolves_in_the_catalogue():
    entries = catalogue()
    unresolved, total = {}, 0
    for path in scanned_files():
        cited = citations(_text(path))
        total += len(cited)
        if cited - entries:
            unresolved[str(path.relative_to(ROOT))] = sorted(cited - entries)
    assert not unresolved, f"citations that docs/FINDINGS.md does not hold: {unresolved}"
    assert total > 50  # the code does cite: the scan is not vacuous


def test_nothing_cites_the_outside_document():
    mentions = [str(p.relative_to(ROOT)) for p in scanned_files() if OUTSIDE_DOC in _text(p)]
    assert not mentions, f"cite docs/FINDINGS.md instead of {OUTSIDE_DOC} in {mentions}"


def test_the_scanner_finds_planted_citations():
    planted = ("Heads (finding 4, docs/FINDINGS.md); Findings 2-3 hold; see findings 5, 8 and 9.\n"
               "Dynamics (docs/FINDINGS.md, P1 to P3, and finding 11), the setting in docs/FINDINGS.md, S2.\n"
               "A section cited bare (P5), finding 12 and P9 are unresolved.")
    assert citations(planted) == {"finding 2", "finding 3", "finding 4", "finding 5", "finding 8", "finding 9",
                                  "finding 11", "finding 12", "P1", "P2", "P3", "P5", "P9", "S2"}
    assert citations(planted) - catalogue() == {"finding 12", "P9"}
    assert citations("findings 1 to 11") == {f"finding {n}" for n in range(1, 12)}
    assert citations("nothing to see here: PAPER 4, P2x, step 4, layer 2") == set()
