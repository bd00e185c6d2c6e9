// `/`: the model, SAE and stores; per-layer eval results; the P_j(l) heatmap of every latent that fires, sorted by
// mean layer (canvas; hover previews a column, click opens its latent; arrow keys move, Enter opens).
import { valuesPerLayer } from "./charts.js";
import { api, blue, count, fmt, h, hideTip, keys, legend, liveModelNeeded, runs, showTip, typing } from "./common.js";

function summary(meta) {
  const card = (title, items) =>
    h("dl", { class: "card" }, h("dt", {}, h("b", {}, title)), items.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  return h(
    "div",
    { class: "cards" },
    card("Model", [["name", meta.model || "none named"], ["d_model", meta.d_model ?? "–"]]),
    card("SAE", [["latents", count(meta.n_latents)], ["k", meta.k], ["latents that fire", count(meta.n_firing)]]),
    card("Stores", [
      ["tokens", count(meta.n_tokens)],
      ["used by the statistics", count(meta.n_rows)],
      ["context windows", `${count(meta.n_docs)} of ${meta.context_length} tokens`],
      ["layers (blocks)", runs(meta.layers)],
    ]),
    card("Index", [
      ["logit effects", meta.has_logits ? "yes" : "none"],
      ["token text", meta.token_text ? "token ids (no tokenizer)" : "decoded"],
    ]),
  );
}

function notes(meta) {
  const out = [];
  if (!meta.has_logits) out.push(h("p", { class: "note", "data-testid": "no-logits" }, `No logit effects: ${meta.logits_note || "the index was built without a model"}.`));
  if (meta.token_text) out.push(h("p", { class: "note" }, meta.token_text));
  return out;
}

/** A prompt box that opens the prompt page with its text (Enter), or how to start the server with a model. */
function promptBox(meta) {
  if (!meta.live) return [h("h2", {}, "Your own prompt"), liveModelNeeded("Running a prompt")];
  const area = h("textarea", { rows: 2, "data-testid": "overview-prompt", "aria-label": "prompt", placeholder: "Type a prompt, then Enter to see its latents at every layer (Shift+Enter: a new line)" });
  const open = () => {
    if (area.value.trim()) location.href = `prompt?${new URLSearchParams({ text: area.value }).toString()}`;
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      open();
    }
  });
  return [h("h2", {}, "Your own prompt"), h("div", { class: "prompt-form" }, area, h("button", { type: "button", "data-testid": "overview-prompt-open", onclick: open }, "Open"))];
}

function evalSection(meta) {
  if (!meta.eval) return [h("p", { class: "muted" }, "No eval results in this index (build it with --eval FILE to show per-layer FVU and delta CE).")];
  const charts = [valuesPerLayer(meta.eval.layer, meta.eval.fvu, "FVU per layer (raw units)")];
  if (meta.eval.delta_ce) charts.push(valuesPerLayer(meta.eval.layer, meta.eval.delta_ce, "Delta CE per layer (nats/token)"));
  return [h("div", { class: "row" }, charts)];
}

function decode(base64, length) {
  const bytes = atob(base64);
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = bytes.charCodeAt(i);
  return out;
}

/** The overview's colour: square root of P(layer) / its maximum, so that the many latents spread over several
 * layers (P of 0.05-0.1 each) are not lost beside the few held by one layer (P near 1). */
const shade = (frac) => blue(Math.sqrt(Math.max(0, frac)));

function heatmapCanvas(ov) {
  const L = ov.layers.length;
  const cells = decode(ov.cells, L * ov.columns);
  const rowH = Math.max(6, Math.min(16, Math.floor(320 / L)));
  const colW = Math.max(1, Math.min(24, Math.floor(1100 / Math.max(1, ov.columns))));
  const canvas = h("canvas", { width: ov.columns * colW, height: L * rowH, tabindex: 0, "data-testid": "overview-heatmap", "aria-label": "P(layer) of every latent, by mean layer" });
  const ctx = canvas.getContext("2d");
  for (let l = 0; l < L; l++) {
    for (let c = 0; c < ov.columns; c++) {
      ctx.fillStyle = shade(cells[l * ov.columns + c] / 255);
      ctx.fillRect(c * colW, l * rowH, colW, rowH);
    }
  }
  return { canvas, cells, rowH, colW };
}

