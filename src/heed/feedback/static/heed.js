// Heed annotation pages: vanilla JS over the JSON API. Model output is untrusted: it is only ever
// put into the page as DOM nodes built here with textContent (never innerHTML; the Markdown below
// makes elements, never parses HTML), and the Content-Security-Policy forbids inline script. The
// guidelines' HTML is rendered server-side from Markdown with raw HTML disabled.
"use strict";

const T = JSON.parse(document.getElementById("heed-strings").textContent);
const PAGE = document.body.dataset.page;
const PROJECT = document.body.dataset.project;
const MUST_CHANGE = "change your one-time password first";
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
  toast.timer = setTimeout(() => { t.className = ""; }, 3500);
}

// An expired or missing session sends the browser to the login page (and back here afterwards);
// a one-time password sends it to the account page first.
function toLogin() {
  location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
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
    if (resp.status === 401 && PAGE !== "login") { err.redirected = true; toLogin(); }
    if (resp.status === 403 && err.message.startsWith(MUST_CHANGE)) { err.redirected = true; location.href = "/account"; }
    throw err;
  }
  return data;
}

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
}

// ---------------------------------------------------------------- Markdown (untrusted text -> elements)
// Fenced code, headings, lists (nested), tables, block quotes, rules, paragraphs with their line
// breaks; inline code, bold, italics, strike-through and http(s) links. Everything else is text.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?/;
const LIST = /^(\s*)([-*+]|\d{1,9}[.)])(?:\s+|$)/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function indentOf(line) { return line.length - line.trimStart().length; }
function isBlank(line) { return line.trim() === ""; }
function isTableStart(lines, i) {
  return i + 1 < lines.length && lines[i].includes("|") && lines[i + 1].includes("-") && TABLE_SEP.test(lines[i + 1]);
}
function startsBlock(lines, i) {
  const l = lines[i];
  return FENCE.test(l) || HEADING.test(l) || RULE.test(l) || QUOTE.test(l) || LIST.test(l) || isTableStart(lines, i);
}

function renderMarkdown(container, text) {
  container.replaceChildren(...mdBlocks(String(text).replace(/\r\n?/g, "\n").split("\n")));
}

function mdBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (isBlank(line)) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(m[1])) body.push(lines[i++]);
      i++;
      const code = el("code", { text: body.join("\n") });
      if (m[2]) code.dataset.lang = m[2];
      out.push(el("pre", {}, code));
    } else if ((m = HEADING.exec(line))) {
      out.push(mdInline(el("div", { class: "md-h md-h" + m[1].length }), m[2]));
      i++;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && !isBlank(lines[i]) && (QUOTE.test(lines[i]) || !startsBlock(lines, i))) {
        body.push(lines[i].replace(QUOTE, ""));
        i++;
      }
      out.push(el("blockquote", {}, ...mdBlocks(body)));
    } else if (isTableStart(lines, i)) {
      const [table, next] = mdTable(lines, i);
      out.push(table);
      i = next;
    } else if (LIST.test(line)) {
      const [list, next] = mdList(lines, i);
      out.push(list);
      i = next;
    } else {
      const para = [line];
      i++;
      while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i)) para.push(lines[i++]);
      out.push(mdInline(el("p"), para.map((l) => l.trim()).join("\n")));
    }
  }
  return out;
}

function mdList(lines, i) {
  const first = LIST.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.setAttribute("start", String(parseInt(first[2], 10)));
  while (i < lines.length) {
    const m = LIST.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const content = [lines[i].slice(m[0].length)];
    i++;
    while (i < lines.length) {
      const l = lines[i];
      if (isBlank(l)) {  // a blank line continues the item only when indented text follows
        if (i + 1 < lines.length && !isBlank(lines[i + 1]) && indentOf(lines[i + 1]) > indent) { content.push(""); i++; continue; }
        break;
      }
      const lm = LIST.exec(l);
      if (lm && lm[1].length <= indent) break;
      if (!lm && indentOf(l) <= indent && startsBlock(lines, i)) break;
      content.push(l.slice(Math.min(indentOf(l), indent + 2)));
      i++;
    }
    const blocks = mdBlocks(content);
    const li = el("li");
    if (blocks.length && blocks[0].tagName === "P") li.append(...blocks.shift().childNodes);  // tight item
    li.append(...blocks);
    list.append(li);
  }
  return [list, i];
}

