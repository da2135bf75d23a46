// Usage: allocation and utilisation over time, GPU-hours by owner and by pool, over a day or a week.
"use strict";
let range = new URLSearchParams(location.search).get("range") || "day";
const buttons = el("div", { class: "toolbar" }, ["day", "week", "90d"].map((name) =>
  el("button", { "data-range": name, onclick: () => { range = name; history.replaceState(null, "", "?range=" + name); load(); } }, name === "90d" ? "90 days" : "last " + name)));
const allocation = el("canvas", { class: "chart", id: "allocation-chart" });
const utilisation = el("canvas", { class: "chart", id: "utilisation-chart" });
const owners = el("tbody", { id: "owners" });
const pools = el("tbody", { id: "pools" });
const note = el("div", { class: "dim" });
APP.append(el("h1", {}, "Usage"), buttons, note,
  el("div", { class: "charts" }, el("div", { class: "panel" }, allocation), el("div", { class: "panel" }, utilisation)),
  el("div", { class: "charts" },
    el("div", {}, el("h2", {}, "GPU-hours by user"), el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "User"), el("th", { class: "num" }, "GPU-hours"), el("th", {}, ""))), owners)),
    el("div", {}, el("h2", {}, "GPU-hours by pool"), el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Pool"), el("th", { class: "num" }, "GPU-hours"), el("th", {}, ""))), pools))));

function bars(body, rows) {
  const top = Math.max(1e-9, ...rows.map((r) => r.gpu_hours));
  body.replaceChildren(...rows.map((r) => {
    const bar = el("div", { class: "hbar" }); bar.style.width = (100 * r.gpu_hours / top) + "%";
    return el("tr", {}, el("td", {}, r.name || "(none)"), el("td", { class: "num" }, r.gpu_hours.toFixed(2)), el("td", { style: null }, bar));
  }));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 3, class: "dim" }, "no GPU-hours in this range")));
}

async function load() {
  for (const b of buttons.children) b.classList.toggle("current", b.dataset.range === range);
  try {
    const data = await api("/api/v1/usage?range=" + range);
    const p = data.points;
    lineChart(allocation, [
      { name: "GPUs", color: "#8a99a8", points: p.map((x) => [x[0], x[1]]) },
      { name: "allocated", color: "#4aa3ff", points: p.map((x) => [x[0], x[2]]) },
    ], { title: "GPUs allocated", format: (v) => v.toFixed(v < 10 ? 1 : 0) });
    lineChart(utilisation, [{ name: "mean utilisation %", color: "#3fb950", points: p.map((x) => [x[0], x[3]]) }], { title: "Utilisation %", yMax: 100 });
    bars(owners, data.owners);
    bars(pools, data.pools);
    note.textContent = `${p.length} points, one per ${data.point_seconds / 60} min; kept by the coordinator in memory since ${fmtTime(data.history_start_time)}`;
    banner("");
  } catch (error) { banner(String(error.message || error)); }
}
load();
setInterval(load, 30000);
