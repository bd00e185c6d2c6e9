"""The structure the code promises, checked on its source: imports point one way (cache <- train <- analyze) and
never in a cycle, store array names are spelled only by their format's owner, and no function or file outgrows the
limits the house style sets."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlsae_cache", "mlsae_train", "mlsae_analyze")
LAYER_OF = {name: i for i, name in enumerate(PACKAGES)}
MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 500

# Every array name of every store, and the modules that own them (the format modules).
STORE_NAMES = {
    "activations", "token_ids", "sequence", "position", "trainable", "layer_mean", "layer_sq_norm", "chunk_sum",
    "chunk_sq_norm_sum", "chunk_count", "indices", "values", "counts", "totals", "probs", "layer_var", "layer_std",
    "n_layers_active", "locations",
}  # fmt: skip
OWNERS = {
    "mlsae_cache.store", "mlsae_cache.cachestats", "mlsae_analyze.latents", "mlsae_analyze.results",
    "mlsae_analyze.explorer.index", "mlsae_analyze.delphi",
}  # fmt: skip


def modules() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in it (functions included), resolved to module names."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        out |= {name for name in names if name in known}
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}


def test_imports_point_one_way(graph: dict[str, set[str]]) -> None:
    wrong = [(a, b) for a, deps in graph.items() for b in deps if LAYER_OF[b.split(".")[0]] > LAYER_OF[a.split(".")[0]]]
    assert wrong == []


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    """Package __init__ files re-export lazily and are left out: a module's own imports must form no cycle."""
    deps = {a: {b for b in bs if b not in PACKAGES} for a, bs in graph.items() if a not in PACKAGES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_store_array_names_are_spelled_only_by_their_owners() -> None:
    spelled = []
    for name, tree in modules().items():
        if name in OWNERS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in STORE_NAMES:
                spelled.append(f"{name}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_functions_and_files_stay_small() -> None:
    too_long = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            source = path.read_text()
            if source.count("\n") > MAX_FILE_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if n > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []
