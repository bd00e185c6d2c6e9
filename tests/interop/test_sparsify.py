"""sparsify itself against our SAEs: a checkpoint saved by sparsify imports and equals sparsify's outputs; an export
of an SAE trained without standardisation loads with `SparseCoder.load_from_disk` and equals ours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from tests.interop.conftest import N, dense, saved_sae
from tests.interop.test_saelens import invoke, ours
from tests.interop.venv import report, run_interop

SAVE_SPARSIFY = """
import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
x = load_file("in.safetensors")["x"]
torch.manual_seed(0)
sc = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4))
with torch.no_grad():
    for p in sc.parameters():
        p.copy_(0.5 * torch.randn_like(p))
    sc.save_to_disk("sparsify/layers.2")
    enc = sc.encode(x)
    recon = sc.decode(enc.top_acts, enc.top_indices)
out = {"acts": enc.top_acts.contiguous(), "indices": enc.top_indices.contiguous(), "recon": recon}
save_file(out, "out.safetensors")
"""

LOAD_EXPORT = """
import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder
x = load_file("in.safetensors")["x"]
coders = SparseCoder.load_many("export", local=True)
assert sorted(coders) == ["layers.0", "layers.1", "layers.2"], sorted(coders)
sc = coders["layers.1"]
with torch.no_grad():
    enc = sc.encode(x)
    recon = sc.decode(enc.top_acts, enc.top_indices)
out = {"acts": enc.top_acts.contiguous(), "indices": enc.top_indices.contiguous(), "recon": recon}
save_file(out, "out.safetensors")
"""


def test_a_checkpoint_saved_by_sparsify_imports_and_equals_sparsify(tmp_path: Path, cache: Path) -> None:
    x = Cache(cache).activations(0, 1000, 2)
    got = run_interop(SAVE_SPARSIFY, tmp_path, {"x": x})
    invoke("import-sae", str(tmp_path / "sparsify" / "layers.2"), str(tmp_path / "ours"), "--from", "sparsify")
    want_latents, want_recon = ours(tmp_path / "ours", x)
    theirs = dense(torch.from_numpy(got["acts"]), torch.from_numpy(got["indices"]), N)
    latent_diff = float(np.abs(theirs - want_latents).max())
    recon_diff = float(np.abs(got["recon"] - want_recon).max())
    report("sparsify import", latents=latent_diff, recon=recon_diff)
    assert ((theirs > 0) == (want_latents > 0)).all()
    assert latent_diff < 1e-4 * np.abs(want_latents).max() and recon_diff < 1e-4 * np.abs(want_recon).max()
    sae, cfg = load_sae(tmp_path / "ours")
    assert (sae.cfg.standardize, cfg["layers"], cfg["imported_from"]["format"]) == (False, [2], "sparsify")


def test_an_unstandardized_sparsify_export_loads_in_sparsify_and_equals_ours(tmp_path: Path, cache: Path) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=False)
    invoke("export", str(sae_dir), str(tmp_path / "export"), "--format", "sparsify")
    x = Cache(cache).activations(0, 1000, 1)
    got = run_interop(LOAD_EXPORT, tmp_path, {"x": x})
    want_latents, want_recon = ours(sae_dir, x)
    theirs = dense(torch.from_numpy(got["acts"]), torch.from_numpy(got["indices"]), N)
    latent_diff = float(np.abs(theirs - want_latents).max())
    recon_diff = float(np.abs(got["recon"] - want_recon).max())
    report("sparsify export (--no-standardize)", latents=latent_diff, recon=recon_diff)
    assert ((theirs > 0) == (want_latents > 0)).all()
    assert latent_diff < 1e-4 and recon_diff < 1e-4 * np.abs(want_recon).max()
    cfg = json.loads((tmp_path / "export" / "layers.1" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (16, N, 4, "topk")
