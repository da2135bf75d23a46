// Shared by every page: the viewer, fetch and post (with the CSRF token), live streams, formatting.
"use strict";
const CSRF = document.querySelector('meta[name=csrf]').content;
const ME = JSON.parse(document.querySelector('meta[name=me]').content);
const EXTRA = document.querySelector('meta[name=extra]').content;
const APP = document.getElementById("app");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function banner(text, note) {
  const box = document.getElementById("banner");
  box.hidden = !text; box.textContent = text || ""; box.className = note ? "note" : "";
}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (response.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); throw new Error("sign in"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF }, body: JSON.stringify(body || {}),
  });
  const text = await response.text();
  let parsed = {};
  try { parsed = JSON.parse(text); } catch (error) { parsed = { error: text }; }
  if (!response.ok) throw new Error(parsed.error || text || response.statusText);
  return parsed;
}

// An EventSource with a handler per event name; the dot in the header says whether it is connected.
function live(url, handlers) {
  const source = new EventSource(url);
  const dot = document.getElementById("live");
  source.onopen = () => { dot.className = "on"; };
  source.onerror = () => { dot.className = "off"; };
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (message) => handler(JSON.parse(message.data)));
  }
  if (!handlers.status) source.addEventListener("status", (message) => {
    const status = JSON.parse(message.data);
    banner(status.error ? "coordinator: " + status.error : "");
  });
  return source;
}

function fmtTime(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function badge(state) { return el("span", { class: "badge " + state }, state); }
function jobLink(id) { return el("a", { href: "/jobs/" + encodeURIComponent(id) }, id); }
function now() { return Date.now() / 1000; }

(function navigation() {
  const page = document.body.dataset.page;
  for (const link of document.querySelectorAll("header nav a")) if (link.dataset.nav === page) link.classList.add("current");
  if (!ME.admin) document.getElementById("admin-link").hidden = true;
  if (!ME.tokens || !ME.signed_in) document.getElementById("logout").hidden = true;
  if (!ME.tokens && !ME.can_act) document.getElementById("who").textContent = "read-only";
  if (ME.signed_in) document.getElementById("who").textContent = `${ME.user} (${ME.role})`;
})();
