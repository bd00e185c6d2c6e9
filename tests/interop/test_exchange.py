"""export / import-sae without the other tools' libraries: every refusal is one line naming what is wrong; imported
SAEs serve as baselines in `compare --single`; checkpoint hygiene (no save_id needed, file modes, the advice for a
foreign directory)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mlsae_cache.core.errors import StoreError
from mlsae_train.checkpoint import load_sae
from mlsae_train.cli import main
from mlsae_train.results import CompareResult
from tests.interop.conftest import D, K, N, saved_sae

SAELENS_TENSORS = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
SPARSIFY_TENSORS = {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}


def saelens_folder(path: Path, extra_tensors: tuple[str, ...] = (), **cfg: object) -> Path:
    """A SAELens folder written by hand: a TopK SAE on blocks.1.hook_resid_post unless `cfg` says otherwise."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    shapes = {**SAELENS_TENSORS, **dict.fromkeys(extra_tensors, (N,))}
    save_file({k: torch.randn(s, generator=gen) for k, s in shapes.items()}, str(path / "sae_weights.safetensors"))
    base = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "normalize_activations": "layer_norm"}
    base["metadata"] = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}
    (path / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return path


def sparsify_folder(path: Path, **cfg: object) -> Path:
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(s, generator=gen) for k, s in SPARSIFY_TENSORS.items()}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": N, "k": K, "d_in": D, **cfg}))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--quiet", *args])
    return result.exit_code, result.output


IMPORT_REFUSALS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("saelens", lambda p: saelens_folder(p, architecture="jumprelu"), "is a SAELens jumprelu SAE"),
    ("saelens", lambda p: saelens_folder(p, architecture="gated"), "is a SAELens gated SAE"),
    ("saelens", lambda p: saelens_folder(p, architecture="standard"), "is a SAELens standard SAE"),
    ("saelens", lambda p: saelens_folder(p, architecture="batchtopk"), "is a SAELens batchtopk SAE"),
    ("saelens", lambda p: saelens_folder(p, normalize_activations="expected_average_only_in"), "normalises"),
    ("saelens", lambda p: saelens_folder(p, extra_tensors=("threshold",)), "holds threshold"),
    ("saelens", lambda p: saelens_folder(p, d_in=D + 1), "W_enc is (16, 64), its config implies (17, 64)"),
    ("saelens", lambda p: sparsify_folder(p), "lacks or has an invalid d_in, d_sae or k"),
    ("saelens", lambda p: saelens_folder(p / "blocks.0.hook_resid_post").parent, "holds SAE folders"),
    ("saelens", lambda p: p, "does not exist"),
    ("sparsify", lambda p: sparsify_folder(p, activation="groupmax"), "is a sparsify groupmax SAE"),
    ("sparsify", lambda p: sparsify_folder(p, skip_connection=True), "has a skip connection"),
    ("sparsify", lambda p: sparsify_folder(p, transcode=True), "is a transcoder"),
    ("sparsify", lambda p: sparsify_folder(p, d_in=None), "invalid d_in"),
    ("reference", lambda p: sparsify_folder(p), "has no config.json"),
]


@pytest.mark.parametrize(
    ("source", "make", "message"),
    IMPORT_REFUSALS,
    ids=[
        "jumprelu",
        "gated",
        "standard",
        "batchtopk",
        "other-normalisation",
        "extra-tensor",
        "shape-mismatch",
        "not-saelens",
        "several-saes",
        "missing",
        "groupmax",
        "skip-connection",
        "transcoder",
        "no-d_in",
        "not-reference",
    ],
)
def test_import_refuses_what_ours_cannot_express(tmp_path: Path, source: str, make: Callable, message: str) -> None:
    src = make(tmp_path / "src")
    code, output = invoke("import-sae", str(src), str(tmp_path / "out"), "--from", source)
    assert code == 2 and output.startswith("Error: ") and output.count("\n") == 1, output
    assert message in output
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    src = saelens_folder(tmp_path / "src")
    code, output = invoke("import-sae", str(src), str(tmp_path / "out"))
    assert code == 2 and "is not empty" in output and output.count("\n") == 1
    assert invoke("import-sae", str(src), str(tmp_path / "out"), "--overwrite")[0] == 0
    assert load_sae(tmp_path / "out")[1]["layers"] == [1]


@pytest.mark.parametrize(
    ("standardize", "args", "message"),
    [
        (True, ["--format", "sparsify"], "standardises its rows, which sparsify cannot express"),
        (False, ["--layers", "5"], "--layers [5] are not layers"),
    ],
    ids=["sparsify-standardized", "unknown-layer"],
)
def test_export_refusals(tmp_path: Path, cache: Path, standardize: bool, args: list[str], message: str) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize)
    code, output = invoke("export", str(sae_dir), str(tmp_path / "out"), *args)
    assert code == 2 and output.startswith("Error: ") and output.count("\n") == 1, output
    assert message in output and not (tmp_path / "out").exists()


