// `/prompt` (live model): any text through the model and the SAE. A text box (Enter runs it, Shift+Enter adds a
// line), the token strip tinted by the selected latent at the selected layer (hover previews a token's latents in
// the side panel, click selects it, ← → move), the prompt's per-layer FVU and delta CE, and three tabs: Latents
// (latent x layer heatmap at the token, the latent's token x layer heatmap and histograms), Recon (logits with the
// reconstruction spliced in) and Steer. State in the URL (promptdata.js); without a live model the page says how
// to start one and sends no request to the live routes.
import { api, clearProblem, fmt, h, hideTip, keys, liveModelNeeded, post, setQuery, showProblem, showTip, tokenSpan, tokenText, typing } from "./common.js";
import { TABS, promptState, stateParams, topAt } from "./promptdata.js";
import { reconPanel, steerPanel } from "./promptlive.js";
import { histogramPanel, latentLayerPanel, metricsPanel, tokenLayerPanel } from "./promptviews.js";

const PREVIEW_ROWS = 12;

function textBox(st, submit) {
  const area = h("textarea", { id: "prompt-text", rows: 3, "data-testid": "prompt-input", "aria-label": "prompt", placeholder: "Type a prompt, then Enter (Shift+Enter: a new line)" });
  area.value = st.text;
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit(area.value);
    }
  });
  const form = h("form", { class: "prompt-form" }, area, h("button", { type: "submit", "data-testid": "prompt-submit" }, "Run"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit(area.value);
  });
  return form;
}

/** The selection the page shows: the URL's, or the last token and the strongest latent there (by the rank
 * chosen; at the selected layer if one is active there). */
function effective(view) {
  const { data, st } = view;
  const last = data.tokens.length - 1;
  const pos = st.pos !== null && st.pos >= 0 && st.pos <= last ? st.pos : last;
  if (st.latent !== null) return { pos, latent: st.latent };
  const top = topAt(data, pos, st.rank);
  const best = top.find((x) => x.layer === st.layer) || top[0];
  return { pos, latent: best ? best.latent : null };
}

/** Latent j's value at token p: at the selected layer, or its largest over layers. */
function valueAt(data, j, p, layer) {
  let best = 0;
  data.layers.forEach((b, l) => {
    if (layer !== null && b !== layer) return;
    const slot = data.indices[l][p].indexOf(j);
    if (slot >= 0) best = Math.max(best, data.values[l][p][slot]);
  });
  return best;
}

function strip(view, sel, select, preview) {
  const { data, st } = view;
  const tint = data.tokens.map((_, p) => (sel.latent === null ? 0 : valueAt(data, sel.latent, p, st.layer)));
  const scale = Math.max(1e-12, ...tint.filter((_, p) => data.trainable[p]), ...(data.trainable.some(Boolean) ? [] : tint));
  const spans = data.tokens.map((t, p) => {
    const span = tokenSpan(t, data.trainable[p] ? tint[p] : 0, scale, { "data-testid": "token", "data-position": p, "data-value": tint[p], role: "button", "aria-pressed": String(p === sel.pos) });
    if (p === sel.pos) span.classList.add("selected");
    if (!data.trainable[p]) span.classList.add("skipped");
    span.addEventListener("mouseenter", () => preview(p));
    span.addEventListener("mousemove", (e) => showTip(e, h("span", { class: "tokens" }, tokenText(t)), `token ${p}${data.trainable[p] ? "" : " (untrainable: the separator or a special token, never trained on)"}`, sel.latent === null ? "" : `latent ${sel.latent}${st.layer === null ? " (largest over layers)" : ` at layer ${st.layer}`}: ${fmt(tint[p], 4)}`));
    span.addEventListener("mouseleave", hideTip);
    span.addEventListener("click", () => select({ pos: p }));
    return t.includes("\n") ? [span, h("br")] : [span];
  });
  const box = h("div", { class: "tokens doc prompt-strip", "data-testid": "prompt-tokens" }, spans.flat());
  box.addEventListener("mouseleave", () => preview(null));
  const where = st.layer === null ? "" : ` at layer ${st.layer}`;
  const active = tint.some((v, p) => v > 0 && data.trainable[p]);
  const range = active ? `, from 0 to its largest in this prompt (${fmt(scale)})` : ` (not active${where} at any trainable token of this prompt)`;
  const what = sel.latent === null ? "no latent selected" : `tinted by latent ${sel.latent}${st.layer === null ? " (its largest value over layers)" : where}${range}`;
  return [box, h("p", { class: "muted" }, `${data.tokens.length} tokens, ${what}; grey: untrainable (not tinted). Hover a token to preview it, click to select it.`)];
}

