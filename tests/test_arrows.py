"""Module arrows point one way (DESIGN.md): the run directory knows nothing of training, the model
nothing of conversion, and the core nothing of the analysis layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "mechlrmc"
FORBIDDEN = {
    "runs.py": {"mechlrmc.train", "mechlrmc.convert", "mechlrmc.reference", "mechlrmc.export", "analyses"},
    "model.py": {"mechlrmc.convert", "mechlrmc.train", "mechlrmc.runs", "mechlrmc.reference", "analyses"},
    "data.py": {"mechlrmc.train", "mechlrmc.runs", "mechlrmc.model", "analyses"},
    "config.py": {"mechlrmc.train", "mechlrmc.runs", "mechlrmc.model", "analyses"},
}


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from ... import` names, at any depth (local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import_what_it_must_not_know(module):
    imported = imported_modules((CORE / module).read_text())
    bad = {name for name in imported for banned in FORBIDDEN[module]
           if name == banned or name.startswith(banned + ".")}
    assert not bad, f"mechlrmc/{module} imports {sorted(bad)}"


def test_the_check_sees_local_imports():
    source = "def f():\n    from mechlrmc import train\n    import mechlrmc.convert as c\n"
    assert {"mechlrmc.train", "mechlrmc.convert"} <= imported_modules(source)
