"""This run's numbers set beside the paper's findings: the "Findings" section of `mlsae-analyze report --compare`.

Lawson et al. (ICLR 2025; METHOD.md section 1) state qualitative findings: for one token a latent is usually
active at one layer, while over many tokens it is active at many (a spread about 100x larger, `rel_var_token`
about 0.01), and larger models show more multi-layer activity and more similar adjacent layers. Each check
below takes our number, states the paper's claim, and applies a rule fixed in this module (the constants) to
say "agrees" or "differs", or "not tested" when the input for it is missing. The rules are simple and written
into the report text, so a reader can judge a rule instead of trusting it; they are not chosen to fit any run,
and changing one is a code change that needs a reason.

Inputs: a `variance` summary.json (dict), a `cosine` cosine.json (dict, optional) and the rows of a
`mlsae-train compare` compare.json (`CompareResult`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

from mlsae_analyze.comparison import NOTE, markdown_table
from mlsae_analyze.examples import layer_runs
from mlsae_analyze.results import CosineResult, VarianceSummary
from mlsae_train.results import CompareResult

SPREAD_RATIO_MAX = 0.1
"""A within-token / aggregated spread ratio below this (at least 10x less spread within a token) agrees with the
paper's about 100x (ratio about 0.01): one of its two orders of magnitude is required, not both."""

PAPER_SPREAD_RATIO = 0.01

MULTI_LAYER_MIN = 0.5
"""More than this share of the latents that fire must be active at more than one layer ("many layers")."""

COSINE_SIMILAR = 0.5
"""A mean adjacent-layer cosine at or above this counts as "adjacent layers similar"."""

WORSE_SHARE = 0.5
"""The MLSAE must be worse than the single-layer SAE at more than this share of the compared layers."""


@dataclass(frozen=True)
class Finding:
    """One check. `text` holds our number, the paper's claim and the rule; `agrees` is the rule's verdict
    (None: not tested, with the reason in `text`)."""

    name: str
    text: str
    agrees: bool | None

    @property
    def verdict(self) -> str:
        return "not tested" if self.agrees is None else "agrees" if self.agrees else "differs"

    def markdown(self) -> str:
        return f"- **{self.name}.** {self.text} Verdict: **{self.verdict}**."


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def spread_finding(ratio: Any, key: str, mode: str) -> Finding:
    """Within-token vs aggregated spread over layers: `ratio` is rel_var_token (or the reference rel_var_t)."""
    name = f"Spread over layers within a token vs over tokens ({mode})"
    rule = f"Rule: agrees if `{key}` < {SPREAD_RATIO_MAX} (at least {1 / SPREAD_RATIO_MAX:.0f}x smaller)."
    claim = (
        f"The paper: a latent is usually active at one layer for a given token but at many over tokens, a "
        f"variance about {1 / PAPER_SPREAD_RATIO:.0f}x smaller within a token (`{key}` about {PAPER_SPREAD_RATIO})."
    )
    value = _number(ratio)
    if value is None or value <= 0:
        return Finding(name, f"`{key}` is {ratio!r}, not a positive number. {claim} {rule}", None)
    ours = (
        f"`{key}` = {value:.4g}: a latent's variance over layers within one token is {1 / value:.3g}x smaller "
        f"than over all tokens ({math.log10(1 / value):.2f} orders of magnitude)."
    )
    return Finding(name, f"{ours} {claim} {rule}", value < SPREAD_RATIO_MAX)


def multi_layer_finding(summary: VarianceSummary) -> Finding:
    """The share of latents that fire at more than one layer (`frac_multi_layer`, with the summary's min_count)."""
    name = "Latents active at more than one layer"
    claim = "The paper: aggregated over tokens, latents are active at many layers."
    rule = f"Rule: agrees if more than {MULTI_LAYER_MIN:.0%} of the latents that fire are."
    share = _number(summary.frac_multi_layer)
    if share is None:
        return Finding(name, f"`frac_multi_layer` is not a number in the variance summary. {claim} {rule}", None)
    min_count = summary.min_count
    std = _number(summary.mean_layer_std)
    ours = (
        f"{share:.1%} of the latents that fire are active at more than one layer (a layer counts from "
        f"{min_count} row(s); `variance --min-count` raises it)"
        + (f"; their mean layer std is {std:.3g} layers." if std is not None else ".")
    )
    return Finding(name, f"{ours} {claim} {rule}", share > MULTI_LAYER_MIN)


