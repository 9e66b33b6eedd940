// The API reference at /docs, rendered from /openapi.json with DOM nodes (no CDN, no inline script,
// so it works under the app's Content-Security-Policy and without network).
"use strict";

(function () {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function refName(ref) { return ref.split("/").pop(); }

  // A compact type expression for a JSON schema: "string", "integer[]", "LoginIn", "A | null".
  function typeOf(schema) {
    if (!schema) return "any";
    if (schema.$ref) return refName(schema.$ref);
    if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
    if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (schema.const !== undefined) return JSON.stringify(schema.const);
    if (schema.type === "array") return typeOf(schema.items) + "[]";
    return schema.type || "object";
  }

  function schemaTable(name, schema) {
    const props = schema.properties || {};
    const required = new Set(schema.required || []);
    const rows = Object.entries(props).map(([k, v]) => el("tr", {},
      el("td", {}, el("code", { text: k + (required.has(k) ? "" : "?") })),
      el("td", { text: typeOf(v) }),
      el("td", { text: v.description || "" })));
    return el("div", { class: "card", id: "schema-" + name },
      el("h3", { text: name }),
      schema.description ? el("p", { class: "muted", text: schema.description }) : "",
      el("table", {}, el("tr", {}, el("th", { text: "field" }), el("th", { text: "type" }), el("th", { text: "" })), ...rows));
  }

  function security(op) {
    if (!op.security) return "no session needed";
    return op.security.map((alt) => Object.keys(alt).join(" + ")).join("  or  ");
  }

  async function main() {
    const spec = await (await fetch("/openapi.json", { credentials: "same-origin" })).json();
    document.getElementById("docs-title").textContent = spec.info.title + " (v" + spec.info.version + ")";
    document.getElementById("docs-description").textContent = spec.info.description || "";
    const schemes = (spec.components || {}).securitySchemes || {};
    document.getElementById("docs-security").append(
      el("h2", { text: "Authentication" }),
      el("ul", {}, ...Object.entries(schemes).map(([name, s]) =>
        el("li", {}, el("b", { text: name }), " (" + (s.in ? s.in + " " + s.name : s.scheme) + "): " + (s.description || "")))));
    const ops = document.getElementById("docs-operations");
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(methods)) {
        const id = "op-" + method + "-" + path.replace(/[^A-Za-z0-9]+/g, "-");
        const params = (op.parameters || []).map((p) =>
          el("li", {}, el("code", { text: p.name }), " (" + p.in + (p.required ? ", required" : "") + "): " + typeOf(p.schema)));
        const body = op.requestBody && op.requestBody.content["application/json"];
        const responses = Object.entries(op.responses || {}).map(([code, r]) => {
          const media = r.content && r.content["application/json"];
          return el("li", {}, el("b", { text: code }), " " + (r.description || "") + (media ? " → " + typeOf(media.schema) : ""));
        });
        ops.append(el("details", { class: "card op", id },
          el("summary", {}, el("span", { class: "method method-" + method, text: method.toUpperCase() }), " ", el("code", { text: path }), "  ", el("span", { class: "muted", text: op.summary || "" })),
          op.description ? el("p", { text: op.description }) : "",
          el("p", {}, el("b", { text: "auth: " }), security(op)),
          params.length ? el("div", {}, el("b", { text: "parameters" }), el("ul", {}, ...params)) : "",
          body ? el("p", {}, el("b", { text: "body: " }), el("code", { text: typeOf(body.schema) })) : "",
          el("div", {}, el("b", { text: "responses" }), el("ul", {}, ...responses))));
      }
    }
    ops.append(el("h2", { text: "Schemas" }));
    for (const [name, schema] of Object.entries((spec.components || {}).schemas || {})) ops.append(schemaTable(name, schema));
    document.body.dataset.ready = "1";
  }

  main().catch((e) => {
    document.getElementById("docs-operations").textContent = "Could not load /openapi.json: " + e.message;
  });
})();
