// ci web UI: live lists, the build form, steps and their live logs (ANSI
// colours rendered), cancel, rebuild and retry.
// Plain JavaScript, no build step. Works with or without an API token.
"use strict";

const tokenRequired = document.body.dataset.token === "required";
const token = () => localStorage.getItem("ci-token") || "";

async function api(method, path, body) {
  const headers = { "accept": "application/json" };
  if (token()) headers["authorization"] = "Bearer " + token();
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) askToken();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function askToken() {
  const box = document.getElementById("token-form");
  if (box) box.hidden = false;
}

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const icons = { success: "✔", failed: "✖", running: "⟳", queued: "…", pending: "…", canceled: "⊘", skipped: "↷", idle: "○", busy: "●" };
const status = (s) => `<span class="status status-${esc(s)}"><span aria-hidden="true">${icons[s] || ""}</span> ${esc(s)}</span>`;
const duration = (ms) => ms == null ? "" : ms < 1000 ? `${ms} ms` : ms < 60000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60000)} min ${Math.round(ms % 60000 / 1000)} s`;
const when = (t) => t ? new Date(t).toLocaleString() : "";

function buildRow(b) {
  return `<tr><td><a href="/builds/${b.id}">#${b.id}</a></td><td><code>${esc(b.hash.slice(0, 12))}</code></td>` +
    `<td class="command"><code>${esc(b.command)}</code></td><td>${status(b.status)}</td>` +
    `<td>${esc(b.agent || "")}</td><td>${duration(b.durationMs)}</td></tr>`;
}

function agentRow(a) {
  return `<tr><td>${a.id}</td><td>${esc(a.url)}</td><td>${status(a.status)}</td><td>${when(a.lastSeen)}</td>` +
    `<td>${a.build ? `<a href="/builds/${a.build}">#${a.build}</a>` : ""}</td></tr>`;
}

// === the list page ===

async function refreshLists() {
  const page = Number(document.body.dataset.pageNumber || 1), size = Number(document.body.dataset.pageSize || 25);
  try {
    const list = await api("GET", `/api/builds?limit=${size}&offset=${(page - 1) * size}`);
    document.querySelector("#builds tbody").innerHTML =
      list.builds.map(buildRow).join("") || `<tr><td colspan="6" class="muted">No builds yet.</td></tr>`;
    const agents = await api("GET", "/api/agents");
    document.querySelector("#agents tbody").innerHTML =
      agents.map(agentRow).join("") || `<tr><td colspan="5" class="muted">No agents registered.</td></tr>`;
    const older = document.querySelector("a[rel=next]");
    if (older) older.hidden = list.builds.length < size;
  } catch (e) { /* the next refresh tries again */ }
}

function setupIndex() {
  const form = document.getElementById("build-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = document.getElementById("form-error");
    err.textContent = "";
    const body = { hash: form.hash.value.trim() };
    if (form.command.value.trim()) body.command = form.command.value;
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const b = await api("POST", "/api/builds", body);
      location.href = `/builds/${b.id}`;
    } catch (e) {
      err.textContent = e.message;
      button.disabled = false;
    }
  });
  refreshLists();
  setInterval(refreshLists, 2000);
}

// === the build page ===

async function refreshBuild(id) {
  const b = await api("GET", `/api/builds/${id}`);
  const set = (k, v) => { const el = document.getElementById(k); if (el) el.innerHTML = v; };
  set("status", status(b.status));
  set("d-waiting", esc(b.waiting || ""));
  set("d-agent", esc(b.agent || ""));
  set("d-attempt", String(b.attempt));
  set("d-exit", b.exitCode == null ? "" : String(b.exitCode));
  set("d-created", when(b.createdAt));
  set("d-started", when(b.startedAt));
  set("d-finished", when(b.finishedAt));
  set("d-duration", duration(b.durationMs));
  (b.steps || []).forEach((s, i) => {
    const li = document.getElementById(`step-${i}`);
    if (!li) return;
    li.querySelector(".st").innerHTML = status(s.status);
    li.querySelector(".dur").textContent = duration(s.durationMs);
  });
  const finished = ["success", "failed", "canceled"].includes(b.status);
  document.getElementById("cancel").disabled = finished;
  document.getElementById("retry").disabled = !(finished && b.status !== "success");
  return finished;
}

