// One job: state, spec, attempts on a timeline, rank logs that follow, and cancel / priority actions.
"use strict";
const JOB_ID = EXTRA;
let job = null, logSource = null, logKey = "";
const head = el("div", { class: "toolbar" });
const actions = el("div", { class: "actions", id: "actions" });
const message = el("span", { id: "action-message" });
const spec = el("dl", { class: "spec" });
const timeline = el("div", { class: "timeline", id: "timeline" });
const rankPicker = el("select", { id: "rank", onchange: () => followLogs(true) });
const follow = el("input", { type: "checkbox", id: "follow", checked: true, onchange: () => followLogs(true) });
const log = el("pre", { id: "log" });
APP.append(el("h1", {}, "Job ", el("span", { id: "job-id" }, JOB_ID)), head, el("div", { class: "panel" }, actions, message),
  el("h2", {}, "Progress"), el("div", { class: "panel", id: "progress" }),
  el("h2", {}, "Attempts"), el("div", { class: "panel" }, timeline),
  el("h2", {}, "Logs"), el("div", { class: "toolbar" }, el("label", {}, "Rank ", rankPicker), el("label", {}, follow, " follow")), log,
  el("h2", {}, "Spec"), el("div", { class: "panel" }, spec));

function row(label, value) { return [el("dt", {}, label), el("dd", {}, value === "" || value === null || value === undefined ? "—" : String(value))]; }

function paintActions() {
  const final = ["SUCCEEDED", "FAILED", "CANCELLED"].includes(job.state);
  if (!ME.can_act) { actions.replaceChildren(el("span", { class: "dim" }, ME.tokens ? "sign in to act on this job" : "read-only dashboard")); return; }
  if (actions.dataset.built === String(final)) return;
  actions.dataset.built = String(final);
  const priority = el("input", { type: "number", id: "priority", value: job.priority });
  actions.replaceChildren(
    el("button", { class: "danger", id: "cancel", disabled: final, onclick: async () => {
      if (!confirm(`Cancel ${JOB_ID}?`)) return;
      try { await post(`/api/v1/jobs/${encodeURIComponent(JOB_ID)}/cancel`); message.textContent = " cancelled"; message.className = ""; }
      catch (error) { message.textContent = " " + error.message; message.className = "error"; }
    } }, "Cancel job"),
    el("label", {}, "Priority ", priority),
    el("button", { id: "set-priority", disabled: final, onclick: async () => {
      try { await post(`/api/v1/jobs/${encodeURIComponent(JOB_ID)}/priority`, { priority: Number(priority.value) }); message.textContent = " priority set"; message.className = ""; }
      catch (error) { message.textContent = " " + error.message; message.className = "error"; }
    } }, "Set"));
}

function paintProgress() {
  const t = job.telemetry, panel = document.getElementById("progress");
  const parts = [];
  if (t.step) parts.push(el("div", { id: "throughput" }, `step ${t.step}` + (t.steps_per_second ? ` · ${t.steps_per_second.toPrecision(3)} steps/s` : "") +
    (t.samples_per_second ? ` · ${t.samples_per_second.toPrecision(4)} samples/s` : "")));
  const scalars = Object.entries(t.scalars);
  if (scalars.length) parts.push(el("div", { id: "scalars" }, scalars.map(([k, v]) => `${k} = ${Number(v).toPrecision(6)}`).join(" · ")));
  if (t.idle) parts.push(el("div", { id: "idle", class: "error" }, `idle: its GPUs are under the idle threshold (${t.gpu_utilization_percent.toFixed(1)}% now)`));
  for (const s of t.stragglers) parts.push(el("div", { class: "straggler error" }, `straggler: rank ${s.rank} on ${s.node_id} (GPU ${s.device_uuid}), attempt ${s.attempt}: ` +
    `${s.step_seconds.toPrecision(3)} s a step against the median ${s.median_step_seconds.toPrecision(3)} s`));
  if (t.ranks.length > 1) parts.push(el("div", { class: "dim" }, "step seconds by rank: " + t.ranks.map((r) => `${r.rank}: ${r.step_seconds ? r.step_seconds.toPrecision(3) : "—"}`).join(" · ")));
  panel.replaceChildren(...(parts.length ? parts : [el("span", { class: "dim" }, "no progress reported (gpuorch.worker.report_progress)")]));
}

