// The prompt payload (POST api/v1/prompt) read as the prompt page needs it: the latents active at one token with
// their values and quantiles per layer, one latent's value at every token and layer, and the page's state in the
// URL (text, pos, layer, latent, rank, thr, tab, the steering edits and the generation settings).
import { intParam, query } from "./common.js";

export const TABS = ["latents", "recon", "steer"];
export const RANKS = ["size", "quantile"];
export const MODES = ["add", "clamp"];
export const UNITS = ["typical", "raw"];

/** One steering edit from its URL form `latent:layer:factor:mode:unit` (null when malformed). */
export function parseEdit(raw) {
  const [latent, layer, factor, mode = "add", unit = "typical"] = String(raw).split(":");
  if (!/^\d+$/.test(latent || "") || !/^\d+$/.test(layer || "") || !Number.isFinite(Number(factor)) || factor === "") return null;
  if (!MODES.includes(mode) || !UNITS.includes(unit)) return null;
  return { latent: Number(latent), layer: Number(layer), factor: Number(factor), mode, unit };
}

export function editParam(e) {
  return `${e.latent}:${e.layer}:${e.factor}:${e.mode}:${e.unit}`;
}

/** "all", "from:P" or "only:P" from the URL, else "all". */
function positionsParam(raw) {
  return raw && /^(all|from:\d+|only:\d+)$/.test(raw) ? raw : "all";
}

/** The page's state, read from the URL. */
export function promptState(meta) {
  const q = query();
  const layer = intParam("layer", null);
  const thr = Number(q.get("thr"));
  const temp = Number(q.get("temp"));
  return {
    text: q.get("text") || "",
    pos: intParam("pos", null),
    layer: meta.layers.includes(layer) ? layer : null,
    latent: intParam("latent", null),
    rank: RANKS.includes(q.get("rank")) ? q.get("rank") : "size",
    thr: Number.isFinite(thr) && thr > 0 ? Math.min(1, thr) : 0,
    tab: TABS.includes(q.get("tab")) ? q.get("tab") : "latents",
    edits: q.getAll("edit").map(parseEdit).filter((e) => e !== null),
    positions: positionsParam(q.get("positions")),
    n: Math.max(1, Math.min(64, intParam("n", 20))),
    seed: intParam("seed", 0),
    temp: q.get("temp") !== null && Number.isFinite(temp) && temp >= 0 ? Math.min(10, temp) : 1,
  };
}

/** The state as URL parameters (defaults left out, so links stay short). */
export function stateParams(st) {
  return {
    text: st.text || null,
    pos: st.pos,
    layer: st.layer,
    latent: st.latent,
    rank: st.rank === "size" ? null : st.rank,
    thr: st.thr > 0 ? st.thr : null,
    tab: st.tab === "latents" ? null : st.tab,
    edit: st.edits.map(editParam),
    positions: st.positions === "all" ? null : st.positions,
    n: st.n === 20 ? null : st.n,
    seed: st.seed === 0 ? null : st.seed,
    temp: st.temp === 1 ? null : st.temp,
  };
}

/**
 * The latents active at token p (value > 0 at some layer): [{latent, values[L], quantiles[L], mean}], `mean`
 * being the layer (block index) weighted by the latent's values there; sorted by it, then by latent.
 */
export function activeAt(data, p) {
  const rows = new Map();
  const L = data.layers.length;
  data.layers.forEach((_, l) => {
    data.indices[l][p].forEach((j, slot) => {
      const v = data.values[l][p][slot];
      if (!(v > 0)) return;
      if (!rows.has(j)) rows.set(j, { latent: j, values: new Array(L).fill(0), quantiles: new Array(L).fill(null) });
      const row = rows.get(j);
      row.values[l] = v;
      row.quantiles[l] = data.quantiles[l][p][slot];
    });
  });
  const out = [...rows.values()];
  for (const row of out) {
    const total = row.values.reduce((a, b) => a + b, 0);
    row.mean = row.values.reduce((a, v, l) => a + v * data.layers[l], 0) / total;
  }
  return out.sort((a, b) => a.mean - b.mean || a.latent - b.latent);
}

/** Latent j's value at every layer and token: [L][P] (0 where it is not among a row's top k). */
export function latentGrid(data, j) {
  return data.layers.map((_, l) =>
    data.indices[l].map((row, p) => {
      const slot = row.indexOf(j);
      return slot < 0 ? 0 : Math.max(0, data.values[l][p][slot]);
    }),
  );
}

/** Each (latent, layer) active at token p as {latent, layer, value, quantile}, strongest first by `rank`. */
export function topAt(data, p, rank) {
  const out = [];
  data.layers.forEach((layer, l) =>
    data.indices[l][p].forEach((j, slot) => {
      const value = data.values[l][p][slot];
      if (value > 0) out.push({ latent: j, layer, value, quantile: data.quantiles[l][p][slot] });
    }),
  );
  const key = rank === "quantile" ? (x) => (x.quantile === null ? 1 : x.quantile) : (x) => x.value;
  return out.sort((a, b) => key(b) - key(a) || b.value - a.value);
}
