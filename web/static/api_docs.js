// Renders /api/v1/openapi.json as a list of operations: parameters, body, answers, schemas.
// Self-contained (no CDN, no UI package); text goes through textContent, never innerHTML.
"use strict";
(function () {
  const root = document.getElementById("api-doc");
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  };
  const refName = (schema) => (schema && schema.$ref ? schema.$ref.split("/").pop() : null);
  const schemaLink = (schema) => {
    const name = refName(schema);
    if (!name) return el("code", JSON.stringify(schema));
    const a = el("a", name);
    a.href = "#schema-" + name;
    return a;
  };
  function render(doc) {
    root.textContent = "";
    root.appendChild(el("p", doc.info.description || ""));
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const box = el("details", undefined, "operation");
        const head = el("summary");
        head.appendChild(el("code", method.toUpperCase() + " " + path));
        head.appendChild(document.createTextNode(" — " + (op.summary || "") + (op.security ? " 🔒" : "")));
        box.appendChild(head);
        if (op.description) box.appendChild(el("p", op.description));
        if (op.parameters) {
          const ul = el("ul");
          for (const p of op.parameters) {
            const li = el("li");
            li.appendChild(el("code", p.name));
            li.appendChild(document.createTextNode(" (" + p.in + (p.required ? ", required" : "") + ") " + (p.description || "") + " "));
            li.appendChild(el("code", JSON.stringify(p.schema)));
            ul.appendChild(li);
          }
          box.appendChild(el("h4", "Parameters"));
          box.appendChild(ul);
        }
        if (op.requestBody) {
          box.appendChild(el("h4", "Body"));
          for (const [media, content] of Object.entries(op.requestBody.content)) {
            const p = el("p");
            p.appendChild(el("code", media));
            p.appendChild(document.createTextNode(" "));
            p.appendChild(schemaLink(content.schema));
            box.appendChild(p);
          }
        }
        box.appendChild(el("h4", "Answers"));
        const table = el("table");
        for (const [status, reply] of Object.entries(op.responses)) {
          const tr = el("tr");
          tr.appendChild(el("td", status));
          tr.appendChild(el("td", reply.description));
          const td = el("td");
          for (const [media, content] of Object.entries(reply.content || {})) {
            td.appendChild(el("code", media + " "));
            td.appendChild(schemaLink(content.schema));
          }
          if (reply.headers) td.appendChild(el("span", " headers: " + Object.keys(reply.headers).join(", ")));
          tr.appendChild(td);
          table.appendChild(tr);
        }
        box.appendChild(table);
        root.appendChild(box);
      }
    }
    root.appendChild(el("h2", "Schemas"));
    for (const [name, schema] of Object.entries(doc.components.schemas)) {
      const box = el("details", undefined, "schema");
      box.id = "schema-" + name;
      box.appendChild(el("summary", name));
      box.appendChild(el("pre", JSON.stringify(schema, null, 2)));
      root.appendChild(box);
    }
  }
  fetch(root.dataset.url)
    .then((r) => r.json())
    .then(render)
    .catch((e) => { root.textContent = "Could not load the document: " + e; });
  window.addEventListener("hashchange", () => {
    const target = document.getElementById(location.hash.slice(1));
    if (target && target.tagName === "DETAILS") target.open = true;
  });
})();
