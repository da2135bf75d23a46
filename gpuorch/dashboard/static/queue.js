// The queue page: running jobs with their runtime, pending ones in the forecast's order, live.
"use strict";
let queue = null;
const summary = el("div", { class: "toolbar" });
const running = el("tbody", { id: "running" });
const pending = el("tbody", { id: "pending" });
const more = el("div", { class: "more" });
APP.append(el("h1", {}, "Queue"), summary,
  el("h2", {}, "Running"), el("table", {}, el("thead", {}, el("tr", {}, ["Job", "Name", "Owner", "GPUs", "Nodes", "Attempt", "Runtime"].map((h) => el("th", {}, h)))), running),
  el("h2", {}, "Pending, in scheduling order"),
  el("table", {}, el("thead", {}, el("tr", {}, ["#", "Job", "Name", "Owner", "GPUs", "Pool", "Priority", "Waiting", "Estimated start", "Reason"].map((h) => el("th", {}, h)))), pending),
  more);

function paint() {
  if (!queue) return;
  const t = now();
  summary.replaceChildren(el("div", { class: "stat" }, el("b", {}, String(queue.running.length)), "running"),
    el("div", { class: "stat" }, el("b", {}, String(queue.pending_total)), "pending"));
  running.replaceChildren(...queue.running.map((job) => el("tr", { "data-job": job.job_id },
    el("td", {}, jobLink(job.job_id)), el("td", {}, job.name || "—"), el("td", {}, job.owner || "—"), el("td", { class: "num" }, String(job.gpus)),
    el("td", {}, job.nodes.join(", ")), el("td", { class: "num" }, String(job.attempt)), el("td", { class: "num runtime", "data-start": job.start_time }, fmtDuration(t - job.start_time)))));
  pending.replaceChildren(...queue.pending.map((job, i) => el("tr", { "data-job": job.job_id },
    el("td", { class: "num dim" }, String(i + 1)), el("td", {}, jobLink(job.job_id)), el("td", {}, job.name || "—"), el("td", {}, job.owner || "—"),
    el("td", { class: "num" }, String(job.gpus)), el("td", {}, job.pool), el("td", { class: "num" }, String(job.priority)),
    el("td", { class: "num" }, fmtDuration(t - job.submit_time)),
    el("td", { class: "estimate" }, job.estimated_start_time ? fmtTime(job.estimated_start_time) : "unknown"),
    el("td", { class: "reason" }, job.reason || ""))));
  if (!queue.running.length) running.append(el("tr", {}, el("td", { colspan: 7, class: "dim" }, "nothing running")));
  if (!queue.pending.length) pending.append(el("tr", {}, el("td", { colspan: 10, class: "dim" }, "nothing pending")));
  more.textContent = queue.pending_total > queue.pending.length ? `and ${queue.pending_total - queue.pending.length} more pending (all of them: /api/v1/jobs)` : "";
}

live("/api/v1/events?topics=queue", { queue: (data) => { queue = data; paint(); } });
setInterval(() => {
  const t = now();
  for (const cell of running.querySelectorAll("td.runtime")) cell.textContent = fmtDuration(t - Number(cell.dataset.start));
}, 1000);
