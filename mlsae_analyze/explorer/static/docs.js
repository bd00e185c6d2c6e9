// `/docs`: the JSON API, read from the server's own OpenAPI description (no external script).
import { h } from "./common.js";

function typeOf(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.anyOf) return schema.anyOf.map((x) => typeOf(x, spec)).join(" | ");
  if (schema.type === "array") return `${typeOf(schema.items, spec)}[]`;
  if (schema.enum) return schema.enum.map((x) => JSON.stringify(x)).join(" | ");
  return schema.type || "object";
}

function route(path, method, op, spec) {
  const params = (op.parameters || []).map((p) => h("tr", {}, h("td", {}, h("code", {}, p.name)), h("td", {}, p.in), h("td", {}, typeOf(p.schema, spec)), h("td", {}, p.description || (p.schema && p.schema.default !== undefined ? `default ${JSON.stringify(p.schema.default)}` : ""))));
  const body = op.requestBody ? typeOf(op.requestBody.content["application/json"].schema, spec) : null;
  const responses = Object.entries(op.responses || {}).map(([code, r]) => `${code}${r.content ? ` ${typeOf(r.content["application/json"]?.schema, spec)}` : ""}`);
  return h(
    "div",
    { class: "api-route", "data-testid": "api-route" },
    h("div", {}, h("span", { class: "method" }, method.toUpperCase()), h("code", {}, path)),
    h("div", { class: "muted" }, op.description || op.summary || ""),
    params.length ? h("table", {}, h("tr", {}, h("th", {}, "parameter"), h("th", {}, "in"), h("th", {}, "type"), h("th", {}, "")), params) : "",
    body ? h("div", {}, "body: ", h("code", {}, body)) : "",
    h("div", {}, "responses: ", responses.join(", ")),
  );
}

function schema(name, s, spec) {
  const rows = Object.entries(s.properties || {}).map(([field, f]) => h("tr", {}, h("td", {}, h("code", {}, field)), h("td", {}, typeOf(f, spec)), h("td", {}, f.description || "")));
  return h("div", { class: "api-route", id: `schema-${name}` }, h("b", {}, name), h("div", { class: "muted" }, s.description || ""), h("table", {}, rows));
}

export async function render(main) {
  const spec = await (await fetch("openapi.json")).json();
  const routes = Object.entries(spec.paths).flatMap(([path, ops]) => Object.entries(ops).map(([method, op]) => route(path, method, op, spec)));
  const schemas = Object.entries(spec.components?.schemas || {}).map(([name, s]) => schema(name, s, spec));
  main.replaceChildren(
    h("h1", {}, `${spec.info.title} API ${spec.info.version}`),
    h("p", { class: "muted" }, "JSON over plain HTTP. The machine-readable description is ", h("a", { href: "openapi.json" }, "openapi.json"), "."),
    h("h2", {}, "Routes"),
    ...routes,
    h("h2", {}, "Schemas"),
    ...schemas,
  );
}
