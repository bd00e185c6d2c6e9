// The prompt page's panels that re-run the model: "Recon" (the top logits at one token, clean and with the SAE's
// reconstruction spliced in at one layer: POST api/v1/prompt/logits) and "Steer" (edits of latents at layers:
// per-position logit changes, POST api/v1/prompt/steer, and default and steered continuations, POST
// api/v1/prompt/generate). Numbers are shown as the API gives them, to three decimals.
import { fix3, h, post, showProblem, tokenSpan, tokenText } from "./common.js";
import { MODES, UNITS, editParam } from "./promptdata.js";

function logitList(title, items, kind, signed = false) {
  const rows = items.flatMap((t) => [h("span", { class: "tokens" }, tokenSpan(t.token, 0, 1)), h("span", { class: "v", "data-testid": "logit-value", "data-value": t.value }, signed && t.value > 0 ? `+${fix3(t.value)}` : fix3(t.value))]);
  return h("div", { class: "panel", "data-testid": "logit-list", "data-kind": kind }, h("h3", {}, title), h("div", { class: "logits" }, rows));
}

function select(label, options, value, testid) {
  return h("label", { class: "field" }, label, h("select", { "data-testid": testid }, options.map(([v, text]) => h("option", { value: v, selected: String(v) === String(value) }, text))));
}

function number(label, value, testid, attrs = {}) {
  return h("label", { class: "field" }, label, h("input", { type: "number", value, "data-testid": testid, ...attrs }));
}

/** The Recon tab: layer and position (the page's selection), then the logits with and without the splice. */
export function reconPanel(ctx) {
  const { data, st } = ctx;
  const layer = st.layer ?? data.layers[0];
  const layerField = select("layer", data.layers.map((b) => [b, `layer ${b}`]), layer, "recon-layer");
  const posField = number("token", ctx.pos, "recon-position", { min: 0, max: data.tokens.length - 1 });
  layerField.querySelector("select").addEventListener("change", (e) => ctx.select({ layer: Number(e.target.value) }));
  posField.querySelector("input").addEventListener("change", (e) => {
    const p = Number(e.target.value);
    if (Number.isInteger(p) && p >= 0 && p < data.tokens.length) ctx.select({ pos: p });
  });
  const out = h("div", { "data-testid": "recon" }, h("p", { class: "muted" }, "Computing…"));
  const box = h("div", {}, h("div", { class: "controls" }, layerField, posField, h("span", { class: "muted" }, "(or click a token, ← → ↑ ↓)")), out);
  const ticket = (ctx.view.reconTicket = (ctx.view.reconTicket || 0) + 1);
  post("prompt/logits", { text: st.text, layer, position: ctx.pos, top: 10 })
    .then((r) => {
      if (ticket === ctx.view.reconTicket) out.replaceChildren(...reconResult(r));
    })
    .catch((error) => {
      out.replaceChildren(h("p", { class: "muted" }, "No logits: see the error above."));
      showProblem(error);
    });
  return box;
}

function reconResult(r) {
  return [
    h("h2", { "data-testid": "recon-heading" }, `Logits after token ${r.position} “`, h("span", { class: "tokens" }, tokenText(r.token)), `”, reconstruction spliced in at layer ${r.layer}`),
    h(
      "p",
      {},
      r.next_token === null ? "The prompt ends here. " : h("span", {}, "The prompt's next token: ", h("span", { class: "tokens" }, tokenSpan(r.next_token, 0, 1)), ". "),
      "Over the prompt's trainable tokens, with the reconstruction at this layer: ΔCE ",
      h("b", { "data-testid": "recon-delta-ce", "data-value": r.delta_ce }, fix3(r.delta_ce)),
      " nats, KL(clean ‖ spliced) ",
      h("b", { "data-testid": "recon-kl", "data-value": r.kl }, fix3(r.kl)),
      " nats.",
    ),
    h("div", { class: "row" }, logitList("Clean (top logits)", r.clean, "clean"), logitList(`Reconstruction at layer ${r.layer}`, r.recon, "recon"), logitList("Log-prob raised most (nats)", r.increases, "increases", true), logitList("Log-prob lowered most (nats)", r.decreases, "decreases", true)),
  ];
}

