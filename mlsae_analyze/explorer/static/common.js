// What every page of the explorer shares: DOM and SVG builders, the URL as the page's state, the JSON API,
// number formats, colours, tokens with visible whitespace, legends and the tooltip. No third-party code.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("a", {href: "x", class: "y", onclick: f}, "text", child, ...). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, like h. */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

// ---------------------------------------------------------------------------------------------- state in the URL

/** The page's state: the URL's query parameters. */
export function query() {
  return new URLSearchParams(location.search);
}

/** Change some query parameters (null removes one, an array sets the key once per item); push a history entry when `push`. */
export function setQuery(updates, push = false) {
  const params = query();
  for (const [key, value] of Object.entries(updates)) {
    if (Array.isArray(value)) {
      params.delete(key);
      for (const item of value) params.append(key, String(item));
    } else if (value === null || value === undefined || value === "") params.delete(key);
    else params.set(key, String(value));
  }
  const text = params.toString();
  const url = location.pathname + (text ? "?" + text : "");
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

/** The integer query parameter `key`, or `fallback`. */
export function intParam(key, fallback = null) {
  const raw = query().get(key);
  if (raw === null || raw === "" || !/^-?\d+$/.test(raw)) return fallback;
  return Number(raw);
}

/** The number at the end of the path (/latent/12 -> 12). */
export function pathNumber() {
  const last = location.pathname.split("/").filter(Boolean).pop();
  return /^\d+$/.test(last || "") ? Number(last) : null;
}

// ---------------------------------------------------------------------------------------------------- the API

export class ApiError extends Error {
  constructor(status, detail, rebuild) {
    super(detail);
    this.status = status;
    this.rebuild = rebuild || null;
  }
}

/** GET api/v1/<path> with query `params` (relative to the page's <base>, so proxies with a root path work). */
export async function api(path, params = {}) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return answer(await fetch(`api/v1/${path}${text ? "?" + text : ""}`, { headers: { Accept: "application/json" } }));
}

async function answer(response) {
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
    throw new ApiError(response.status, detail, body.rebuild);
  }
  return body;
}

/** POST api/v1/<path> with a JSON body; the answer's JSON, or an ApiError. */
export async function post(path, body) {
  const headers = { Accept: "application/json", "Content-Type": "application/json" };
  return answer(await fetch(`api/v1/${path}`, { method: "POST", headers, body: JSON.stringify(body) }));
}

/** Hide the banner of an earlier failure. */
export function clearProblem() {
  document.getElementById("banner").hidden = true;
}

/** Show an API failure: the stale-index banner with the rebuild command, or the error in the banner. */
export function showProblem(error) {
  const banner = document.getElementById("banner");
  banner.replaceChildren();
  banner.hidden = false;
  banner.classList.toggle("error", !(error instanceof ApiError && error.status === 409));
  if (error instanceof ApiError && error.status === 409) {
    banner.append(h("strong", {}, "This index is out of date: "), error.message.replace(/^the index is out of date: /, ""), ". Rebuild it with:");
    banner.append(h("code", { "data-testid": "rebuild" }, error.rebuild || "mlsae-analyze index ..."));
  } else {
    banner.append(h("strong", {}, error instanceof ApiError ? `Error ${error.status}: ` : "Error: "), error.message);
  }
}

// ------------------------------------------------------------------------------------------------ numbers

/** A number in at most `digits` significant digits, without exponent for ordinary sizes. */
export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(Math.max(0, digits - 1));
  return Number(x.toPrecision(digits)).toLocaleString("en-US", { maximumFractionDigits: 6 });
}

/** A number with exactly three decimals (the live pages' logits and changes), "–" for none. */
export function fix3(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return (Object.is(x, -0) ? 0 : x).toFixed(3);
}

export function pct(x) {
  if (x === null || x === undefined) return "–";
  return x >= 0.001 ? `${fmt(100 * x, 3)}%` : `${fmt(100 * x, 2)}%`;
}

export function count(n) {
  return Number(n).toLocaleString("en-US");
}

// ------------------------------------------------------------------------------------------------ colours

/** Background of a token or cell at activation share `frac` of the scale (orange, transparent at 0). */
export function actColor(frac) {
  const a = frac > 0 ? Math.min(1, 0.12 + 0.88 * Math.sqrt(Math.min(1, frac))) : 0;
  return `rgba(230, 85, 13, ${a.toFixed(3)})`;
}

