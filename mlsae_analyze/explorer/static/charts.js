// SVG charts with readable axes: bars per layer, histograms, heatmaps. Each returns an <svg> element.
import { blue, fmt, hideTip, legend, s, showTip } from "./common.js";

/** About `n` round tick values from 0 to `max`. */
export function ticks(max, n = 4) {
  if (!(max > 0)) return [0];
  const raw = max / n;
  const step = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= raw);
  const out = [];
  for (let t = 0; t <= max * 1.0001; t += nice) out.push(Number(t.toPrecision(6)));
  return out;
}

/** A block index (possibly between blocks) as a layer position, the inverse of interpolating positions. */
export function blockToPosition(block, layers) {
  if (block === null || block === undefined) return null;
  for (let i = 1; i < layers.length; i++) {
    if (block <= layers[i]) return i - 1 + (block - layers[i - 1]) / (layers[i] - layers[i - 1]);
  }
  return layers.length - 1;
}

/** Every n-th label, so that `labels` (or `count` labels of `labelWidth` px) spread over `width` px do not collide. */
function labelEvery(count, width, labelWidth = 22, labels = null) {
  const widest = labels ? 7 * Math.max(1, ...labels.map((x) => String(x).length)) + 8 : labelWidth;
  return Math.max(1, Math.ceil((count * widest) / Math.max(width, 1)));
}

function yAxis(g, top, height, left, width, max, format = fmt) {
  for (const t of ticks(max)) {
    const y = top + height - (t / max) * height;
    g.append(s("line", { x1: left, x2: left + width, y1: y, y2: y, class: "grid" }));
    g.append(s("text", { x: left - 5, y: y + 4, "text-anchor": "end" }, format(t)));
  }
  g.append(s("line", { x1: left, x2: left, y1: top, y2: top + height, class: "axis" }));
}

/**
 * P_j(l) as one bar per layer: x = layers (block indices), y = probability; the mean layer and +-1 std band.
 * opts: layers, probs, counts, max, mean (block index), std (positions), selected (block or null),
 * onSelect(block), title.
 */
export function layerBars(opts) {
  const { layers, probs } = opts;
  const W = Math.max(420, Math.min(1000, 60 + layers.length * 28));
  const H = 230;
  const m = { left: 48, right: 12, top: 26, bottom: 40 };
  const iw = W - m.left - m.right;
  const ih = H - m.top - m.bottom;
  const ymax = Math.max(...probs.map((p) => p || 0), 1e-9) * 1.1;
  const slot = iw / layers.length;
  const svg = s("svg", { width: W, height: H, role: "img", "aria-label": opts.title, "data-testid": "layer-bars" });
  svg.append(s("text", { x: m.left, y: 14, class: "title" }, opts.title));
  yAxis(svg, m.top, ih, m.left, iw, ymax, (t) => fmt(t, 2));
  const pos = blockToPosition(opts.mean, layers);
  if (pos !== null && opts.std !== null) {
    const x0 = m.left + (Math.max(0, pos - opts.std) + 0.5) * slot;
    const x1 = m.left + (Math.min(layers.length - 1, pos + opts.std) + 0.5) * slot;
    svg.append(s("rect", { x: x0, y: m.top, width: Math.max(1, x1 - x0), height: ih, class: "spread" }));
  }
  const every = labelEvery(layers.length, iw, 22, layers);
  layers.forEach((block, i) => {
    const p = probs[i] || 0;
    const bh = (p / ymax) * ih;
    const x = m.left + i * slot;
    const g = s("g", {
      class: "bar",
      "data-testid": "layer-bar",
      "data-layer": block,
      "data-p": probs[i] === null ? "" : String(probs[i]),
      tabindex: -1,
    });
    const rect = s("rect", { x: x + slot * 0.12, y: m.top + ih - bh, width: slot * 0.76, height: bh, class: "bar-rect" });
    if (opts.selected === block) rect.classList.add("selected");
    g.append(rect, s("rect", { x, y: m.top, width: slot, height: ih, class: "hit" }));
    g.addEventListener("mousemove", (e) =>
      showTip(e, `layer ${block}: P = ${fmt(p, 4)}`, `fires on ${fmt(opts.counts[i], 6)} rows, max ${fmt(opts.max[i])}`),
    );
    g.addEventListener("mouseleave", hideTip);
    g.addEventListener("click", () => opts.onSelect(block));
    svg.append(g);
    if (i % every === 0) svg.append(s("text", { x: x + slot / 2, y: m.top + ih + 14, "text-anchor": "middle" }, block));
  });
  if (pos !== null) {
    const x = m.left + (pos + 0.5) * slot;
    svg.append(s("line", { x1: x, x2: x, y1: m.top - 4, y2: m.top + ih, class: "mean", "data-testid": "mean-layer" }));
    svg.append(s("text", { x: x + 4, y: m.top + 6, fill: "#c0392b" }, `mean ${fmt(opts.mean, 3)}`));
  }
  svg.append(s("line", { x1: m.left, x2: m.left + iw, y1: m.top + ih, y2: m.top + ih, class: "axis" }));
  svg.append(s("text", { x: m.left + iw / 2, y: H - 6, "text-anchor": "middle" }, "layer (block)  ·  shaded: mean ± 1 std"));
  svg.append(s("text", { x: 12, y: m.top + ih / 2, transform: `rotate(-90 12 ${m.top + ih / 2})`, "text-anchor": "middle" }, "P(layer)"));
  return svg;
}