function mdCells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function mdTable(lines, i) {
  const head = mdCells(lines[i]);
  const aligns = mdCells(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : (c.startsWith(":") ? "left" : "")));
  const cell = (tag, text, k) => {
    const node = mdInline(el(tag), text || "");
    if (aligns[k]) node.style.textAlign = aligns[k];
    return node;
  };
  const table = el("table", { class: "md-table" }, el("thead", {}, el("tr", {}, ...head.map((h, k) => cell("th", h, k)))));
  const body = el("tbody");
  i += 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const cells = mdCells(lines[i]);
    body.append(el("tr", {}, ...head.map((_, k) => cell("td", cells[k], k))));
    i++;
  }
  table.append(body);
  return [el("div", { class: "table-wrap" }, table), i];
}

const INLINE = new RegExp([
  /(`+)([^`]|[\s\S]*?[^`])\1(?!`)/.source,                       // 1, 2: code span
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,                              // 3: bold
  /(?<![A-Za-z0-9])__(?=\S)([\s\S]*?\S)__(?![A-Za-z0-9])/.source,  // 4: bold
  /~~(?=\S)([\s\S]*?\S)~~/.source,                                  // 5: strike
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,                          // 6: italics
  /(?<![A-Za-z0-9_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![A-Za-z0-9_])/.source,  // 7: italics
  /\[([^\]\n]+)\]\(\s*<?([^\s)>]+)>?(?:\s+"[^"\n]*")?\s*\)/.source, // 8, 9: link
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source,               // 10: bare link
].join("|"), "g");

