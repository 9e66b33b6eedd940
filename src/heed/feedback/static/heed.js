// Heed annotation pages: vanilla JS over the JSON API. Model output is untrusted: it is only ever
// put into the page with textContent (never innerHTML), and the Content-Security-Policy forbids
// inline script. The guidelines' HTML is rendered server-side from Markdown with raw HTML disabled.
"use strict";

const T = JSON.parse(document.getElementById("heed-strings").textContent);
const PAGE = document.body.dataset.page;
const PROJECT = document.body.dataset.project;
let CSRF = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function toast(msg, isError) {
  const t = $("toast");
  t.textContent = msg;
  t.className = isError ? "show error" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ""; }, 2500);
}

async function api(method, url, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && CSRF) headers["X-CSRF-Token"] = CSRF;
  const resp = await fetch(url, { method, headers, credentials: "same-origin",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.detail) || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
}

// Text with ``` fences: fenced parts become <pre><code>, the rest keeps its line breaks (CSS pre-wrap).
function renderText(container, text) {
  container.replaceChildren();
  const fence = /```([^\n`]*)\n([\s\S]*?)```/g;
  let last = 0, m;
  while ((m = fence.exec(text)) !== null) {
    if (m.index > last) container.append(el("div", { class: "text", text: text.slice(last, m.index) }));
    const code = el("code", { text: m[2] });
    if (m[1].trim()) code.dataset.lang = m[1].trim();
    container.append(el("pre", {}, code));
    last = fence.lastIndex;
  }
  if (last < text.length) container.append(el("div", { class: "text", text: text.slice(last) }));
}

function renderPrompt(container, prompt) {
  container.replaceChildren();
  if (typeof prompt === "string") { renderText(container, prompt); return; }
  for (const msg of prompt) {
    const body = el("div", { class: "msg-body" });
    renderText(body, msg.content);
    container.append(el("div", { class: "msg role-" + msg.role }, el("div", { class: "role", text: msg.role }), body));
  }
}

async function loadMe() {
  try {
    const me = await api("GET", "/api/me");
    CSRF = me.csrf_token;
    return me;
  } catch (e) {
    if (e.status === 401) location.href = "/login";
    throw e;
  }
}

function wireLogout() {
  const b = $("logout");
  if (b) b.addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } finally { location.href = "/login"; }
  });
}

// ---------------------------------------------------------------- login

function loginPage() {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").textContent = "";
    try {
      await api("POST", "/api/login", { name: $("login-name").value, password: $("login-password").value });
      location.href = "/";
    } catch (e) {
      $("login-error").textContent = e.status === 401 ? T.login_failed : e.message;
    }
  });
}

// ---------------------------------------------------------------- project list

async function projectsPage() {
  await loadMe();
  const list = $("project-list");
  const projects = await api("GET", "/api/projects");
  if (!projects.length) list.append(el("li", { text: T.no_projects }));
  for (const p of projects) {
    const a = el("a", { href: "/annotate/" + encodeURIComponent(p.name), id: "project-" + p.name, text: p.name });
    list.append(el("li", { class: "card" }, a, el("span", { class: "muted", text: " · " + p.task + " · " + p.num_records })));
  }
}

// ---------------------------------------------------------------- annotator page

const state = { project: null, item: null, choice: null, ranked: [], tiePending: false, discard: false,
                key: null, shownAt: 0, busy: false };

async function annotatePage() {
  await loadMe();
  const base = "/api/projects/" + encodeURIComponent(PROJECT);
  state.project = await api("GET", base);
  $("guidelines-body").innerHTML = state.project.guidelines_html;  // sanitised Markdown (raw HTML off)
  const pairwise = state.project.task === "pairwise";
  $("keys-help").textContent = pairwise ? T.keys_pairwise : T.keys_ranking;
  $("pairwise-buttons").hidden = !pairwise;
  $("ranking-buttons").hidden = pairwise;
  $("ranking-box").hidden = pairwise;
  if (!state.project.allow_tie) $("btn-tie").hidden = true;
  if (!state.project.allow_discard) { $("btn-discard").hidden = true; $("btn-rank-discard").hidden = true; }
  if (state.project.rationale === "off") $("rationale-label").hidden = true;
  if (state.project.rationale === "required") $("rationale-label").firstChild.textContent = T.rationale_required;
  for (const b of document.querySelectorAll("[data-choice]")) b.addEventListener("click", () => choose(b.dataset.choice));
  $("btn-rank-discard").addEventListener("click", () => { state.discard = !state.discard; renderSelection(); });
  $("submit").addEventListener("click", submit);
  $("undo").addEventListener("click", undo);
  const ol = $("ranking");
  ol.addEventListener("dragover", (ev) => ev.preventDefault());
  ol.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const pos = parseInt(ev.dataTransfer.getData("text/plain"), 10);
    const target = ev.target.closest("li");
    moveRanked(pos, target ? parseInt(target.dataset.pos, 10) : null);
  });
  document.addEventListener("keydown", onKey);
  await next();
  setBusy(false);
}

async function next() {
  const base = "/api/projects/" + encodeURIComponent(PROJECT);
  const [item] = await Promise.all([api("GET", base + "/next"), refreshProgress()]);
  state.item = item.done ? null : item;
  state.choice = null; state.ranked = []; state.tiePending = false; state.discard = false;
  state.key = newKey(); state.shownAt = performance.now();
  $("rationale").value = "";
  $("all-done").hidden = !item.done;
  $("item").hidden = item.done;
  if (item.done) return;
  renderPrompt($("prompt"), item.prompt);
  const box = $("responses");
  box.replaceChildren();
  const pairwise = state.project.task === "pairwise";
  for (const r of item.responses) {
    const label = pairwise ? "AB"[r.position] : String(r.position + 1);
    const body = el("div", { class: "body" });
    renderText(body, r.text);
    const card = el("div", { class: "card response", id: "response-" + r.position, "data-pos": String(r.position) },
                    el("div", { class: "label", text: T.response + " " + label }), body);
    if (!pairwise) {
      card.draggable = true;
      card.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(r.position)));
    }
    box.append(card);
  }
  renderSelection();
}

async function refreshProgress() {
  const p = await api("GET", "/api/projects/" + encodeURIComponent(PROJECT) + "/progress");
  $("p-done").textContent = p.done; $("p-assigned").textContent = p.assigned; $("p-total").textContent = p.total;
  const denom = Math.max(1, p.done + p.available);
  $("p-bar").style.width = Math.round(100 * p.done / denom) + "%";
}

function choose(c) { state.choice = state.choice === c ? null : c; renderSelection(); }

function ranksFromList() {
  // competition ranking: a row tied with the one above shares its rank
  const ranks = new Array(state.item.responses.length).fill(null);
  let r = 0;
  state.ranked.forEach((row, i) => { if (!(row.tie && i > 0)) r = i + 1; ranks[row.pos] = r; });
  return ranks;
}

function moveRanked(pos, beforePos) {
  if (Number.isNaN(pos)) return;
  const existing = state.ranked.findIndex((row) => row.pos === pos);
  const row = existing >= 0 ? state.ranked.splice(existing, 1)[0] : { pos, tie: false };
  const at = beforePos === null ? -1 : state.ranked.findIndex((x) => x.pos === beforePos);
  if (at < 0) state.ranked.push(row); else state.ranked.splice(at, 0, row);
  state.discard = false;
  renderSelection();
}

function renderSelection() {
  if (!state.item) return;
  const pairwise = state.project.task === "pairwise";
  for (const b of document.querySelectorAll("[data-choice]")) b.classList.toggle("selected", b.dataset.choice === state.choice);
  for (const card of document.querySelectorAll(".response")) {
    const pos = parseInt(card.dataset.pos, 10);
    card.classList.toggle("selected", pairwise ? (state.choice === "AB"[pos]) : state.ranked.some((r) => r.pos === pos));
  }
  $("btn-rank-discard").classList.toggle("selected", state.discard);
  if (pairwise) return;
  const ol = $("ranking");
  ol.replaceChildren();
  const ranks = ranksFromList();
  state.ranked.forEach((row, i) => {
    const text = state.item.responses[row.pos].text;
    const li = el("li", { "data-pos": String(row.pos), draggable: "true", id: "ranked-" + i },
                  el("b", { text: "#" + ranks[row.pos] + " · " + T.response + " " + (row.pos + 1) + ": " }),
                  el("span", { text: text.length > 80 ? text.slice(0, 80) + "…" : text }));
    li.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(row.pos)));
    if (i > 0 && state.project.allow_tie) {
      const box = el("input", { type: "checkbox", class: "tie" });
      box.checked = row.tie;
      box.addEventListener("change", () => { row.tie = box.checked; renderSelection(); });
      li.append(el("label", { class: "tie-label" }, box, " " + T.tie_above));
    }
    ol.append(li);
  });
}

function onKey(ev) {
  if (!state.item || state.busy) return;
  const typing = ev.target && (ev.target.tagName === "TEXTAREA" || ev.target.tagName === "INPUT");
  if (typing) {
    if (ev.key === "Escape") ev.target.blur();
    else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
    return;
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const pairwise = state.project.task === "pairwise";
  const k = ev.key;
  if (k === "Enter") { ev.preventDefault(); submit(); return; }
  if (k === "u") { undo(); return; }
  if (k === "r" && !$("rationale-label").hidden) { ev.preventDefault(); $("rationale").focus(); return; }
  if (pairwise) {
    const map = { "1": "A", "2": "B", "a": "A", "b": "B", "t": "tie", "d": "discard" };
    if (map[k]) {
      if ((map[k] === "tie" && !state.project.allow_tie) || (map[k] === "discard" && !state.project.allow_discard)) return;
      choose(map[k]);
    }
    return;
  }
  const n = state.item.responses.length;
  if (/^[1-9]$/.test(k) && parseInt(k, 10) <= n) {
    const pos = parseInt(k, 10) - 1;
    if (state.ranked.some((r) => r.pos === pos)) return;
    state.ranked.push({ pos, tie: state.tiePending && state.ranked.length > 0 && state.project.allow_tie });
    state.tiePending = false; state.discard = false;
    renderSelection();
  } else if (k === "=") {
    state.tiePending = true;
  } else if (k === "Backspace") {
    ev.preventDefault();
    state.ranked.pop(); state.tiePending = false; renderSelection();
  } else if (k === "d" && state.project.allow_discard) {
    state.discard = !state.discard; renderSelection();
  }
}

async function submit() {
  if (!state.item || state.busy) return;
  const body = { record_id: state.item.record_id, idempotency_key: state.key,
                 duration_ms: Math.round(performance.now() - state.shownAt) };
  const rationale = $("rationale").value;
  if (rationale.trim()) body.rationale = rationale;
  if (state.project.task === "pairwise") {
    if (!state.choice) { toast(T.pick_first, true); return; }
    body.choice = state.choice;
  } else if (state.discard) {
    body.discard = true;
  } else {
    if (state.ranked.length !== state.item.responses.length) { toast(T.incomplete, true); return; }
    body.ranks = ranksFromList();
  }
  setBusy(true);
  try {
    // A retry after a network error resends the same idempotency key: stored once.
    let lastErr = null;
    for (let attempt = 0; attempt < 3; attempt++) {
      try { await api("POST", "/api/projects/" + encodeURIComponent(PROJECT) + "/annotations", body); lastErr = null; break; }
      catch (e) { lastErr = e; if (e.status) break; await new Promise((r) => setTimeout(r, 300 * (attempt + 1))); }
    }
    if (lastErr) throw lastErr;
    toast(T.saved);
    await next();
  } catch (e) {
    toast(T.error + ": " + e.message, true);
  } finally {
    setBusy(false);
  }
}

// data-busy on <body> lets tests (and styles) wait until a submission or undo has fully settled.
function setBusy(b) { state.busy = b; document.body.dataset.busy = b ? "1" : "0"; }

async function undo() {
  if (state.busy) return;
  setBusy(true);
  try {
    const r = await api("POST", "/api/projects/" + encodeURIComponent(PROJECT) + "/undo");
    toast(r.record_id === null ? T.nothing_to_undo : T.undone);
    await next();
  } catch (e) {
    toast(T.error + ": " + e.message, true);
  } finally {
    setBusy(false);
  }
}

// ---------------------------------------------------------------- admin page

function fmt(x) { return x === null || x === undefined ? "–" : (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : String(x)); }

function table(node, header, rows) {
  node.replaceChildren(el("tr", {}, ...header.map((h) => el("th", { text: h }))));
  for (const r of rows) node.append(el("tr", {}, ...r.map((c) => el("td", { text: fmt(c) }))));
}

async function adminPage() {
  await loadMe();
  const select = $("admin-project");
  async function loadProjects(selected) {
    const projects = await api("GET", "/api/projects");
    select.replaceChildren(...projects.map((p) => el("option", { value: p.name, text: p.name + " (" + p.task + ")" })));
    if (selected) select.value = selected;
    if (select.value) await loadProject(select.value);
  }
  async function loadProject(name) {
    const base = "/api/admin/projects/" + encodeURIComponent(name);
    const [stats, dis] = await Promise.all([api("GET", base + "/stats"), api("GET", base + "/disagreements?limit=50")]);
    const p = stats.progress, a = stats.agreement;
    $("admin-progress").textContent = T.complete_records + ": " + p.complete_records + " / " + p.total + " · " +
      T.annotations + ": " + p.annotations + " / " + p.target;
    const rows = a.task === "pairwise"
      ? [["Fleiss κ", a.fleiss_kappa], ["Cohen κ (mean over pairs)", a.cohen_kappa], ["Krippendorff α (nominal)", a.alpha_nominal]]
      : [["Krippendorff α (ordinal)", a.alpha_ordinal], ["Krippendorff α (interval)", a.alpha_interval], ["Kendall τ-b (mean)", a.mean_kendall_tau]];
    const bias = a.position_bias;
    rows.push([T.position_bias, a.task === "pairwise" ? bias.first_shown_wins : bias.first_shown_top]);
    if (a.task !== "pairwise") rows.push(["(unbiased)", bias.expected_if_unbiased]);
    rows.push([T.outcome, JSON.stringify(stats.outcomes)]);
    table($("admin-agreement"), ["", ""], rows);
    const per = p.annotators.map((u) => {
      const s = a.per_annotator[u.user] || {};
      return [u.user, u.done, a.task === "pairwise" ? s.agree_with_majority : s.tau_with_others,
              a.task === "pairwise" ? s.first_shown_wins : s.first_shown_top, u.mean_ms];
    });
    table($("admin-annotators"), [T.annotator, T.done, T.with_majority, T.position_bias, "ms"], per);
    table($("admin-disagreements"), [T.record, T.agreement, T.prompt, T.labels],
          dis.map((d) => [d.record_id, d.agreement, typeof d.prompt === "string" ? d.prompt.slice(0, 80) : JSON.stringify(d.prompt).slice(0, 80), JSON.stringify(d.labels)]));
    $("export-pairs").href = base + "/export?format=pairs&file=jsonl";
    $("export-ranked").href = base + "/export?format=ranked&file=jsonl";
    $("export-pairs-parquet").href = base + "/export?format=pairs&file=parquet";
    $("export-ranked-parquet").href = base + "/export?format=ranked&file=parquet";
  }
  async function loadUsers() {
    const users = await api("GET", "/api/admin/users");
    $("user-list").replaceChildren(...users.map((u) => el("li", { text: u.name + " (" + u.role + ")" })));
  }
  select.addEventListener("change", () => loadProject(select.value));
  $("project-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      await api("POST", "/api/admin/projects", { name: f.get("name"), task: f.get("task"),
        overlap: parseInt(f.get("overlap"), 10), guidelines: f.get("guidelines") });
      await loadProjects(f.get("name"));
    } catch (e) { toast(T.error + ": " + e.message, true); }
  });
  $("user-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      const u = await api("POST", "/api/admin/users", { name: f.get("name"), role: f.get("role") });
      $("user-result").textContent = T.new_password + " " + u.name + ": " + u.password;
      await loadUsers();
    } catch (e) { toast(T.error + ": " + e.message, true); }
  });
  $("import-file").addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    if (!file || !select.value) return;
    try {
      const lines = (await file.text()).split("\n").filter((l) => l.trim());
      const records = lines.map((l) => JSON.parse(l));
      const r = await api("POST", "/api/admin/projects/" + encodeURIComponent(select.value) + "/records", { records });
      $("import-result").textContent = T.imported + " " + r.count;
      await loadProject(select.value);
    } catch (e) { toast(T.error + ": " + e.message, true); }
  });
  await Promise.all([loadProjects(), loadUsers()]);
}

// ---------------------------------------------------------------- start

wireLogout();
const pages = { login: loginPage, projects: projectsPage, annotate: annotatePage, admin: adminPage };
if (pages[PAGE]) pages[PAGE]().catch((e) => { if (e.status !== 401) toast(T.error + ": " + e.message, true); });
