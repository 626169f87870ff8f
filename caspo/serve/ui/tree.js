// The CaT tree page (caspo/serve/tree_page.py): plain JavaScript and SVG, no build step, nothing fetched
// from anywhere but this server. It streams POST /v1/solve/stream with tree_events (NDJSON lines:
// {"search"}, {"tree": [nodes]}, {"step"}, {"result"}) for CaT and for greedy, and redraws each tree
// as its nodes arrive.
"use strict";

const TOKEN_KEY = "caspo-token";
const SVGNS = "http://www.w3.org/2000/svg";
const W = 172, H = 58, GX = 14, GY = 44;  // node box and gaps (px)
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 2) => (typeof x === "number" ? x.toFixed(d) : String(x));

// ---- the server: token, errors, streams ------------------------------------------------------------
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(resp) {
  let text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) text = body.error.message;
    else if (body.detail) text = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : String(body.detail);
  } catch (_) { /* not JSON: the text as it came */ }
  return new HttpError(resp.status, `HTTP ${resp.status}: ${text}`);
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function refused(e) {
  showError(e.message);
  if (e.status === 401) { $("token-box").hidden = false; $("token").focus(); }
}

async function stream(body, view) {
  const resp = await fetch("/v1/solve/stream", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    buf += decoder.decode(value || new Uint8Array(), { stream: !done });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) view.event(JSON.parse(line));
    }
    if (done) break;
  }
  if (buf.trim()) view.event(JSON.parse(buf));
  if (!view.result) throw new Error(`${view.name}: the stream ended without an answer (the server stopped the search)`);
}

// ---- one search's view: its tree and summary --------------------------------------------------------
const REASONS = {
  under_tau: (s) => `pruned: C under τ ${fmt(s.tau)}`,
  width: (s) => `dropped: not among the ${s.width || s.k} kept`,
  outranked: () => "dropped: cannot beat an answer",
};

function why(node, search) {
  if (node.reason && REASONS[node.reason]) return REASONS[node.reason](search || {});
  if (node.status === "completed") return "completed";
  if (node.status === "dead") return "ended without an answer";
  if (node.status === "truncated") return "stopped: max steps";
  return "";
}

function colour(c) { return `hsl(${Math.round(120 * Math.max(0, Math.min(1, c)))}, 70%, 78%)`; }