function editRow(ctx, e, i) {
  const { data } = ctx;
  const fields = [
    number("latent", e.latent, "edit-latent", { min: 0, max: ctx.view.meta.n_latents - 1, "data-key": "latent" }),
    select("layer", data.layers.map((b) => [b, b]), e.layer, "edit-layer"),
    number("factor", e.factor, "edit-factor", { step: "any", "data-key": "factor" }),
    select("mode", MODES.map((m) => [m, m]), e.mode, "edit-mode"),
    select("unit", UNITS.map((u) => [u, u]), e.unit, "edit-unit"),
  ];
  const keys = ["latent", "layer", "factor", "mode", "unit"];
  fields.forEach((field, k) =>
    field.querySelector("input, select").addEventListener("change", (event) => {
      const raw = event.target.value;
      const value = k >= 3 ? raw : Number(raw);
      if (k < 3 && !Number.isFinite(value)) return;
      ctx.view.st.edits[i] = { ...ctx.view.st.edits[i], [keys[k]]: value };
      ctx.save();
    }),
  );
  const remove = h("button", { type: "button", title: "remove this edit", onclick: () => ctx.select({ edits: ctx.view.st.edits.filter((_, x) => x !== i) }) }, "×");
  return h("div", { class: "controls edit", "data-testid": "edit", "data-edit": editParam(e) }, fields, remove);
}

function positionsRow(ctx) {
  const { st, data } = ctx.view;
  const [kind, at] = st.positions === "all" ? ["all", ctx.pos] : st.positions.split(":");
  const kindField = select("positions", [["all", "all"], ["from", "from token"], ["only", "only token"]], kind, "positions");
  const atField = number("token", at, "positions-at", { min: 0, max: data.tokens.length - 1, disabled: kind === "all" });
  const update = () => {
    const k = kindField.querySelector("select").value;
    const p = Math.max(0, Math.min(data.tokens.length - 1, Number(atField.querySelector("input").value) || 0));
    ctx.view.st.positions = k === "all" ? "all" : `${k}:${p}`;
    atField.querySelector("input").disabled = k === "all";
    ctx.save();
  };
  kindField.querySelector("select").addEventListener("change", update);
  atField.querySelector("input").addEventListener("change", update);
  return h("div", { class: "controls" }, kindField, atField);
}

/** The Steer tab: the edits (in the URL), positions, "Apply" (logit changes) and "Generate" (continuations). */
export function steerPanel(ctx) {
  const { st } = ctx.view;
  const out = (ctx.view.steerOut ||= h("div", { "data-testid": "steer-result" })); // kept while the text stays
  const gen = (ctx.view.genOut ||= h("div", { "data-testid": "generate-result" }));
  const add = () => ctx.select({ edits: [...st.edits, { latent: ctx.latent ?? 0, layer: st.layer ?? ctx.data.layers[0], factor: 1, mode: "add", unit: "typical" }] });
  const apply = h("button", { type: "button", "data-testid": "apply", disabled: !st.edits.length, onclick: () => runSteer(ctx, out) }, "Apply");
  const genFields = [number("tokens", st.n, "gen-n", { min: 1, max: 64 }), number("seed", st.seed, "gen-seed", { step: 1 }), number("temperature", st.temp, "gen-temp", { min: 0, max: 10, step: "any" })];
  const keys = ["n", "seed", "temp"];
  genFields.forEach((field, k) =>
    field.querySelector("input").addEventListener("change", (e) => {
      const value = Number(e.target.value);
      if (Number.isFinite(value)) ctx.view.st[keys[k]] = value;
      ctx.save();
    }),
  );
  const generate = h("button", { type: "button", "data-testid": "generate", onclick: () => runGenerate(ctx, gen) }, "Generate");
  const box = h(
    "div",
    {},
    h("p", { class: "muted" }, "Each edit changes one latent at one layer, then the model runs on from that layer. add: raise the latent by factor (in units of its typical activation at that layer, its mean where it fires, or raw); clamp: set it to factor. Positions: every token, from a token on (the generated ones too), or one token."),
    st.edits.length ? st.edits.map((e, i) => editRow(ctx, e, i)) : h("p", { class: "muted" }, "No edit yet."),
    h("div", { class: "controls" }, h("button", { type: "button", "data-testid": "add-edit", onclick: add }, `+ edit${ctx.latent === null ? "" : ` (latent ${ctx.latent})`}`)),
    positionsRow(ctx),
    h("div", { class: "controls" }, apply, h("span", { class: "muted" }, "per-token top logit changes")),
    out,
    h("h2", {}, "Continuation"),
    h("div", { class: "controls" }, genFields, generate, h("span", { class: "muted" }, "default and steered, drawn with the same seed (temperature 0: greedy)")),
    gen,
  );
  if (st.edits.length && ctx.view.autoSteer) {
    ctx.view.autoSteer = false; // a link with edits opens with their changes shown, once
    runSteer(ctx, out);
  }
  return box;
}

