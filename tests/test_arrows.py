"""Module arrows point one way (DESIGN.md): the run directory knows nothing of training, the model
nothing of conversion, the sweep spec nothing of Ray, and the core nothing of the analysis layer
(every module under mechlrmc/, at any depth, string imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "mechlrmc"
FORBIDDEN = {
    "runs.py": {"mechlrmc.train", "mechlrmc.convert", "mechlrmc.reference", "mechlrmc.export", "analyses"},
    "model.py": {"mechlrmc.convert", "mechlrmc.train", "mechlrmc.runs", "mechlrmc.reference", "analyses"},
    **{f"tasks/{name}.py": {"mechlrmc.train", "mechlrmc.runs", "mechlrmc.model", "analyses"}
       for name in ("__init__", "base", "lrmc", "tokens", "mws", "prefix_sum", "reverse")},
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


def string_imports(source: str) -> set[str]:
    """Modules named by a string in `importlib.import_module("...")`, `__import__("...")` or any
    call whose first argument is a string literal (what a string import looks like to the parser)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _is(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


CORE_MODULES = sorted(str(p.relative_to(CORE)) for p in CORE.glob("**/*.py"))


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_does_not_import_the_analysis_layer(module):
    source = (CORE / module).read_text()
    bad = {name for name in imported_modules(source) if _is(name, "analyses")}
    bad |= {name for name in string_imports(source) if name.startswith("analyses")}
    assert not bad, f"mechlrmc/{module} imports {sorted(bad)}"


def test_the_sweep_spec_does_not_import_ray():
    """`mechlrmc.trials` (spec, trial names, trial state on disk) reads a sweep without Ray."""
    source = (CORE / "trials.py").read_text()
    bad = {name for name in imported_modules(source) | string_imports(source) if _is(name, "ray")}
    assert not bad, f"mechlrmc/trials.py imports {sorted(bad)}"


def test_the_check_sees_every_core_module_and_string_imports():
    assert {"runs.py", "train.py", "trials.py", "sweep.py", "cli.py"} <= set(CORE_MODULES)
    source = "import importlib\ndef f():\n    importlib.import_module('analyses.commands')\n    __import__('analyses')\n"
    assert {"analyses.commands", "analyses"} <= string_imports(source)


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import_what_it_must_not_know(module):
    imported = imported_modules((CORE / module).read_text())
    bad = {name for name in imported for banned in FORBIDDEN[module] if _is(name, banned)}
    assert not bad, f"mechlrmc/{module} imports {sorted(bad)}"


def test_the_check_sees_local_imports():
    source = "def f():\n    from mechlrmc import train\n    import mechlrmc.convert as c\n"
    assert {"mechlrmc.train", "mechlrmc.convert"} <= imported_modules(source)


def test_the_command_line_starts_without_torch_or_the_analysis_layer():
    """`mechlrmc --help` builds every subcommand's parser without importing torch, Ray or an
    analysis module: `import analyses` loads its names on first use."""
    import subprocess
    import sys

    probe = ("import sys; from mechlrmc.cli import build_parser; build_parser(); import analyses; "
             "print(sorted(m for m in ('torch', 'ray', 'analyses.attention.heads', 'analyses.report.run_report') if m in sys.modules)); "
             "analyses.head_taxonomy; print('analyses.attention.heads' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True", out