function previewPanel(view, p, hovering, select) {
  const { data, st } = view;
  const top = topAt(data, p, st.rank).slice(0, PREVIEW_ROWS);
  const rows = top.map((x) =>
    h("tr", { "data-testid": "preview-row", "data-latent": x.latent, "data-layer": x.layer }, h("td", {}, h("a", { href: `latent/${x.latent}` }, x.latent)), h("td", {}, x.layer), h("td", { class: "num" }, fmt(x.value, 3)), h("td", { class: "num", title: x.quantile === null ? "it never fired at this layer in the stores" : null }, x.quantile === null ? "unseen" : fmt(x.quantile, 2)), h("td", {}, h("button", { type: "button", onclick: () => select({ latent: x.latent, layer: x.layer }) }, "select"))),
  );
  return h(
    "aside",
    { class: "panel preview", "data-testid": "token-preview", "data-position": p, "data-hover": String(hovering) },
    h("h3", {}, `${hovering ? "Preview" : "Selected"}: token ${p} “`, h("span", { class: "tokens" }, tokenText(data.tokens[p])), "”"),
    data.trainable[p] ? "" : h("p", { class: "note" }, "Untrainable (separator or special token): the SAE never saw such rows."),
    h("p", { class: "muted" }, `Strongest (latent, layer) pairs by ${st.rank === "size" ? "activation" : "quantile within the latent's own activations at that layer"}:`),
    rows.length ? h("table", { class: "preview-table" }, h("tr", {}, h("th", {}, "latent"), h("th", {}, "layer"), h("th", {}, "value"), h("th", {}, "quantile"), h("th", {}, "")), rows) : h("p", { class: "muted" }, "none active"),
  );
}

export async function render(main) {
  const meta = await api("meta");
  document.title = "Prompt · mlsae explorer";
  if (!meta.live) {
    main.replaceChildren(h("h1", {}, "Prompt"), liveModelNeeded("This page runs your text through the model and the SAE: it"));
    return;
  }
  const view = { meta, st: promptState(meta), data: null, deltaCe: null, hover: null, infos: new Map(), autoSteer: true, loaded: 0 };
  const boxes = Object.fromEntries(["status", "strip", "preview", "metrics", "tabs", "tab"].map((k) => [k, h("div", {})]));
  main.replaceChildren(
    h("h1", {}, "Prompt"),
    textBox(view.st, (text) => submit(view, boxes, text)),
    boxes.status,
    h("div", { class: "prompt-top" }, h("div", { class: "prompt-main" }, boxes.strip, boxes.metrics), boxes.preview),
    boxes.tabs,
    boxes.tab,
  );
  window.addEventListener("popstate", () => {
    const before = view.st.text;
    view.st = promptState(meta);
    if (view.st.text !== before) load(view, boxes);
    else paint(view, boxes);
  });
  document.addEventListener("keydown", (e) => onKey(e, view, boxes));
  keys(["Enter", "run the text (Shift+Enter: new line)"], ["← →", "previous / next token"], ["↑ ↓", "previous / next layer"], ["hover", "preview a token"], ["click", "select a token, cell or latent"]);
  await load(view, boxes);
}

function submit(view, boxes, text) {
  if (!text.trim()) return;
  Object.assign(view.st, { text, pos: null });
  setQuery(stateParams(view.st), true);
  load(view, boxes);
}

