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
    COMPARABLE,
    MULTI_LAYER_MIN,
    SPREAD_RATIO_MAX,
    StudyPoint,
    multi_layer_finding,
    reconstruction_finding,
    size_trend_finding,
    spread_finding,
    study_section,
)
from mlsae_analyze.layers import layer_distribution
from mlsae_analyze.results import CosineResult, VarianceOutput, VarianceSummary, variance_dataset
from mlsae_train.results import CompareResult
from tests.analyze.test_plots import PNG_SIGNATURE
from tests.analyze.test_report_cli import invoke

LAYERS = [0, 1, 2, 3]


def summary_of(rel_var_token: float, rel_var_t: float, frac_multi_layer: float) -> dict[str, Any]:
    """A summary whose window rel_var_t is `rel_var_t`, whose reference one is 50x smaller (not used by any rule),
    and whose multi-layer fraction at 10% of mass is `frac_multi_layer`."""
    window = {"exp_var_tf": 0.1, "exp_var_f": 1.0, "var_l": 2.0, "rel_var_f": 0.5, "rel_var_t": rel_var_t}
    curve = {"by_share": {"0.01": 1.0, "0.05": 0.9, "0.1": frac_multi_layer, "0.25": 0.1}, "by_rows": {"1": 1.0}}
    return {
        "window": window,
        "multi_layer": curve,
        "var_total": 2.0,
        "var_within_latent": 1.0,
        "var_within_token": rel_var_token,
        "rel_var_latent": 0.5,
        "rel_var_token": rel_var_token,
        "mean_layer_std": 0.75,
        "frac_multi_layer": frac_multi_layer,
        "n_rows": 400,
        "reference": {"exp_var_tf": 0.1, "exp_var_f": 1.0, "var_l": 2.0, "rel_var_f": 0.5, "rel_var_t": rel_var_t / 50},
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
    return dict(re.findall(r"^- \*\*(.+?)\.\*\* .* Verdict: \*\*(agrees|differs|not testable here)\*\*\.$", text, re.M))


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


@pytest.mark.parametrize("ratio", [None, float("nan"), -0.1, "0.1"], ids=["missing", "nan", "negative", "string"])
def test_spread_without_a_number_is_not_testable(ratio: Any) -> None:
    assert spread_finding(ratio, "rel_var_t", "window").verdict == "not testable here"


def test_no_spread_at_all_agrees() -> None:
    assert spread_finding(0.0, "rel_var_token", "pooled").verdict == "agrees"


@pytest.mark.parametrize(
    ("share", "verdict"), [(0.9, "agrees"), (MULTI_LAYER_MIN, "differs"), (0.2, "differs")], ids=["high", "at", "low"]
)
def test_multi_layer_rule_at_ten_percent_of_the_mass(share: float, verdict: str) -> None:
    summary = VarianceSummary.from_dict(summary_of(0.5, 0.5, share))
    finding = multi_layer_finding(summary)
    assert finding.verdict == verdict and f"{share:.1%} of the latents that fire" in finding.text
    assert "100% at 1%" in finding.text and "10% at 25%" in finding.text  # the whole curve is shown


def test_a_trend_over_model_sizes_is_not_testable_with_one_model() -> None:
    summary = VarianceSummary.from_dict(summary_of(0.5, 0.5, 0.9))
    cosine = CosineResult(layer_pairs=[[0, 1], [1, 2]], cosine=[0.8, 0.9], n_tokens=10)
    finding = size_trend_finding(summary, cosine)
    assert finding.verdict == "not testable here" and "0.85" in finding.text and "90.0%" in finding.text


@pytest.mark.parametrize(
    ("mlsae", "single", "verdict", "gap"),
    [
        ([0.3] * 4, [0.3, 0.3, 0.3, 0.3], "agrees", "0% lower"),
        ([0.3] * 4, [0.26, 0.26, 0.26, 0.26], "agrees", "15% higher"),
        ([0.3] * 4, [0.2, 0.2, 0.2, 0.2], "differs", "50% higher"),
        ([0.1] * 4, [0.2, None, 0.2, None], "differs", "50% lower"),
    ],
    ids=["equal", "within-tolerance", "worse", "better-with-missing"],
)
def test_reconstruction_rule_compares_means_with_a_tolerance(
    mlsae: list[float], single: list[float | None], verdict: str, gap: str
) -> None:
    data = compare_rows(mlsae, single)
    result = CompareResult(data["rows"], 2.5, 4, data["sources"])
    for metric in ("fvu", "delta_ce"):
        finding = reconstruction_finding(result, metric, metric)
        assert finding.verdict == verdict and gap in finding.text and f"{COMPARABLE:.0%}" in finding.text


def test_reconstruction_without_splice_or_singles_is_not_testable() -> None:
    data = compare_rows([0.3] * 4, [0.3] * 4, splice=False)
    result = CompareResult(data["rows"], None, None, data["sources"])
    assert reconstruction_finding(result, "fvu", "FVU").verdict == "agrees"
    finding = reconstruction_finding(result, "delta_ce", "delta CE")
    assert finding.verdict == "not testable here" and "--splice" in finding.text
    data = compare_rows([0.3] * 4, [None] * 4)
    assert reconstruction_finding(CompareResult(data["rows"], 2.5, 4, {}), "fvu", "FVU").verdict == "not testable here"


def test_the_training_length_study_says_which_verdicts_are_stable() -> None:
    points = [
        StudyPoint(500_000, VarianceSummary.from_dict(summary_of(0.2, 0.05, 0.6)), 0.4, 0.0),
        StudyPoint(8_000_000, VarianceSummary.from_dict(summary_of(0.05, 0.04, 0.7)), 0.2, 0.1),
    ]
    text = "\n".join(study_section(points))
    assert "| 500,000 | 0.4 | 0.0% | 0.2 | 0.05 | 60.0% |" in text
    assert (
        "(activation-weighted, pooled): differs at 500,000 rows, agrees at 8,000,000 rows: **not yet stable**" in text
    )
    assert "(per window, normalised mixtures): **agrees** at every length (2 lengths): stable." in text


def test_a_verdict_whose_number_heads_across_the_threshold_is_not_yet_stable() -> None:
    """The same verdict at every length is "stable" only if one more step like the last would not flip it."""
    rows = (500_000, 2_000_000, 8_000_000)
    window = (0.26, 0.22, 0.14)  # differs everywhere, but 0.14 - 0.08 = 0.06 would agree
    pooled = (0.56, 0.62, 0.59)  # differs everywhere and stays so (0.56)
    points = [
        StudyPoint(r, VarianceSummary.from_dict(summary_of(p, w, 0.6)), 0.3, 0.0)
        for r, p, w in zip(rows, pooled, window, strict=True)
    ]
    text = "\n".join(study_section(points))
    assert "(activation-weighted, pooled): **differs** at every length (3 lengths): stable." in text
    assert (
        "(per window, normalised mixtures): differs at every length (3 lengths), but its number moved from 0.22 to"
        in text
    )
    assert "about 0.06, across the rule's threshold: **not yet stable**" in text


@pytest.mark.parametrize("side", ["agree", "differ"])
def test_report_with_compare_states_the_numbers_and_verdicts(tmp_path: Path, side: str) -> None:
    agree = side == "agree"
    summary = summary_of(0.05 if agree else 0.2, 0.02 if agree else 0.5, 0.8 if agree else 0.3)
    single = [0.25, 0.25, 0.25, None] if agree else [0.1, 0.1, 0.1, None]
    mlsae = [0.3, 0.25, 0.3, 0.5]
    compare = compare_rows(mlsae, single)
    paths = write_outputs(tmp_path, summary, compare, [0.9, 0.8, 0.7])
    out = tmp_path / "report"
    args = ["--variance", str(paths["var"]), "--cosine", str(paths["cos"]), "--compare", str(paths["cmp"])]
    result = invoke("report", str(out), *args, "--title", "hand-made")
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert text.index("## Findings") < text.index("## Where latents fire")
    found = verdicts(text)
    assert len(found) == 6, found
    tested = {name: v for name, v in found.items() if v != "not testable here"}
    assert len(tested) == 5 and set(tested.values()) == {"agrees" if agree else "differs"}, found
    assert f"Here {5 if agree else 0} agree, {0 if agree else 5} differ, 1 not testable here." in text
    assert f"`rel_var_token` = {summary['rel_var_token']:.4g}" in text
    assert f"`rel_var_t` = {summary['window']['rel_var_t']:.4g}" in text
    assert f"Not used for a verdict: the reference mode's `rel_var_t` = {summary['reference']['rel_var_t']:.4g}" in text
    assert f"{summary['multi_layer']['by_share']['0.1']:.1%} of the latents that fire" in text
    assert "mean adjacent-layer cosine 0.8" in text
    mean_mlsae, mean_single = sum(mlsae[:3]) / 3, sum(single[:3]) / 3
    assert f"mean FVU is {mean_mlsae:.4g} for the MLSAE and {mean_single:.4g}" in text
    assert "compared layers (0-2)" in text
    assert "| layer | FVU mlsae | FVU single | dCE mlsae | dCE single |" in text and "| 3 | 0.5 | - |" in text
    assert "Clean CE 2.5000 nats/token over 4 windows." in text
    assert (out / "figures" / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "](figures/compare.png)" in text and (out / "report.html").is_file()


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