/** A sequential blue for probabilities and counts: white at 0, dark blue at 1. */
export function blue(frac) {
  const t = Math.max(0, Math.min(1, frac));
  const from = [247, 251, 255];
  const to = [8, 48, 107];
  const c = from.map((f, i) => Math.round(f + (to[i] - f) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

/** A horizontal colour legend: `color(frac)` from 0 to `max`, labelled with absolute values. */
export function legend(label, max, color, width = 180) {
  const id = `g${Math.random().toString(36).slice(2, 8)}`;
  const stops = [0, 0.25, 0.5, 0.75, 1].map((t) => s("stop", { offset: t, "stop-color": color(t) }));
  const room = Math.max(width + 10, label.length * 7 + 10);
  return s(
    "svg",
    { width: room, height: 36, class: "legend", "data-testid": "legend", role: "img", "aria-label": label },
    s("defs", {}, s("linearGradient", { id }, stops)),
    s("text", { x: 0, y: 11, class: "title" }, label),
    s("rect", { x: 0, y: 15, width, height: 8, fill: `url(#${id})`, stroke: "#8a94a3", "stroke-width": 0.5 }),
    s("text", { x: 0, y: 33 }, "0"),
    s("text", { x: width, y: 33, "text-anchor": "end" }, fmt(max)),
  );
}

// -------------------------------------------------------------------------------------------------- tokens

/** A token's text with its whitespace made visible: spaces as ·, line breaks as ⏎, tabs as ⇥. */
export function tokenText(text) {
  const parts = [];
  let plain = "";
  for (const ch of text) {
    const shown = ch === " " ? "·" : ch === "\n" ? "⏎" : ch === "\t" ? "⇥" : ch === "\r" ? "" : null;
    if (shown === null) plain += ch;
    else {
      if (plain) parts.push(plain);
      plain = "";
      if (shown) parts.push(h("span", { class: "ws" }, shown));
    }
  }
  if (plain) parts.push(plain);
  return parts.length ? parts : [h("span", { class: "ws" }, "∅")];
}

/** A token span tinted by its activation `value` on the scale `max`. */
export function tokenSpan(text, value, max, attrs = {}) {
  const span = h("span", { class: "tok", ...attrs }, tokenText(text));
  if (value > 0 && max > 0) span.style.background = actColor(value / max);
  return span;
}

// -------------------------------------------------------------------------------------------------- tooltip

/** Show the tooltip near the pointer event (lines: strings or nodes). */
export function showTip(event, ...lines) {
  const tip = document.getElementById("tip");
  tip.replaceChildren(...lines.map((line) => h("div", {}, line)));
  tip.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = event.clientY + 16 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 10 : event.clientY + 16;
  tip.style.left = `${Math.max(4, x)}px`;
  tip.style.top = `${Math.max(4, y)}px`;
}

export function hideTip() {
  document.getElementById("tip").hidden = true;
}

// ---------------------------------------------------------------------------------------------- page helpers

/** Where a live route is needed and the server has no model: how to start one (and no request is sent). */
export function liveModelNeeded(what) {
  return h(
    "div",
    { class: "panel", "data-testid": "no-model" },
    h("p", {}, `${what} needs a live model, and this explorer was started without one. Stop it and start it again with one (\`cache\`: the model the cache was harvested from; or a model directory or hub id):`),
    h("code", { class: "cmd" }, "mlsae-analyze explore INDEX --model cache"),
    h("p", { class: "muted" }, "INDEX being the index directory it serves now; --device picks where the model runs, --max-prompt-tokens the longest prompt."),
  );
}

/** The keyboard help in the footer. */
export function keys(...pairs) {
  const footer = document.getElementById("keys");
  footer.replaceChildren("Keys: ");
  for (const [key, what] of pairs) footer.append(h("kbd", {}, key), ` ${what}   `);
}

/** True when a key press belongs to a text field, not to the page's navigation. */
export function typing(event) {
  const t = event.target;
  return t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement;
}

/** Layer runs: [0,1,2,5] -> "0-2, 5". */
export function runs(blocks) {
  const out = [];
  for (const b of blocks) {
    const last = out[out.length - 1];
    if (last && b === last[1] + 1) last[1] = b;
    else out.push([b, b]);
  }
  return out.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(", ");
}

/** The header: the current page's link, the latent jump box and the random-latent button. */
export function initShell(page) {
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.nav === page);
  document.getElementById("jump").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("jump-latent").value.trim();
    if (/^\d+$/.test(value)) location.href = `latent/${value}`;
  });
  document.getElementById("random-latent").addEventListener("click", async () => {
    try {
      const meta = await api("meta");
      const offset = Math.floor(Math.random() * Math.max(1, meta.n_firing));
      const table = await api("latents", { sort: "latent", desc: false, min_density: 1e-300, offset, limit: 1 });
      if (table.rows.length) location.href = `latent/${table.rows[0].latent}`;
    } catch (error) {
      showProblem(error);
    }
  });
}
