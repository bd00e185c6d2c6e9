// The prompt page's views of one payload: the latent x layer heatmap at the selected token (rank by size or by
// quantile, a threshold hiding weaker cells), the selected latent's token x layer heatmap and its per-layer
// histograms with the prompt's value marked, and the prompt's per-layer FVU and delta CE.
import { heatmap, layerHistograms, valuesPerLayer } from "./charts.js";
import { actColor, fix3, fmt, h, legend, tokenText } from "./common.js";
import { activeAt, latentGrid } from "./promptdata.js";

/** A button group choosing one of `choices` (the current one pressed). */
export function toggle(label, choices, current, onPick, testid) {
  return h(
    "div",
    { class: "tabs", role: "group", "aria-label": label },
    h("span", { class: "label" }, label),
    choices.map((c) => h("button", { type: "button", "aria-pressed": String(c === current), "data-testid": testid, "data-value": c, onclick: () => onPick(c) }, c)),
  );
}

function rankControls(st, select) {
  const slider = h("input", { type: "range", min: 0, max: 1, step: 0.05, value: st.thr, "data-testid": "threshold", "aria-label": "threshold" });
  const shown = h("span", { class: "muted" }, st.thr > 0 ? `${st.rank === "size" ? "≥" : "quantile ≥"} ${fmt(st.thr, 2)}${st.rank === "size" ? " of the largest" : ""}` : "all cells");
  slider.addEventListener("input", () => (shown.textContent = `threshold ${fmt(Number(slider.value), 2)}`));
  slider.addEventListener("change", () => select({ thr: Number(slider.value) }));
  return h("div", { class: "controls" }, toggle("rank:", ["size", "quantile"], st.rank, (rank) => select({ rank }), "rank"), h("label", { class: "tabs" }, h("span", { class: "label" }, "threshold"), slider, shown));
}

/** A cell's colour share: its value over the largest at the token (size) or its quantile (null: beyond the store). */
function shareOf(row, l, st, scale) {
  if (!(row.values[l] > 0)) return 0;
  return st.rank === "quantile" ? (row.quantiles[l] === null ? 1 : row.quantiles[l]) : row.values[l] / scale;
}

export function latentLayerPanel(data, p, st, latent, select) {
  const all = activeAt(data, p);
  const scale = Math.max(1e-12, ...all.flatMap((r) => r.values));
  const shares = all.map((row) => data.layers.map((_, l) => shareOf(row, l, st, scale)));
  const keep = all.map((_, r) => st.thr === 0 || shares[r].some((x) => x > 0 && x >= st.thr));
  const rows = all.filter((_, r) => keep[r]);
  const values = shares.filter((_, r) => keep[r]).map((row) => row.map((x) => (x > 0 && x >= st.thr ? x : 0)));
  const intro = h("p", { class: "muted" }, `${all.length} latents active at token ${p} “`, h("span", { class: "tokens" }, tokenText(data.tokens[p])), `” at some layer, by mean layer (weighted by their values)${rows.length < all.length ? `; ${rows.length} pass the threshold` : ""}. Click a cell to select that latent and layer; a row's label opens the latent.`);
  if (!rows.length) return [rankControls(st, select), intro];
  const L = data.layers.length;
  const chart = heatmap({
    values,
    rowLabels: rows.map((r) => String(r.latent)),
    colLabels: data.layers.map(String),
    scale: 1,
    color: actColor,
    cellWidth: Math.max(8, Math.min(18, Math.floor(560 / L))),
    cellHeight: Math.max(3, Math.min(14, Math.floor(900 / rows.length))),
    left: 56,
    title: `Latents at token ${p}, per layer (colour: ${st.rank === "size" ? "activation / the largest here" : "quantile within the latent's own activations at that layer"})`,
    xTitle: "layer (block)",
    yTitle: "latent",
    testid: "latent-layer-heatmap",
    rowAttrs: (r) => ({ "data-testid": "heat-row", "data-latent": rows[r].latent, "data-mean": rows[r].mean, class: rows[r].latent === latent ? "current-row" : null }),
    rowHref: (r) => `latent/${rows[r].latent}`,
    cellAttrs: (r, l) => ({ "data-layer": data.layers[l], "data-value": rows[r].values[l] }),
    selected: rows.some((r) => r.latent === latent) && st.layer !== null ? [rows.findIndex((r) => r.latent === latent), data.layers.indexOf(st.layer)] : null,
    tip: (r, l) => [`latent ${rows[r].latent} (mean layer here ${fmt(rows[r].mean, 3)})`, `layer ${data.layers[l]}: ${fmt(rows[r].values[l], 4)}${rows[r].values[l] > 0 ? `, quantile ${rows[r].quantiles[l] === null ? "beyond the store (never fired at this layer)" : fmt(rows[r].quantiles[l], 3)}` : ""}`, "click to select"],
    onCell: (r, l) => select({ latent: rows[r].latent, layer: data.layers[l] }),
  });
  const key = st.rank === "size" ? legend(`activation at this token (largest ${fmt(scale)})`, scale, actColor) : legend("quantile among the latent's activations", 1, actColor);
  return [rankControls(st, select), intro, h("div", { class: "scroll" }, chart), key];
}