function el(tag, attrs, parent, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function clip(text, n = 27) { return text.length > n ? text.slice(0, n - 1) + "…" : text; }

class View {
  constructor(name, question) {
    this.name = name;
    this.question = question;
    this.nodes = new Map();
    this.search = null;
    this.result = null;
    this.chosen = new Set();
    this.svg = $(name + "-tree");
    this.summary = $(name + "-summary");
    this.summary.textContent = "searching …";
    this.draw();
  }

  event(ev) {
    if (ev.search) {
      this.search = ev.search;
      if (this.name === "cat") $("cat-search").textContent = describe(ev.search);
    }
    if (ev.tree) {
      for (const n of ev.tree) this.nodes.set(n.id, n);
      this.summary.textContent = `searching … ${this.nodes.size} steps proposed`;
      this.draw();
    }
    if (ev.result) {
      this.result = ev.result;
      this.chosen = new Set(ev.result.has_answer ? chosenPath(this.nodes, ev.result.steps.map((s) => s.text)) : []);
      this.draw();
      this.summarize();
    }
  }

  summarize() {
    const r = this.result, p = this.name;
    this.summary.innerHTML = "";
    const add = (label, id, value) => {
      const span = document.createElement("span");
      span.append(label + " ");
      const b = document.createElement("b");
      b.id = `${p}-${id}`;
      b.textContent = value;
      span.append(b, "  ");
      this.summary.append(span);
    };
    add("answer", "answer", r.has_answer ? r.answer : r.reason);
    add("confidence", "confidence", fmt(r.confidence, 3));
    add("tokens", "tokens", String(r.tokens_generated));
    add("latency", "latency", `${fmt(r.seconds, 2)} s`);
    add("policy", "policy", `v${r.policy_version}`);
    if (p === "cat") add("pruned", "pruned", String(r.branches_pruned));
  }

  draw() {
    const svg = this.svg;
    svg.replaceChildren();
    const kids = new Map([[0, []]]);
    for (const n of [...this.nodes.values()].sort((a, b) => a.id - b.id)) {
      if (!kids.has(n.parent)) kids.set(n.parent, []);
      kids.get(n.parent).push(n.id);
    }
    const pos = new Map();
    let slots = 0, depth = 0;
    const place = (id, d) => {  // leaves in order, a parent centred over its children
      depth = Math.max(depth, d);
      const ch = kids.get(id) || [];
      if (!ch.length) { pos.set(id, { x: slots++, d }); return; }
      ch.forEach((c) => place(c, d + 1));
      pos.set(id, { x: (pos.get(ch[0]).x + pos.get(ch[ch.length - 1]).x) / 2, d });
    };
    place(0, 0);
    svg.setAttribute("width", slots * (W + GX) + GX);
    svg.setAttribute("height", (depth + 1) * (H + GY) + GY / 2);
    const X = (id) => GX + pos.get(id).x * (W + GX), Y = (id) => GY / 2 + pos.get(id).d * (H + GY);
    const edges = el("g", { class: "edges" }, svg), marks = el("g", { class: "marks" }, svg), boxes = el("g", { class: "nodes" }, svg);
    for (const n of this.nodes.values()) {
      const x1 = X(n.parent) + W / 2, y1 = Y(n.parent) + H, x2 = X(n.id) + W / 2, y2 = Y(n.id), ym = (y1 + y2) / 2;
      const cls = ["edge", n.status, this.chosen.has(n.id) ? "chosen" : ""].join(" ").trim();
      el("path", { class: cls, d: `M${x1},${y1} C${x1},${ym} ${x2},${ym} ${x2},${y2}`, "data-id": n.id }, edges);
    }
    for (const [id, ch] of kids) {  // branch points: a parent whose children were chosen among siblings
      const first = this.nodes.get(ch[0]);
      if (!first || !first.branched) continue;
      const x = X(id) + W / 2, y = Y(id) + H + 7;
      const g = el("g", { class: "expansion", "data-id": id }, marks);
      el("path", { d: `M${x},${y - 6} L${x + 6},${y} L${x},${y + 6} L${x - 6},${y} Z` }, g);
      const s = this.search || {};
      const label = first.uncertainty == null ? `branched ×${s.k || ch.length}` : `${s.uncertainty || "H"} ${fmt(first.uncertainty)} > ${fmt(s.branch_threshold)}`;
      el("text", { x: x + 9, y: y + 4 }, g, label);
    }
    const root = el("g", { class: "node root" }, boxes);
    el("rect", { class: "node", x: X(0), y: Y(0), width: W, height: H, rx: 6 }, root);
    el("text", { x: X(0) + 6, y: Y(0) + 16 }, root, "question");
    el("text", { x: X(0) + 6, y: Y(0) + 32 }, root, clip(this.question));
    el("title", {}, root, this.question);
    for (const n of this.nodes.values()) {
      const chosen = this.chosen.has(n.id);
      const g = el("g", { class: `node ${n.status}${chosen ? " chosen" : ""}`, "data-id": n.id, "data-parent": n.parent }, boxes);
      const x = X(n.id), y = Y(n.id), reason = why(n, this.search);
      el("rect", { class: "node", x, y, width: W, height: H, rx: 6, fill: colour(n.c) }, g);
      el("text", { class: "step", x: x + 6, y: y + 15 }, g, clip(n.step || "(no step)"));
      el("text", { class: "meta", x: x + 6, y: y + 31 }, g, `c ${fmt(n.c)} · C ${fmt(n.C)}`);
      if (reason) el("text", { class: "why", x: x + 6, y: y + 47 }, g, reason);
      el("title", {}, g, `${n.step}\nc = ${fmt(n.c, 4)}, C = ${fmt(n.C, 4)}, ${n.tokens} tokens, mean entropy ${fmt(n.mean_entropy, 3)}\n${n.status}${reason ? ": " + reason : ""}`);
    }
  }
}

function chosenPath(nodes, steps) {
  // the completed branch whose steps are the answer's: walk down from the question matching each step
  const kids = new Map();
  for (const n of nodes.values()) { if (!kids.has(n.parent)) kids.set(n.parent, []); kids.get(n.parent).push(n); }
  const walk = (id, i) => {
    if (i === steps.length) return nodes.get(id) && nodes.get(id).status === "completed" ? [] : null;
    for (const c of kids.get(id) || []) {
      if (c.step !== steps[i]) continue;
      const rest = walk(c.id, i + 1);
      if (rest) return [c.id, ...rest];
    }
    return null;
  };
  return walk(0, 0) || [];
}

function describe(s) {
  const parts = [`method ${s.method}`, `k ${s.k}`, `τ ${fmt(s.tau)}`, `scoring ${s.scoring}`];
  if (s.method === "cat") {
    parts.push(`branching ${s.branching}`);
    if (s.branching === "adaptive") parts.push(`threshold ${fmt(s.branch_threshold)} nats (${s.uncertainty})`);
    parts.push(`width ${s.width || s.k}`, `τ prunes on ${s.prune_scoring || s.scoring}`);
  }
  parts.push(`max steps ${s.max_steps}`, `temperature ${fmt(s.temperature)}`, `seed ${s.seed}`);
  return parts.join(" · ");
}

function compare(cat, greedy) {
  const a = cat.result, b = greedy.result, out = $("compare");
  if (!a || !b) { out.textContent = ""; return; }
  const sa = a.steps.map((s) => s.text), sb = b.steps.map((s) => s.text);
  let i = 0;
  while (i < sa.length && i < sb.length && sa[i] === sb[i]) i++;
  const where = i === sa.length && i === sb.length ? "CaT took greedy's path" : `CaT leaves greedy's path at step ${i + 1}`;
  const same = a.has_answer && b.has_answer && a.answer === b.answer;
  out.textContent = same ? `Same answer as CaT (${a.answer}); ${where}.` : `CaT changed the answer: greedy ${b.has_answer ? b.answer : "(" + b.reason + ")"} → CaT ${a.has_answer ? a.answer : "(" + a.reason + ")"}; ${where}.`;
}

// ---- the page ---------------------------------------------------------------------------------------
function options(select, values, chosen) {
  for (const v of values) {
    const o = document.createElement("option");
    o.value = o.textContent = v;
    if (v === chosen) o.selected = true;
    select.append(o);
  }
}

async function loadInfo() {
  const resp = await fetch("/ui/info", { headers: headers() });
  if (!resp.ok) throw await errorOf(resp);
  const info = await resp.json();
  const c = info.calibration;
  $("info").innerHTML = "";
  const put = (label, id, value) => {
    const b = document.createElement("b");
    b.id = id;
    b.textContent = value;
    $("info").append(label + " ", b, "   ");
  };
  put("model", "model", info.model);
  put("policy", "policy-version", `v${info.policy_version}`);
  put("calibration: τ", "cal-tau", fmt(c.tau));
  put("threshold", "cal-threshold", `${fmt(c.branch_threshold)} nats (${c.uncertainty})`);
  put("from", "cal-source", c.source);
  if (!$("method").options.length) {
    options($("method"), info.choices.method, info.method);
    options($("branching"), info.choices.branching);
    options($("scoring"), info.choices.scoring);
    $("k").max = info.limits.max_k;
  }
  return info;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function solve(ev) {
  ev.preventDefault();
  showError("");
  $("compare").textContent = "";
  $("cat-search").textContent = "";
  const question = $("question").value;
  const body = { question, tree_events: true, method: $("method").value || undefined };
  for (const f of ["k", "tau", "branch_threshold", "seed"]) body[f] = number(f);
  for (const f of ["branching", "scoring"]) body[f] = $(f).value || undefined;
  $("cat-title").textContent = body.method === "cat" || !body.method ? "CaT" : `${body.method} (as asked)`;
  const cat = new View("cat", question), greedy = new View("greedy", question);
  $("solve").disabled = true;
  const runs = [stream(body, cat), stream({ question, tree_events: true, method: "greedy", seed: body.seed }, greedy)];
  const failed = (await Promise.allSettled(runs)).filter((r) => r.status === "rejected");
  $("solve").disabled = false;
  for (const view of [cat, greedy]) if (!view.result) view.summary.textContent = "";
  if (failed.length) return refused(failed[0].reason);
  compare(cat, greedy);
  document.body.dataset.solved = String(Number(document.body.dataset.solved || 0) + 1);
}

async function saveToken(ev) {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token-box").hidden = true;
  showError("");
  loadInfo().catch(refused);
}

$("ask").addEventListener("submit", solve);
$("token-box").addEventListener("submit", saveToken);
loadInfo().catch(refused);
