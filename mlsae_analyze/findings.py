"""This run's numbers set beside the paper's claims: the "Findings" section of `mlsae-analyze report --compare`.

Lawson et al. (ICLR 2025) report, for Pythia models: for one token a latent is usually active at one layer while over
many tokens it is active at many (a spread about 100x larger: `rel_var_token` about 0.01); larger models show more
multi-layer activity and more similar adjacent layers; and an MLSAE reaches reconstruction error and downstream loss
comparable to single-layer SAEs. Each check below takes our number, states the claim, and applies a rule fixed in
this module (the constants) to say "agrees", "differs", or "not testable here" (one model cannot show a trend over
model sizes; an input may be missing). Every rule uses statistics that do not change when the layers are relabelled,
and each is written into the report, so a reader can judge the rule instead of trusting it. Changing a rule is a code
change that needs a reason.

Inputs: a `variance` summary, a `cosine` result (optional), a `compare` result, and optionally the summaries of the
same MLSAE trained for several lengths (the training-length study), which says whether each verdict is stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlsae_analyze.comparison import NOTE, markdown_table
from mlsae_analyze.layers import layer_runs
from mlsae_analyze.results import CosineResult, VarianceSummary
from mlsae_train.results import CompareResult

SPREAD_RATIO_MAX = 0.1
"""A within-token / aggregated spread ratio below this (at least 10x less spread within a token) agrees with the
paper's about 100x (ratio about 0.01): one of its two orders of magnitude is required, not both."""

PAPER_SPREAD_RATIO = 0.01

MULTI_LAYER_SHARE = 0.10
"""A layer counts for a latent when it holds at least this share of the latent's activation mass: a tenth is a real
part of the latent, not stray firings (at 1% nearly every latent counts as multi-layer, at 25% at most four layers
can count)."""

MULTI_LAYER_MIN = 0.5
"""More than this share of the latents that fire must count at two layers or more ("active at many layers")."""

COMPARABLE = 0.25
"""Two mean errors are comparable when they differ by at most this fraction of the single-layer SAEs' mean."""

VERDICTS = ("agrees", "differs", "not testable here")


@dataclass(frozen=True)
class Finding:
    """One check. `text` holds our number, the paper's claim and the rule; `agrees` is the rule's verdict (None:
    not testable here, with the reason in `text`)."""

    name: str
    text: str
    agrees: bool | None

    @property
    def verdict(self) -> str:
        return VERDICTS[2] if self.agrees is None else VERDICTS[0] if self.agrees else VERDICTS[1]

    def markdown(self) -> str:
        return f"- **{self.name}.** {self.text} Verdict: **{self.verdict}**."


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def spread_agrees(ratio: float) -> bool:
    """The spread rule: at least 1 / SPREAD_RATIO_MAX times less spread within a token."""
    return ratio < SPREAD_RATIO_MAX


def multi_layer_agrees(share: float) -> bool:
    """The multi-layer rule: more than MULTI_LAYER_MIN of the latents that fire count at two layers or more."""
    return share > MULTI_LAYER_MIN


def spread_finding(ratio: Any, key: str, mode: str) -> Finding:
    """Within-token vs aggregated spread over layers: `ratio` is rel_var_token (pooled) or rel_var_t (window)."""
    name = f"Spread over layers within a token vs over tokens ({mode})"
    rule = f"Rule: agrees if `{key}` < {SPREAD_RATIO_MAX} (at least {1 / SPREAD_RATIO_MAX:.0f}x smaller)."
    claim = (
        f"The paper: a latent is usually active at one layer for a given token but at many over tokens, a "
        f"variance about {1 / PAPER_SPREAD_RATIO:.0f}x smaller within a token (`{key}` about {PAPER_SPREAD_RATIO})."
    )
    value = _number(ratio)
    if value is None or value < 0:
        return Finding(name, f"`{key}` is {ratio!r}, not a number >= 0. {claim} {rule}", None)
    if value == 0:
        ours = f"`{key}` = 0: within one token a latent does not spread over layers at all."
    else:
        ours = (
            f"`{key}` = {value:.4g}: a latent's variance over layers within one token is {1 / value:.3g}x smaller "
            f"than over all tokens ({math.log10(1 / value):.2f} orders of magnitude)."
        )
    return Finding(name, f"{ours} {claim} {rule}", spread_agrees(value))


def multi_layer_share(summary: VarianceSummary, share: float = MULTI_LAYER_SHARE) -> float | None:
    """The fraction of active latents with two layers or more that each hold `share` of their mass."""
    return _number(((summary.multi_layer or {}).get("by_share") or {}).get(f"{share:g}"))