def test_an_imported_sae_is_a_baseline_in_compare(tmp_path: Path, cache: Path) -> None:
    mlsae = saved_sae(tmp_path / "mlsae", cache, standardize=True)
    assert invoke("import-sae", str(saelens_folder(tmp_path / "saelens")), str(tmp_path / "single"))[0] == 0
    code, output = invoke("compare", str(mlsae), str(tmp_path / "cmp"), "--cache", str(cache), "--single",
                          f"1={tmp_path / 'single'}", "--device", "cpu")  # fmt: skip
    assert code == 0, output
    rows = CompareResult.read(tmp_path / "cmp" / "compare.json").rows
    assert [row["single"] is not None for row in rows] == [False, True, False]
    assert rows[1]["single"]["fvu"] > 0


def test_a_hand_written_checkpoint_without_save_id_loads(tmp_path: Path) -> None:
    """SPEC's checkpoint: cfg.json with the core keys, sae.safetensors with the four tensors, no save ids."""
    tmp_path.joinpath("sae").mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
    save_file({k: torch.randn(s, generator=gen) for k, s in shapes.items()}, str(tmp_path / "sae" / "sae.safetensors"))
    cfg = {"format": "mlsae-sae", "version": 1, "d_model": D, "n_latents": N, "k": K, "standardize": True}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "layers": [0]}))
    sae, loaded = load_sae(tmp_path / "sae")
    assert sae.cfg.n_latents == N and loaded["layers"] == [0]


def test_saved_files_have_one_mode(tmp_path: Path, cache: Path) -> None:
    old = os.umask(0o022)
    try:
        sae_dir = saved_sae(tmp_path / "sae", cache, standardize=False)
        assert invoke("export", str(sae_dir), str(tmp_path / "sl"))[0] == 0
        assert invoke("export", str(sae_dir), str(tmp_path / "sp"), "--format", "sparsify")[0] == 0
    finally:
        os.umask(old)
    files = [*sae_dir.iterdir(), *(tmp_path / "sl").glob("*/*"), *(tmp_path / "sp").glob("*/*")]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o644"}


def test_a_foreign_directory_points_to_import_sae(tmp_path: Path) -> None:
    src = saelens_folder(tmp_path / "saelens")
    with pytest.raises(StoreError, match="import-sae SRC OUT --from saelens") as info:
        load_sae(src)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def lens_sae(tmp_path_factory: pytest.TempPathFactory, random_cache: Path) -> Path:
    """An SAE fitted on rows translated by a random lens (the SAE directory carries the lens)."""
    from mlsae_train.config import TrainConfig
    from mlsae_train.trainer import fit
    from tests.train.test_lens import random_lens
    from tests.train.test_lens_sae import FIT, saved_lens

    root = tmp_path_factory.mktemp("lens-sae")
    lens = saved_lens(root / "lens", random_lens((0, 1, 2), 16))
    fit(TrainConfig(cache=random_cache, out=root / "sae", lens=lens, **FIT))
    return root / "sae"


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_refuses_a_lens_sae(tmp_path: Path, lens_sae: Path, fmt: str) -> None:
    code, output = invoke("export", str(lens_sae), str(tmp_path / "out"), "--format", fmt)
    assert code == 2 and output.startswith("Error: ") and output.count("\n") == 1, output
    assert "tuned-lens translated rows" in output and not (tmp_path / "out").exists()


def test_a_pushed_lens_sae_carries_its_lens_without_local_paths(tmp_path: Path, lens_sae: Path) -> None:
    from mlsae_train.lens import lens_of

    code, output = invoke("push", str(lens_sae), "me/lensed", "--to-folder", str(tmp_path / "up"))
    assert code == 0, output
    texts = [p.read_text(encoding="utf-8") for p in (tmp_path / "up").rglob("*.json")]
    assert texts and not any(str(tmp_path.parent) in t or "_path" in t for t in texts)
    _, cfg = load_sae(tmp_path / "up")
    got, want = lens_of(tmp_path / "up", cfg), lens_of(lens_sae, load_sae(lens_sae)[1])
    assert got is not None and want is not None
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


def test_a_failed_reference_import_leaves_out_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{not json")
    code, output = invoke(
        "import-sae", str(tmp_path / "src"), str(tmp_path / "out"), "--from", "reference", "--overwrite"
    )
    assert code == 2 and output.count("\n") == 1, output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
