"""The README's Python example runs as written (on a tiny random model instead of SmolLM2, to stay quick)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_python_api_example_runs(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (example,) = [block for block in python_blocks() if "run_variance" in block]
    code, n = re.subn(r'^MODEL = ".*"', f'MODEL = "{tiny_models["llama"]}"', example, flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own example
    assert 0 < namespace["variance"].summary.rel_var_token < 1  # type: ignore[attr-defined]
    assert (tmp_path / "runs" / "variance" / "summary.json").is_file()


ROOT = README.parent
OUTSIDE = re.compile(
    r"(?<!docs/)\bMETHOD\.md|\bSPEC(\.md)?( section|,)|\.\./shared|this session|this VM|been lent|was lent|"
    r"lent to this project"
)


def project_texts() -> list[Path]:
    """What users read: the README, docs/, the packages' code and docstrings, the benchmarks, the Makefile."""
    found = [README, ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("mlsae_cache", "mlsae_train", "mlsae_analyze", "benchmarks", "data"):
        found += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".toml", ".js", ".html"})
    return found


def test_nothing_cites_files_outside_the_repository_or_how_it_was_developed() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in project_texts()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_every_docs_file_the_code_cites_exists() -> None:
    cited = {m for path in project_texts() for m in re.findall(r"docs/[A-Z_]+\.md", path.read_text(encoding="utf-8"))}
    assert cited and all((ROOT / name).is_file() for name in cited), cited