function mdText(node, text) {
  const parts = text.replace(/\\([\\`*_{}[\]()#+\-.!|~>])/g, "$1").split("\n");
  parts.forEach((p, k) => { if (k) node.append(el("br")); if (p) node.append(p); });
}

function mdLink(label, url) {
  if (!/^(https?:|mailto:)/i.test(url)) return null;
  return el("a", { href: url, rel: "noopener noreferrer nofollow", target: "_blank" });
}

function mdInline(node, text) {
  const re = new RegExp(INLINE.source, "g");
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) mdText(node, text.slice(last, m.index));
    if (m[1]) node.append(el("code", { text: m[2].replace(/^ (.+) $/, "$1") }));
    else if (m[3] !== undefined || m[4] !== undefined) node.append(mdInline(el("strong"), m[3] ?? m[4]));
    else if (m[5] !== undefined) node.append(mdInline(el("del"), m[5]));
    else if (m[6] !== undefined || m[7] !== undefined) node.append(mdInline(el("em"), m[6] ?? m[7]));
    else if (m[8] !== undefined) {
      const a = mdLink(m[8], m[9]);
      if (a) node.append(mdInline(a, m[8])); else mdText(node, m[0]);
    } else if (m[10] !== undefined) node.append(el("a", { href: m[10], rel: "noopener noreferrer nofollow", target: "_blank", text: m[10] }));
    last = re.lastIndex;
  }
  if (last < text.length) mdText(node, text.slice(last));
  return node;
}

function renderPrompt(container, prompt) {
  container.replaceChildren();
  if (typeof prompt === "string") { renderMarkdown(container, prompt); return; }
  for (const msg of prompt) {
    const body = el("div", { class: "msg-body" });
    renderMarkdown(body, msg.content);
    container.append(el("div", { class: "msg role-" + msg.role }, el("div", { class: "role", text: msg.role }), body));
  }
}

async function loadMe() {
  const me = await api("GET", "/api/me");
  CSRF = me.csrf_token;
  if (me.must_change_password && PAGE !== "account") { location.href = "/account"; throw Object.assign(new Error("redirect"), { redirected: true }); }
  return me;
}

function wireLogout() {
  const b = $("logout");
  if (b) b.addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (e) { /* already logged out */ } finally { location.href = "/login"; }
  });
}

// ---------------------------------------------------------------- login and account

function safeNext() {
  const next = new URLSearchParams(location.search).get("next") || "/";
  return next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") ? next : "/";
}

function loginPage() {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").textContent = "";
    try {
      const r = await api("POST", "/api/login", { name: $("login-name").value, password: $("login-password").value });
      location.href = r.must_change_password ? "/account" : safeNext();
    } catch (e) {
      $("login-error").textContent = e.status === 401 ? T.login_failed : e.message;
    }
  });
}

async function accountPage() {
  const me = await loadMe();
  $("password-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("password-error").textContent = "";
    if ($("new-password").value !== $("new-password-2").value) { $("password-error").textContent = T.passwords_differ; return; }
    try {
      await api("POST", "/api/me/password", { current_password: $("current-password").value, new_password: $("new-password").value });
      toast(T.password_changed);
      if (me.must_change_password) location.href = "/";
      else ev.target.reset();
    } catch (e) {
      if (!e.redirected) $("password-error").textContent = e.message;
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

const BASE = "/api/projects/" + encodeURIComponent(PROJECT || "");
const state = { project: null, item: null, editing: null, choice: null, ranked: [], tiePending: false,
                discard: false, thumb: null, rating: null, editFor: null, editOriginal: null, diff: false,
                key: null, shownAt: 0, busy: false };

function kinds() { return state.project.kinds && state.project.kinds.length ? state.project.kinds : [state.project.task]; }
function asks(kind) { return kinds().includes(kind); }
function pairwise() { return asks("pairwise"); }
function ranking() { return asks("ranking"); }
function comparison() { return pairwise() || ranking(); }

async function annotatePage() {
  await loadMe();
  state.project = await api("GET", BASE);
  const p = state.project;
  $("guidelines-body").innerHTML = state.project.guidelines_html;  // sanitised Markdown (raw HTML off)
  const help = [pairwise() ? T.keys_pairwise : ranking() ? T.keys_ranking : asks("binary") ? T.keys_binary
                : asks("rating") ? T.keys_rating : T.keys_common];
  if (asks("critique")) help.push(T.keys_critique);
  if (asks("edit")) help.push(T.keys_edit);
  if (p.diff) help.push(T.keys_diff);
  $("keys-help").textContent = help.join(" ");
  $("pairwise-buttons").hidden = !pairwise();
  $("ranking-buttons").hidden = pairwise();  // the discard button of every other kind
  $("ranking-box").hidden = !ranking();
  $("binary-buttons").hidden = !asks("binary");
  $("rating-box").hidden = !asks("rating");
  $("critique-label").hidden = !asks("critique");
  $("edit-label").hidden = !asks("edit");
  $("btn-diff").hidden = !p.diff;
  if (asks("rating")) buildScale();
  if (!p.allow_tie) $("btn-tie").hidden = true;
  if (!p.allow_discard) { $("btn-discard").hidden = true; $("btn-rank-discard").hidden = true; }
  if (p.rationale === "off") $("rationale-label").hidden = true;
  if (p.rationale === "required") $("rationale-text").textContent = T.rationale_required;
  for (const b of document.querySelectorAll("[data-choice]")) b.addEventListener("click", () => choose(b.dataset.choice));
  for (const b of document.querySelectorAll("[data-thumb]")) b.addEventListener("click", () => setThumb(b.dataset.thumb));
  $("btn-rank-discard").addEventListener("click", () => { state.discard = !state.discard; renderSelection(); });
  $("btn-diff").addEventListener("click", toggleDiff);
  $("edit").addEventListener("focus", fillEdit);
  $("edit").addEventListener("input", renderEditDiff);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  $("back-to-queue").addEventListener("click", () => run(next));
  $("history-box").addEventListener("toggle", () => { if ($("history-box").open) loadHistory(); });
  const ol = $("ranking");
  ol.addEventListener("dragover", (ev) => ev.preventDefault());
  ol.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const pos = parseInt(ev.dataTransfer.getData("text/plain"), 10);
    const target = ev.target.closest("li");
    moveRanked(pos, target ? parseInt(target.dataset.pos, 10) : null);
  });
  document.addEventListener("keydown", onKey);
  await run(next);
}

// The Likert scale: one button per point, the ends named when the project names them.
function buildScale() {
  const [lo, hi] = state.project.scale || [1, 5];
  const ends = state.project.scale_labels || ["", ""];
  const box = $("rating-scale");
  box.replaceChildren();
  if (ends[0]) box.append(el("span", { class: "end", id: "scale-low", text: ends[0] }));
  for (let v = lo; v <= hi; v++) {
    const b = el("button", { type: "button", id: "rating-" + v, "data-rating": String(v), text: "[" + v + "] " + v });
    b.addEventListener("click", () => setRating(v));
    box.append(b);
  }
  if (ends[1]) box.append(el("span", { class: "end", id: "scale-high", text: ends[1] }));
}

// Runs one action with the page marked busy (tests and styles watch data-busy on <body>).
async function run(action) {
  if (state.busy) return;
  setBusy(true);
  try { await action(); } catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); } finally { setBusy(false); }
}

function setBusy(b) { state.busy = b; document.body.dataset.busy = b ? "1" : "0"; }

async function next() {
  const [item] = await Promise.all([api("POST", BASE + "/next"), refreshProgress()]);
  state.editing = null;
  $("edit-banner").hidden = true;
  show(item.done ? null : item, null);
  if ($("history-box").open) loadHistory();
}

// Shows a record (or "all done" when item is null); `past` preselects a past label being changed.
function show(item, past) {
  state.item = item;
  state.choice = null; state.ranked = []; state.tiePending = false; state.discard = false;
  state.thumb = null; state.rating = null; state.editFor = null; state.editOriginal = null;
  state.key = newKey(); state.shownAt = performance.now();
  $("rationale").value = past && past.rationale ? past.rationale : "";
  $("critique").value = past && past.critique ? past.critique : "";
  $("edit").value = "";
  // a new record starts with the keys working (not typing into the last record's text boxes)
  if (["rationale", "critique", "edit"].includes(document.activeElement && document.activeElement.id)) document.activeElement.blur();
  $("all-done").hidden = item !== null;
  $("item").hidden = item === null;
  for (const id of ["pairwise-buttons", "ranking-buttons", "binary-buttons", "submit", "skip"]) $(id).classList.toggle("gone", item === null);
  $("skip").classList.toggle("gone", item === null || past !== null);
  if (item === null) return;
  renderPrompt($("prompt"), item.prompt);
  $("prompt").scrollTop = 0;
  const box = $("responses");
  box.replaceChildren();
  const sugg = item.suggestion || null;
  for (const r of item.responses) {
    const label = pairwise() ? "AB"[r.position] : String(r.position + 1);
    const body = el("div", { class: "body md scroll" });
    renderMarkdown(body, r.text);
    const card = el("div", { class: "card response", id: "response-" + r.position, "data-pos": String(r.position) },
                    el("div", { class: "label", text: comparison() ? T.response + " " + label : T.response }), body);
    if (sugg) card.append(el("div", { class: "suggestion", id: "suggestion-" + r.position, text: suggestionText(sugg, r.position) }));
    if (ranking()) {
      card.draggable = true;
      card.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(r.position)));
    }
    box.append(card);
  }
  if (past) {
    if (pairwise()) state.choice = past.choice;
    else if (past.discard) state.discard = true;
    else if (past.ranks) {
      const order = past.ranks.map((rank, pos) => ({ pos, rank })).sort((a, b) => a.rank - b.rank || a.pos - b.pos);
      state.ranked = order.map((o, k) => ({ pos: o.pos, tie: k > 0 && o.rank === order[k - 1].rank }));
    }
    state.thumb = past.thumb || null;
    state.rating = past.rating === undefined ? null : past.rating;
    if (past.edit) { state.editFor = targetPos(); state.editOriginal = targetText(); $("edit").value = past.edit; }
  }
  if (asks("edit") && !comparison() && !past) fillEdit();  // one answer: start from it (unchanged = fine as is)
  if (state.diff) renderDiff();
  renderSelection();
}

function suggestionText(sugg, pos) {
  if (sugg.label && !comparison()) return T.model_thumb + ": " + (sugg.label === "up" ? "👍" : "👎") + " (" + sugg.scores[pos].toFixed(2) + ")";
  if (state.project.suggest === "ranking") return T.model_says + ": #" + sugg.ranks[pos];
  return T.model_says + ": " + sugg.scores[pos].toFixed(2) + (comparison() ? " · #" + sugg.ranks[pos] : "");
}

async function refreshProgress() {
  const p = await api("GET", BASE + "/progress");
  $("p-done").textContent = p.done; $("p-assigned").textContent = p.assigned; $("p-total").textContent = p.total;
  $("p-skipped").textContent = p.skipped;
  const denom = Math.max(1, p.done + p.available);
  $("p-bar").style.width = Math.round(100 * p.done / denom) + "%";
}

function choose(c) { state.choice = state.choice === c ? null : c; renderSelection(); }
function setThumb(t) { state.thumb = state.thumb === t ? null : t; state.discard = false; renderSelection(); }
function setRating(v) {
  const [lo, hi] = state.project.scale || [1, 5];
  if (v < lo || v > hi) return;
  state.rating = v; state.discard = false; renderSelection();
}

function ranksFromList() {
  // competition ranking: a row tied with the one above shares its rank
  const ranks = new Array(state.item.responses.length).fill(null);
  let r = 0;
  state.ranked.forEach((row, i) => { if (!(row.tie && i > 0)) r = i + 1; ranks[row.pos] = r; });
  return ranks;
}

// The answer a critique or edit is about (display position): the one the judgement puts first,
// the first shown among equals (the server picks the same one); null while undecided.
function targetPos() {
  if (!comparison()) return 0;
  if (pairwise()) return state.choice === "A" || state.choice === "tie" ? 0 : state.choice === "B" ? 1 : null;
  if (!state.ranked.length) return null;
  const ranks = ranksFromList();
  const best = Math.min(...ranks.filter((r) => r !== null));
  return ranks.findIndex((r) => r === best);
}

function targetText() {
  const pos = targetPos();
  return pos === null ? null : state.item.responses[pos].text;
}

// Fills the edit box with the answer to correct (once per target; typed corrections are kept).
function fillEdit() {
  if (!state.item || !asks("edit")) return;
  const pos = targetPos();
  if (pos === null || pos === state.editFor) return;
  const untouched = state.editFor === null || $("edit").value === state.editOriginal;
  if (!untouched) return;
  state.editFor = pos; state.editOriginal = state.item.responses[pos].text;
  $("edit").value = state.editOriginal;
  renderEditDiff();
}

function moveRanked(pos, beforePos) {
  if (Number.isNaN(pos) || !state.item) return;
  const existing = state.ranked.findIndex((row) => row.pos === pos);
  const row = existing >= 0 ? state.ranked.splice(existing, 1)[0] : { pos, tie: false };
  const at = beforePos === null ? -1 : state.ranked.findIndex((x) => x.pos === beforePos);
  if (at < 0) state.ranked.push(row); else state.ranked.splice(at, 0, row);
  state.discard = false;
  renderSelection();
}

function renderSelection() {
  if (!state.item) return;
  for (const b of document.querySelectorAll("[data-choice]")) b.classList.toggle("selected", b.dataset.choice === state.choice);
  for (const b of document.querySelectorAll("[data-thumb]")) b.classList.toggle("selected", b.dataset.thumb === state.thumb);
  for (const b of document.querySelectorAll("[data-rating]")) b.classList.toggle("selected", Number(b.dataset.rating) === state.rating);
  for (const card of document.querySelectorAll(".response")) {
    const pos = parseInt(card.dataset.pos, 10);
    card.classList.toggle("selected", pairwise() ? (state.choice === "AB"[pos]) : ranking() ? state.ranked.some((r) => r.pos === pos) : false);
  }
  $("btn-rank-discard").classList.toggle("selected", state.discard);
  if (comparison()) {
    const pos = targetPos();
    const name = pos === null ? "…" : (pairwise() ? "AB"[pos] : String(pos + 1));
    $("critique-text").textContent = T.critique_of + " " + name;
    $("edit-text").textContent = T.edit_of + " " + name;
  }
  if (!ranking()) return;
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

// ---------------------------------------------------------------- differences between two texts
// A word-level longest common subsequence; words only in the one text are marked (diff-a / diff-b).

function diffWords(a, b) {
  const x = a.split(/(\s+)/).filter((w) => w !== ""), y = b.split(/(\s+)/).filter((w) => w !== "");
  if (x.length * y.length > 4e6) return null;  // too long to compare here
  const n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const left = [], right = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { left.push([x[i], false]); right.push([y[j], false]); i++; j++; }
    else if (j >= m || (i < n && L[i + 1][j] >= L[i][j + 1])) { left.push([x[i], true]); i++; }
    else { right.push([y[j], true]); j++; }
  }
  return [left, right];
}

function diffNode(parts, cls) {
  const node = el("div", { class: "text diffed" });
  for (const [w, changed] of parts) node.append(changed && w.trim() ? el("span", { class: cls, text: w }) : w);
  return node;
}

// Pairwise: A against B. Ranking: every answer against the first shown (the first against the second).
function renderDiff() {
  const rs = state.item.responses;
  for (const r of rs) {
    const card = $("response-" + r.position), body = card.querySelector(".body");
    if (!state.diff || rs.length < 2) { renderMarkdown(body, r.text); continue; }
    const other = r.position === 0 ? rs[1] : rs[0];
    const d = diffWords(r.text, other.text);
    if (d === null) { renderMarkdown(body, r.text); continue; }
    body.replaceChildren(diffNode(d[0], r.position === 0 ? "diff-a" : "diff-b"));
  }
}

function toggleDiff() {
  if (!state.item || !state.project.diff) return;
  state.diff = !state.diff;
  $("btn-diff").classList.toggle("selected", state.diff);
  renderDiff();
}

// The correction against the answer it corrects, as it is typed.
function renderEditDiff() {
  const box = $("edit-diff");
  const fixed = $("edit").value;
  if (!asks("edit") || state.editOriginal === null || fixed === state.editOriginal) { box.hidden = true; return; }
  const d = diffWords(state.editOriginal, fixed);
  box.hidden = d === null;
  if (d) box.replaceChildren(diffNode(d[0], "diff-a"), el("hr"), diffNode(d[1], "diff-b"));
}

function onKey(ev) {
  if (state.busy) return;
  const typing = ev.target && (ev.target.tagName === "TEXTAREA" || ev.target.tagName === "INPUT");
  if (typing) {
    if (ev.key === "Escape") ev.target.blur();
    else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
    return;
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  if (k === "u") { undo(); return; }
  if (k === "h") { $("history-box").open = !$("history-box").open; return; }
  if (k === "Escape" && state.editing !== null) { run(next); return; }
  if (!state.item) return;
  if (k === "Enter") { ev.preventDefault(); submit(); return; }
  if (k === "s" && state.editing === null) { skip(); return; }
  if (k === "r" && !$("rationale-label").hidden) { ev.preventDefault(); $("rationale").focus(); return; }
  if (k === "c" && asks("critique")) { ev.preventDefault(); $("critique").focus(); return; }
  if (k === "e" && asks("edit")) {
    if (targetPos() === null) { toast(comparison() && pairwise() ? T.pick_first : T.incomplete, true); return; }
    ev.preventDefault(); $("edit").focus(); return;
  }
  if (k === "f" && state.project.diff) { toggleDiff(); return; }
  if (pairwise()) {
    const map = { "1": "A", "2": "B", "a": "A", "b": "B", "t": "tie", "d": "discard" };
    if (map[k]) {
      if ((map[k] === "tie" && !state.project.allow_tie) || (map[k] === "discard" && !state.project.allow_discard)) return;
      choose(map[k]);
    }
    return;
  }
  if (k === "d" && state.project.allow_discard) { state.discard = !state.discard; renderSelection(); return; }
  if (asks("binary")) {
    const map = { "1": "up", "y": "up", "+": "up", "2": "down", "n": "down", "-": "down" };
    if (map[k]) setThumb(map[k]);
    return;
  }
  if (asks("rating")) {
    const [lo, hi] = state.project.scale || [1, 5];
    if (/^[0-9]$/.test(k)) setRating(parseInt(k, 10));
    else if (k === "ArrowRight" || k === "ArrowLeft") {
      ev.preventDefault();
      const step = k === "ArrowRight" ? 1 : -1;
      setRating(state.rating === null ? (step > 0 ? lo : hi) : Math.min(hi, Math.max(lo, state.rating + step)));
    }
    return;
  }
  if (!ranking()) return;
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
  }
}

// The judgement on screen as API fields, or null (with a message) when it is incomplete.
function judgement() {
  const body = {};
  const rationale = $("rationale").value;
  if (rationale.trim()) body.rationale = rationale;
  if (pairwise()) {
    if (!state.choice) { toast(T.pick_first, true); return null; }
    body.choice = state.choice;
    if (state.choice === "discard") return body;
  } else if (state.discard) {
    body.discard = true;
    return body;
  } else if (ranking()) {
    if (state.ranked.length !== state.item.responses.length) { toast(T.incomplete, true); return null; }
    body.ranks = ranksFromList();
  } else if (asks("binary")) {
    if (!state.thumb) { toast(T.need_thumb, true); return null; }
    body.thumb = state.thumb;
  } else if (asks("rating")) {
    if (state.rating === null) { toast(T.need_rating, true); return null; }
    body.rating = state.rating;
  }
  if (asks("critique")) {
    if (!$("critique").value.trim()) { toast(T.need_critique, true); return null; }
    body.critique = $("critique").value;
  }
  if (asks("edit")) {
    if (comparison() && state.editFor !== targetPos()) fillEdit();  // the best answer changed: start again from it
    if (!$("edit").value.trim()) { toast(T.need_edit, true); return null; }
    body.edit = $("edit").value;
  }
  return body;
}

function submit() {
  if (!state.item || state.busy) return;
  const body = judgement();
  if (body === null) return;
  if (state.editing !== null) {
    run(async () => {
      await api("PUT", BASE + "/annotations/" + state.editing, body);
      toast(T.edited);
      await next();
    });
    return;
  }
  Object.assign(body, { record_id: state.item.record_id, idempotency_key: state.key,
                        duration_ms: Math.round(performance.now() - state.shownAt) });
  run(async () => {
    // A retry after a network error resends the same idempotency key: stored once.
    let lastErr = null;
    for (let attempt = 0; attempt < 3; attempt++) {
      try { await api("POST", BASE + "/annotations", body); lastErr = null; break; }
      catch (e) { lastErr = e; if (e.status) break; await new Promise((r) => setTimeout(r, 300 * (attempt + 1))); }
    }
    if (lastErr && lastErr.status === 409) {
      // the lease ran out, or another tab labelled it: never repeat the same refusal, move on
      toast(T.moved_on, true);
    } else if (lastErr) {
      throw lastErr;
    } else {
      toast(T.saved);
    }
    await next();
  });
}

function skip() {
  if (!state.item || state.busy || state.editing !== null) return;
  const recordId = state.item.record_id;
  run(async () => {
    try {
      await api("POST", BASE + "/skip", { record_id: recordId });
      toast(T.skipped);
    } catch (e) {
      if (e.status !== 409) throw e;
      toast(T.moved_on, true);
    }
    await next();
  });
}

function undo() {
  run(async () => {
    const r = await api("POST", BASE + "/undo");
    toast(r.record_id === null ? T.nothing_to_undo : T.undone);
    await next();
  });
}

function describeLabel(h) {
  if (h.discard) return T.discard;
  const parts = [];
  if (h.choice) parts.push(h.choice === "tie" ? T.tie : h.choice);
  if (h.ranks) parts.push(h.ranks.join(", "));
  if (h.thumb) parts.push(h.thumb === "up" ? "👍" : "👎");
  if (h.rating !== null && h.rating !== undefined) parts.push(String(h.rating));
  if (h.critique) parts.push("“" + (h.critique.length > 30 ? h.critique.slice(0, 30) + "…" : h.critique) + "”");
  if (h.edit) parts.push("✎");
  return parts.join(" ");
}

async function loadHistory() {
  const items = await api("GET", BASE + "/history?limit=100");
  const list = $("history-list");
  list.replaceChildren();
  if (!items.length) { list.append(el("li", { class: "muted", text: T.no_history })); return; }
  for (const h of items) {
    const prompt = typeof h.prompt === "string" ? h.prompt : h.prompt.map((m) => m.content).join(" / ");
    const b = el("button", { type: "button", class: "link", id: "history-" + h.annotation_id },
                 el("b", { text: describeLabel(h) }), " · " + (prompt.length > 60 ? prompt.slice(0, 60) + "…" : prompt));
    b.addEventListener("click", () => run(() => openPast(h.annotation_id)));
    list.append(el("li", { class: state.editing === h.annotation_id ? "current" : "" }, b));
  }
}

async function openPast(annotationId) {
  const past = await api("GET", BASE + "/annotations/" + annotationId);
  state.editing = annotationId;
  $("edit-banner").hidden = false;
  show({ record_id: past.record_id, prompt: past.prompt, responses: past.responses }, past);
  window.scrollTo(0, 0);
}

// ---------------------------------------------------------------- admin page

function fmt(x) { return x === null || x === undefined ? "–" : (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : String(x)); }
function seconds(ms) { return ms === null || ms === undefined ? "–" : (ms / 1000).toFixed(1) + " s"; }
function outcomeName(key) { return T["outcome_" + key] || key; }
function labelName(label) {
  if (Array.isArray(label)) return label.map((r) => fmt(r)).join(", ");
  return label === "0" || label === "1" ? outcomeName(label) : outcomeName(String(label));
}

function table(node, header, rows) {
  node.replaceChildren(el("tr", {}, ...header.map((h) => el("th", { text: h }))));
  for (const r of rows) node.append(el("tr", {}, ...r.map((c) => el("td", { text: fmt(c) }))));
}

async function adminPage() {
  await loadMe();
  const select = $("admin-project");
  let users = [];
  const info = {};
  async function loadProjects(selected) {
    const projects = await api("GET", "/api/projects");
    for (const p of projects) info[p.name] = p;
    select.replaceChildren(...projects.map((p) => el("option", { value: p.name, text: p.name + " (" + (p.kinds || [p.task]).join(", ") + ")" })));
    if (selected) select.value = selected;
    if (select.value) await loadProject(select.value);
  }
  async function loadProject(name) {
    const base = "/api/admin/projects/" + encodeURIComponent(name);
    const [stats, dis, anns] = await Promise.all([api("GET", base + "/stats"), api("GET", base + "/disagreements?limit=50"),
                                                  api("GET", base + "/annotations")]);
    const p = stats.progress, a = stats.agreement;
    $("admin-progress").textContent = T.complete_records + ": " + p.complete_records + " / " + p.total + " · " +
      T.annotations + ": " + p.annotations + " / " + p.target;
    const nominal = a.task === "pairwise" || a.task === "binary";
    const rows = nominal
      ? [["Fleiss κ", a.fleiss_kappa], ["Cohen κ (mean over pairs)", a.cohen_kappa], ["Krippendorff α (nominal)", a.alpha_nominal]]
      : [["Krippendorff α (ordinal)", a.alpha_ordinal], ["Krippendorff α (interval)", a.alpha_interval]];
    if (a.task === "ranking") rows.push(["Kendall τ-b (mean)", a.mean_kendall_tau]);
    const bias = a.position_bias;
    if (a.task === "pairwise") rows.push([T.position_bias, bias.first_shown_wins]);
    if (a.task === "ranking") rows.push([T.position_bias, bias.first_shown_top], ["(unbiased)", bias.expected_if_unbiased]);
    const sg = stats.suggestions || {};
    if (sg.shown) rows.push([T.model_says + " (shown / hidden)", fmt(sg.shown.agreement) + " / " + fmt(sg.hidden.agreement)]);
    const outcomes = Object.entries(stats.outcomes).map(([k, n]) => outcomeName(k) + ": " + n).join(" · ");
    rows.push([T.outcome, outcomes || "–"]);
    table($("admin-agreement"), ["", ""], rows);
    const per = p.annotators.map((u) => {
      const s = a.per_annotator[u.user] || {};
      const agree = nominal ? s.agree_with_majority : a.task === "rating" ? s.mean_abs_diff_with_others : s.tau_with_others;
      return [u.user, u.done, agree, a.task === "pairwise" ? s.first_shown_wins : s.first_shown_top, seconds(u.mean_ms)];
    });
    table($("admin-annotators"), [T.annotator, T.done, T.with_majority, T.position_bias, T.mean_time], per);
    const withWhy = anns.filter((x) => x.rationale).reverse().slice(0, 200);
    table($("admin-rationales"), [T.record, T.user, T.label, T.rationale, T.time],
          withWhy.map((x) => [x.record_id, x.user, labelName(x.label === "rank" ? x.ranks : x.label === "rating" ? x.rating : x.label), x.rationale, x.created_at.slice(0, 16).replace("T", " ")]));
    table($("admin-disagreements"), [T.record, T.agreement, T.prompt, T.labels],
          dis.map((d) => [d.record_id, d.agreement, typeof d.prompt === "string" ? d.prompt.slice(0, 80) : d.prompt.map((m) => m.content).join(" / ").slice(0, 80),
                          Object.entries(d.labels).map(([u, l]) => u + ": " + labelName(l)).join(" · ")]));
    const links = [];
    for (const f of (info[name] && info[name].formats) || ["pairs", "ranked"]) {
      for (const file of ["jsonl", "parquet"]) {
        if (links.length) links.push(" · ");
        links.push(el("a", { id: "export-" + f + (file === "jsonl" ? "" : "-parquet"), href: base + "/export?format=" + f + "&file=" + file, text: f + "." + file }));
      }
    }
    $("export-links").replaceChildren(...links);
    await loadMembers(name);
  }
  async function loadMembers(name) {
    const members = await api("GET", "/api/admin/projects/" + encodeURIComponent(name) + "/members");
    $("member-list").replaceChildren(...members.map((m) => {
      const b = el("button", { type: "button", id: "member-remove-" + m, text: T.remove });
      b.addEventListener("click", async () => {
        try { await api("DELETE", "/api/admin/projects/" + encodeURIComponent(name) + "/members/" + encodeURIComponent(m)); await loadMembers(name); }
        catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
      });
      return el("li", {}, m + " ", b);
    }));
    const candidates = users.filter((u) => u.role === "annotator" && !members.includes(u.name));
    $("member-user").replaceChildren(...candidates.map((u) => el("option", { value: u.name, text: u.name })));
  }
  async function loadUsers() {
    users = await api("GET", "/api/admin/users");
    $("user-list").replaceChildren(...users.map((u) => {
      const flags = [u.role].concat(u.active ? [] : [T.disabled]).concat(u.must_change_password ? [T.one_time] : []);
      const b = el("button", { type: "button", id: "user-" + (u.active ? "disable" : "enable") + "-" + u.name, text: u.active ? T.disable : T.enable });
      b.addEventListener("click", async () => {
        try { await api("POST", "/api/admin/users/" + encodeURIComponent(u.name) + "/" + (u.active ? "disable" : "enable")); await loadUsers(); }
        catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
      });
      return el("li", { class: u.active ? "" : "muted" }, u.name + " (" + flags.join(", ") + ") ", b);
    }));
  }
  select.addEventListener("change", () => loadProject(select.value));
  $("project-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      await api("POST", "/api/admin/projects", { name: f.get("name"), task: f.get("task"),
        overlap: parseInt(f.get("overlap"), 10), guidelines: f.get("guidelines") });
      await loadProjects(f.get("name"));
    } catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
  });
  $("member-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!select.value || !$("member-user").value) return;
    try {
      await api("POST", "/api/admin/projects/" + encodeURIComponent(select.value) + "/members", { user: $("member-user").value });
      await loadMembers(select.value);
    } catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
  });
  $("user-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      const projects = f.get("member") && select.value ? [select.value] : [];
      const u = await api("POST", "/api/admin/users", { name: f.get("name"), role: f.get("role"), projects });
      $("user-result").textContent = T.new_password + " " + u.name + ": " + u.password;
      await loadUsers();
      if (select.value) await loadMembers(select.value);
    } catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
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
    } catch (e) { if (!e.redirected) toast(T.error + ": " + e.message, true); }
  });
  await loadUsers();
  await loadProjects();
}

// ---------------------------------------------------------------- start

wireLogout();
const pages = { login: loginPage, account: accountPage, projects: projectsPage, annotate: annotatePage, admin: adminPage };
if (pages[PAGE]) {
  Promise.resolve().then(pages[PAGE]).catch((e) => { if (!e.redirected) toast(T.error + ": " + e.message, true); });
}