def multi_layer_finding(summary: VarianceSummary) -> Finding:
    """The share of latents active at several layers, at the threshold MULTI_LAYER_SHARE, with the whole curve."""
    name = "Latents active at more than one layer"
    claim = "The paper: aggregated over tokens, latents are active at many layers."
    rule = (
        f"Rule: a layer counts for a latent when it holds at least {MULTI_LAYER_SHARE:.0%} of the latent's "
        f"activation mass; agrees if more than {MULTI_LAYER_MIN:.0%} of the latents that fire have two such layers."
    )
    value = multi_layer_share(summary)
    if value is None:
        return Finding(name, f"The variance output has no multi-layer curve (re-run `variance`). {claim} {rule}", None)
    curve = summary.multi_layer or {}
    shares = ", ".join(f"{v:.0%} at {float(s):.0%}" for s, v in curve.get("by_share", {}).items())
    rows = ", ".join(f"{v:.0%} from {r} row(s)" for r, v in curve.get("by_rows", {}).items())
    ours = (
        f"{value:.1%} of the latents that fire have two layers or more holding {MULTI_LAYER_SHARE:.0%} of their "
        f"mass. The fraction depends on the threshold: by share of mass {shares}; by rows {rows}."
    )
    return Finding(name, f"{ours} {claim} {rule}", multi_layer_agrees(value))


def size_trend_finding(summary: VarianceSummary, cosine: CosineResult | None) -> Finding:
    """The paper's trend over model sizes: one model measures a point, not a trend."""
    name = "More multi-layer latents and more similar adjacent layers in larger models"
    share = multi_layer_share(summary)
    ours = f"This model: {share:.1%} of latents multi-layer at {MULTI_LAYER_SHARE:.0%} of mass" if share else ""
    if cosine is not None and cosine.cosine:
        mean = sum(cosine.cosine) / len(cosine.cosine)
        ours += f"{'; ' if ours else 'This model: '}mean adjacent-layer cosine {mean:.4g}"
    claim = "The paper: both grow with model size (Pythia-70m to 1b)."
    return Finding(
        name, f"{ours or 'Not measured'}. {claim} A trend needs several models: one run cannot test it.", None
    )


def reconstruction_finding(result: CompareResult, metric: str, label: str) -> Finding:
    """MLSAE vs single-layer SAEs on one metric (fvu or delta_ce): comparable means, as the paper states it."""
    name = f"{label}: MLSAE vs single-layer SAEs"
    claim = (
        "The paper: an MLSAE reaches reconstruction error and downstream loss comparable to single-layer SAEs of the "
        "same size."
    )
    rule = (
        f"Rule: agrees if the two means over the compared layers differ by at most {COMPARABLE:.0%} of the "
        "single-layer mean."
    )
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
    mlsae, single = sum(m for _, m, _ in pairs) / n, sum(s for _, _, s in pairs) / n
    gap = (mlsae - single) / abs(single) if single else math.inf
    side = "higher" if gap > 0 else "lower"
    dead = _dead_fractions(result)
    ours = (
        f"Over the {n} compared layers ({layer_runs([layer for layer, _, _ in pairs])}) the mean {label} is "
        f"{mlsae:.4g} for the MLSAE and {single:.4g} for the single-layer SAEs: {abs(gap):.0%} {side}.{dead}"
    )
    return Finding(name, f"{ours} {claim} {rule}", abs(gap) <= COMPARABLE)


def _dead_fractions(result: CompareResult) -> str:
    rows = [r for r in result.rows if r.get("single")]
    mlsae = _number(result.rows[0]["mlsae"].get("dead_fraction"))
    singles = [_number(r["single"].get("dead_fraction")) for r in rows]
    shown = [f"{v:.0%}" for v in singles if v is not None]
    if mlsae is None or not shown:
        return ""
    singles_dead = ", ".join(shown)
    return f" Dead latents on the evaluated rows: {mlsae:.0%} of the MLSAE's; {singles_dead} of the single-layer SAEs'."


def findings(summary: VarianceSummary, cosine: CosineResult | None, result: CompareResult) -> list[Finding]:
    """Every check, in the order of the paper's findings, then reconstruction."""
    window = summary.window or {}
    return [
        spread_finding(summary.rel_var_token, "rel_var_token", "activation-weighted, pooled"),
        spread_finding(window.get("rel_var_t"), "rel_var_t", "per window, normalised mixtures"),
        multi_layer_finding(summary),
        size_trend_finding(summary, cosine),
        reconstruction_finding(result, "fvu", "FVU"),
        reconstruction_finding(result, "delta_ce", "delta CE"),
    ]


@dataclass(frozen=True)
class StudyPoint:
    """The same MLSAE trained for one length: its rows, variance summary and held-out evaluation (if any)."""

    rows: int
    summary: VarianceSummary
    fvu_mean: float | None = None
    dead_fraction: float | None = None


