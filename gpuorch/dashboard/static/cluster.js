// The cluster page: every node and GPU, coloured by the chosen metric, kept live by the "cluster" event.
"use strict";
const METRICS = {
  utilization: { column: 1, label: "GPU utilisation %", low: 0, high: 100 },
  memory: { column: 2, label: "memory used %", low: 0, high: 100 },
  temperature: { column: 3, label: "temperature °C", low: 30, high: 90 },
  power: { column: 4, label: "power W", low: 0, high: 700 },
};
let metric = new URLSearchParams(location.search).get("metric") || "utilization";
if (!METRICS[metric]) metric = "utilization";
let latest = null, selected = null;
const cards = new Map();

function colour(value) {
  if (value === null || value === undefined) return "#333d48";
  const m = METRICS[metric];
  const f = Math.max(0, Math.min(1, (value - m.low) / (m.high - m.low)));
  return `hsl(${Math.round(220 - 220 * f)}, 70%, ${Math.round(35 + 12 * f)}%)`;
}

const stats = el("div", { class: "toolbar", id: "stats" });
const picker = el("select", { id: "metric", onchange: (event) => { metric = event.target.value; history.replaceState(null, "", "?metric=" + metric); paint(); } },
  Object.entries(METRICS).map(([key, m]) => el("option", { value: key, selected: key === metric }, m.label)));
const grid = el("div", { class: "grid", id: "grid" });
const detail = el("div", { class: "panel", id: "detail", hidden: true });
APP.append(el("h1", {}, "Cluster"), stats,
  el("div", { class: "toolbar" }, el("label", {}, "Colour by ", picker), el("span", { class: "legend" }, "low", el("span", { class: "bar" }), "high"),
    el("span", { class: "dim" }, "● = held by a job; stripes = unhealthy; dashed = drained")),
  detail, grid);

function stat(label, value) { return el("div", { class: "stat" }, el("b", {}, String(value)), label); }

function card(node) {
  let entry = cards.get(node.node_id);
  if (!entry) {
    const gpus = el("div", { class: "gpus" });
    const title = el("div", { class: "title" });
    const reason = el("div", { class: "reason" });
    const root = el("div", { class: "node", "data-node": node.node_id }, title, gpus, reason);
    entry = { root, title, gpus, reason, cells: [] };
    cards.set(node.node_id, entry);
  }
  return entry;
}

function paint() {
  if (!latest) return;
  const { nodes, owners, status } = latest;
  stats.replaceChildren(stat("nodes", status.nodes_total ?? nodes.length), stat("GPUs", status.gpus_total ?? 0),
    stat("free", status.gpus_free ?? 0), stat("mean utilisation", (status.mean_gpu_utilization_percent ?? 0) + "%"),
    stat("running jobs", (status.jobs_by_state || {}).RUNNING || 0), stat("pending jobs", (status.jobs_by_state || {}).PENDING || 0));
  const column = METRICS[metric].column;
  const order = [];
  const seen = new Set();
  for (const node of nodes) {
    seen.add(node.node_id);
    const entry = card(node);
    order.push(entry.root);
    entry.root.className = "node " + node.state.toLowerCase() + (node.drained ? " drained" : "");
    entry.title.replaceChildren(el("span", { class: "id", title: node.hostname }, node.node_id), el("span", {}, node.pool !== "default" ? node.pool + " " : "", badge(node.state)));
    entry.reason.textContent = node.reason || "";
    while (entry.cells.length < node.gpus.length) {
      const cell = el("div", { class: "gpu", onclick: () => select(node.node_id, cell.dataset.uuid) });
      entry.cells.push(cell); entry.gpus.append(cell);
    }
    node.gpus.forEach((gpu, i) => {
      const cell = entry.cells[i];
      const [index, util, mem, temp, power, healthy, job, uuid, reason] = gpu;
      cell.dataset.uuid = uuid; cell.dataset.job = job; cell.dataset.index = index;
      cell.style.background = colour(gpu[column]);
      cell.textContent = gpu[column] === null ? "–" : Math.round(gpu[column]);
      cell.classList.toggle("held", !!job);
      cell.classList.toggle("sick", !healthy);
      cell.classList.toggle("selected", selected && selected.uuid === uuid);
      cell.title = `${node.node_id} GPU ${index}\nutil ${util ?? "–"}%  mem ${mem ?? "–"}%  ${temp ?? "–"}°C  ${power ?? "–"} W` +
        (job ? `\njob ${job} (${owners[job] || "no owner"})` : "\nfree") + (healthy ? "" : `\nunhealthy: ${reason}`);
    });
  }
  for (const [id, entry] of cards) if (!seen.has(id)) { entry.root.remove(); cards.delete(id); }
  if (grid.children.length !== order.length || order.some((root, i) => grid.children[i] !== root)) grid.replaceChildren(...order);
}

async function select(nodeId, uuid) {
  selected = { nodeId, uuid };
  paint();
  detail.hidden = false;
  detail.replaceChildren(el("span", { class: "dim" }, "loading…"));
  try {
    const node = await api("/api/v1/nodes/" + encodeURIComponent(nodeId));
    const gpu = node.gpus.find((row) => row[7] === uuid);
    const samples = node.history[uuid] || [];
    const owner = latest && gpu && gpu[6] ? latest.owners[gpu[6]] : "";
    const charts = [
      ["GPU utilisation %", 1, "#4aa3ff", 100], ["memory used GiB", 2, "#a371f7", gpu ? gpu[10] / 2 ** 30 : undefined],
      ["temperature °C", 3, "#d29922", undefined], ["power W", 4, "#3fb950", undefined],
    ].map(([title, col, color, yMax]) => {
      const canvas = el("canvas", { class: "chart", "data-series": title });
      return { canvas, title, color, yMax, points: samples.map((s) => [s[0], col === 2 ? s[col] / 2 ** 30 : s[col]]) };
    });
    detail.replaceChildren(
      el("div", { class: "toolbar" }, el("b", {}, `${nodeId} · GPU ${gpu ? gpu[0] : "?"}`), el("span", { class: "dim" }, uuid),
        gpu && gpu[6] ? el("span", {}, "held by ", jobLink(gpu[6]), owner ? ` (${owner})` : "") : el("span", { class: "dim" }, "free"),
        gpu && !gpu[5] ? el("span", { class: "error" }, "unhealthy: " + gpu[8]) : null,
        el("span", { class: "dim" }, `${samples.length} samples`),
        el("button", { onclick: () => { selected = null; detail.hidden = true; paint(); } }, "Close")),
      el("div", { class: "charts" }, charts.map((c) => c.canvas)));
    for (const c of charts) lineChart(c.canvas, [{ name: "", color: c.color, points: c.points }], { title: c.title, yMax: c.yMax });
  } catch (error) {
    detail.replaceChildren(el("span", { class: "error" }, String(error.message || error)));
  }
}

live("/api/v1/events?topics=cluster", { cluster: (data) => { latest = data; paint(); } });
