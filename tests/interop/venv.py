"""Running the real SAELens, sparsify and delphi: they live in `.venv-interop` (made by `make interop`, which `make
test` runs), because their pins conflict with ours. A test writes its inputs as safetensors files, runs a short
script there in a subprocess, and reads its outputs back. Without that venv the tests skip with the reason, except
where MLSAE_REQUIRE_INTEROP=1 (CI), where they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"


def _unavailable(reason: str) -> None:
    if os.environ.get("MLSAE_REQUIRE_INTEROP") == "1":
        pytest.fail(f"the interop tests are required here (MLSAE_REQUIRE_INTEROP=1) but {reason}")
    pytest.skip(reason)


def interop_python() -> Path:
    """The interop venv's python, or a skip (a failure under MLSAE_REQUIRE_INTEROP=1)."""
    if not INTEROP_PYTHON.exists():
        _unavailable(f"{INTEROP_PYTHON.parent.parent.name} does not exist (run `make interop`)")
    return INTEROP_PYTHON


def run_interop(script: str, workdir: Path, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run `script` in the interop venv with cwd `workdir`, after writing `inputs` to workdir/in.safetensors; it
    writes its results to out.safetensors, which is returned."""
    python = interop_python()
    if inputs:
        save_file({k: np.ascontiguousarray(v) for k, v in inputs.items()}, str(workdir / "in.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        if "ModuleNotFoundError" in done.stderr:
            _unavailable(f"{python} lacks a library: {done.stderr.strip().splitlines()[-1]} (run `make interop`)")
        sys.stderr.write(done.stderr)
        pytest.fail(f"the interop script failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    out = workdir / "out.safetensors"
    return load_file(str(out)) if out.exists() else {}


def report(name: str, **diffs: float) -> None:
    """Print the max differences a comparison found (pytest -s, or the captured output of a failure, shows them)."""
    print(f"[interop] {name}: " + ", ".join(f"max |{k}| {v:.3g}" for k, v in diffs.items()))
