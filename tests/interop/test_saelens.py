"""SAELens itself against our SAEs: an export loads with `SAE.load_from_disk` and encodes and decodes as ours does;
TopK SAEs saved by SAELens import into ours and equal SAELens' own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.cli import main
from tests.interop.conftest import CONTEXT, saved_sae
from tests.interop.venv import report, run_interop

LOAD_EXPORT = """
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file("in.safetensors")["x"]
sae = SAE.load_from_disk("export/blocks.1.hook_resid_post")
meta = sae.cfg.metadata
assert (meta.hook_name, meta.context_size, meta.model_name) == ("blocks.1.hook_resid_post", 50, "tiny"), meta
with torch.no_grad():
    feats = sae.encode(x)
    recon = sae.decode(feats)
save_file({"feats": feats.contiguous(), "recon": recon.contiguous()}, "out.safetensors")
"""


def invoke(*args: str) -> None:
    result = CliRunner().invoke(main, ["--quiet", *args])
    assert result.exit_code == 0, result.output


def ours(sae_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our dense latents [B, n] and reconstruction [B, d] of rows x."""
    sae, _ = load_sae(sae_dir)
    with torch.no_grad():
        out = sae(torch.from_numpy(x))
    latents = torch.zeros(len(x), sae.cfg.n_latents).scatter_(1, out.indices, out.values)
    return latents.numpy(), out.x_hat.numpy()


@pytest.mark.parametrize("standardize", [True, False], ids=["standardized", "raw"])
def test_a_saelens_export_loads_in_saelens_and_equals_ours(tmp_path: Path, cache: Path, standardize: bool) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize)
    invoke("export", str(sae_dir), str(tmp_path / "export"), "--format", "saelens")
    assert sorted(p.name for p in (tmp_path / "export").iterdir() if p.is_dir()) == [
        f"blocks.{layer}.hook_resid_post" for layer in range(3)
    ]
    x = Cache(cache).activations(0, 1000, 1)
    got = run_interop(LOAD_EXPORT, tmp_path, {"x": x})
    want_latents, want_recon = ours(sae_dir, x)
    latent_diff = float(np.abs(got["feats"] - want_latents).max())
    recon_diff = float(np.abs(got["recon"] - want_recon).max())
    report(f"SAELens export ({'standardized' if standardize else 'raw'})", latents=latent_diff, recon=recon_diff)
    assert ((got["feats"] > 0) == (want_latents > 0)).all(), "a row is on a different active set"
    assert latent_diff < 1e-4 and recon_diff < 1e-3 * np.abs(want_recon).max()
    cfg = json.loads((tmp_path / "export" / "blocks.1.hook_resid_post" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == ("layer_norm" if standardize else "none")
    assert cfg["rescale_acts_by_decoder_norm"] is True and cfg["architecture"] == "topk"
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["context_size"]) == ("blocks.1.hook_resid_post", CONTEXT)
    assert meta["model_name"] == "tiny"
    policy = Cache(cache).meta.trainable_policy
    assert meta["mlsae_trainable_policy"] == policy and "never trained" in meta["mlsae_note"]
    assert meta["seqpos_slice"] == ([1, None] if policy["exclude_position_0"] else [None])


SAVE_SAELENS = """
import torch
from safetensors.torch import load_file, save_file
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
x = load_file("in.safetensors")["x"]
torch.manual_seed(0)
out = {}
for name, apply_b_dec, norm, rescale in CASES:
    cfg = TopKSAEConfig(d_in=16, d_sae=64, k=4, apply_b_dec_to_input=apply_b_dec, normalize_activations=norm,
                        rescale_acts_by_decoder_norm=rescale)
    cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    cfg.metadata.model_name = "tiny"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        sae.save_model(name)
        feats = sae.encode(x)
        out[name + ".feats"] = feats.contiguous()
        out[name + ".recon"] = sae.decode(feats).contiguous()
save_file(out, "out.safetensors")
"""
CASES = [
    ("layer_norm-b_dec-rescaled", True, "layer_norm", True),
    ("layer_norm-b_dec", True, "layer_norm", False),
    ("none-no_b_dec-rescaled", False, "none", True),
    ("none-no_b_dec", False, "none", False),
]


def test_topk_saes_saved_by_saelens_import_and_equal_saelens(tmp_path: Path, cache: Path) -> None:
    x = Cache(cache).activations(0, 1000, 2)
    got = run_interop(f"CASES = {CASES!r}\n{SAVE_SAELENS}", tmp_path, {"x": x})
    for name, *_ in CASES:
        invoke("import-sae", str(tmp_path / name), str(tmp_path / f"ours-{name}"), "--from", "saelens")
        want_latents, want_recon = ours(tmp_path / f"ours-{name}", x)
        latent_diff = float(np.abs(got[name + ".feats"] - want_latents).max())
        recon_diff = float(np.abs(got[name + ".recon"] - want_recon).max())
        report(f"SAELens import {name}", latents=latent_diff, recon=recon_diff)
        assert ((got[name + ".feats"] > 0) == (want_latents > 0)).all(), name
        assert latent_diff < 1e-4 * max(1.0, np.abs(want_latents).max()), name
        assert recon_diff < 1e-4 * np.abs(want_recon).max(), name
        cfg = load_sae(tmp_path / f"ours-{name}")[1]
        assert (cfg["layers"], cfg["model"], cfg["imported_from"]["format"]) == ([2], "tiny", "saelens")
