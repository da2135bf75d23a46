// Admin: drain and resume nodes, with a reason. The coordinator checks the role of whoever is signed in.
"use strict";
let latest = null;
const rows = el("tbody", { id: "admin-nodes" });
const filter = el("input", { type: "search", placeholder: "filter nodes", id: "filter", oninput: () => paint(true) });
const message = el("div", { id: "admin-message" });
APP.append(el("h1", {}, "Admin"), el("div", { class: "toolbar" }, filter), message,
  el("table", {}, el("thead", {}, el("tr", {}, ["Node", "State", "Pool", "GPUs", "Held", "Reason", ""].map((h) => el("th", {}, h)))), rows));

async function act(nodeId, verb, reason) {
  try {
    await post(`/api/v1/nodes/${encodeURIComponent(nodeId)}/${verb}`, verb === "drain" ? { reason } : {});
    message.className = ""; message.textContent = `${verb === "drain" ? "drained" : "resumed"} ${nodeId}`;
  } catch (error) { message.className = "error"; message.textContent = error.message; }
}

let shown = "";
function paint(force) {
  if (!latest) return;
  const text = filter.value.trim();
  const nodes = latest.nodes.filter((n) => !text || n.node_id.includes(text)).slice(0, 500);
  const key = JSON.stringify(nodes.map((n) => [n.node_id, n.state, n.reason, n.drained, n.gpus.filter((g) => g[6]).length]));
  if (!force && key === shown) return;
  if (document.activeElement && document.activeElement.classList.contains("reason-input") && !force) return;
  shown = key;
  rows.replaceChildren(...nodes.map((n) => {
    const reason = el("input", { class: "reason-input", placeholder: "reason", "data-node": n.node_id });
    return el("tr", { "data-node": n.node_id }, el("td", {}, n.node_id), el("td", {}, badge(n.state)), el("td", {}, n.pool),
      el("td", { class: "num" }, String(n.gpus.length)), el("td", { class: "num" }, String(n.gpus.filter((g) => g[6]).length)),
      el("td", { class: "dim" }, n.reason || ""),
      el("td", { class: "actions" }, n.drained
        ? el("button", { class: "resume", onclick: () => act(n.node_id, "resume") }, "Resume")
        : [reason, el("button", { class: "drain danger", onclick: () => act(n.node_id, "drain", reason.value) }, "Drain")]));
  }));
}

if (!ME.admin) banner(ME.tokens ? "drain and resume need role admin" : "read-only dashboard: start it with --allow-actions to drain and resume", true);
live("/api/v1/events?topics=cluster", { cluster: (data) => { latest = data; paint(false); } });