def cosine_finding(cosine: CosineResult | None, summary: VarianceSummary) -> Finding:
    """Adjacent-layer cosine, checked for the link the paper draws between it and multi-layer latents."""
    name = "Adjacent-layer cosine similarity"
    claim = (
        "The paper: larger models have more similar adjacent layers and more multi-layer latents; one model "
        "cannot test that trend, so the check is the link itself."
    )
    rule = (
        f"Rule: agrees if the mean cosine is >= {COSINE_SIMILAR} and more than {MULTI_LAYER_MIN:.0%} of latents "
        f"are multi-layer, or the cosine is below {COSINE_SIMILAR} and at most {MULTI_LAYER_MIN:.0%} are."
    )
    values = [_number(v) for v in cosine.cosine] if cosine is not None else []
    share = _number(summary.frac_multi_layer)
    if cosine is None or not values or None in values or share is None:
        return Finding(name, f"Not measured here (give `--cosine`). {claim} {rule}", None)
    measured = cast("list[float]", values)  # no None: checked above
    mean = sum(measured) / len(measured)
    low = min(range(len(measured)), key=measured.__getitem__)
    a, b = cosine.layer_pairs[low]
    ours = (
        f"The mean over {len(measured)} adjacent pairs is {mean:.4g} (lowest {measured[low]:.4g}, layers {a} → {b}), "
        f"with {share:.1%} of latents multi-layer."
    )
    agrees = (mean >= COSINE_SIMILAR) == (share > MULTI_LAYER_MIN)
    return Finding(name, f"{ours} {claim} {rule}", agrees)


def reconstruction_finding(result: CompareResult, metric: str, label: str) -> Finding:
    """MLSAE vs single-layer SAEs on one metric (fvu or delta_ce), over the layers that have both."""
    name = f"{label}: MLSAE vs single-layer SAEs"
    claim = (
        "Expected: one dictionary shared by every layer reconstructs a layer less well than an SAE of the same "
        "size trained on that layer alone (the paper compares the two; METHOD.md lists no number for it)."
    )
    rule = f"Rule: agrees if the MLSAE is worse (higher) at more than {WORSE_SHARE:.0%} of the compared layers."
    numbers = [
        (row["layer"], _number(row["mlsae"].get(metric)), _number(row["single"].get(metric)))
        for row in result.rows
        if row.get("single")
    ]
    pairs = [(layer, m, s) for layer, m, s in numbers if m is not None and s is not None]
    if not pairs:
        why = "no layer has both values" + (" (run `compare --splice`)" if metric != "fvu" else " (give --single)")
        return Finding(name, f"Not compared: {why}. {claim} {rule}", None)
    n = len(pairs)
    worse = sum(m > s for _, m, s in pairs)
    ours = (
        f"Over the {n} compared layers ({layer_runs([layer for layer, _, _ in pairs])}) the mean {label} is "
        f"{sum(m for _, m, _ in pairs) / n:.4g} for the MLSAE and {sum(s for _, _, s in pairs) / n:.4g} for the "
        f"single-layer SAEs; the MLSAE is worse at {worse} of {n}."
    )
    return Finding(name, f"{ours} {claim} {rule}", worse > WORSE_SHARE * n)


def findings(summary: VarianceSummary, cosine: CosineResult | None, result: CompareResult) -> list[Finding]:
    """Every check, in the order of the paper's findings, then reconstruction."""
    reference = summary.reference or {}
    return [
        spread_finding(summary.rel_var_token, "rel_var_token", "activation-weighted, pooled"),
        spread_finding(reference.get("rel_var_t"), "rel_var_t", "reference mode, per window"),
        multi_layer_finding(summary),
        cosine_finding(cosine, summary),
        reconstruction_finding(result, "fvu", "FVU"),
        reconstruction_finding(result, "delta_ce", "delta CE"),
    ]


def findings_section(
    summary: VarianceSummary, cosine: CosineResult | None, result: CompareResult, figure: str
) -> list[str]:
    """The Findings section: one verdict per finding, then the comparison table and its figure."""
    checks = findings(summary, cosine, result)
    counts = {v: sum(c.verdict == v for c in checks) for v in ("agrees", "differs", "not tested")}
    lines = [
        "## Findings: the paper's claims on this run",
        "",
        "Each item states our number, the claim of Lawson et al. (ICLR 2025) it bears on, and the rule that "
        "decides the verdict; the rules are fixed in `mlsae_analyze/findings.py`, not tuned to this run. "
        f"Here {counts['agrees']} agree, {counts['differs']} differ, {counts['not tested']} not tested. The spread "
        "is checked in both modes of `variance`: the paper's numbers were computed as the reference mode does "
        "(per window, every (token, latent) pair weighted alike), the pooled activation-weighted mode is this "
        "project's (METHOD.md section 6; both are tabulated below).",
        "",
        *[check.markdown() for check in checks],
        "",
        "### MLSAE vs single-layer SAEs",
        "",
        f"MLSAE `{result.sources.get('mlsae', '?')}` beside single-layer SAEs of the same expansion factor and k, "
        f"on the rows of cache `{result.sources.get('cache', '?')}` that `compare` evaluated (held out from "
        "training if it was given the training range's end as `--start`).",
        "",
        f"![MLSAE vs single-layer SAEs]({figure})",
        "",
        *markdown_table(result),
        "",
        NOTE
        + (
            f" Clean CE {result.clean_ce:.4f} nats/token over {result.n_windows} windows."
            if result.clean_ce is not None
            else ""
        ),
        "",
    ]
    return lines
