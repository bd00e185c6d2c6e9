"""A flipped bit, a changed digit or a truncated file anywhere in any store is found: `mlsae-cache verify` exits 1
with one line naming the file, and the store's normal reader either raises our one-line error or returns exactly the
numbers of the undamaged store (a file it never reads, such as a cache's per-chunk partial sums, cannot change them).

One case per kind of file of each store kind (every array's metadata and its first chunk, the root record, the
JSON and weights files) and per damage; the stores are built once and each case damages a copy.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsae_analyze.explorer.build import IndexConfig, run_index
from mlsae_analyze.explorer.index import ExplorerIndex
from mlsae_analyze.latents import Latents
from mlsae_analyze.results import VarianceOutput
from mlsae_cache.cli import main
from mlsae_cache.core.errors import MlsaeError
from mlsae_cache.core.verifying import STORE_VERIFIERS, verifier
from mlsae_cache.store import open_cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.lens import Lens, load_lens, save_lens
from mlsae_train.state import load_state, save_state
from mlsae_train.trainer import make_optimizer
from tests.explorer.stores import make_stores


def read_cache(path: Path) -> dict[str, Any]:
    cache = open_cache(path)
    acts = [cache.stored_chunk(c, i) for c in range(cache.n_chunks) for i in range(len(cache.layers))]
    return {"acts": acts, "tokens": cache.tokens(), "mean": cache.layer_mean(), "sq": cache.layer_sq_norm(),
            "meta": cache.meta}  # fmt: skip


def read_latents(path: Path) -> dict[str, Any]:
    latents = Latents(path)
    return {"rows": latents.chunk(0, latents.n_tokens), "meta": latents.meta}


def read_variance(path: Path) -> dict[str, Any]:
    out = VarianceOutput.read(path)
    return {"data": out.dataset.load(), "summary": out.summary}


def read_index(path: Path) -> dict[str, Any]:
    index = ExplorerIndex(path)
    return {"arrays": index.arrays(), "meta": index.meta}


def read_sae(path: Path) -> dict[str, Any]:
    """The SAE as eval and encode load it, and the trainer state as a resumed fit loads it."""
    sae, cfg = load_sae(path)
    return {"state": sae.state_dict(), "cfg": cfg, "trainer": load_state(path)}


def read_lens(path: Path) -> dict[str, Any]:
    lens = load_lens(path)
    return {"weight": lens.weight, "bias": lens.bias, "meta": {k: v for k, v in lens.meta.items() if k != "path"}}


READERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "cache": read_cache,
    "latents": read_latents,
    "variance": read_variance,
    "index": read_index,
    "sae": read_sae,
    "lens": read_lens,
}


def flip(path: Path) -> None:
    """Flip the lowest bit of the middle byte."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def digit(path: Path) -> None:
    """Change one digit of a JSON file (the first at or after the middle, else the first): still valid JSON."""
    text = path.read_text()
    found = re.compile(r"\d").search(text, len(text) // 2) or re.compile(r"\d").search(text)
    assert found is not None, path
    i = found.start()
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])


DAMAGES = {"flip": flip, "truncate": truncate, "digit": digit}


@dataclass(frozen=True)
class Built:
    stores: dict[str, Path]
    pristine: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("corruption")
    s = make_stores(root / "stores", chunk_tokens=320)
    run_index(IndexConfig(s.latents, root / "index", s.variance, s.sae))
    sae, _ = load_sae(s.sae)  # a trainer state beside it, as fit leaves one: weights and Adam's after a step
    optimizer = make_optimizer(sae.parameters(), 1e-4)
    sum(p.square().sum() for p in sae.parameters()).backward()
    optimizer.step()
    save_state(s.sae, {"rows": 1024, "step": 1, "model": sae.state_dict(), "optimizer": optimizer.state_dict()})
    g = torch.Generator().manual_seed(0)
    save_lens(Lens((0, 1, 2, 3), 0.1 * torch.randn(4, 32, 32, generator=g), torch.zeros(4, 32)), root / "lens", {})
    stores = {"cache": s.cache, "latents": s.latents, "variance": s.variance, "index": root / "index",
              "sae": s.sae, "lens": root / "lens"}  # fmt: skip
    return Built(stores, {kind: READERS[kind](path) for kind, path in stores.items()})


