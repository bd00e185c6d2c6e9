"""An MLSAE on lens-translated rows: `fit --lens`, `eval`, `encode` and the splice apply the SAE's own lens, each
layer's translator to that layer's rows only (the off-by-one check), and an identity lens changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mlsae_train.trainer as trainer
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.latents import Latents
from mlsae_analyze.prompt import prompt_totals
from mlsae_cache.core.errors import InputError
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import load_model
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae, save_sae
from mlsae_train.config import TrainConfig
from mlsae_train.evaluate import EvalConfig, run_eval
from mlsae_train.lens import SAE_CFG_KEY, Lens, lens_of, load_lens, save_lens
from mlsae_train.splice import SpliceConfig, splice_evaluate
from mlsae_train.trainer import fit
from tests.cache.conftest import small_config
from tests.train.test_lens import random_lens

FIT = {
    "expansion_factor": 2,
    "k": 4,
    "batch_rows": 128,
    "max_rows": 1536,
    "block_units": 4,
    "device": "cpu",
    "train_tokens": 1500,
}


def saved_lens(path: Path, lens: Lens) -> Path:
    return save_lens(lens, path, {"finished": True})


def latents(path: Path) -> tuple[np.ndarray, np.ndarray]:
    chunk = Latents(path).chunk(0, 10**9)
    return chunk.indices, chunk.values


def test_an_identity_lens_gives_the_plain_sae_its_latents_and_eval(tmp_path: Path, random_cache: Path) -> None:
    lens = saved_lens(tmp_path / "lens", Lens.identity((0, 1, 2), 16))
    fit(TrainConfig(cache=random_cache, out=tmp_path / "plain", **FIT))
    fit(TrainConfig(cache=random_cache, out=tmp_path / "lensed", lens=lens, **FIT))
    (plain, _), (lensed, cfg) = load_sae(tmp_path / "plain"), load_sae(tmp_path / "lensed")
    weights = zip(plain.state_dict().values(), lensed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)
    assert cfg[SAE_CFG_KEY]["layers"] == [0, 1, 2] and (tmp_path / "lensed" / "lens" / "lens.safetensors").is_file()
    a = run_eval(EvalConfig(tmp_path / "plain", random_cache, device="cpu"))
    b = run_eval(EvalConfig(tmp_path / "lensed", random_cache, device="cpu"))
    assert a.fvu == b.fvu == b.fvu_lens and a.mse == b.mse and a.l0 == b.l0 and a.fvu_lens is None
    for name in ("plain", "lensed"):
        run_encode(EncodeConfig(tmp_path / name, random_cache, tmp_path / f"latents-{name}", device="cpu"))
    for x, y in zip(latents(tmp_path / "latents-plain"), latents(tmp_path / "latents-lensed"), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fit_translates_only_the_rows_of_each_translators_layer(
    tmp_path: Path, random_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lens that is zero except at block 2, fitted on blocks 1 and 2: rows of block 1 reach the SAE as stored,
    rows of block 2 translated by block 2's translator."""
    lens = random_lens((0, 1, 2), 16, only=2)
    seen: list[Any] = []
    original = trainer.train_step

    def spy(run: Any, batch: Any, measure_raw: bool = True) -> Any:
        seen.append((batch.x.clone(), batch.layer.clone(), batch.token.clone()))
        return original(run, batch, measure_raw)

    monkeypatch.setattr(trainer, "train_step", spy)
    cfg = TrainConfig(cache=random_cache, out=tmp_path / "sae", layers=(1, 2), lens=saved_lens(tmp_path / "l", lens))
    fit(TrainConfig(**{**cfg.__dict__, **FIT, "max_rows": 256}))
    cache = Cache(random_cache)
    x, slot, token = seen[0]
    rows = zip(token.tolist(), slot.tolist(), strict=True)
    raw = torch.from_numpy(np.stack([cache.activations(t, t + 1, 1 + s)[0] for t, s in rows]))
    block1, block2 = slot == 0, slot == 1
    assert block1.any() and block2.any()
    assert torch.equal(x[block1], raw[block1])
    want = raw[block2] + raw[block2] @ lens.weight[2].T + lens.bias[2]
    torch.testing.assert_close(x[block2], want)


@pytest.fixture(scope="module")
def lensed_sae(tmp_path_factory: pytest.TempPathFactory, random_cache: Path) -> tuple[Path, Path, Lens]:
    """An SAE fitted with a lens that is zero except at block 1, and the same weights saved as a plain SAE."""
    root = tmp_path_factory.mktemp("lensed")
    lens = random_lens((0, 1, 2), 16, only=1)
    fit(TrainConfig(cache=random_cache, out=root / "lensed", lens=saved_lens(root / "lens", lens), **FIT))
    sae, cfg = load_sae(root / "lensed")
    per_save = ("save_id", "weights_crc32c", "crc32c", SAE_CFG_KEY)  # written anew by the save, or the lens's
    save_sae(sae, root / "plain", {k: v for k, v in cfg.items() if k not in per_save})
    return root / "lensed", root / "plain", lens


