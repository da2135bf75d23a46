// Sign in with a coordinator token; the dashboard keeps it server side and gives the browser a session cookie.
"use strict";
const next = new URLSearchParams(location.search).get("next") || "/";
APP.append(el("div", { class: "panel login" },
  el("h1", {}, "Sign in"),
  el("p", { class: "dim" }, "Paste your gpuorch token (the one gpuctl uses as $GPUORCH_TOKEN)."),
  EXTRA ? el("p", { class: "error", id: "login-error" }, EXTRA) : null,
  el("form", { method: "post", action: "/login" },
    el("input", { type: "hidden", name: "csrf", value: CSRF }),
    el("input", { type: "hidden", name: "next", value: next }),
    el("input", { type: "password", name: "token", id: "token", placeholder: "token", autocomplete: "off", required: true }),
    el("button", { type: "submit", id: "sign-in" }, "Sign in"))));
document.getElementById("token").focus();
