"""What lives at a path, in words, so that an error about a wrong path can say what it actually is (an SAE given
where a cache belongs, arguments in the wrong order) and give advice that fits."""

from __future__ import annotations

import json
from pathlib import Path

STORE_KINDS = {
    "mlsae-cache": "an mlsae cache",
    "mlsae-latents": "an mlsae latents store",
    "mlsae-explorer-index": "an mlsae explorer index",
}
SAE_FORMAT = "mlsae-sae"
SWAPPED = "check the order of the arguments in --help"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def what_is(path: Path | str) -> str:
    """'an mlsae cache', 'an mlsae SAE checkpoint', 'a `variance` output', 'a file', 'an empty directory', ...;
    'nothing' for a path that does not exist."""
    path = Path(path)
    if not path.exists():
        return "nothing"
    if not path.is_dir():
        return "a file"
    group = _json(path / "zarr.json") or {}
    fmt = (group.get("attributes", {}).get("mlsae") or {}).get("format") if isinstance(group, dict) else None
    if fmt in STORE_KINDS:
        return STORE_KINDS[fmt]
    if (_json(path / "cfg.json") or {}).get("format") == SAE_FORMAT:
        return "an mlsae SAE checkpoint"
    marker = path / ".mlsae-output"
    if marker.is_file():
        kind = (_json(marker) or {}).get("kind") or marker.read_text().strip()
        return f"a `{kind}` output"
    if (path / "config.json").is_file():
        return "a model or checkpoint of another tool (config.json)"
    if not any(path.iterdir()):
        return "an empty directory"
    return "a directory of other files"


def bytes_under(path: Path | str) -> int:
    """The bytes of the files at or under `path` (0 for nothing there)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def gigabytes(n: float) -> str:
    """'3.46 GB', or '12.3 MB' below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def is_mlsae(description: str) -> bool:
    """Whether `what_is` named something mlsae wrote."""
    return "mlsae" in description or description.endswith("` output")
