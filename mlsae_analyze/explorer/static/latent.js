// `/latent/{j}`: where latent j fires over layers (bars: hover previews, click selects a layer), its activation
// histograms, logit effects and similar latents, and its examples per tab (All / each layer) and kind
// (top / quantile / random), each a window of tokens tinted by activation with a strip of the latent at that token
// at every layer. State in the URL: layer, kind, show (examples listed), ex (the highlighted example).
import { histogram, layerBars, layerHistograms } from "./charts.js";
import { ownTextSection } from "./owntext.js";
import {
  actColor, api, count, fmt, h, hideTip, intParam, keys, legend, pathNumber, pct, query, s, setQuery,
  showProblem, showTip, tokenSpan, tokenText, typing,
} from "./common.js";

const KINDS = ["top", "quantile", "random"];
const PAGE = 20;

function state(meta) {
  const q = query();
  const raw = q.get("layer");
  const layer = raw !== null && /^\d+$/.test(raw) && meta.layers.includes(Number(raw)) ? Number(raw) : "all";
  const kind = KINDS.includes(q.get("kind")) ? q.get("kind") : "top";
  return { layer, kind, show: Math.max(PAGE, intParam("show", PAGE)), ex: intParam("ex", null) };
}

function chips(lat, meta) {
  const chip = (label, value, title) => h("span", { class: "chip", title }, `${label} `, h("b", {}, value));
  return h(
    "div",
    { class: "chips" },
    chip("density", pct(lat.density), `fires on ${count(lat.tokens_fired)} of ${count(meta.n_rows)} tokens (at some layer)`),
    chip("max", fmt(lat.max_all), "largest activation over all layers"),
    chip("mean of token max", fmt(lat.mean_all), "mean over the tokens where it fires of its largest activation"),
    chip("mean layer", fmt(lat.mean_layer, 3), "E[L|j] as a block index"),
    chip("layer std", fmt(lat.layer_std, 3), "sqrt(Var[L|j]), in layers"),
    chip("within-token var", fmt(lat.within_var, 3), "E_T[Var(L|T,j)]: spread over layers inside one token"),
    chip("across-token var", fmt(lat.across_var, 3), "Var_T(E[L|T,j]): how each token's own mean layer moves"),
  );
}

function logitList(title, items) {
  return h("div", {}, h("h2", {}, title), h("div", { class: "logits" }, items.flatMap((t) => [h("span", { class: "tokens" }, tokenSpan(t.token, 0, 1)), h("span", { class: "v" }, fmt(t.value))])));
}

function logitsPanel(lat, meta) {
  if (!meta.has_logits) return h("div", { class: "panel" }, h("h2", {}, "Logit effects"), h("p", { class: "note", "data-testid": "no-logits" }, `None: ${meta.logits_note || "the index was built without a model"}.`));
  return h("div", { class: "panel", "data-testid": "logits" }, h("div", { class: "row" }, logitList("Promotes", lat.logits_pos), logitList("Suppresses", lat.logits_neg)), h("p", { class: "muted" }, "logits of the decoder direction through the final norm and unembedding"));
}

function similarPanel(lat) {
  const items = lat.similar.map((x) => h("li", {}, h("a", { href: `latent/${x.latent}` }, `latent ${x.latent}`), ` cosine ${fmt(x.cosine, 3)}`));
  return h("div", { class: "panel" }, h("h2", {}, "Similar latents (decoder cosine)"), items.length ? h("ol", {}, items) : h("p", { class: "muted" }, "none"));
}

function layerStrip(ex, layers, scale) {
  const cw = Math.max(5, Math.min(10, Math.floor(160 / layers.length)));
  const svg = s("svg", { width: layers.length * cw + 2, height: 16, "data-testid": "layer-strip", role: "img", "aria-label": "activation at this token per layer" });
  ex.layer_strip.forEach((v, i) => {
    const cell = s("rect", { x: 1 + i * cw, y: 1, width: cw - 1, height: 14, fill: v > 0 ? actColor(v / scale) : "#f1f3f5", "data-layer": layers[i], "data-value": v });
    cell.addEventListener("mousemove", (e) => showTip(e, `layer ${layers[i]}: ${fmt(v, 4)}`));
    cell.addEventListener("mouseleave", hideTip);
    svg.append(cell);
  });
  const at = layers.indexOf(ex.layer);
  svg.append(s("rect", { x: 1 + at * cw, y: 1, width: cw - 1, height: 14, class: "outline" }));
  return svg;
}