/** Counts in equal bins of [0, max] as bars on a log scale: x = activation, y = rows (log10(1 + count)). */
export function histogram(counts, max, title) {
  const W = 420;
  const H = 190;
  const m = { left: 48, right: 14, top: 24, bottom: 38 };
  const iw = W - m.left - m.right;
  const ih = H - m.top - m.bottom;
  const top = Math.max(1, ...counts);
  const decades = Math.max(1, Math.ceil(Math.log10(1 + top)));
  const svg = s("svg", { width: W, height: H, role: "img", "aria-label": title, "data-testid": "histogram" });
  svg.append(s("text", { x: m.left, y: 14, class: "title" }, title));
  for (let d = 0; d <= decades; d++) {
    const y = m.top + ih - (d / decades) * ih;
    svg.append(s("line", { x1: m.left, x2: m.left + iw, y1: y, y2: y, class: "grid" }));
    svg.append(s("text", { x: m.left - 5, y: y + 4, "text-anchor": "end" }, d === 0 ? "0" : fmt(10 ** d)));
  }
  const bw = iw / counts.length;
  counts.forEach((c, i) => {
    const bh = (Math.log10(1 + c) / decades) * ih;
    const rect = s("rect", { x: m.left + i * bw + 0.5, y: m.top + ih - bh, width: Math.max(1, bw - 1), height: bh, class: "bar-rect" });
    const lo = (i / counts.length) * max;
    const hi = ((i + 1) / counts.length) * max;
    rect.addEventListener("mousemove", (e) => showTip(e, `activation ${fmt(lo)} – ${fmt(hi)}`, `${fmt(c, 8)} rows`));
    rect.addEventListener("mouseleave", hideTip);
    svg.append(rect);
  });
  for (const t of ticks(max, 4)) {
    const x = m.left + (t / max) * iw;
    svg.append(s("line", { x1: x, x2: x, y1: m.top + ih, y2: m.top + ih + 4, class: "axis" }));
    svg.append(s("text", { x, y: m.top + ih + 16, "text-anchor": "middle" }, fmt(t)));
  }
  svg.append(s("line", { x1: m.left, x2: m.left + iw, y1: m.top + ih, y2: m.top + ih, class: "axis" }));
  svg.append(s("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + ih, class: "axis" }));
  svg.append(s("text", { x: m.left + iw / 2, y: H - 4, "text-anchor": "middle" }, "activation"));
  svg.append(s("text", { x: 11, y: m.top + ih / 2, transform: `rotate(-90 11 ${m.top + ih / 2})`, "text-anchor": "middle" }, "rows (log)"));
  return svg;
}

/**
 * A heatmap of rows x columns of SVG cells: rowLabels on the left, colLabels below (thinned), cell colour
 * color(value / scale). opts: values (rows of numbers), rowLabels, colLabels, scale, color, cell (px),
 * title, xTitle, yTitle, onCell(r, c), tip(r, c) -> lines, selected [r, c] | null with selectedAttrs, testid,
 * cellAttrs(r, c); rowAttrs(r) -> attributes of a <g> holding row r's cells; rowHref(r) -> a link for row r's
 * label; overlay(svg, {left, top, cw, ch}) draws over the cells.
 */
export function heatmap(opts) {
  const rows = opts.values.length;
  const cols = rows ? opts.values[0].length : 0;
  const cw = opts.cellWidth || opts.cell || 12;
  const ch = opts.cellHeight || opts.cell || 12;
  const m = { left: opts.left || 44, top: 22, bottom: 36, right: 10 };
  const W = Math.max(m.left + cols * cw + m.right, 12 + 7 * (opts.title || "").length, m.left + 7 * (opts.xTitle || "").length);
  const H = m.top + rows * ch + m.bottom;
  const svg = s("svg", { width: W, height: H, role: "img", "aria-label": opts.title, "data-testid": opts.testid });
  svg.append(s("text", { x: m.left, y: 14, class: "title" }, opts.title));
  const color = opts.color || blue;
  const scale = opts.scale > 0 ? opts.scale : 1;
  for (let r = 0; r < rows; r++) {
    const group = opts.rowAttrs ? s("g", opts.rowAttrs(r)) : svg;
    for (let c = 0; c < cols; c++) {
      const v = opts.values[r][c];
      const cell = s("rect", { x: m.left + c * cw, y: m.top + r * ch, width: cw, height: ch, fill: v > 0 ? color(v / scale) : "#fbfcfd", ...(opts.cellAttrs ? opts.cellAttrs(r, c) : {}) });
      if (opts.tip) {
        cell.addEventListener("mousemove", (e) => showTip(e, ...opts.tip(r, c)));
        cell.addEventListener("mouseleave", hideTip);
      }
      if (opts.onCell) cell.addEventListener("click", () => opts.onCell(r, c));
      group.append(cell);
    }
    if (group !== svg) svg.append(group);
  }
  const rowEvery = labelEvery(rows, rows * ch, 12);
  opts.rowLabels.forEach((label, r) => {
    if (r % rowEvery !== 0) return;
    const text = s("text", { x: m.left - 4, y: m.top + r * ch + ch / 2 + 4, "text-anchor": "end" }, label);
    svg.append(opts.rowHref ? s("a", { href: opts.rowHref(r), class: "row-link" }, text) : text);
  });
  if (opts.overlay) opts.overlay(svg, { left: m.left, top: m.top, cw, ch });
  const colEvery = labelEvery(cols, cols * cw, 26, opts.colLabels);
  opts.colLabels.forEach((label, c) => {
    if (c % colEvery === 0) svg.append(s("text", { x: m.left + c * cw + cw / 2, y: m.top + rows * ch + 13, "text-anchor": "middle" }, label));
  });
  if (opts.selected) {
    const [r, c] = opts.selected;
    svg.append(s("rect", { x: m.left + c * cw, y: m.top + r * ch, width: cw, height: ch, class: "outline", "data-testid": "selected-cell", "data-row": r, "data-col": c, ...(opts.selectedAttrs || {}) }));
  }
  svg.append(s("text", cols * cw > 7 * (opts.xTitle || "").length ? { x: m.left + (cols * cw) / 2, y: H - 6, "text-anchor": "middle" } : { x: m.left, y: H - 6 }, opts.xTitle || ""));
  if (opts.yTitle) svg.append(s("text", { x: 10, y: m.top + (rows * ch) / 2, transform: `rotate(-90 10 ${m.top + (rows * ch) / 2})`, "text-anchor": "middle" }, opts.yTitle));
  return svg;
}

/** Per-layer histograms as one heatmap: rows = layers, columns = activation bins, colour = log(1 + rows);
 * `marks` (per layer, a value or null) are drawn as ticks on their layer's row, labelled `markLabel`. */
export function layerHistograms(layers, perLayer, max, marks = null, markLabel = "value") {
  const top = Math.max(1, ...perLayer.flat());
  const bins = perLayer[0] ? perLayer[0].length : 0;
  const values = perLayer.map((row) => row.map((c) => Math.log10(1 + c)));
  const colLabels = Array.from({ length: bins }, (_, i) => fmt(((i + 0.5) / bins) * max, 2));
  const chart = heatmap({
    values,
    rowLabels: layers.map(String),
    colLabels,
    scale: Math.log10(1 + top),
    cellWidth: Math.max(6, Math.min(12, Math.floor(380 / Math.max(1, bins)))),
    cellHeight: Math.max(5, Math.min(12, Math.floor(260 / Math.max(1, layers.length)))),
    title: "Activation histogram per layer",
    xTitle: "activation (bin centre)",
    yTitle: "layer",
    testid: "layer-histograms",
    tip: (r, c) => [`layer ${layers[r]}, activation ${fmt((c / bins) * max)} – ${fmt(((c + 1) / bins) * max)}`, `${fmt(perLayer[r][c], 8)} rows`],
    overlay: marks ? (svg, g) => drawMarks(svg, g, layers, marks, max, bins, markLabel) : null,
  });
  const notes = marks ? [s("svg", { width: 220, height: 16 }, s("rect", { x: 0, y: 3, width: 3, height: 11, class: "mark" }), s("text", { x: 8, y: 13 }, markLabel))] : [];
  return [chart, legend("rows per bin (log scale)", top, (t) => blue(t)), ...notes];
}

function drawMarks(svg, g, layers, marks, max, bins, label) {
  marks.forEach((value, r) => {
    if (value === null || value === undefined || !(value > 0)) return;
    const x = g.left + Math.min(1, value / (max || 1)) * bins * g.cw;
    const mark = s("rect", { x: x - 1.5, y: g.top + r * g.ch - 1, width: 3, height: g.ch + 2, class: "mark", "data-testid": "hist-mark", "data-layer": layers[r], "data-value": value });
    mark.addEventListener("mousemove", (e) => showTip(e, `layer ${layers[r]}: ${label} ${fmt(value, 4)}${value > max ? " (beyond the store's largest)" : ""}`));
    mark.addEventListener("mouseleave", hideTip);
    svg.append(mark);
  });
}

/** One value per layer as bars with a y axis (for eval metrics); `width` in px, else from the layer count. */
export function valuesPerLayer(layers, values, title, width = null) {
  const W = width || Math.max(360, Math.min(900, 60 + layers.length * 22));
  const H = 170;
  const m = { left: 52, right: 10, top: 24, bottom: 34 };
  const iw = W - m.left - m.right;
  const ih = H - m.top - m.bottom;
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  const ymax = Math.max(1e-9, ...finite.map((v) => Math.abs(v))) * 1.1;
  const svg = s("svg", { width: W, height: H, role: "img", "aria-label": title });
  svg.append(s("text", { x: m.left, y: 14, class: "title" }, title));
  yAxis(svg, m.top, ih, m.left, iw, ymax, (t) => fmt(t, 2));
  const slot = iw / layers.length;
  const every = labelEvery(layers.length, iw, 22, layers);
  layers.forEach((block, i) => {
    const v = values[i];
    const bh = v === null ? 0 : (Math.abs(v) / ymax) * ih;
    const rect = s("rect", { x: m.left + i * slot + slot * 0.15, y: m.top + ih - bh, width: slot * 0.7, height: bh, class: "bar-rect" });
    rect.addEventListener("mousemove", (e) => showTip(e, `layer ${block}: ${fmt(v, 4)}`));
    rect.addEventListener("mouseleave", hideTip);
    svg.append(rect);
    if (v === null) svg.append(s("text", { x: m.left + i * slot + slot / 2, y: m.top + ih - 4, "text-anchor": "middle" }, "n/a"));
    if (i % every === 0) svg.append(s("text", { x: m.left + i * slot + slot / 2, y: m.top + ih + 14, "text-anchor": "middle" }, block));
  });
  svg.append(s("line", { x1: m.left, x2: m.left + iw, y1: m.top + ih, y2: m.top + ih, class: "axis" }));
  svg.append(s("text", { x: m.left + iw / 2, y: H - 4, "text-anchor": "middle" }, "layer (block)"));
  return svg;
}