export function tokenLayerPanel(data, j, st, pos, select) {
  if (j === null) return [h("p", { class: "muted" }, "No latent is selected (none is active at this token).")];
  const grid = latentGrid(data, j);
  const scale = Math.max(1e-12, ...grid.flat());
  const P = data.tokens.length;
  const selected = st.layer === null ? null : [data.layers.indexOf(st.layer), pos];
  const chart = heatmap({
    values: grid,
    rowLabels: data.layers.map(String),
    colLabels: data.tokens.map((_, p) => String(p)),
    scale,
    color: actColor,
    cellWidth: Math.max(4, Math.min(18, Math.floor(1100 / P))),
    cellHeight: Math.max(5, Math.min(14, Math.floor(320 / data.layers.length))),
    title: `Latent ${j} at every token and layer`,
    xTitle: "token (position in the prompt)",
    yTitle: "layer",
    testid: "token-layer-heatmap",
    selected,
    selectedAttrs: selected ? { "data-position": pos, "data-layer": st.layer } : {},
    cellAttrs: (l, p) => ({ "data-layer": data.layers[l], "data-position": p, "data-value": grid[l][p] }),
    tip: (l, p) => [`token ${p} “${data.tokens[p]}”${data.trainable[p] ? "" : " (untrainable)"}, layer ${data.layers[l]}`, `latent ${j}: ${fmt(grid[l][p], 4)}`],
    onCell: (l, p) => select({ pos: p, layer: data.layers[l] }),
  });
  return [h("div", { class: "scroll" }, chart), legend(`latent ${j}'s activation (largest in this prompt ${fmt(scale)})`, scale, actColor)];
}

/** Latent j's histograms per layer (from its page's data `info`), the prompt's value at token `pos` marked. */
export function histogramPanel(data, info, j, pos) {
  if (j === null) return [];
  if (!info) return [h("p", { class: "muted" }, `Loading latent ${j}'s histograms…`)];
  const grid = latentGrid(data, j);
  const marks = grid.map((row) => row[pos]);
  return [h("p", { class: "muted" }, `Where latent ${j}'s activations fall in the store, per layer; the ticks mark its value at token ${pos} of this prompt. `, h("a", { href: `latent/${j}` }, `latent ${j}'s page`)), ...layerHistograms(data.layers, info.histogram.layers, info.histogram.max, marks, `value at token ${pos}`)];
}

/** The prompt's FVU per layer and, once the second request answers, its delta CE per layer. */
export function metricsPanel(data, deltaCe) {
  const table = h(
    "table",
    { class: "metrics", "data-testid": "prompt-metrics" },
    h("tr", {}, h("th", {}, "layer"), data.layers.map((b) => h("th", {}, b))),
    h("tr", {}, h("th", {}, "FVU"), data.fvu.map((v, l) => h("td", { "data-testid": "fvu", "data-layer": data.layers[l], "data-value": v }, fix3(v)))),
    h("tr", {}, h("th", {}, "ΔCE (nats)"), data.layers.map((b, l) => h("td", { "data-testid": "delta-ce", "data-layer": b, "data-value": deltaCe ? deltaCe[l] : null }, deltaCe ? fix3(deltaCe[l]) : "…"))),
  );
  const width = Math.max(360, Math.min(480, 60 + data.layers.length * 22));
  const charts = [valuesPerLayer(data.layers, data.fvu, "FVU of this prompt per layer (trainable tokens)", width)];
  charts.push(deltaCe ? valuesPerLayer(data.layers, deltaCe, "ΔCE per layer, reconstruction spliced (nats/token)", width) : h("p", { class: "muted", "data-testid": "delta-ce-pending" }, "ΔCE per layer: computing (one re-run of the model per layer)…"));
  return [h("div", { class: "row" }, charts), h("div", { class: "scroll" }, table)];
}