function exampleRow(ex, j, lat, meta, index, current) {
  const scale = lat.max[meta.layers.indexOf(ex.layer)] || lat.max_all;
  const tokens = ex.tokens.map((t, i) => {
    const span = tokenSpan(t, ex.values[i], scale, { "data-i": i });
    if (i === ex.focus) span.classList.add("focus");
    if (ex.skipped.includes(i)) span.classList.add("skipped");
    span.addEventListener("mousemove", (e) => showTip(e, h("span", { class: "tokens" }, tokenText(t)), `activation at layer ${ex.layer}: ${fmt(ex.values[i], 4)}`, ex.skipped.includes(i) ? "left out of the statistics (special token or position 0)" : ""));
    span.addEventListener("mouseleave", hideTip);
    return span;
  });
  const href = `doc/${ex.sequence}?latent=${j}&pos=${ex.position}&layer=${ex.layer}`;
  return h(
    "div",
    { class: `example${index === current ? " current" : ""}`, "data-testid": "example", "data-act": ex.value, "data-token": ex.token, "data-layer": ex.layer, "data-index": index },
    h("span", { class: "act", title: `layer ${ex.layer}` }, fmt(ex.value), h("div", { class: "muted" }, `L${ex.layer}`)),
    layerStrip(ex, meta.layers, lat.max_all),
    h("span", { class: "tokens" }, tokens),
    h("a", { href, "data-testid": "open-in-context", title: `window ${ex.sequence}, token ${ex.position}` }, "open in context"),
  );
}

function exampleList(data, j, lat, meta, current) {
  const rows = [];
  let group = null;
  data.examples.forEach((ex, i) => {
    if (data.kind === "quantile" && ex.group !== group) {
      group = ex.group;
      const edges = data.group_edges;
      rows.push(h("div", { class: "group-head" }, `quantile group ${group + 1} of ${edges.length - 1}: activation in (${fmt(edges[group])}, ${fmt(edges[group + 1])}]`));
    }
    rows.push(exampleRow(ex, j, lat, meta, i, current));
  });
  if (!rows.length) rows.push(h("p", { class: "muted" }, "No examples here: the latent never fires in this tab."));
  return rows;
}

export async function render(main) {
  const j = pathNumber();
  const [meta, lat] = await Promise.all([api("meta"), api(`latent/${j}`)]);
  document.title = `Latent ${j} · mlsae explorer`;
  const view = { meta, lat, j, st: state(meta), examples: null, marks: null };
  const barsBox = h("div", { class: "panel" });
  const histBox = h("div", { class: "panel row" });
  const tabsBox = h("div", {});
  const listBox = h("div", { class: "examples", "data-testid": "examples" });
  const moreBox = h("div", { class: "pager" });
  const own = ownTextSection(meta, j, (marks) => {
    view.marks = marks;
    drawHistograms(view, histBox);
  });
  view.own = own;
  const nav = h("span", { class: "nav" }, j > 0 ? h("a", { href: `latent/${j - 1}` }, "← previous") : "", "  ", j + 1 < meta.n_latents ? h("a", { href: `latent/${j + 1}` }, "next →") : "");
  main.replaceChildren(
    h("h1", {}, `Latent ${j} `, nav),
    chips(lat, meta),
    h("div", { class: "row" }, barsBox, histBox),
    own.node,
    h("div", { class: "row" }, logitsPanel(lat, meta), similarPanel(lat)),
    h("h2", {}, "Examples"),
    tabsBox,
    h("p", { class: "muted" }, "Each example: its activation and layer; a strip of the latent at that token at every layer (outlined: the example's layer); the window's tokens shaded by the latent's activation at that layer, from 0 to that layer's maximum (outlined: the example's token; grey: left out of the statistics)."),
    listBox,
    moreBox,
  );
  const select = (changes, push = true) => {
    Object.assign(view.st, changes);
    setQuery({ layer: view.st.layer === "all" ? null : view.st.layer, kind: view.st.kind === "top" ? null : view.st.kind, show: view.st.show === PAGE ? null : view.st.show, ex: view.st.ex }, push);
    if (Object.keys(changes).every((key) => key === "ex")) {
      for (const row of listBox.querySelectorAll(".example")) row.classList.toggle("current", Number(row.dataset.index) === view.st.ex);
      return;
    }
    draw(view, { barsBox, histBox, tabsBox, listBox, moreBox }, select);
  };
  window.addEventListener("popstate", () => {
    view.st = state(meta);
    draw(view, { barsBox, histBox, tabsBox, listBox, moreBox }, select);
  });
  document.addEventListener("keydown", (e) => onKey(e, view, select));
  keys(["← →", "previous / next layer tab"], ["↑ ↓", "previous / next example"], ["Enter", "open the example in context"], ["t q r", "top / quantile / random"], ["[ ]", "previous / next latent"]);
  await draw(view, { barsBox, histBox, tabsBox, listBox, moreBox }, select);
}

