"""The heatmap and report commands over a tiny pipeline: import -> fit -> encode -> variance, cosine, eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from mlsae_analyze import plots
from mlsae_analyze.cli import main
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_train.cli import main as train_main
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import fit
from tests.analyze.test_plots import PNG_SIGNATURE
from tests.cache.test_resume import store_files
from tests.train.conftest import import_npy


def invoke(*args: str, cli=main):  # noqa: ANN001, ANN201
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variance, cosine and eval outputs of a tiny SAE on 1,200 random tokens x 3 layers x 16."""
    root = tmp_path_factory.mktemp("pipeline")
    x = np.random.default_rng(1).normal(size=(1200, 3, 16)) * np.array([1.0, 2.0, 4.0])[None, :, None]
    cache = import_npy(root, x.astype(np.float32), "cache", chunk_tokens=256)
    sae = root / "sae"
    fit(TrainConfig(cache=cache, out=sae, expansion_factor=4, k=4, batch_rows=128, max_rows=4000, device="cpu"))
    run_encode(EncodeConfig(sae, cache, root / "lat", device="cpu"))
    assert invoke("variance", str(root / "lat"), str(root / "var"), "--scheduler", "sync").exit_code == 0
    assert invoke("cosine", str(cache), str(root / "cos"), "--scheduler", "sync").exit_code == 0
    result = invoke("eval", str(sae), str(cache), "--device", "cpu", "--out", str(root / "eval.json"), cli=train_main)
    assert result.exit_code == 0, result.output
    return {"root": root, "var": root / "var", "cos": root / "cos", "eval": root / "eval.json"}


def test_heatmap_command_plots_the_variance_output(tmp_path: Path, outputs: dict[str, Path]) -> None:
    out = tmp_path / "fig"
    result = invoke("heatmap", str(outputs["var"]), str(out), "--cosine", str(outputs["cos"]))
    assert result.exit_code == 0, result.output
    for name in ("layer_heatmap.png", "layer_histograms.png", "cosine.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
    ds = xr.open_zarr(outputs["var"] / "variance.zarr", consolidated=False)
    assert np.isfinite(ds["layer_mean"].values).any()
    assert invoke("heatmap", str(outputs["var"]), str(out), "--cosine", str(outputs["cos"])).exit_code == 0
    refused = invoke("heatmap", str(outputs["var"]), str(out))  # other inputs: refused, the figures kept
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr and (out / "cosine.png").exists()
    again = invoke("heatmap", str(outputs["var"]), str(out), "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "cosine.png").exists()


def test_report_links_every_figure_it_names(tmp_path: Path, outputs: dict[str, Path]) -> None:
    extra = tmp_path / "prompt"
    extra.mkdir()
    plots.cosine_plot([[0, 1]], [0.5], extra / "prompt_heatmap.png", "stand-in for a prompt heatmap")
    out = tmp_path / "report"
    args = ["--variance", str(outputs["var"]), "--eval", str(outputs["eval"]), "--cosine", str(outputs["cos"])]
    result = invoke("report", str(out), *args, "--figures", str(extra))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 6 and set(images) <= set(links)
    for link in links:
        assert not Path(link).is_absolute() and (out / link).is_file(), link
    names = {"training.png", "layer_heatmap.png", "layer_histograms.png", "multi_layer.png", "cosine.png"}
    names.add("prompt_heatmap.png")
    assert {Path(p).name for p in images} == names
    summary = json.loads((outputs["var"] / "summary.json").read_text())
    assert f"{summary['rel_var_token']:.4g}" in text and "two orders of magnitude" in text
    assert "rel_var_t" in text and "Reference mode" in text
    evaluation = json.loads(outputs["eval"].read_text())
    assert "| layer | fvu | mse | l0 | n_rows |" in text and f"{evaluation['fvu'][0]:.4g}" in text
    assert "0 → 1" in text
    for section in ("## The SAE", "## The cache", "| setting | value |", "| fact | value |"):
        assert section in text, section
    html = (out / "report.html").read_text()
    assert "<h2" in html and 'src="figures/training.png"' in html.replace("'", '"')


def report_case(case: str, root: Path, outputs: dict[str, Path]) -> list[str]:
    args = ["--variance", str(outputs["var"])]
    if case == "not-variance":
        return ["--variance", str(outputs["cos"])]
    if case == "missing-variance":
        return ["--variance", str(root / "nope")]
    if case == "bad-eval":
        (root / "bad.json").write_text("{not json")
        return [*args, "--eval", str(root / "bad.json")]
    if case == "missing-cosine":
        return [*args, "--cosine", str(root / "nope")]
    (root / "empty").mkdir()
    return [*args, "--figures", str(root / "empty")]


@pytest.mark.parametrize("case", ["not-variance", "missing-variance", "bad-eval", "missing-cosine", "no-png"])
def test_report_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, outputs: dict[str, Path], case: str) -> None:
    result = invoke("report", str(tmp_path / "out"), *report_case(case, tmp_path, outputs))
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_heatmap_bad_input(tmp_path: Path, outputs: dict[str, Path]) -> None:
    result = invoke("heatmap", str(outputs["root"] / "lat"), str(tmp_path / "fig"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "variance" in result.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    before = store_files(foreign)
    result = invoke("heatmap", str(outputs["var"]), str(foreign))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and store_files(foreign) == before


def test_examples_of_an_imported_cache_show_token_ids_and_join_the_report(
    tmp_path: Path, outputs: dict[str, Path]
) -> None:
    result = invoke("examples", str(outputs["root"] / "lat"), str(tmp_path / "ex"), "--top", "2")
    assert result.exit_code == 0, result.output
    assert "token ids are shown" in result.stderr.lower() and result.stderr.count("\n") == 1
    assert "token ids are shown" in (tmp_path / "ex" / "examples.md").read_text().lower()
    out = tmp_path / "report"
    result = invoke("report", str(out), "--variance", str(outputs["var"]), "--examples", str(tmp_path / "ex"))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    for name in ("examples.md", "examples.html", "examples.tsv"):
        assert f"(examples/{name})" in text and (out / "examples" / name).is_file()
