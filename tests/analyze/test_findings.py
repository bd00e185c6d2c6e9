"""The Findings section of `report --compare`: each rule on both sides of its threshold, and the CLI end to end on
small hand-made variance, cosine and compare outputs (so every number in the report is known in advance)."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlsae_analyze.findings import (
    COSINE_SIMILAR,
    MULTI_LAYER_MIN,
    SPREAD_RATIO_MAX,
    cosine_finding,
    multi_layer_finding,
    reconstruction_finding,
    spread_finding,
)
from mlsae_analyze.layers import layer_distribution
from mlsae_analyze.results import CosineResult, VarianceOutput, VarianceSummary, variance_dataset
from mlsae_train.results import CompareResult
from tests.analyze.test_plots import PNG_SIGNATURE
from tests.analyze.test_report_cli import invoke

LAYERS = [0, 1, 2, 3]


def summary_of(rel_var_token: float, rel_var_t: float, frac_multi_layer: float) -> dict[str, Any]:
    return {
        "var_total": 2.0,
        "var_within_latent": 1.0,
        "var_within_token": rel_var_token,
        "rel_var_latent": 0.5,
        "rel_var_token": rel_var_token,
        "mean_layer_std": 0.75,
        "frac_multi_layer": frac_multi_layer,
        "n_rows": 400,
        "reference": {"exp_var_tf": 0.1, "exp_var_f": 1.0, "var_l": 2.0, "rel_var_f": 0.5, "rel_var_t": rel_var_t},
        "latents": "nowhere/latents",
        "n_latents": 8,
        "k": 2,
        "layers": LAYERS,
        "min_count": 1,
        "include_untrainable": False,
    }


def compare_rows(mlsae_fvu: list[float], single_fvu: list[float | None], splice: bool = True) -> dict[str, Any]:
    """compare.json rows: the MLSAE's delta CE is its FVU / 10, a single-layer SAE's likewise."""
    rows = []
    for layer, m, s in zip(LAYERS, mlsae_fvu, single_fvu, strict=True):
        metrics = [{"fvu": v, "dead_fraction": 0.0} if v is not None else None for v in (m, s)]
        for side, v in zip(metrics, (m, s), strict=True):
            if side is not None and splice:
                side.update({"delta_ce": v / 10, "kl": v / 20})
        rows.append({"layer": layer, "mlsae": metrics[0], "single": metrics[1]})
    sources = {"mlsae": "runs/mlsae", "single": {}, "cache": "runs/cache"}
    return {"rows": rows, "clean_ce": 2.5 if splice else None, "n_windows": 4 if splice else None, "sources": sources}


def write_outputs(root: Path, summary: dict[str, Any], compare: dict[str, Any], cosine: list[float]) -> dict[str, Path]:
    """A `variance` OUT (variance.zarr from random totals, summary.json), a `cosine` OUT and a `compare` OUT."""
    totals = np.random.default_rng(0).random((len(LAYERS), 8))
    counts = np.ones_like(totals, dtype=np.int64)
    dataset = variance_dataset(layer_distribution(totals), counts, totals, counts.sum(0), tuple(LAYERS), {})
    paths = {name: root / name for name in ("var", "cos", "cmp")}
    for path in paths.values():
        path.mkdir()
    VarianceOutput(dataset, VarianceSummary.from_dict(summary)).write(paths["var"])
    pairs = [[a, b] for a, b in pairwise(LAYERS)]
    (paths["cos"] / "cosine.json").write_text(json.dumps({"layer_pairs": pairs, "cosine": cosine, "n_tokens": 100}))
    (paths["cmp"] / "compare.json").write_text(json.dumps(compare))
    return paths


def verdicts(text: str) -> dict[str, str]:
    """Finding name -> verdict, from the bullet list of the Findings section."""
    return dict(re.findall(r"^- \*\*(.+?)\.\*\* .* Verdict: \*\*(agrees|differs|not tested)\*\*\.$", text, re.M))


@pytest.mark.parametrize(
    ("ratio", "verdict"),
    [(0.01, "agrees"), (SPREAD_RATIO_MAX * 0.99, "agrees"), (SPREAD_RATIO_MAX, "differs"), (0.635, "differs")],
    ids=["paper", "just-below", "at-threshold", "demo-like"],
)
def test_spread_rule(ratio: float, verdict: str) -> None:
    finding = spread_finding(ratio, "rel_var_token", "pooled")
    assert finding.verdict == verdict
    assert f"`rel_var_token` = {ratio:.4g}" in finding.text and f"{1 / ratio:.3g}x" in finding.text
    assert f"< {SPREAD_RATIO_MAX}" in finding.text and "100x" in finding.text


@pytest.mark.parametrize("ratio", [None, float("nan"), 0.0, "0.1"], ids=["missing", "nan", "zero", "string"])
def test_spread_without_a_number_is_not_tested(ratio: Any) -> None:
    assert spread_finding(ratio, "rel_var_t", "reference").verdict == "not tested"


@pytest.mark.parametrize(
    ("share", "cosine", "multi", "linked"),
    [
        (0.9, 0.9, "agrees", "agrees"),
        (MULTI_LAYER_MIN, 0.9, "differs", "differs"),
        (0.2, COSINE_SIMILAR - 0.01, "differs", "agrees"),
        (0.9, COSINE_SIMILAR - 0.01, "agrees", "differs"),
        (0.2, COSINE_SIMILAR, "differs", "differs"),
    ],
    ids=["both-high", "share-at-threshold", "both-low", "cosine-low", "cosine-at-threshold"],
)
def test_multi_layer_and_cosine_rules(share: float, cosine: float, multi: str, linked: str) -> None:
    summary = VarianceSummary.from_dict(summary_of(0.5, 0.5, share))
    assert multi_layer_finding(summary).verdict == multi
    assert f"{share:.1%} of the latents" in multi_layer_finding(summary).text
    data = CosineResult(layer_pairs=[[0, 1], [1, 2]], cosine=[cosine - 0.05, cosine + 0.05], n_tokens=10)
    finding = cosine_finding(data, summary)
    assert finding.verdict == linked and f"is {cosine:.4g} (lowest {cosine - 0.05:.4g}, layers 0 → 1)" in finding.text
    assert cosine_finding(None, summary).verdict == "not tested"


@pytest.mark.parametrize(
    ("mlsae", "single", "verdict", "worse"),
    [
        ([0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.4], "agrees", "3 of 4"),
        ([0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.4, 0.4], "differs", "2 of 4"),
        ([0.3, 0.3, 0.3, 0.3], [0.2, None, 0.4, 0.4], "differs", "1 of 3"),
        ([0.3, 0.3, 0.3, 0.3], [0.2, None, 0.2, None], "agrees", "2 of 2"),
    ],
    ids=["worse-at-most", "worse-at-half", "one-missing", "two-missing"],
)
def test_reconstruction_rule(mlsae: list[float], single: list[float | None], verdict: str, worse: str) -> None:
    data = compare_rows(mlsae, single)
    result = CompareResult(data["rows"], 2.5, 4, data["sources"])
    pairs = [(m, s) for m, s in zip(mlsae, single, strict=True) if s is not None]
    for metric, scale in (("fvu", 1.0), ("delta_ce", 0.1)):
        finding = reconstruction_finding(result, metric, metric)
        assert finding.verdict == verdict and f"worse at {worse}." in finding.text
        means = [sum(p[i] for p in pairs) * scale / len(pairs) for i in (0, 1)]
        assert f"is {means[0]:.4g} for the MLSAE and {means[1]:.4g} for the single-layer SAEs" in finding.text


def test_reconstruction_without_splice_or_singles_is_not_tested() -> None:
    data = compare_rows([0.3] * 4, [0.2] * 4, splice=False)
    result = CompareResult(data["rows"], None, None, data["sources"])
    assert reconstruction_finding(result, "fvu", "FVU").verdict == "agrees"
    finding = reconstruction_finding(result, "delta_ce", "delta CE")
    assert finding.verdict == "not tested" and "--splice" in finding.text
    data = compare_rows([0.3] * 4, [None] * 4)
    assert reconstruction_finding(CompareResult(data["rows"], 2.5, 4, {}), "fvu", "FVU").verdict == "not tested"


@pytest.mark.parametrize("side", ["agree", "differ"])
def test_report_with_compare_states_the_numbers_and_verdicts(tmp_path: Path, side: str) -> None:
    agree = side == "agree"
    summary = summary_of(0.05 if agree else 0.2, 0.02 if agree else 0.5, 0.8 if agree else 0.3)
    single = [0.2, 0.2, 0.2, None] if agree else [0.4, 0.4, 0.2, None]
    compare = compare_rows([0.3, 0.35, 0.3, 0.5], single)
    paths = write_outputs(tmp_path, summary, compare, [0.9, 0.8, 0.7] if agree else [0.9, 0.9, 0.9])
    out = tmp_path / "report"
    args = ["--variance", str(paths["var"]), "--cosine", str(paths["cos"]), "--compare", str(paths["cmp"])]
    result = invoke("report", str(out), *args, "--title", "hand-made")
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert text.index("## Findings") < text.index("## Where latents fire")
    found = verdicts(text)
    assert len(found) == 6 and set(found.values()) == {"agrees" if agree else "differs"}, found
    assert f"Here {6 if agree else 0} agree, {0 if agree else 6} differ, 0 not tested." in text
    assert f"`rel_var_token` = {summary['rel_var_token']:.4g}" in text
    assert f"`rel_var_t` = {summary['reference']['rel_var_t']:.4g}" in text
    assert f"{summary['frac_multi_layer']:.1%} of the latents that fire" in text
    assert f"mean over 3 adjacent pairs is {0.8 if agree else 0.9:.4g}" in text
    mean_single = sum(s for s in single if s is not None) / 3
    assert f"mean FVU is {(0.3 + 0.35 + 0.3) / 3:.4g} for the MLSAE and {mean_single:.4g}" in text
    assert "compared layers (0-2)" in text
    assert "| layer | FVU mlsae | FVU single | dCE mlsae | dCE single |" in text and "| 3 | 0.5 | - |" in text
    assert "Clean CE 2.5000 nats/token over 4 windows." in text
    assert (out / "figures" / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "](figures/compare.png)" in text


def test_report_without_compare_has_no_findings(tmp_path: Path) -> None:
    paths = write_outputs(tmp_path, summary_of(0.05, 0.02, 0.8), compare_rows([0.3] * 4, [0.2] * 4), [0.9] * 3)
    out = tmp_path / "report"
    assert invoke("report", str(out), "--variance", str(paths["var"])).exit_code == 0
    text = (out / "report.md").read_text()
    assert "## Findings" not in text and not (out / "figures" / "compare.png").exists()


def bad_compare(case: str, cmp: Path) -> Path:
    """Break the compare OUT `cmp` as `case` says; returns the path to give to --compare."""
    if case == "missing-dir":
        return cmp.parent / "nope"
    if case == "a-file":
        return cmp / "compare.json"
    if case == "no-json":
        (cmp / "compare.json").unlink()
    elif case == "not-json":
        (cmp / "compare.json").write_text("{not json")
    elif case == "a-list":
        (cmp / "compare.json").write_text("[]")
    elif case == "no-rows":
        (cmp / "compare.json").write_text(json.dumps({"rows": []}))
    elif case == "bad-row":
        (cmp / "compare.json").write_text(json.dumps({"rows": [{"layer": 0, "mlsae": {"fvu": "x"}, "single": None}]}))
    elif case == "bad-single":
        rows = [{"layer": 0, "mlsae": {"fvu": 0.1}, "single": {"kl": 0.1}}]
        (cmp / "compare.json").write_text(json.dumps({"rows": rows}))
    return cmp


@pytest.mark.parametrize(
    "case", ["missing-dir", "a-file", "no-json", "not-json", "a-list", "no-rows", "bad-row", "bad-single"]
)
def test_bad_compare_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    paths = write_outputs(tmp_path, summary_of(0.05, 0.02, 0.8), compare_rows([0.3] * 4, [0.2] * 4), [0.9] * 3)
    given = bad_compare(case, paths["cmp"])
    out = tmp_path / "report"
    result = invoke("report", str(out), "--variance", str(paths["var"]), "--compare", str(given))
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "compare" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]
