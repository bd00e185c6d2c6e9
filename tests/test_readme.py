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