async function runSteer(ctx, out) {
  const { st } = ctx.view;
  out.replaceChildren(h("p", { class: "muted" }, "Steering…"));
  try {
    const body = { text: st.text, edits: st.edits.map((e) => ({ ...e })), positions: st.positions, top: 5, measure: "logprob" };
    const r = await post("prompt/steer", body);
    out.replaceChildren(...steerResult(r, ctx.data, body));
  } catch (error) {
    out.replaceChildren();
    showProblem(error);
  }
}

function changeCells(items) {
  return items.map((t) => h("span", { class: "change" }, h("span", { class: "tokens" }, tokenSpan(t.token, 0, 1)), " ", h("span", { class: "v", "data-testid": "change-value", "data-value": t.value }, t.value > 0 ? `+${fix3(t.value)}` : fix3(t.value))));
}

function steerResult(r, data, body) {
  const scales = r.scales.map((x, i) => h("li", {}, `latent ${x.latent} at layer ${x.layer}, ${body.edits[i].mode} ${body.edits[i].factor}${body.edits[i].unit === "typical" ? " × typical" : ""}: ${body.edits[i].mode === "add" ? "adds" : "sets it to"} ${fix3(x.raw)} (raw activation units)`));
  const rows = r.changes.map((c) => {
    const still = [...c.increases, ...c.decreases].every((t) => t.value === 0); // nothing moved: no token to name
    const cells = still ? [h("td", { colspan: 2, class: "muted" }, h("span", { class: "v", "data-testid": "change-value", "data-value": 0 }, fix3(0)), " (nothing changed)")] : [h("td", {}, changeCells(c.increases)), h("td", {}, changeCells(c.decreases))];
    return h("tr", { "data-testid": "steer-change", "data-position": c.position, "data-still": String(still), class: data.trainable[c.position] ? null : "untrainable" }, h("td", {}, c.position), h("td", { class: "tokens" }, tokenText(c.token)), cells);
  });
  return [
    h("p", { class: "muted" }, `Applied ${body.positions === "all" ? "at every token" : body.positions.startsWith("from:") ? `from token ${body.positions.slice(5)} on` : `at token ${body.positions.slice(5)} only`}:`),
    h("ul", {}, scales),
    h("div", { class: "scroll" }, h("table", { class: "changes" }, h("tr", {}, h("th", {}, "token"), h("th", {}, ""), h("th", {}, "next-token log-probability raised most (nats)"), h("th", {}, "lowered most")), rows)),
  ];
}

async function runGenerate(ctx, out) {
  const { st } = ctx.view;
  out.replaceChildren(h("p", { class: "muted" }, "Generating…"));
  try {
    const r = await post("prompt/generate", { text: st.text, edits: st.edits, positions: st.positions, n_tokens: st.n, seed: st.seed, temperature: st.temp });
    const side = (title, text, testid) => h("div", { class: "panel gen" }, h("h3", {}, title), h("div", { class: "continuation", "data-testid": testid }, h("span", { class: "muted" }, st.text), h("b", {}, text)));
    out.replaceChildren(h("div", { class: "row" }, side("Default", r.default, "gen-default"), side(st.edits.length ? "Steered" : "Steered (no edit: the same)", r.steered, "gen-steered")), h("p", { class: "muted" }, `${r.n_tokens} tokens, seed ${r.seed}, temperature ${r.temperature}`));
  } catch (error) {
    out.replaceChildren();
    showProblem(error);
  }
}
