// `/doc/{d}`: one context window of the cache. Its tokens (tinted by the selected latent at the selected layer;
// click selects a token), a token x layer heatmap of the selected latent (click selects a cell), and the latent x
// layer heatmap of the latents active at the selected token (click selects a latent). State in the URL: latent,
// pos (index of the token in the window), layer (block). Arrow keys: ← → move the token, ↑ ↓ the layer.
import { heatmap } from "./charts.js";
import { actColor, api, fmt, h, hideTip, intParam, keys, legend, pathNumber, setQuery, showProblem, showTip, tokenSpan, tokenText, typing } from "./common.js";

const MAX_ROWS = 80;

function state(meta) {
  const layer = intParam("layer", null);
  return { latent: intParam("latent", null), pos: intParam("pos", null), layer: meta.layers.includes(layer) ? layer : null };
}

function tokenStrip(doc, meta, st, select) {
  const values = new Map(doc.cells.map((c) => [`${c.position}:${c.layer}`, c.value]));
  const at = (p) => {
    if (st.layer !== null) return values.get(`${p}:${st.layer}`) || 0;
    return Math.max(0, ...meta.layers.map((b) => values.get(`${p}:${b}`) || 0));
  };
  const spans = doc.tokens.map((t, p) => {
    const span = tokenSpan(t, at(p), doc.latent_max || 0, { "data-testid": "token", "data-position": p, role: "button", "aria-pressed": String(p === st.pos) });
    if (p === st.pos) span.classList.add("selected");
    if (doc.skipped.includes(p)) span.classList.add("skipped");
    span.addEventListener("mousemove", (e) => showTip(e, h("span", { class: "tokens" }, tokenText(t)), `token ${p} (row ${doc.start + p})`, st.latent === null ? "" : `latent ${st.latent}${st.layer === null ? " (max over layers)" : ` at layer ${st.layer}`}: ${fmt(at(p), 4)}`));
    span.addEventListener("mouseleave", hideTip);
    span.addEventListener("click", () => select({ pos: p }));
    return t.includes("\n") ? [span, h("br")] : [span]; // the window's own line breaks, as in the text
  });
  return h("div", { class: "tokens doc", "data-testid": "doc-tokens" }, spans.flat());
}

function tokenLayerMap(doc, meta, st, select) {
  if (st.latent === null) return h("p", { class: "muted" }, "Select a latent (below, or with ?latent=) to see where it fires in this window.");
  const grid = meta.layers.map(() => new Array(doc.tokens.length).fill(0));
  for (const c of doc.cells) grid[meta.layers.indexOf(c.layer)][c.position] = c.value;
  const rowOf = st.layer === null ? null : meta.layers.indexOf(st.layer);
  const selected = st.pos !== null && rowOf !== null ? [rowOf, st.pos] : null;
  return h(
    "div",
    {},
    heatmap({
      values: grid,
      rowLabels: meta.layers.map(String),
      colLabels: doc.tokens.map((_, p) => String(p)),
      scale: doc.latent_max,
      color: actColor,
      cellWidth: Math.max(3, Math.min(12, Math.floor(1100 / doc.tokens.length))),
      cellHeight: Math.max(5, Math.min(12, Math.floor(300 / meta.layers.length))),
      title: `Latent ${st.latent} per token and layer`,
      xTitle: "token (position in the window)",
      yTitle: "layer",
      testid: "token-layer-heatmap",
      selected,
      selectedAttrs: selected ? { "data-position": st.pos, "data-layer": st.layer } : {},
      tip: (r, p) => [`token ${p} “${doc.tokens[p]}”, layer ${meta.layers[r]}`, `activation ${fmt(grid[r][p], 4)}`],
      onCell: (r, p) => select({ pos: p, layer: meta.layers[r] }),
    }),
    legend(`latent ${st.latent}'s activation (its max over the store: ${fmt(doc.latent_max)})`, doc.latent_max, actColor),
  );
}