async function load(view, boxes) {
  const { st } = view;
  const ticket = ++view.loaded;
  view.data = view.deltaCe = view.steerOut = view.genOut = null;
  for (const key of ["strip", "preview", "metrics", "tabs", "tab"]) boxes[key].replaceChildren();
  if (!st.text) {
    boxes.status.replaceChildren(h("p", { class: "muted" }, "Type a text above and press Enter: its tokens, the latents at every token and layer, the logits with the reconstruction, and steering."));
    return;
  }
  boxes.status.replaceChildren(h("p", { class: "muted" }, "Running the model…"));
  try {
    const data = await post("prompt", { text: st.text });
    if (ticket !== view.loaded) return;
    view.data = data;
    clearProblem();
    boxes.status.replaceChildren();
    paint(view, boxes);
    const full = await post("prompt/delta_ce", { text: st.text }); // L re-runs: asked once the page is drawn
    if (ticket !== view.loaded) return;
    view.deltaCe = full.delta_ce;
    boxes.metrics.replaceChildren(...metricsPanel(view.data, view.deltaCe));
  } catch (error) {
    if (ticket !== view.loaded) return;
    boxes.status.replaceChildren(h("p", { class: "muted" }, view.data ? "" : "No result for this text."));
    showProblem(error);
  }
}

function paint(view, boxes) {
  if (!view.data) return;
  const sel = effective(view);
  const select = (changes, push = false) => {
    Object.assign(view.st, changes);
    setQuery(stateParams(view.st), push);
    paint(view, boxes);
  };
  const preview = (p) => {
    view.hover = p;
    boxes.preview.replaceChildren(previewPanel(view, p ?? sel.pos, p !== null, select));
  };
  boxes.strip.replaceChildren(...strip(view, sel, select, preview));
  boxes.preview.replaceChildren(previewPanel(view, sel.pos, false, select));
  boxes.metrics.replaceChildren(...metricsPanel(view.data, view.deltaCe));
  const tabButton = (tab) => h("button", { type: "button", role: "tab", "data-testid": "tab", "data-tab": tab, "aria-pressed": String(view.st.tab === tab), onclick: () => select({ tab }) }, { latents: "Latents", recon: "Recon", steer: "Steer" }[tab]);
  boxes.tabs.replaceChildren(h("div", { class: "tabs main-tabs" }, TABS.map(tabButton)));
  boxes.tab.replaceChildren(...tabBody(view, sel, select, boxes));
}

function tabBody(view, sel, select, boxes) {
  const { data, st } = view;
  const ctx = { view, data, st, pos: sel.pos, latent: sel.latent, select, save: () => setQuery(stateParams(view.st)) };
  if (st.tab === "recon") return [reconPanel(ctx)];
  if (st.tab === "steer") return [steerPanel(ctx)];
  const info = sel.latent === null ? null : view.infos.get(sel.latent);
  if (sel.latent !== null && !view.infos.has(sel.latent)) {
    view.infos.set(sel.latent, null);
    api(`latent/${sel.latent}`)
      .then((got) => {
        view.infos.set(sel.latent, got);
        if (effective(view).latent === sel.latent && view.st.tab === "latents") paint(view, boxes);
      })
      .catch(showProblem);
  }
  const chosen = st.latent === null && sel.latent !== null ? " (the strongest at this token; click a row to choose another)" : "";
  return [
    h("h2", {}, "Latents at the selected token"),
    ...latentLayerPanel(data, sel.pos, st, sel.latent, select),
    h("h2", {}, `Latent ${sel.latent ?? "–"} at every token and layer${chosen}`),
    ...tokenLayerPanel(data, sel.latent, st, sel.pos, select),
    h("h2", {}, "Its activations in the store, per layer"),
    ...histogramPanel(data, info, sel.latent, sel.pos),
  ];
}

function onKey(e, view, boxes) {
  if (typing(e) || !view.data || e.altKey || e.ctrlKey || e.metaKey) return;
  const { st, data } = view;
  const sel = effective(view);
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    st.pos = Math.max(0, Math.min(data.tokens.length - 1, sel.pos + (e.key === "ArrowRight" ? 1 : -1)));
  } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    const at = st.layer === null ? -1 : data.layers.indexOf(st.layer);
    st.layer = data.layers[Math.max(0, Math.min(data.layers.length - 1, at + (e.key === "ArrowDown" ? 1 : -1)))];
  } else return;
  e.preventDefault();
  setQuery(stateParams(st));
  paint(view, boxes);
}
