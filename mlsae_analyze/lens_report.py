"""The tuned-lens section of `mlsae-analyze report --lens-variance DIR`: a lens MLSAE beside the plain one.

The paper (Lawson et al., ICLR 2025) reports that training MLSAEs on lens-translated residuals leaves its findings
"qualitatively unchanged". The rule here (`unchanged`): each finding of findings.py that has a fixed threshold (the
within-token spread, pooled and per window, and the share of latents active at several layers) must land on the
same side of its threshold for the lens MLSAE as for the plain one; the claim holds when every finding that can be
measured on both does. It can go either way: a lens that moved one number across its threshold would be reported
as changing the finding. Reconstruction (FVU, delta CE) is set side by side but not judged: the paper makes no
claim about it for the lens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mlsae_analyze import plots
from mlsae_analyze.findings import (
    MULTI_LAYER_MIN,
    MULTI_LAYER_SHARE,
    SPREAD_RATIO_MAX,
    multi_layer_agrees,
    multi_layer_share,
    spread_agrees,
)
from mlsae_analyze.results import VarianceOutput, VarianceSummary
from mlsae_train.lens_eval import LensEvalResult, draw_lens_kl
from mlsae_train.results import EvalResult


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Rule:
    """A finding's number, read from a variance summary, and the side of its threshold that agrees."""

    name: str
    number: Callable[[VarianceSummary], float | None]
    agrees: Callable[[float], bool]
    threshold: str


RULES = (
    Rule(
        "Spread within a token vs over tokens (pooled `rel_var_token`)",
        lambda s: _finite(s.rel_var_token),
        spread_agrees,
        f"< {SPREAD_RATIO_MAX}",
    ),
    Rule(
        "Spread within a token vs over tokens (window `rel_var_t`)",
        lambda s: _finite((s.window or {}).get("rel_var_t")),
        spread_agrees,
        f"< {SPREAD_RATIO_MAX}",
    ),
    Rule(
        f"Latents active at 2+ layers (a layer holds {MULTI_LAYER_SHARE:.0%} of the mass)",
        multi_layer_share,
        multi_layer_agrees,
        f"> {MULTI_LAYER_MIN:.0%}",
    ),
)


@dataclass(frozen=True)
class LensCheck:
    """One finding on both MLSAEs: the numbers, whether each agrees with the paper, and whether they agree alike
    (None: not measurable on both)."""

    rule: Rule
    plain: float | None
    lens: float | None

    @property
    def unchanged(self) -> bool | None:
        if self.plain is None or self.lens is None:
            return None
        return self.rule.agrees(self.plain) == self.rule.agrees(self.lens)


def lens_checks(plain: VarianceSummary, lens: VarianceSummary) -> list[LensCheck]:
    return [LensCheck(rule, rule.number(plain), rule.number(lens)) for rule in RULES]


def unchanged(checks: list[LensCheck]) -> bool | None:
    """The verdict: every measurable finding on the same side for both (None: none measurable)."""
    verdicts = [c.unchanged for c in checks if c.unchanged is not None]
    return all(verdicts) if verdicts else None


def _cell(value: float | None, percent: bool = False) -> str:
    return "-" if value is None else f"{value:.1%}" if percent else f"{value:.4g}"


def _side(rule: Rule, value: float | None) -> str:
    return "-" if value is None else "agrees" if rule.agrees(value) else "differs"


def _reconstruction_rows(plain: EvalResult | None, lens: EvalResult | None) -> list[str]:
    """Mean FVU (raw units, and the lens space), delta CE and KL of both, where the eval results give them."""
    rows = [
        ("mean FVU, raw units", "fvu_mean"),
        ("mean FVU, lens space", "fvu_lens_mean"),
        ("mean delta CE (nats/token)", "delta_ce_mean"),
        ("mean KL(clean \\|\\| spliced)", "kl_mean"),  # a bare pipe would end the table cell
        ("dead fraction", "dead_fraction"),
    ]
    get = lambda r, k: _finite(getattr(r, k, None)) if r is not None else None  # noqa: E731
    return [f"| {label} | {_cell(get(plain, key))} | {_cell(get(lens, key))} |" for label, key in rows]