function paintTimeline() {
  const attempts = job.attempts;
  if (!attempts.length) { timeline.replaceChildren(el("span", { class: "dim" }, "not placed yet" + (job.reason ? ": " + job.reason : ""))); return; }
  const start = Math.min(job.submit_time, ...attempts.map((a) => a.start_time || now()));
  const end = Math.max(...attempts.map((a) => a.end_time || now()), job.end_time || 0);
  const span = Math.max(1, end - start);
  timeline.replaceChildren(...attempts.map((a) => {
    const left = ((a.start_time || end) - start) / span * 100, width = (((a.end_time || now()) - (a.start_time || end)) / span) * 100;
    const failed = a.end_reason && !/exited with code 0|succeeded/.test(a.end_reason);
    const where = a.placement.map((n) => `${n.node_id} [${n.gpus.join(",")}]`).join("  ");
    const bar = el("div", { class: "span" + (a.end_time ? (failed ? " failed" : " ended") : ""), title: where });
    bar.style.left = left + "%"; bar.style.width = Math.max(0.5, width) + "%";
    return el("div", { class: "attempt", "data-attempt": a.attempt },
      el("div", { class: "row" }, el("span", { class: "label" }, `attempt ${a.attempt}`), el("div", { class: "track" }, bar)),
      el("div", { class: "why" }, `${fmtTime(a.start_time)} → ${a.end_time ? fmtTime(a.end_time) : "running"} · ${where}` +
        (a.restart_reason ? ` · started because ${a.restart_reason}` : "") + (a.end_reason ? ` · ended: ${a.end_reason}` : "")));
  }));
}

function paint() {
  head.replaceChildren(el("span", { id: "state" }, badge(job.state)), el("span", {}, job.name || ""), el("span", { class: "dim" }, `owner ${job.owner || "—"}`),
    el("span", { class: "dim" }, `${job.gpus} GPUs · priority ${job.priority} · attempt ${job.attempt} · restarts ${job.restarts}`),
    el("span", { id: "reason" }, job.reason || ""));
  paintActions();
  paintTimeline();
  paintProgress();
  const s = job.spec;
  spec.replaceChildren(...row("argv", s.argv.join(" ")), ...row("submitted", fmtTime(job.submit_time)), ...row("started", fmtTime(job.start_time)),
    ...row("ended", fmtTime(job.end_time)), ...row("estimated start", job.state === "PENDING" ? (job.estimated_start_time ? fmtTime(job.estimated_start_time) : "unknown") : ""),
    ...row("pool", job.pool), ...row("backend", s.backend), ...row("gpus per node", s.gpus_per_node || "any"), ...row("min gpus", s.min_gpus || ""),
    ...row("max restarts", s.max_restarts), ...row("time limit", s.time_limit_seconds ? fmtDuration(s.time_limit_seconds) : ""),
    ...row("working dir", s.working_dir || s.submit_dir), ...row("env", Object.entries(s.env).map(([k, v]) => `${k}=${s.env_redacted ? "…" : v}`).join(" ")));
  const ranks = Math.max(1, job.world_size || job.gpus);
  if (rankPicker.options.length !== ranks) rankPicker.replaceChildren(...Array.from({ length: ranks }, (_, i) => el("option", { value: i }, String(i))));
  followLogs(false);
}

function followLogs(restart) {
  if (!job || !job.attempt) { log.textContent = "no output yet: the job has not started"; return; }
  const key = `${rankPicker.value || 0}/${job.attempt}/${follow.checked}`;
  if (!restart && key === logKey) return;
  logKey = key;
  if (logSource) logSource.close();
  logSource = null;
  log.textContent = "";
  const url = `/api/v1/jobs/${encodeURIComponent(JOB_ID)}/logs/events?rank=${rankPicker.value || 0}&attempt=${job.attempt}`;
  if (!follow.checked) {
    logSource = null;
    fetch(`/api/v1/jobs/${encodeURIComponent(JOB_ID)}/logs?rank=${rankPicker.value || 0}&tail=500`).then((r) => r.text()).then((text) => { log.textContent = text; });
    return;
  }
  logSource = new EventSource(url);
  logSource.addEventListener("log", (event) => {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
    log.append(JSON.parse(event.data));
    if (atBottom) log.scrollTop = log.scrollHeight;
  });
  logSource.addEventListener("problem", (event) => { log.append(`\n[${JSON.parse(event.data).error}]\n`); logSource.close(); });
  logSource.addEventListener("end", () => logSource.close());
}

const watch = new EventSource(`/api/v1/jobs/${encodeURIComponent(JOB_ID)}/events`);
const dot = document.getElementById("live");
watch.onopen = () => { dot.className = "on"; };
watch.onerror = () => { dot.className = "off"; };
watch.addEventListener("job", (event) => { job = JSON.parse(event.data); paint(); });
watch.addEventListener("problem", (event) => { banner(JSON.parse(event.data).error); watch.close(); });
watch.addEventListener("end", () => { watch.close(); dot.className = ""; });