function latentLayerMap(doc, meta, st, select) {
  if (st.pos === null) return h("p", { class: "muted" }, "Click a token to see every latent active there.");
  let rows = doc.token_latents;
  const total = rows.length;
  if (!total) return h("p", { class: "muted" }, "No latent is active at this token.");
  if (total > MAX_ROWS) {
    const keep = new Set([...rows].sort((a, b) => Math.max(...b.values) - Math.max(...a.values)).slice(0, MAX_ROWS).map((r) => r.latent));
    rows = rows.filter((r) => keep.has(r.latent));
  }
  const scale = Math.max(...rows.flatMap((r) => r.values));
  return h(
    "div",
    {},
    h("p", { class: "muted" }, `${total} latents active at token ${st.pos} “`, h("span", { class: "tokens" }, tokenText(doc.tokens[st.pos])), `”, by mean layer${total > MAX_ROWS ? `; the ${MAX_ROWS} strongest shown` : ""}. Click a row to select that latent.`),
    heatmap({
      values: rows.map((r) => r.values),
      rowLabels: rows.map((r) => String(r.latent)),
      colLabels: meta.layers.map(String),
      scale,
      color: actColor,
      cellWidth: Math.max(8, Math.min(16, Math.floor(600 / meta.layers.length))),
      cellHeight: 12,
      left: 56,
      title: "Latents at the selected token, per layer",
      xTitle: "layer (block)",
      yTitle: "latent",
      testid: "latent-layer-heatmap",
      selected: st.latent !== null && rows.some((r) => r.latent === st.latent) && st.layer !== null ? [rows.findIndex((r) => r.latent === st.latent), meta.layers.indexOf(st.layer)] : null,
      tip: (r, c) => [`latent ${rows[r].latent} (mean layer ${fmt(rows[r].mean_layer, 3)})`, `layer ${meta.layers[c]}: ${fmt(rows[r].values[c], 4)}`, "click to select this latent"],
      onCell: (r, c) => select({ latent: rows[r].latent, layer: meta.layers[c] }),
    }),
    legend("activation at this token", scale, actColor),
  );
}

export async function render(main) {
  const d = pathNumber();
  const meta = await api("meta");
  const view = { st: state(meta), doc: null };
  const head = h("div", {});
  const body = h("div", {});
  main.replaceChildren(head, body);
  let drawn = 0;
  const draw = async () => {
    const ticket = ++drawn;
    let doc;
    try {
      doc = await api(`doc/${d}`, { latent: view.st.latent, position: view.st.pos });
    } catch (error) {
      showProblem(error);
      return;
    }
    if (ticket !== drawn) return; // a later selection is being drawn
    view.doc = doc;
    paint(view, meta, d, head, body, select);
  };
  const select = (changes, push = false) => {
    Object.assign(view.st, changes);
    setQuery({ latent: view.st.latent, pos: view.st.pos, layer: view.st.layer }, push);
    draw();
  };
  window.addEventListener("popstate", () => {
    view.st = state(meta);
    draw();
  });
  document.addEventListener("keydown", (e) => onKey(e, view, meta, select));
  keys(["← →", "previous / next token"], ["↑ ↓", "previous / next layer"], ["click", "select a token, cell or latent"]);
  await draw();
}

function paint(view, meta, d, head, body, select) {
  const { doc, st } = view;
  document.title = `Window ${d} · mlsae explorer`;
  const input = h("input", { type: "number", min: 0, value: st.latent ?? "", id: "doc-latent", "aria-label": "latent id" });
  const form = h("form", { class: "jump" }, h("label", { for: "doc-latent" }, "Latent"), input, h("button", { type: "submit" }, "Show"), st.latent === null ? "" : h("a", { href: `latent/${st.latent}` }, `latent ${st.latent}'s page`));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    select({ latent: /^\d+$/.test(input.value) ? Number(input.value) : null }, true);
  });
  const nav = h("span", { class: "nav" }, d > 0 ? h("a", { href: `doc/${d - 1}${location.search}` }, "← previous") : "", "  ", d + 1 < meta.n_docs ? h("a", { href: `doc/${d + 1}${location.search}` }, "next →") : "");
  head.replaceChildren(h("h1", {}, `Context window ${d} `, nav), h("p", { class: "muted" }, `rows ${doc.start}–${doc.start + doc.tokens.length - 1} of the cache; selected: token ${st.pos ?? "–"}, layer ${st.layer ?? "–"}`), form);
  body.replaceChildren(
    h("h2", {}, "Tokens"),
    tokenStrip(doc, meta, st, select),
    h("h2", {}, "Selected latent per token and layer"),
    tokenLayerMap(doc, meta, st, select),
    h("h2", {}, "Latents at the selected token"),
    latentLayerMap(doc, meta, st, select),
  );
}

function onKey(e, view, meta, select) {
  if (typing(e) || !view.doc) return;
  const { st, doc } = view;
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    const pos = st.pos === null ? 0 : Math.max(0, Math.min(doc.tokens.length - 1, st.pos + (e.key === "ArrowRight" ? 1 : -1)));
    select({ pos });
  } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    const at = st.layer === null ? -1 : meta.layers.indexOf(st.layer);
    const next = Math.max(0, Math.min(meta.layers.length - 1, at + (e.key === "ArrowDown" ? 1 : -1)));
    select({ layer: meta.layers[next] });
  } else return;
  e.preventDefault();
}