// ANSI colour codes (SGR) as spans; other escape sequences dropped. A
// sequence cut by a network read waits for its end in `state.carry`.
function appendAnsi(pre, text, state) {
  text = state.carry + text;
  state.carry = "";
  let at;
  while ((at = text.indexOf("\x1b")) >= 0) {
    appendSpan(pre, text.slice(0, at), state.classes);
    const rest = text.slice(at + 1);
    if (!rest.startsWith("[")) { if (rest === "") { state.carry = "\x1b"; return; } text = rest; continue; }
    const m = /^\[([0-?]*)[ -\/]*([@-~])/.exec(rest);
    if (!m) { state.carry = "\x1b" + rest; return; }
    text = rest.slice(m[0].length);
    if (m[2] !== "m") continue;
    const classes = [];
    for (const p of m[1].split(";")) {
      const n = Number(p);
      if (n === 1) classes.push("ansi-bold");
      else if ((n >= 30 && n <= 37) || (n >= 90 && n <= 97)) classes.push(`ansi-fg${n % 10 + (n >= 90 ? 8 : 0)}`);
      else if ((n >= 40 && n <= 47) || (n >= 100 && n <= 107)) classes.push(`ansi-bg${n % 10 + (n >= 100 ? 8 : 0)}`);
    }
    state.classes = classes;
  }
  appendSpan(pre, text, state.classes);
}

function appendSpan(pre, text, classes) {
  if (!text) return;
  if (!classes.length) { pre.append(text); return; }
  const span = document.createElement("span");
  span.className = classes.join(" ");
  span.textContent = text;
  pre.append(span);
}

async function followLog(id, step) {
  const out = document.getElementById("stdout"), err = document.getElementById("stderr");
  const headers = { "accept": "text/event-stream" };
  if (token()) headers["authorization"] = "Bearer " + token();
  const path = step ? `/api/builds/${id}/steps/${encodeURIComponent(step)}/log?follow=1` : `/api/builds/${id}/log?follow=1`;
  const r = await fetch(path, { headers });
  if (!r.ok || !r.body) return;
  out.textContent = ""; err.textContent = "";
  const states = { stdout: { carry: "", classes: [] }, stderr: { carry: "", classes: [] } };
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut); buf = buf.slice(cut + 2);
      let event = "message", data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      const text = data.join("\n");
      if (event === "stdout") appendAnsi(out, text, states.stdout);
      else if (event === "stderr") appendAnsi(err, text, states.stderr);
      else if (event === "attempt") {
        for (const pre of [out, err]) {
          const m = document.createElement("span"); m.className = "marker";
          m.textContent = `\n--- the previous attempt stopped here; attempt ${text} starts ---\n`;
          pre.append(m);
        }
      } else if (event === "end") { await refreshBuild(id); return; }
    }
  }
}

function setupBuild() {
  const id = document.body.dataset.build, step = document.body.dataset.step;
  const msg = document.getElementById("action-error");
  const act = (button, path, then) => document.getElementById(button).addEventListener("click", async () => {
    msg.textContent = "";
    try { then(await api("POST", path)); } catch (e) { msg.textContent = e.message; }
  });
  act("cancel", `/api/builds/${id}/cancel`, () => refreshBuild(id));
  act("rebuild", `/api/builds/${id}/rebuild`, (b) => { location.href = `/builds/${b.id}`; });
  act("retry", `/api/builds/${id}/retry`, () => { location.href = `/builds/${id}`; });
  refreshBuild(id).catch(() => {});
  followLog(id, step).catch(() => {});
  const timer = setInterval(async () => { try { if (await refreshBuild(id)) clearInterval(timer); } catch (e) {} }, 1000);
}

// === token ===

function setupToken() {
  const form = document.getElementById("token-form");
  if (!form) return;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem("ci-token", form.token.value.trim());
    location.reload();
  });
  if (tokenRequired && !token()) askToken();
}

setupToken();
if (document.body.dataset.page === "index") setupIndex();
if (document.body.dataset.page === "build") setupBuild();