def _study_checks(point: StudyPoint) -> list[Finding]:
    window = point.summary.window or {}
    return [
        spread_finding(point.summary.rel_var_token, "rel_var_token", "activation-weighted, pooled"),
        spread_finding(window.get("rel_var_t"), "rel_var_t", "per window, normalised mixtures"),
        multi_layer_finding(point.summary),
    ]


_STUDY_RULES: tuple[tuple[Callable[[VarianceSummary], float | None], Callable[[float], bool]], ...] = (
    (lambda s: _number(s.rel_var_token), spread_agrees),
    (lambda s: _number((s.window or {}).get("rel_var_t")), spread_agrees),
    (multi_layer_share, multi_layer_agrees),
)
"""The number each study check (in `_study_checks`' order) decides on, and its finding's rule."""


def _drift(check: int, ordered: list[StudyPoint]) -> str | None:
    """Why a verdict that holds at every length is not yet settled: its number moved over the last two lengths so
    that one more step of the same size (in log rows, linearly) would cross the rule's threshold; None if not."""
    if len(ordered) < 2:
        return None
    value_of, agrees = _STUDY_RULES[check]
    (ra, a), (rb, b) = ((p.rows, value_of(p.summary)) for p in ordered[-2:])
    if a is None or b is None or agrees(b) == agrees(2 * b - a):
        return None
    return (
        f"its number moved from {a:.4g} to {b:.4g} over the last {rb / ra:.0f}x of training; one more such step "
        f"would bring it to about {2 * b - a:.4g}, across the rule's threshold: **not yet stable** with training "
        "length on this model."
    )


def study_section(study: list[StudyPoint]) -> list[str]:
    """The training-length table and, per finding, whether its verdict holds at every length."""

    def cell(v: float | None, fmt: str = ".4g") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "### Training length",
        "",
        "The same MLSAE trained for several lengths; FVU and dead fraction on the held-out tokens.",
        "",
        "| rows trained | held-out FVU | dead fraction | `rel_var_token` (pooled) | `rel_var_t` (window) "
        f"| multi-layer at {MULTI_LAYER_SHARE:.0%} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(study, key=lambda p: p.rows):
        window = (p.summary.window or {}).get("rel_var_t")
        lines.append(
            f"| {p.rows:,} | {cell(p.fvu_mean)} | {cell(p.dead_fraction, '.1%')} | {cell(p.summary.rel_var_token)} "
            f"| {cell(_number(window))} | {cell(multi_layer_share(p.summary), '.1%')} |"
        )
    lines.append("")
    ordered = sorted(study, key=lambda p: p.rows)
    per_point = [_study_checks(p) for p in ordered]
    for i, check in enumerate(per_point[0]):
        verdicts = [checks[i].verdict for checks in per_point]
        drift = _drift(i, ordered) if len(set(verdicts)) == 1 else None
        if len(set(verdicts)) == 1 and drift is None:
            lines.append(f"- {check.name}: **{verdicts[0]}** at every length ({len(verdicts)} lengths): stable.")
        elif drift is not None:
            lines.append(f"- {check.name}: {verdicts[0]} at every length ({len(verdicts)} lengths), but {drift}")
        else:
            shown = ", ".join(
                f"{v} at {p.rows:,} rows" for v, p in zip(verdicts, sorted(study, key=lambda p: p.rows), strict=True)
            )
            lines.append(f"- {check.name}: {shown}: **not yet stable** with training length on this model.")
    return [*lines, ""]


def findings_section(
    summary: VarianceSummary,
    cosine: CosineResult | None,
    result: CompareResult,
    figure: str,
    study: list[StudyPoint] | None = None,
) -> list[str]:
    """The Findings section: one verdict per finding, the training-length study, then the comparison."""
    checks = findings(summary, cosine, result)
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    reference = (summary.reference or {}).get("rel_var_t")
    lines = [
        "## Findings: the paper's claims on this run",
        "",
        "Each item states our number, the claim of Lawson et al. (ICLR 2025) it bears on, and the rule that "
        "decides the verdict; the rules are fixed in `mlsae_analyze/findings.py`, not tuned to this run, and use "
        f"only statistics that do not change when the layers are relabelled. Here {counts['agrees']} agree, "
        f"{counts['differs']} differ, {counts['not testable here']} not testable here.",
        "",
        *[check.markdown() for check in checks],
        "",
        f"Not used for a verdict: the reference mode's `rel_var_t` = {_number(reference) or float('nan'):.4g}, the "
        "authors' own per-window computation, whose mixtures are not normalised: it changes when the layers are "
        "relabelled, so it is not a variance (docs/METHOD.md, section 6). It is tabulated below to be set beside "
        "numbers from the authors' code.",
        "",
    ]
    if study:
        lines += study_section(study)
    lines += [
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
        + (f" Clean CE {result.clean_ce:.4f} nats/token over {result.n_windows} windows." if result.clean_ce else ""),
        "",
    ]
    return lines