def curves_figure(plain: VarianceSummary, lens: VarianceSummary, title: str) -> Figure:
    """The multi-layer curve by share of mass for both MLSAEs."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for summary, label, style in ((plain, "plain", "o-"), (lens, "tuned lens", "s--")):
        points = (summary.multi_layer or {}).get("by_share", {})
        ax.plot([float(x) for x in points], list(points.values()), style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("a layer counts from this share of the latent's mass")
    ax.set_ylabel("latents active at 2+ layers")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(plots.wrapped(title, fig, 11), fontsize=11)
    return fig


def lens_figures(plain: VarianceOutput, lens: VarianceOutput, kl: LensEvalResult | None, out: Path) -> dict[str, Path]:
    """The lens MLSAE's heatmap, both multi-layer curves and (given it) the lens's KL by layer, into `out`."""
    v = lens
    paths = {
        "lens_heatmap": plots.layer_heatmap(
            v.probs, v.layer_mean, v.layers, out / "lens_layer_heatmap.png", "Lens MLSAE: where each latent fires"
        ),
        "lens_curves": plots.save_png(
            curves_figure(plain.summary, lens.summary, "Latents active at several layers: plain vs tuned lens"),
            out / "lens_multi_layer.png",
        ),
    }
    if kl is not None:
        paths["lens_kl"] = draw_lens_kl(kl, out / "lens_kl.png")
    return paths


def lens_section(
    plain: VarianceOutput,
    lens: VarianceOutput,
    evals: tuple[EvalResult | None, EvalResult | None],
    kl: LensEvalResult | None,
    link: dict[str, str],
) -> list[str]:
    """The section: the verdict and its rule, the findings side by side, reconstruction, figures."""
    checks = lens_checks(plain.summary, lens.summary)
    verdict = unchanged(checks)
    said = {True: "qualitatively unchanged", False: "changed", None: "not testable here"}[verdict]
    lines = [
        "## The tuned-lens variant: lens MLSAE vs plain MLSAE",
        "",
        "The paper reports that a tuned lens leaves its findings qualitatively unchanged. Rule: a finding is "
        "unchanged when its number lands on the same side of the Findings threshold for the lens MLSAE as for the "
        "plain one; the claim holds when every finding measurable on both is unchanged. "
        f"Verdict: **{said}**.",
        "",
        "| finding | threshold | plain | lens | plain verdict | lens verdict | unchanged |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for c in checks:
        pct = c.rule.agrees is multi_layer_agrees
        same = {True: "yes", False: "**no**", None: "-"}[c.unchanged]
        lines.append(
            f"| {c.rule.name} | {c.rule.threshold} | {_cell(c.plain, pct)} | {_cell(c.lens, pct)} | "
            f"{_side(c.rule, c.plain)} | {_side(c.rule, c.lens)} | {same} |"
        )
    lines += ["", "| also (not judged) | plain | lens |", "|---|---:|---:|"]
    lines += [
        f"| mean layer std (layers) | {_cell(_finite(plain.summary.mean_layer_std))} | "
        f"{_cell(_finite(lens.summary.mean_layer_std))} |",
        f"| `rel_var_latent` | {_cell(_finite(plain.summary.rel_var_latent))} | "
        f"{_cell(_finite(lens.summary.rel_var_latent))} |",
        *_reconstruction_rows(*evals),
        "",
        "FVU in raw units maps the lens MLSAE's reconstruction back through the exact inverse of each translator; "
        "delta CE splices that back into the model, so both compare like for like with the plain MLSAE.",
        "",
        f"![latents active at several layers, plain vs lens]({link['lens_curves']})",
        "",
        f"![lens MLSAE: where each latent fires]({link['lens_heatmap']})",
        "",
    ]
    if kl is not None:
        lines += [f"![lens KL by layer]({link['lens_kl']})", "", _kl_summary(kl), ""]
    return lines


def _kl_summary(kl: LensEvalResult) -> str:
    better = sum(t < g for t, g in zip(kl.kl_tuned[:-1], kl.kl_logit[:-1], strict=True))
    return (
        f"The lens on {kl.n_tokens:,} tokens: the tuned lens has lower KL(p_final || p_layer) than the logit lens "
        f"at {better} of {len(kl.layer) - 1} layers before the last; last block KL {kl.kl_tuned[-1]:.2g} nats."
    )
