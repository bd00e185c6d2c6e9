// `/latents`: every latent in a table that sorts (click a column header) and filters (density, mean layer, the
// text of its top logit token), a page at a time. State in the URL: sort, asc, offset, min_density, min_layer,
// max_layer, q, row (the highlighted row). Keys: ↑ ↓ move the highlight, Enter opens it, ← → change page.
import { api, fmt, h, intParam, keys, pct, query, setQuery, showProblem, tokenText, typing } from "./common.js";

const LIMIT = 50;
const COLUMNS = [
  ["latent", "latent", "id"],
  ["density", "density", "share of tokens where it fires, at some layer"],
  ["max", "max", "largest activation"],
  ["mean_layer", "mean layer", "E[L|j], block index"],
  ["layer_std", "layer std", "sqrt(Var[L|j]), in layers"],
  ["within_var", "within-token var", "E_T[Var(L|T,j)]: spread over layers inside one token"],
  ["across_var", "across-token var", "Var_T(E[L|T,j]): spread of each token's mean layer"],
];
const FILTERS = [
  ["min_density", "min density (0-1)"],
  ["min_layer", "mean layer from"],
  ["max_layer", "mean layer to"],
  ["q", "top logit token contains"],
];

function state() {
  const q = query();
  const sort = COLUMNS.some(([key]) => key === q.get("sort")) ? q.get("sort") : "density";
  const filters = Object.fromEntries(FILTERS.map(([key]) => [key, q.get(key) || ""]));
  return { sort, desc: q.get("asc") === null, offset: Math.max(0, intParam("offset", 0)), row: intParam("row", null), ...filters };
}

function cells(row) {
  return [
    h("td", {}, h("a", { href: `latent/${row.latent}` }, String(row.latent))),
    h("td", {}, pct(row.density)),
    h("td", {}, fmt(row.max)),
    h("td", {}, fmt(row.mean_layer, 3)),
    h("td", {}, fmt(row.layer_std, 3)),
    h("td", {}, fmt(row.within_var, 3)),
    h("td", {}, fmt(row.across_var, 3)),
    h("td", { class: "text tokens" }, row.top_logit === null ? "–" : tokenText(row.top_logit)),
  ];
}

export async function render(main) {
  const meta = await api("meta");
  let st = state();
  let table = null;
  const filterBox = h("form", { class: "filters" });
  const pager = h("div", { class: "pager" });
  const tableBox = h("div", {});
  main.replaceChildren(h("h1", {}, "Latents"), filterBox, pager, tableBox);
  const select = (changes, push = false) => {
    st = { ...st, ...changes };
    const filters = Object.fromEntries(FILTERS.map(([key]) => [key, st[key] || null]));
    setQuery({ sort: st.sort === "density" ? null : st.sort, asc: st.desc ? null : 1, offset: st.offset || null, row: st.row, ...filters }, push);
    draw();
  };
  const inputs = FILTERS.map(([key, label]) => {
    const input = h("input", { name: key, value: st[key], type: key === "q" ? "text" : "number", step: "any" });
    filterBox.append(h("label", {}, label, input));
    return [key, input];
  });
  filterBox.append(h("button", { type: "submit" }, "Filter"));
  filterBox.addEventListener("submit", (e) => {
    e.preventDefault();
    select({ ...Object.fromEntries(inputs.map(([k, input]) => [k, input.value.trim()])), offset: 0, row: null }, true);
  });
  if (!meta.has_logits) filterBox.append(h("span", { class: "note" }, "no logit effects in this index"));

  let drawn = 0;
  async function draw() {
    const params = { sort: st.sort, desc: st.desc, offset: st.offset, limit: LIMIT };
    for (const [key] of FILTERS) if (st[key] !== "") params[key] = st[key];
    const ticket = ++drawn;
    let answer;
    try {
      answer = await api("latents", params);
    } catch (error) {
      showProblem(error);
      return;
    }
    if (ticket !== drawn) return; // a later selection is being drawn
    table = answer;
    const head = COLUMNS.map(([key, label, title]) => h("th", { title, "aria-sort": st.sort === key ? (st.desc ? "descending" : "ascending") : null, onclick: () => select({ sort: key, desc: st.sort === key ? !st.desc : key !== "latent", offset: 0, row: null }, true) }, label));
    head.push(h("th", { class: "text", title: "the token its decoder direction promotes most" }, "top logit"));
    const rows = table.rows.map((row, i) => h("tr", { class: i === st.row ? "current" : "", "data-testid": "latent-row", "data-latent": row.latent }, cells(row)));
    tableBox.replaceChildren(h("table", { class: "latents" }, h("thead", {}, h("tr", {}, head)), h("tbody", {}, rows)));
    const last = Math.min(table.total, st.offset + table.rows.length);
    pager.replaceChildren(
      h("button", { type: "button", disabled: st.offset === 0, onclick: () => select({ offset: Math.max(0, st.offset - LIMIT), row: null }, true) }, "← previous"),
      h("span", { class: "muted" }, table.total ? `latents ${st.offset + 1}–${last} of ${table.total}` : "no latent matches"),
      h("button", { type: "button", disabled: last >= table.total, onclick: () => select({ offset: st.offset + LIMIT, row: null }, true) }, "next →"),
    );
  }

  document.addEventListener("keydown", (e) => {
    if (typing(e) || !table) return;
    const n = table.rows.length;
    if ((e.key === "ArrowDown" || e.key === "ArrowUp") && n) {
      const cur = st.row === null ? -1 : st.row;
      select({ row: Math.max(0, Math.min(n - 1, cur + (e.key === "ArrowDown" ? 1 : -1))) });
      document.querySelector("tr.current")?.scrollIntoView({ block: "nearest" });
    } else if (e.key === "Enter" && st.row !== null && n) location.href = `latent/${table.rows[st.row].latent}`;
    else if (e.key === "ArrowRight" && st.offset + n < table.total) select({ offset: st.offset + LIMIT, row: null }, true);
    else if (e.key === "ArrowLeft" && st.offset > 0) select({ offset: Math.max(0, st.offset - LIMIT), row: null }, true);
    else return;
    e.preventDefault();
  });
  window.addEventListener("popstate", () => {
    st = state();
    draw();
  });
  keys(["↑ ↓", "move the highlight"], ["Enter", "open the latent"], ["← →", "previous / next page"], ["click a header", "sort"]);
  await draw();
}