def test_encode_translates_only_the_rows_of_each_translators_layer(
    tmp_path: Path, random_cache: Path, lensed_sae: tuple[Path, Path, Lens]
) -> None:
    lensed, plain, _ = lensed_sae
    run_encode(EncodeConfig(lensed, random_cache, tmp_path / "a", device="cpu"))
    run_encode(EncodeConfig(plain, random_cache, tmp_path / "b", device="cpu"))
    (ia, va), (ib, vb) = latents(tmp_path / "a"), latents(tmp_path / "b")
    for layer in (0, 2):
        np.testing.assert_array_equal(ia[:, layer], ib[:, layer])
        np.testing.assert_array_equal(va[:, layer], vb[:, layer])
    assert not np.array_equal(va[:, 1], vb[:, 1])


def test_eval_of_a_lens_sae_equals_a_dense_reference(random_cache: Path, lensed_sae: tuple[Path, Path, Lens]) -> None:
    lensed, _, lens = lensed_sae
    result = run_eval(EvalConfig(lensed, random_cache, device="cpu"))
    sae, _ = load_sae(lensed)
    cache = Cache(random_cache)
    keep = cache.trainable()[1500:]
    for slot in range(3):
        x = torch.from_numpy(cache.activations(1500, cache.n_tokens, slot)[keep]).double()
        y = x + x @ lens.weight[slot].double().T + lens.bias[slot].double()
        with torch.no_grad():
            y_hat = sae(y.float()).x_hat.double()
        x_hat = torch.linalg.solve(
            torch.eye(16, dtype=torch.float64) + lens.weight[slot].double(), (y_hat - lens.bias[slot].double()).T
        ).T

        def fvu(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())

        assert result.fvu[slot] == pytest.approx(fvu(x, x_hat), rel=1e-4)
        assert result.fvu_lens is not None and result.fvu_lens[slot] == pytest.approx(fvu(y, y_hat), rel=1e-4)


def test_fit_refuses_a_lens_without_the_sae_layers_and_writes_nothing(tmp_path: Path, random_cache: Path) -> None:
    lens = saved_lens(tmp_path / "lens", Lens.identity((0, 1), 16))
    with pytest.raises(InputError, match="no translator for blocks \\[2\\]"):
        fit(TrainConfig(cache=random_cache, out=tmp_path / "sae", lens=lens, **FIT))
    assert not (tmp_path / "sae").exists()
    wide = saved_lens(tmp_path / "wide", Lens.identity((0, 1, 2), 8))
    with pytest.raises(InputError, match="d_model 8"):
        fit(TrainConfig(cache=random_cache, out=tmp_path / "sae", lens=wide, **FIT))
    assert not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------------------------------- the splice


@pytest.fixture(scope="module")
def llama_cache(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("splice-lens") / "cache"
    run_harvest(small_config(out, tiny_models["llama"], dtype="float32", max_tokens=320))
    return out


def test_the_splice_puts_back_the_inverse_at_the_translators_layer_only(
    tmp_path: Path, llama_cache: Path, tiny_models: dict[str, Path]
) -> None:
    cache = Cache(llama_cache)
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    cfg = SpliceConfig(max_windows=4)
    fit(TrainConfig(cache=llama_cache, out=tmp_path / "sae", **{**FIT, "train_tokens": None, "max_rows": 512}))
    sae, _ = load_sae(tmp_path / "sae")
    lens = random_lens((0, 1, 2), 32, only=1)
    plain = splice_evaluate(sae, cache, (0, 1, 2), cfg, loaded)
    lensed = splice_evaluate(sae, cache, (0, 1, 2), cfg, loaded, lens=lens)
    np.testing.assert_allclose([lensed.delta_ce[i] for i in (0, 2)], [plain.delta_ce[i] for i in (0, 2)], rtol=1e-6)
    assert lensed.delta_ce[1] != pytest.approx(plain.delta_ce[1], rel=1e-3)


def test_lens_of_a_plain_sae_is_none(lensed_sae: tuple[Path, Path, Lens]) -> None:
    lensed, plain, lens = lensed_sae
    assert lens_of(plain, load_sae(plain)[1]) is None
    carried = lens_of(lensed, load_sae(lensed)[1])
    assert carried is not None and torch.equal(carried.weight, lens.weight)
    assert load_lens(lensed / "lens").fingerprint == carried.fingerprint


def test_prompt_totals_translate_each_layer_by_its_own_translator(lensed_sae: tuple[Path, Path, Lens]) -> None:
    _, plain, lens = lensed_sae
    sae, _ = load_sae(plain)
    acts = np.random.default_rng(0).normal(size=(20, 3, 16)).astype(np.float32)
    got = prompt_totals(sae, acts, lens)
    moved = np.stack([lens.translate(torch.from_numpy(acts[:, i]), i).numpy() for i in range(3)], axis=1)
    np.testing.assert_allclose(got, prompt_totals(sae, moved), rtol=1e-6)
    raw = prompt_totals(sae, acts)
    np.testing.assert_array_equal(got[[0, 2]], raw[[0, 2]])  # only block 1's translator is not the identity
    assert not np.allclose(got[1], raw[1])
