"""The API's payloads built from the stores (api.py names their fields; store.py reads)."""

from __future__ import annotations

import base64
import math

import numpy as np

import mlsae_analyze.explorer.api as api
from mlsae_analyze.explorer.index import EMPTY, LatentEntry
from mlsae_analyze.explorer.store import ExplorerStores, Window
from mlsae_analyze.layers import block_mean
from mlsae_cache.core.errors import InputError

TABLE_SORTS = tuple(name for name in api.LatentRow.model_fields if name != "top_logit")
"""The columns the latents table sorts by: the numeric fields of a row, in their order."""


def number(x: float) -> float | None:
    """A float for JSON: None for NaN and infinities."""
    x = float(x)
    return x if math.isfinite(x) else None


def _block(stores: ExplorerStores, mean: float) -> float | None:
    return number(block_mean(mean, stores.index.meta.layers)) if math.isfinite(mean) else None


def meta_view(stores: ExplorerStores, live: bool = False) -> api.Meta:
    m = stores.index.meta
    ev = api.EvalLayers(**{k: m.eval[k] for k in ("layer", "fvu", "delta_ce")}) if m.eval else None
    return api.Meta(
        n_latents=m.n_latents,
        k=m.k,
        layers=list(m.layers),
        n_tokens=m.n_tokens,
        model=stores.model or stores.cache_model.get("name"),
        live=live,
        n_rows=m.n_rows,
        n_docs=m.n_docs,
        n_firing=m.n_firing,
        context_length=m.context_length,
        d_model=m.d_model,
        has_logits=m.logits > 0,
        logits_note=m.logits_note,
        eval=ev,
        sources={name: str(path) for name, path in stores.paths.items()},
        token_text=stores.token_note,
    )


def _logits(stores: ExplorerStores, e: LatentEntry) -> tuple[list[api.TokenValue], list[api.TokenValue]]:
    if e.logits is None:
        return [], []
    pairs = ((e.logits.pos_token, e.logits.pos_value), (e.logits.neg_token, e.logits.neg_value))
    pos, neg = (
        [api.TokenValue(token=stores.decode(int(t)), value=float(v)) for t, v in zip(ts, vs, strict=True)]
        for ts, vs in pairs
    )
    return pos, neg


def latent_view(stores: ExplorerStores, j: int) -> api.Latent:
    e = stores.index.latent(j)
    m = stores.index.meta
    pos, neg = _logits(stores, e)
    fired = int(e.fired[0])
    return api.Latent(
        latent=j,
        layer_probs=[number(p) for p in e.layer_probs],
        counts=[int(c) for c in e.fired[1:]],
        max=[float(x) for x in e.peak[1:]],
        mean_layer=_block(stores, e.mean_layer),
        layer_std=number(e.std_layer),
        within_var=number(e.within_var),
        across_var=number(e.across_var),
        density=fired / m.n_rows if m.n_rows else 0.0,
        tokens_fired=fired,
        max_all=float(e.peak[0]),
        mean_all=number(e.total[0] / fired) if fired else None,
        histogram=api.Histogram(max=float(e.peak[0]), all=e.histogram[0].tolist(), layers=e.histogram[1:].tolist()),
        quantile_edges=e.quantile_edges.tolist(),
        logits_pos=pos,
        logits_neg=neg,
        similar=[
            api.SimilarLatent(latent=int(s), cosine=float(c))
            for s, c in zip(e.similar_latent, e.similar_cosine, strict=True)
        ],
    )


def _example(stores: ExplorerStores, j: int, code: int, w: Window, group: int | None) -> api.Example:
    layer = code % stores.index.meta.n_layers
    values = w.latent_values(j)
    return api.Example(
        token=code // stores.index.meta.n_layers,
        sequence=w.sequence,
        position=int(w.position[w.focus]),
        layer=stores.index.meta.layers[layer],
        value=float(values[w.focus, layer]),
        tokens=stores.text(w.token_ids),
        values=values[:, layer].tolist(),
        layer_strip=values[w.focus].tolist(),
        focus=w.focus,
        skipped=w.skipped.tolist(),
        group=group,
    )


def examples_view(
    stores: ExplorerStores, j: int, layer: str, kind: str, offset: int, limit: int, context: int
) -> api.Examples:
    """One page of an example list: `layer` 'all' or a block index, `kind` top, quantile or random."""
    if layer != "all" and not layer.lstrip("-").isdigit():
        raise InputError(f"layer {layer!r} is neither 'all' nor a block index")
    tab = stores.index.tab(None if layer == "all" else int(layer))
    slots = stores.index.examples(j, tab, kind)
    filled = slots.codes != EMPTY
    codes, groups = slots.codes[filled], slots.groups[filled] if slots.groups is not None else None
    if groups is not None:  # the strongest group first; draws keep their order inside a group
        order = np.argsort(-groups, kind="stable")
        codes, groups = codes[order], groups[order]
    page = slice(offset, offset + limit)
    windows = stores.windows(codes[page], context)
    shown = groups[page] if groups is not None else [None] * len(windows)
    return api.Examples(
        latent=j,
        layer=layer,
        kind=kind,
        offset=offset,
        total=len(codes),
        examples=[
            _example(stores, j, int(c), w, None if g is None else int(g))
            for c, w, g in zip(codes[page], windows, shown, strict=True)
        ],
        group_edges=slots.edges.tolist() if slots.edges is not None else None,
    )