def _cases() -> list[tuple[str, str, str, str]]:
    """(id, store kind, file relative to the store, damage) for every kind of file of the stores `built` makes."""
    cases = []
    for kind, files in _layout().items():
        for name, rel in files.items():
            for damage in DAMAGES:
                if damage == "digit" and not rel.endswith(".json"):
                    continue
                cases.append((f"{kind}-{name}-{damage}", kind, rel, damage))
    return cases


def _layout() -> dict[str, dict[str, str]]:
    """The kinds of files of each store kind that `built` makes, by name: path relative to the store (for a chunk,
    the prefix of its array's first chunk file)."""
    layout = {
        "cache": ["activations", "token_ids", "sequence", "position", "trainable", "layer", "layer_mean",
                  "layer_sq_norm", "chunk_sum", "chunk_sq_norm_sum", "chunk_count"],
        "latents": ["indices", "values", "token_ids", "sequence", "position", "trainable", "layer"],
        "index": ["stat_count", "stat_sum", "stat_sum_sq", "stat_max", "p_layer", "mean_layer_pos", "std_layer_pos",
                  "within_token_var", "across_token_var", "top_code", "top_value", "random_code", "quantile_code",
                  "quantile_edges", "act_histogram", "similar_latent", "similar_cosine", "order_by_mean_layer",
                  "doc_start"],
        "variance": ["counts", "totals", "probs", "layer_mean", "layer_var", "layer_std", "n_layers_active", "layer",
                     "latent"],
    }  # fmt: skip
    out: dict[str, dict[str, str]] = {}
    for kind, arrays in layout.items():
        prefix = "variance.zarr/" if kind == "variance" else ""
        files = {"root": f"{prefix}zarr.json"}
        for a in arrays:
            files[f"{a}-meta"] = f"{prefix}{a}/zarr.json"
            files[f"{a}-chunk"] = f"{prefix}{a}/c/0"
        if kind in ("variance", "index"):
            files.update({"manifest": ".mlsae-checksums.json", "marker": ".mlsae-output"})
        if kind == "variance":
            files["summary"] = "summary.json"
        out[kind] = files
    out["sae"] = {"cfg": "cfg.json", "weights": "sae.safetensors", "trainer-state": "trainer_state.pt"}
    out["lens"] = {"cfg": "cfg.json", "weights": "lens.safetensors"}
    return out


CASES = _cases()


def _file(store: Path, rel: str) -> Path:
    """The file `rel` names: itself, or for a chunk prefix `<array>/c/0`, the array's first chunk file."""
    path = store / rel
    if path.is_file():
        return path
    return next(p for p in sorted(path.parent.rglob("*")) if p.is_file() and str(p).startswith(str(path)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    if hasattr(a, "identical"):  # an xarray Dataset
        return bool(a.identical(b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return bool(a == b or (a != a and b != b))


@pytest.mark.parametrize(("kind", "rel", "damage"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damage_is_found(built: Built, tmp_path: Path, kind: str, rel: str, damage: str) -> None:
    store = tmp_path / kind
    shutil.copytree(built.stores[kind], store)
    target = _file(store, rel)
    DAMAGES[damage](target)

    result = CliRunner().invoke(main, ["verify", str(store)])
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert str(target) in lines[0], lines[0]

    refused: MlsaeError | None = None
    try:
        numbers = READERS[kind](store)
    except MlsaeError as e:  # our error, as every command shows it: one line
        refused = e
    if refused is not None:
        assert len(str(refused).splitlines()) == 1, str(refused)
    else:
        assert _same(numbers, built.pristine[kind]), f"{kind} reader returned other numbers after {damage} of {rel}"


def test_every_verifier_resolves_and_passes_its_store(built: Built) -> None:
    for name in STORE_VERIFIERS.values():
        assert callable(verifier(name))
    for path in built.stores.values():
        result = CliRunner().invoke(main, ["verify", str(path)])
        assert result.exit_code == 0 and "verified" in result.output and "note" not in result.output, result.output