async function draw(view, boxes, select) {
  const { meta, lat, j, st } = view;
  boxes.barsBox.replaceChildren(layerBars({ layers: meta.layers, probs: lat.layer_probs, counts: lat.counts, max: lat.max, mean: lat.mean_layer, std: lat.layer_std, selected: st.layer === "all" ? null : st.layer, onSelect: (b) => select({ layer: b, show: PAGE, ex: null }), title: `P(layer) of latent ${j}: click a bar for that layer's examples` }));
  drawHistograms(view, boxes.histBox);
  const likeliest = meta.layers[lat.layer_probs.reduce((best, p, i) => ((p || 0) > (lat.layer_probs[best] || 0) ? i : best), 0)];
  view.own.setLayer(st.layer === "all" ? likeliest : st.layer);
  const tabButton = (label, layer) => h("button", { type: "button", "aria-pressed": String(st.layer === layer), "data-testid": "layer-tab", "data-layer": layer, onclick: () => select({ layer, show: PAGE, ex: null }) }, label);
  const kindButton = (kind) => h("button", { type: "button", "aria-pressed": String(st.kind === kind), "data-testid": "kind-tab", "data-kind": kind, onclick: () => select({ kind, show: PAGE, ex: null }) }, kind);
  boxes.tabsBox.replaceChildren(
    h("div", { class: "tabs" }, h("span", { class: "label" }, "Layer"), tabButton("All", "all"), meta.layers.map((b) => tabButton(String(b), b))),
    h("div", { class: "tabs" }, h("span", { class: "label" }, "Kind"), KINDS.map(kindButton)),
  );
  const ticket = (view.drawn = (view.drawn || 0) + 1);
  let examples;
  try {
    examples = await api(`latent/${j}/examples`, { layer: st.layer, kind: st.kind, limit: st.show });
  } catch (error) {
    showProblem(error);
    return;
  }
  if (ticket !== view.drawn) return; // a later selection is being drawn: its answer, not this one, is shown
  view.examples = examples;
  boxes.listBox.replaceChildren(...exampleList(view.examples, j, lat, meta, st.ex));
  const shown = view.examples.examples.length;
  boxes.moreBox.replaceChildren(h("span", { class: "muted" }, `${shown} of ${view.examples.total} examples`), shown < view.examples.total ? h("button", { type: "button", onclick: () => select({ show: st.show + PAGE }, false) }, "Show more") : "");
}

/** The selected tab's histogram and the per-layer ones (with the own text's largest values marked, if any). */
function drawHistograms(view, histBox) {
  const { meta, lat, st } = view;
  const tab = st.layer === "all" ? null : meta.layers.indexOf(st.layer);
  const counts = tab === null ? lat.histogram.all : lat.histogram.layers[tab];
  histBox.replaceChildren(histogram(counts, lat.histogram.max, tab === null ? "Activations, all layers (each token's max)" : `Activations at layer ${st.layer}`), h("div", {}, ...layerHistograms(meta.layers, lat.histogram.layers, lat.histogram.max, view.marks, "largest on your text")));
}

function onKey(e, view, select) {
  if (typing(e) || e.altKey || e.ctrlKey || e.metaKey) return;
  const { meta, st, j } = view;
  const tabs = ["all", ...meta.layers];
  const at = tabs.indexOf(st.layer);
  const n = view.examples ? view.examples.examples.length : 0;
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    const next = Math.max(0, Math.min(tabs.length - 1, at + (e.key === "ArrowRight" ? 1 : -1)));
    if (next !== at) select({ layer: tabs[next], show: PAGE, ex: null });
  } else if ((e.key === "ArrowDown" || e.key === "ArrowUp") && n) {
    const cur = st.ex === null ? -1 : st.ex;
    select({ ex: Math.max(0, Math.min(n - 1, cur + (e.key === "ArrowDown" ? 1 : -1))) }, false);
    document.querySelector(".example.current")?.scrollIntoView({ block: "nearest" });
  } else if (e.key === "Enter" && st.ex !== null && n) {
    document.querySelector(`.example[data-index="${st.ex}"] a`)?.click();
  } else if ("tqr".includes(e.key) && e.key.length === 1) {
    select({ kind: KINDS["tqr".indexOf(e.key)], show: PAGE, ex: null });
  } else if (e.key === "[" && j > 0) location.href = `latent/${j - 1}`;
  else if (e.key === "]" && j + 1 < meta.n_latents) location.href = `latent/${j + 1}`;
  else return;
  e.preventDefault();
}
