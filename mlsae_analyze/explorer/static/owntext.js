// The latent page's "Test your own text": the text through the live model (POST api/v1/prompt), the latent's
// activation at every token and layer of it, its largest per layer (marked on the page's histograms by the
// caller), and a link that opens the prompt page with an edit of this latent at the layer of the tab shown.
import { heatmap } from "./charts.js";
import { actColor, fmt, h, legend, post, showProblem, tokenSpan } from "./common.js";
import { latentGrid } from "./promptdata.js";

/** The prompt page's URL with text `text` and one edit of latent j at `layer` (factor 1, add, typical units). */
export function steerHref(j, layer, text) {
  const params = new URLSearchParams();
  if (text) params.set("text", text);
  params.set("tab", "steer");
  params.set("latent", String(j));
  params.set("layer", String(layer));
  params.append("edit", `${j}:${layer}:1:add:typical`);
  return `prompt?${params.toString()}`;
}

function grid(data, j) {
  const values = latentGrid(data, j);
  const scale = Math.max(1e-12, ...values.flat());
  const largest = values.map((row) => Math.max(0, ...row.filter((_, p) => data.trainable[p])));
  const tint = data.tokens.map((_, p) => Math.max(0, ...values.map((row) => row[p])));
  const tokens = data.tokens.map((t, p) => {
    const span = tokenSpan(t, data.trainable[p] ? tint[p] : 0, scale, { "data-testid": "own-token", "data-position": p, "data-value": tint[p], title: `token ${p}: largest over layers ${fmt(tint[p], 4)}` });
    if (!data.trainable[p]) span.classList.add("skipped");
    return span;
  });
  const chart = heatmap({
    values,
    rowLabels: data.layers.map(String),
    colLabels: data.tokens.map((_, p) => String(p)),
    scale,
    color: actColor,
    cellWidth: Math.max(4, Math.min(18, Math.floor(1000 / data.tokens.length))),
    cellHeight: Math.max(5, Math.min(14, Math.floor(300 / data.layers.length))),
    title: `Latent ${j} on your text, per token and layer`,
    xTitle: "token (position in the text)",
    yTitle: "layer",
    testid: "own-text-grid",
    cellAttrs: (l, p) => ({ "data-layer": data.layers[l], "data-position": p, "data-value": values[l][p] }),
    tip: (l, p) => [`token ${p} “${data.tokens[p]}”${data.trainable[p] ? "" : " (untrainable)"}, layer ${data.layers[l]}`, `activation ${fmt(values[l][p], 4)}`],
  });
  return { largest, parts: [h("div", { class: "tokens" }, tokens), h("div", { class: "scroll" }, chart), legend(`latent ${j}'s activation (its largest on this text ${fmt(scale)})`, scale, actColor)] };
}

/**
 * The section, given the meta, latent j and `onMarks(largest per layer | null)`; returns {node, setLayer(block)}:
 * setLayer points the steer link at the layer of the tab shown.
 */
export function ownTextSection(meta, j, onMarks) {
  if (!meta.live) {
    const note = h("p", { class: "note", "data-testid": "no-model" }, "Test your own text: this needs a live model; restart the explorer with ", h("code", {}, "mlsae-analyze explore INDEX --model cache"), ".");
    return { node: note, setLayer: () => {} };
  }
  const area = h("textarea", { rows: 2, "data-testid": "own-text-input", "aria-label": "your text", placeholder: "Type a text, then Enter (Shift+Enter: a new line)" });
  const out = h("div", { "data-testid": "own-text" });
  const link = h("a", { "data-testid": "steer-link", href: steerHref(j, meta.layers[0], "") }, "steer with this latent");
  let layer = meta.layers[0];
  const run = async () => {
    const text = area.value;
    link.setAttribute("href", steerHref(j, layer, text));
    if (!text.trim()) return;
    out.replaceChildren(h("p", { class: "muted" }, "Running the model…"));
    try {
      const data = await post("prompt", { text });
      const { largest, parts } = grid(data, j);
      out.replaceChildren(h("p", { class: "muted" }, `Largest per layer (trainable tokens), also marked on the histograms above: ${data.layers.map((b, l) => `${b}: ${fmt(largest[l], 3)}`).join(", ")}`), ...parts);
      onMarks(largest);
    } catch (error) {
      out.replaceChildren();
      showProblem(error);
    }
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      run();
    }
  });
  area.addEventListener("input", () => link.setAttribute("href", steerHref(j, layer, area.value)));
  const button = h("button", { type: "button", "data-testid": "own-text-run", onclick: run }, "Run");
  const node = h("div", { class: "panel own" }, h("h2", {}, "Test your own text ", h("span", { class: "muted" }, "· "), link), h("div", { class: "prompt-form" }, area, button), out);
  const setLayer = (block) => {
    layer = block;
    link.setAttribute("href", steerHref(j, layer, area.value));
    link.textContent = `steer with latent ${j} at layer ${layer}`;
  };
  return { node, setLayer };
}
