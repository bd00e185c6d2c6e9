"""`mlsae-analyze index`: the batch job that precomputes what the explorer's pages show (format: index.py).

It checks that the latents, the variance output, the SAE and the cache belong together, streams the latents
store three times (passes.py; memory bounded by the number of latents, never the number of tokens), adds the
decoder directions' nearest latents and logit effects (directions.py), and writes the index whole. A re-run on
unchanged stores with the same options finds the index up to date and does nothing.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mlsae_analyze.explorer.fingerprints import SOURCES, fingerprint
from mlsae_analyze.explorer.index import IndexArrays, IndexMeta, Source, read_index_meta, write_index
from mlsae_analyze.explorer.passes import (
    FirstPass,
    PassParams,
    SecondPass,
    ThirdPass,
    ahead,
    blocks,
    quantile_edges,
)
from mlsae_analyze.latents import Latents
from mlsae_analyze.layers import layer_distribution
from mlsae_analyze.results import VarianceOutput
from mlsae_cache.core.errors import InputError, MlsaeError, StoreError
from mlsae_cache.core.outputs import check_replaceable, output_dir
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import Cache, open_cache

log = logging.getLogger(__name__)

KIND = "explorer index"
_COUNTS = ("top", "random", "quantiles", "per_quantile", "bins", "similar", "logit_tokens")


@dataclass(frozen=True)
class IndexConfig:
    """Everything `mlsae-analyze index` takes; CLI options map one-to-one onto these fields.

    `cache` defaults to the cache the latents were encoded from; `model` to the model that cache names (the source
    of the logit effects and of the tokens' text); `logits` False builds the index without logit effects. `eval`: a
    JSON of `mlsae-train eval --out`, whose per-layer FVU and delta CE the overview then shows. The counts: `top`
    strongest, `random` random and `quantiles` x `per_quantile` examples per latent and tab, histogram `bins`,
    `similar` latents and `logit_tokens` tokens per sign; `seed` fixes the draws.
    """

    latents: Path
    out: Path
    variance: Path
    sae: Path | str
    cache: Path | None = None
    model: str | None = None
    logits: bool = True
    eval: Path | None = None
    top: int = 20
    random: int = 20
    quantiles: int = 5
    per_quantile: int = 4
    bins: int = 32
    similar: int = 10
    logit_tokens: int = 10
    seed: int = 0
    allow_unfinished: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            low = 2 if name in ("quantiles", "bins") else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1000:
                raise InputError(f"--{name.replace('_', '-')} must be an integer in [{low}, 1000], got {value!r}")
        if self.model is not None and not self.logits:
            raise InputError("--model and --no-logits contradict each other (give one)")

    def rebuild_command(self, paths: dict[str, Path]) -> str:
        """The command that builds this index again from the stores at `paths`, replacing it."""
        words = ["mlsae-analyze", "index", str(paths["latents"]), str(Path(self.out).resolve())]
        for name in ("variance", "sae", "cache"):
            words += [f"--{name}", str(paths[name])]
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("model", "eval", *_COUNTS, "seed"):
            if getattr(self, name) != defaults[name]:
                words += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        words += ["--no-logits"] * (not self.logits) + ["--allow-unfinished"] * self.allow_unfinished
        return shlex.join([*words, "--overwrite"])


@dataclass(frozen=True)
class IndexResult:
    meta: IndexMeta
    noop: bool
    message: str


def _check_together(latents: Latents, variance: VarianceOutput, cache: Cache, sae_fp: str, cfg: IndexConfig) -> None:
    """Refuse stores that do not belong together, naming the one to make again."""
    meta, summary = latents.meta, variance.summary
    if sae_fp != meta.sae_fingerprint:
        raise StoreError(f"latents {cfg.latents} were encoded with another SAE than {cfg.sae} (give the SAE of encode)")
    if cache.meta.fingerprint != meta.cache_fingerprint:
        raise StoreError(f"latents {cfg.latents} were encoded from another cache than {cache.path} (pass --cache)")
    recorded = (summary.sae_fingerprint, summary.cache_fingerprint)
    if recorded != (None, None) and recorded != (meta.sae_fingerprint, meta.cache_fingerprint):
        raise StoreError(
            f"variance output {cfg.variance} was computed from other latents than {cfg.latents} "
            f"(re-run `mlsae-analyze variance {cfg.latents} {cfg.variance} --overwrite`)"
        )
    if variance.layers != meta.layers or variance.probs.shape[1] != meta.n_latents:
        raise StoreError(f"variance output {cfg.variance} does not match latents {cfg.latents} (re-run variance)")


def _eval_summary(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from mlsae_train.results import EvalResult

    result = EvalResult.read(path)
    return {"layer": result.layer, "fvu": result.fvu, "delta_ce": result.delta_ce, "path": str(path)}


def _model_spec(cfg: IndexConfig, cache: Cache) -> tuple[str | None, dict[str, Any], str | None]:
    """(model spec for the logit effects or None, its load keywords, why there are none)."""
    if not cfg.logits:
        return None, {}, "the index was built with --no-logits"
    if cfg.model is not None:
        return cfg.model, {}, None
    model = cache.meta.model
    if model.get("name") in (None, "imported"):
        return None, {}, "the cache was imported from an array and names no model; build the index with --model"
    return model["name"], {k: model.get(k) for k in ("revision", "gguf_file")}, None


def _run_passes(latents: Latents, params: PassParams, progress: Progress) -> tuple[FirstPass, SecondPass, ThirdPass]:
    """The three passes over the store (passes.py); `progress` gets the tokens of each chunk, 3 * n_tokens."""

    def sweep(number: int) -> Any:
        def report(n: int, /, **facts: Any) -> None:
            progress(n, **{"pass": f"{number}/3"})

        return ahead(blocks(latents.chunks(report), params))

    first = FirstPass(params)
    for chunk, e, g in sweep(1):
        first.add(chunk, e, g)
    second = SecondPass(params, first.peak[0])
    for chunk, e, g in sweep(2):
        second.add(chunk, e, g)
    edges = quantile_edges(second.histogram, first.peak[0], first.peak, params.quantiles)
    third = ThirdPass(params, edges)
    for chunk, e, g in sweep(3):
        third.add(chunk, e, g)
    return first, second, third


def _check_rows(first: FirstPass, variance: VarianceOutput, cfg: IndexConfig) -> np.ndarray:
    """Var[L|j] from the passes' own totals, after checking that they give the variance output's P_j(l)."""
    mine = layer_distribution(first.total[1:])
    if not np.allclose(mine.probs, variance.probs, rtol=1e-5, atol=1e-9, equal_nan=True):
        raise StoreError(
            f"variance output {cfg.variance} was computed from other rows of {cfg.latents} than it says "
            f"(re-run `mlsae-analyze variance {cfg.latents} {cfg.variance} --overwrite`)"
        )
    return mine.var


def _assemble(
    passes: tuple[FirstPass, SecondPass, ThirdPass], variance: VarianceOutput, cfg: IndexConfig, p: PassParams
) -> IndexArrays:
    """The index's arrays, latent-major ([N, T, ...]), from the passes and the variance output; the decoder
    arrays are left empty for `_directions`."""
    first, second, third = passes
    layer_var = _check_rows(first, variance, cfg)
    mass = first.total[1:].sum(0)
    within = np.divide(first.within, mass, out=np.full_like(mass, np.nan), where=mass > 0)
    mean = variance.layer_mean
    top_values, top_codes = (x.reshape(p.n_tabs, p.n_latents, p.top) for x in first.top.result())
    random_codes = first.random.result()[1].reshape(p.n_tabs, p.n_latents, p.random)
    codes = third.samples.result()[1].reshape(p.n_tabs, p.quantiles, p.n_latents, p.per_quantile)
    edges = np.concatenate([np.zeros((*third.inner.shape[:2], 1)), third.inner, first.peak[..., None]], axis=-1)
    empty = np.zeros((p.n_latents, 0))
    return IndexArrays(
        stat_count=first.fired.T,
        stat_sum=first.total.T,
        stat_sum_sq=first.total_sq.T,
        stat_max=first.peak.T,
        p_layer=variance.probs.T,
        mean_layer_pos=mean,
        std_layer_pos=variance.layer_std,
        within_token_var=within,
        across_token_var=np.maximum(layer_var - within, 0.0),
        top_code=top_codes.transpose(1, 0, 2),
        top_value=np.where(np.isfinite(top_values), top_values, 0.0).transpose(1, 0, 2),
        random_code=random_codes.transpose(1, 0, 2),
        quantile_code=codes.transpose(2, 0, 1, 3),
        quantile_edges=np.where(first.fired[..., None] > 0, edges, 0.0).transpose(1, 0, 2),
        act_histogram=second.histogram.transpose(1, 0, 2),
        similar_latent=empty,
        similar_cosine=empty,
        order_by_mean_layer=np.argsort(np.where(np.isnan(mean), np.inf, mean), kind="stable"),
        doc_start=first.docs.finish(first.n_tokens),
    )


def _directions(cfg: IndexConfig, W_dec: Any, spec: str | None, load: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(similar ids, similar cosines, logit effects or None) of the SAE's decoder directions W_dec [N, d]."""
    from mlsae_analyze.explorer.directions import load_unembedding, logit_effects, similar_latents

    unembedding = load_unembedding(spec, **load) if spec is not None else None
    ids, cos = similar_latents(W_dec, cfg.similar)
    logits = logit_effects(unembedding, W_dec, cfg.logit_tokens) if unembedding is not None else None
    return ids, cos, logits


@dataclass(frozen=True)
class _Inputs:
    latents: Latents
    variance: VarianceOutput
    cache: Cache
    paths: dict[str, Path]
    sources: dict[str, Source]
    eval: dict[str, Any] | None
    W_dec: Any


def _open_inputs(cfg: IndexConfig) -> _Inputs:
    from mlsae_train.checkpoint import load_sae, resolve_sae

    sae_dir = resolve_sae(cfg.sae)  # a hub id: its local snapshot
    sae, _ = load_sae(sae_dir, "cpu", cfg.allow_unfinished)
    latents = Latents(cfg.latents)
    variance = VarianceOutput.read(cfg.variance)
    cache = open_cache(cfg.cache if cfg.cache is not None else latents.meta.cache_path)
    paths = {"latents": cfg.latents, "variance": cfg.variance, "sae": sae_dir, "cache": cache.path}
    paths = {name: Path(p).resolve() for name, p in paths.items()}
    sources = {name: Source(str(paths[name]), fingerprint(name, paths[name])) for name in SOURCES}
    _check_together(latents, variance, cache, sources["sae"].fingerprint, cfg)
    return _Inputs(latents, variance, cache, paths, sources, _eval_summary(cfg.eval), sae.W_dec.detach())


def _up_to_date(out: Path, sources: dict[str, Source], rebuild: str) -> IndexMeta | None:
    try:
        old = read_index_meta(out)
    except MlsaeError:
        return None
    return old if old.sources == sources and old.rebuild == rebuild else None


def run_index(cfg: IndexConfig, progress: Progress = no_progress) -> IndexResult:
    """Build the explorer index of cfg.latents in cfg.out (module docstring)."""
    inputs = _open_inputs(cfg)
    rebuild = cfg.rebuild_command(inputs.paths)
    old = _up_to_date(Path(cfg.out), inputs.sources, rebuild)
    if old is not None and not cfg.overwrite:
        return IndexResult(old, True, f"{cfg.out} is up to date with its stores; nothing to do")
    fingerprints = {name: s.fingerprint for name, s in inputs.sources.items()}
    check_replaceable(Path(cfg.out), KIND, fingerprints, cfg.overwrite)
    spec, load, note = _model_spec(cfg, inputs.cache)
    similar_ids, similar_cos, logits = _directions(cfg, inputs.W_dec, spec, load)
    latents = inputs.latents
    params = PassParams(
        latents.n_latents,
        len(latents.layers),
        *(cfg.top, cfg.random, cfg.quantiles, cfg.per_quantile, cfg.bins, cfg.seed),
        include_untrainable=inputs.variance.summary.include_untrainable,
    )
    progress(0, total=3 * latents.n_tokens)
    done = _run_passes(latents, params, progress)
    arrays = _assemble(done, inputs.variance, cfg, params)
    arrays = arrays._replace(similar_latent=similar_ids, similar_cosine=similar_cos, logits=logits)
    meta = _meta(cfg, inputs, arrays, rebuild, note, done[0].n_rows)
    with output_dir(Path(cfg.out), KIND, fingerprints, cfg.overwrite) as tmp:
        write_index(tmp, meta, arrays)
    return IndexResult(meta, False, f"wrote {cfg.out}: {meta.n_latents} latents x {meta.n_layers} layers")


def _meta(
    cfg: IndexConfig, inputs: _Inputs, arrays: IndexArrays, rebuild: str, note: str | None, n_rows: int
) -> IndexMeta:
    from importlib.metadata import version

    latents = inputs.latents
    return IndexMeta(
        n_latents=latents.n_latents,
        k=latents.meta.k,
        layers=latents.layers,
        n_tokens=latents.n_tokens,
        n_rows=n_rows,
        n_docs=len(arrays.doc_start) - 1,
        n_firing=int((arrays.stat_count[:, 0] > 0).sum()),
        context_length=inputs.cache.meta.context_length,
        include_untrainable=inputs.variance.summary.include_untrainable,
        **{name: getattr(cfg, name) for name in ("top", "random", "quantiles", "per_quantile", "bins", "seed")},
        similar=arrays.similar_latent.shape[1],
        logits=arrays.logits.pos_token.shape[1] if arrays.logits is not None else 0,
        sources=inputs.sources,
        rebuild=rebuild,
        model=cfg.model,
        logits_note=note,
        d_model=inputs.cache.d_model,
        eval=inputs.eval,
        versions={"mlsae": version("mlsae")},
    )
