"""The tuned-lens section of the report: the "qualitatively unchanged" rule both ways, and the CLI end to end on
hand-made variance outputs of a plain and a lens MLSAE, their eval results and an eval-lens result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlsae_analyze.lens_report import lens_checks, unchanged
from mlsae_analyze.results import VarianceSummary
from mlsae_train.lens_eval import LENS_EVAL_JSON, LensEvalResult
from mlsae_train.results import EvalResult
from tests.analyze.test_findings import LAYERS, compare_rows, summary_of, write_outputs
from tests.analyze.test_plots import PNG_SIGNATURE
from tests.analyze.test_report_cli import invoke


def summary(rel_var_token: float, rel_var_t: float, multi: float) -> VarianceSummary:
    return VarianceSummary.from_dict(summary_of(rel_var_token, rel_var_t, multi))


@pytest.mark.parametrize(
    ("lens", "verdict"),
    [
        ((0.06, 0.03, 0.7), True),  # numbers move, every one stays on its side
        ((0.2, 0.03, 0.7), False),  # the pooled spread crosses 0.1
        ((0.06, 0.03, 0.4), False),  # the multi-layer share falls below 50%
    ],
    ids=["same-sides", "spread-crosses", "multi-layer-crosses"],
)
def test_unchanged_means_every_finding_on_the_same_side(lens: tuple[float, float, float], verdict: bool) -> None:
    checks = lens_checks(summary(0.05, 0.02, 0.8), summary(*lens))
    assert len(checks) == 3 and unchanged(checks) is verdict


def test_a_finding_measured_on_one_side_only_is_left_out() -> None:
    lens = summary_of(0.05, 0.02, 0.8)
    lens["window"] = None
    checks = lens_checks(summary(0.05, 0.02, 0.8), VarianceSummary.from_dict(lens))
    assert [c.unchanged for c in checks] == [True, None, True] and unchanged(checks) is True


def eval_json(path: Path, fvu: float, lens: bool) -> Path:
    n = len(LAYERS)
    result = EvalResult(
        layer=LAYERS, fvu=[fvu] * n, mse=[1.0] * n, l0=[2.0] * n, n_rows=[10] * n, dead_fraction=0.0, fvu_mean=fvu,
        delta_ce=[fvu / 10] * n, kl=[fvu / 20] * n, delta_ce_mean=fvu / 10, kl_mean=fvu / 20, clean_ce=2.5,
        fvu_lens=[fvu * 0.9] * n if lens else None, fvu_lens_mean=fvu * 0.9 if lens else None,
    )  # fmt: skip
    return result.write(path)


@pytest.mark.parametrize("side", ["unchanged", "changed"])
def test_report_sets_the_lens_mlsae_beside_the_plain_one(tmp_path: Path, side: str) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "lens").mkdir()
    rows = compare_rows([0.3] * 4, [0.2] * 4)
    plain = write_outputs(tmp_path / "plain", summary_of(0.05, 0.02, 0.8), rows, [0.9] * 3)
    lens_summary = summary_of(0.06, 0.03, 0.7) if side == "unchanged" else summary_of(0.3, 0.03, 0.7)
    lens = write_outputs(tmp_path / "lens", lens_summary, rows, [0.9] * 3)
    kl = tmp_path / "kl"
    kl.mkdir()
    LensEvalResult(LAYERS, [0.5, 0.2, 0.1, 0.0], [3.0, 2.0, 1.0, 0.0], 100, 0, 120, True).write(kl / LENS_EVAL_JSON)
    args = ["--variance", str(plain["var"]), "--eval", str(eval_json(tmp_path / "p.json", 0.3, False))]
    args += ["--lens-variance", str(lens["var"]), "--lens-eval", str(eval_json(tmp_path / "l.json", 0.35, True))]
    out = tmp_path / "report"
    result = invoke("report", str(out), *args, "--lens-kl", str(kl), "--title", "hand-made")
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert f"Verdict: **{'qualitatively unchanged' if side == 'unchanged' else 'changed'}**." in text
    assert "| mean FVU, raw units | 0.3 | 0.35 |" in text and "| mean FVU, lens space | - | 0.315 |" in text
    assert "| mean delta CE (nats/token) | 0.03 | 0.035 |" in text
    assert "| mean KL(clean \\|\\| spliced) | 0.015 | 0.0175 |" in text
    assert "at 3 of 3 layers before the last" in text
    rows = re.findall(r"^\| Spread within a token vs over tokens \(pooled.*$", text, re.M)
    assert len(rows) == 1 and rows[0].endswith("| yes |" if side == "unchanged" else "| **no** |")
    for name in ("lens_layer_heatmap.png", "lens_multi_layer.png", "lens_kl.png"):
        assert (out / "figures" / name).read_bytes().startswith(PNG_SIGNATURE), name
        assert f"](figures/{name})" in text