function overviewSection(ov, nFiring) {
  if (!ov.columns) return [h("p", { class: "muted" }, "No latent fires in these stores.")];
  const { canvas, cells, rowH, colW } = heatmapCanvas(ov);
  const L = ov.layers.length;
  let cursor = 0;
  const open = (c) => (location.href = `latent/${ov.latent[c]}`);
  const describe = (c, l) => [
    `latent ${ov.latent[c]}${ov.per_column > 1 ? ` (column of ${ov.per_column} latents)` : ""}`,
    `mean layer ${fmt(ov.mean_layer[c], 3)}${l === null ? "" : `; P(layer ${ov.layers[l]}) ≈ ${fmt((cells[l * ov.columns + c] / 255) * ov.scale, 3)}`}`,
    "click to open",
  ];
  canvas.addEventListener("mousemove", (e) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.min(ov.columns - 1, Math.floor((e.clientX - rect.left) / colW));
    const l = Math.min(L - 1, Math.floor((e.clientY - rect.top) / rowH));
    showTip(e, ...describe(c, l));
  });
  canvas.addEventListener("mouseleave", hideTip);
  canvas.addEventListener("click", (e) => open(Math.min(ov.columns - 1, Math.floor((e.clientX - canvas.getBoundingClientRect().left) / colW))));
  canvas.addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      cursor = Math.max(0, Math.min(ov.columns - 1, cursor + (e.key === "ArrowRight" ? 1 : -1) * (e.shiftKey ? 20 : 1)));
      const rect = canvas.getBoundingClientRect();
      showTip({ clientX: rect.left + cursor * colW, clientY: rect.bottom }, ...describe(cursor, null));
      e.preventDefault();
    } else if (e.key === "Enter") open(cursor);
  });
  const yLabels = h("div", { class: "ylabels" });
  const every = Math.max(1, Math.ceil(12 / rowH));
  const labels = ov.layers.map((b, l) => h("div", { class: "muted" }, l % every === 0 ? String(b) : "")).map((d) => {
    d.style.height = `${rowH}px`;
    d.style.fontSize = "10px";
    d.style.lineHeight = `${rowH}px`;
    d.style.textAlign = "right";
    return d;
  });
  yLabels.append(...labels);
  yLabels.style.marginRight = "4px";
  const yTitle = h("div", { class: "muted" }, "layer");
  yTitle.style.writingMode = "vertical-rl";
  yTitle.style.transform = "rotate(180deg)";
  yTitle.style.fontSize = "11px";
  yTitle.style.textAlign = "center";
  const row = h("div", {}, yTitle, yLabels, h("div", {}, canvas, h("div", { class: "muted", "data-testid": "overview-x" }, `latents, by mean layer → (${count(nFiring)} in ${ov.columns} columns)`)));
  row.style.display = "flex";
  for (const part of row.children) part.style.fontSize = part.style.fontSize || "12px";
  const first = ov.mean_layer[0];
  const last = ov.mean_layer[ov.mean_layer.length - 1];
  return [
    h("p", { class: "muted" }, `Rows: layers (blocks). Columns: the ${count(nFiring)} latents that fire, sorted by mean layer (${fmt(first, 3)} → ${fmt(last, 3)})${ov.per_column > 1 ? `, ${ov.per_column} per column (their mean)` : ""}. Colour: P(layer).`),
    row,
    legend("P(layer), square-root colour scale", ov.scale, shade),
  ];
}

export async function render(main) {
  const [meta, ov] = await Promise.all([api("meta"), api("overview", { width: 1100 })]);
  main.replaceChildren(
    h("h1", {}, "Overview"),
    summary(meta),
    ...notes(meta),
    ...promptBox(meta),
    h("h2", {}, "Reconstruction per layer"),
    ...evalSection(meta),
    h("h2", {}, "Where latents fire over layers"),
    ...overviewSection(ov, meta.n_firing),
  );
  keys(["Tab", "focus the heatmap"], ["← →", "move along it"], ["Enter", "open the latent"]);
  document.addEventListener("keydown", (e) => {
    if (!typing(e) && e.key === "/") {
      document.getElementById("jump-latent").focus();
      e.preventDefault();
    }
  });
}
