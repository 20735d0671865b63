"""The house rules of the code (DESIGN.md): no import circles, no borrowed private names, tasks asked
instead of sniffed, and one home for the shared measures. Each check parses the source, so it sees
every import (local and type-only ones too) without running anything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mechlrmc", "analyses")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (root / package).rglob("*.py")}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import of the module, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.append((full, "") if full in modules else (source, alias.name))
    return [(m, n) for m, n in out if m in modules]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m, p, modules)} - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_circle():
    modules = project_modules()
    assert {"mechlrmc.measures", "analyses.llc.estimator", "analyses.base.registry"} <= set(modules)
    assert cycles(import_graph(modules)) == []


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "analyses" / "a.py").write_text("def f():\n    from analyses.b import g\n")
    (tmp_path / "analyses" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from analyses import a\n")
    (tmp_path / "analyses" / "c.py").write_text("from analyses.b import x\n")
    modules = {module_name_in(tmp_path, p): p for p in tmp_path.rglob("*.py")}
    graph = {m: {t for t, _ in imports(m, p, modules)} - {m} for m, p in modules.items()}
    assert cycles(graph) == [["analyses.a", "analyses.b"]]


def module_name_in(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_borrows_another_modules_private_names():
    modules = project_modules()
    borrowed = sorted(f"{m} imports {name} from {source}" for m, p in modules.items()
                      for source, name in imports(m, p, modules)
                      if name.startswith("_") and not name.startswith("__") and source != m)
    assert borrowed == []


SNIFFING = {
    "a batch's class checked": re.compile(r"isinstance\([^)]*\b(Sequence)?Batch\b"),
    "a task's name compared": re.compile(r"""(\.task|task\.name)\s*(==|!=|in\b|not in\b)|(==|!=)\s*["']lrmc["']"""),
    "a task-specific metric column tested": re.compile(r"""["']eval_loss_mask["']\s+(not\s+)?in\b"""),
    "a task-specific phase column tested": re.compile(r"""["']analytic_loss_mask["']\s+(not\s+)?in\b"""),
}


@pytest.mark.parametrize("rule", sorted(SNIFFING))
def test_only_the_tasks_know_which_task_they_are(rule):
    """Outside `mechlrmc/tasks/`, code asks the task (`Task.supports`, `phase_metric`, the batch's
    own methods) instead of testing what it is."""
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in project_modules().values() if "tasks" not in path.relative_to(ROOT).parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if SNIFFING[rule].search(line)]
    assert offenders == []


def test_the_sniffing_patterns_catch_what_they_name():
    lines = ['if isinstance(batch, SequenceBatch):', 'if run.config.data.task == "lrmc":',
             'token = "eval_loss_mask" not in run.metrics', 'if cfg.data.task in TAXONOMY_TASKS:']
    assert [any(p.search(line) for p in SNIFFING.values()) for line in lines] == [True, True, True, True]
    assert not any(p.search('if "matrix" in ctx.task.supports:') for p in SNIFFING.values())


MEASURE_CODE = {
    "cosine similarity (collapse)": re.compile(r"\bnormalize\(|cosine_similarity\("),
    "consecutive repetition": re.compile(r"\[\.\.\., 1:\] ==|\[:, 1:\] ==|\[1:\] =="),
}


@pytest.mark.parametrize("measure", sorted(MEASURE_CODE))
def test_shared_measures_are_computed_only_in_their_home(measure):
    home = ROOT / "mechlrmc" / "measures.py"
    assert MEASURE_CODE[measure].search(home.read_text())
    elsewhere = [f"{path.relative_to(ROOT)}:{n}" for path in project_modules().values() if path != home
                 for n, line in enumerate(path.read_text().splitlines(), 1) if MEASURE_CODE[measure].search(line)]
    assert elsewhere == []


def test_science_modules_take_no_context():
    """Inside each lens, only the registry's adapters (`adapters.py`) read a `Context` (and the base
    package that defines it, the report that assembles the adapters, the command line): the
    estimators take models, batches, runs and tables."""
    offenders = []
    for path in (ROOT / "analyses").rglob("*.py"):
        parts = path.relative_to(ROOT / "analyses").parts
        if parts[0] in ("base", "commands", "report") or path.name in ("adapters.py", "__init__.py") or len(parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.args.args and node.args.args[0].arg == "ctx":
                offenders.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert offenders == []