def table_view(
    stores: ExplorerStores,
    sort: str,
    desc: bool,
    offset: int,
    limit: int,
    min_density: float | None = None,
    min_layer: float | None = None,
    max_layer: float | None = None,
    q: str | None = None,
) -> api.LatentTable:
    """A page of the latents table, filtered (density, mean layer as block indices, text of the top logit token)
    and sorted (`TABLE_SORTS`; latents without a value last)."""
    t, m = stores.table, stores.index.meta
    density = t.fired / max(m.n_rows, 1)
    mean = np.interp(t.mean_layer, np.arange(m.n_layers), m.layers)
    mean[np.isnan(t.mean_layer)] = np.nan
    numeric = (np.arange(m.n_latents, dtype=np.float64), density, t.peak, mean, t.std_layer, t.within_var, t.across_var)
    columns = dict(zip(TABLE_SORTS, numeric, strict=True))
    if sort not in columns:
        raise InputError(f"sort {sort!r} is not one of {', '.join(TABLE_SORTS)}")
    keep = np.ones(m.n_latents, bool)
    for bound, values, above in ((min_density, density, True), (min_layer, mean, True), (max_layer, mean, False)):
        if bound is not None:
            keep &= values >= bound if above else values <= bound
    if q:
        texts = stores.top_logit_text
        keep &= np.array([s is not None and q.lower() in s.lower() for s in texts])
    ids = np.flatnonzero(keep)
    key = columns[sort][ids]
    key = np.where(np.isnan(key), np.inf, -key if desc else key)
    ids = ids[np.argsort(key, kind="stable")][offset : offset + limit]
    texts = stores.top_logit_text
    return api.LatentTable(
        total=int(keep.sum()),
        offset=offset,
        rows=[
            api.LatentRow(
                latent=int(j),
                density=float(density[j]),
                max=float(t.peak[j]),
                mean_layer=number(mean[j]),
                layer_std=number(t.std_layer[j]),
                within_var=number(t.within_var[j]),
                across_var=number(t.across_var[j]),
                top_logit=texts[j],
            )
            for j in ids
        ],
    )


def overview_view(stores: ExplorerStores, width: int) -> api.Overview:
    """The P_j(l) heatmap of the latents that fire, by mean layer, in at most `width` columns."""
    m = stores.index.meta
    ids = stores.order[: m.n_firing]
    per_column = max(1, math.ceil(len(ids) / width))
    columns = math.ceil(len(ids) / per_column)
    pad = columns * per_column - len(ids)
    probs = np.nan_to_num(stores.layer_probs[ids])  # [n, L]
    padded = np.concatenate([probs, np.zeros((pad, m.n_layers))]).reshape(columns, per_column, m.n_layers)
    sizes = np.full(columns, per_column)
    if pad:
        sizes[-1] -= pad
    cells = padded.sum(1) / sizes[:, None]  # [columns, L]
    scale = float(cells.max()) if cells.size else 0.0
    quantised = np.round(cells / scale * 255).astype(np.uint8) if scale > 0 else cells.astype(np.uint8)
    fired = np.concatenate([stores.table.fired[ids], np.full(pad, -1)]).reshape(columns, per_column)
    chosen = ids[np.minimum(np.arange(columns) * per_column + fired.argmax(1), len(ids) - 1)] if len(ids) else ids
    first_mean = stores.table.mean_layer[ids[::per_column]] if len(ids) else np.zeros(0)
    return api.Overview(
        layers=list(m.layers),
        columns=columns,
        per_column=per_column,
        scale=scale,
        cells=base64.b64encode(np.ascontiguousarray(quantised.T).tobytes()).decode(),
        latent=[int(j) for j in chosen],
        mean_layer=[block_mean(float(x), m.layers) for x in first_mean],
    )


def _token_latents(stores: ExplorerStores, w: Window, p: int) -> list[api.TokenLatent]:
    """The latents active at window row p, each with its activation per layer, by mean layer."""
    m = stores.index.meta
    active = w.values[p] > 0  # [L, k]
    layer, slot = np.nonzero(active)
    latents = w.indices[p][layer, slot]
    ids = np.unique(latents)
    values = np.zeros((len(ids), m.n_layers))
    np.add.at(values, (np.searchsorted(ids, latents), layer), w.values[p][layer, slot])
    mean = stores.table.mean_layer[ids]
    order = np.lexsort((ids, np.where(np.isnan(mean), np.inf, mean)))
    return [
        api.TokenLatent(latent=int(ids[i]), values=values[i].tolist(), mean_layer=_block(stores, float(mean[i])))
        for i in order
    ]


def doc_view(stores: ExplorerStores, d: int, latent: int | None, position: int | None) -> api.Doc:
    """Context window d; with `latent`, where it fires in the window; with `position` (an index into the
    window), the latents active at that token."""
    w = stores.doc_window(d)
    cells: list[api.DocCell] = []
    if latent is not None:
        stores.index.check_latent(latent)
        values = w.latent_values(latent)
        for p, layer in zip(*np.nonzero(values > 0), strict=True):
            cells.append(
                api.DocCell(position=int(p), layer=stores.index.meta.layers[layer], value=float(values[p, layer]))
            )
    if position is not None and not 0 <= position < len(w.token_ids):
        raise InputError(f"position {position} is outside window {d} (0..{len(w.token_ids) - 1})")
    return api.Doc(
        doc=d,
        start=w.start,
        tokens=stores.text(w.token_ids),
        positions=w.position.tolist(),
        skipped=w.skipped.tolist(),
        latent=latent,
        cells=cells,
        latent_max=float(stores.table.peak[latent]) if latent is not None else None,
        position=position,
        token_latents=_token_latents(stores, w, position) if position is not None else [],
    )
