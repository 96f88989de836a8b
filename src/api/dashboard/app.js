// Godel's dashboard: plain DOM, no framework, nothing loaded from elsewhere.
//
// - The API key lives in sessionStorage (this tab only). Every call sends it
//   as a bearer credential; a 401 forgets it and asks again.
// - Live: one WebSocket on /api/v1/events, credential as its first message,
//   subscribed to every event. An event updates what it touches: the row of
//   its object, or one small resource re-read at most once per THROTTLE.
//   Data is never rendered as HTML (textContent only).
// - The only timer that reads the API is a slow safety net (REFRESH_MS).
"use strict";

const KEY_STORE = "godel.key";
const REFRESH_MS = 15000;
const FEED_MAX = 200;
const FEED_SHORT = 12;
const CHART_WINDOW_MS = 10 * 60 * 1000;
const CHART_POINTS_MAX = 1200;
const TASK_PAGE = 100;
const TASK_FETCH_MAX = 20;
const TASK_ROWS_MAX = 300;
const PENDING_MAX = 1000;
const RECONNECT_MAX_MS = 30000;
const THROTTLE = { depth: 1000, cluster: 1000, tasks: 500, dead: 2000, fleet: 1000 };
const PRIORITIES = ["critical", "high", "medium", "low"];
const COLORS = { critical: "#d64545", high: "#e08a1e", medium: "#3b7dd8", low: "#7a869a" };
const STATUSES = [
  "awaiting_approval", "waiting", "pending", "scheduled", "leased", "running",
  "completed", "failed", "cancelled", "dead_letter",
];
const ENDED = new Set(["completed", "failed", "cancelled", "dead_letter"]);

const S = {
  key: sessionStorage.getItem(KEY_STORE),
  tab: "overview",
  ws: null,
  // Where to resume the event stream: seq per Raft group (0: the meta
  // group; with several queue shards each numbers its own events).
  lastSeq: null,
  backoff: 1000,
  reconnectTimer: null,
  tasks: new Map(),
  taskCursor: null,
  filter: { status: "", priority: "", tenant: "" },
  selected: null,
  pendingTasks: new Set(),
  nodes: [],
  cluster: null,
  gateways: new Map(),
  sessionsPerGateway: new Map(),
  depthSamples: [],
  feed: [],
  dirty: new Set(),
  timers: [],
};

// ---------- small helpers

const $ = (id) => document.getElementById(id);

/** An element with a class (optional) and children (nodes or text). */
function el(tag, cls, ...children) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const c of children) {
    e.append(c instanceof Node ? c : String(c ?? ""));
  }
  return e;
}

function badge(text, kind) {
  return el("span", "badge " + (kind || text), text);
}

function ago(ms) {
  if (ms == null) return "";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function since(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? "" : ago(Date.now() - t);
}

function json(v) {
  return v == null ? "" : JSON.stringify(v, null, 2);
}

function emptyRow(text, columns) {
  const td = el("td", "muted", text);
  td.colSpan = columns;
  return el("tr", "", td);
}

function clearRows(table) {
  const body = $(table).tBodies[0];
  body.replaceChildren();
  return body;
}

function notice(text, kind) {
  const n = el("div", "notice " + (kind || "info"), text);
  const close = el("button", "link", "dismiss");
  close.type = "button";
  close.addEventListener("click", () => n.remove());
  n.append(" ", close);
  $("notices").prepend(n);
  while ($("notices").children.length > 4) $("notices").lastChild.remove();
  if (kind !== "error") setTimeout(() => n.remove(), 15000);
}

/** Runs `fn` at most once per `ms`, trailing: calls in between coalesce. */
function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(async () => {
      timer = null;
      last = Date.now();
      try {
        await fn();
      } catch (e) {
        report(e);
      }
    }, wait);
  };
}

function report(e) {
  if (e && e.auth) return;
  notice(String(e && e.message ? e.message : e), "error");
}

// ---------- the API

class ApiError extends Error {
  constructor(status, code, message) {
    super(code ? `${code} (${status}): ${message}` : `${status}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + S.key }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  let data = null;
  try {
    data = await r.json();
  } catch (_) {
    data = null;
  }
  if (r.status === 401) {
    signOut("The key was refused (401): enter it again.");
    const e = new ApiError(401, "unauthenticated", "sign in again");
    e.auth = true;
    throw e;
  }
  if (!r.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(r.status, err.code, err.message || r.statusText);
  }
  return data;
}

const get = (path) => api("GET", path);
const post = (path, body) => api("POST", path, body ?? {});

/** Loads into a section, showing a 403 there rather than as an error. */
async function guarded(msgId, load) {
  try {
    await load();
    if (msgId) $(msgId).textContent = "";
  } catch (e) {
    if (e.status === 403 && msgId) {
      $(msgId).textContent = "Not allowed for this key: " + e.message;
    } else {
      throw e;
    }
  }
}

// ---------- sign-in

function signOut(why) {
  sessionStorage.removeItem(KEY_STORE);
  S.key = null;
  stopLive();
  $("app").hidden = true;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("key").value = "";
  $("key").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  S.key = key;
  try {
    await get("/api/v1/queue/depth");
  } catch (e) {
    if (!e.auth) $("login-error").textContent = e.message;
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  start();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  showTab(tabFromHash());
  connect();
  S.timers.push(setInterval(safetyNet, REFRESH_MS));
  S.timers.push(setInterval(drawChart, 5000));
}

function stopLive() {
  for (const t of S.timers) clearInterval(t);
  S.timers = [];
  clearTimeout(S.reconnectTimer);
  if (S.ws) {
    S.ws.onclose = null;
    S.ws.close();
    S.ws = null;
  }
  S.lastSeq = null;
  setConn("offline", "off");
}

// ---------- tabs

const TAB_LOADERS = {
  overview: () => [refresh.cluster(), refresh.depth()],
  tasks: () => [refresh.tasks(), refresh.taskRows()],
  dead: () => [refresh.dead()],
  fleet: () => [refresh.fleet()],
  events: () => [],
};

function tabFromHash() {
  const t = location.hash.replace("#", "");
  return t in TAB_LOADERS ? t : "overview";
}

function showTab(tab) {
  S.tab = tab;
  for (const a of document.querySelectorAll("#tabs a")) {
    a.classList.toggle("active", a.dataset.tab === tab);
  }
  for (const name of Object.keys(TAB_LOADERS)) {
    $("tab-" + name).hidden = name !== tab;
  }
  if (S.dirty.has(tab)) {
    S.dirty.delete(tab);
    TAB_LOADERS[tab]();
  }
}

/** Marks what an event touched: reloaded now if shown, else when shown. */
function touch(tab, reload) {
  if (S.tab === tab) {
    reload();
  } else {
    S.dirty.add(tab);
  }
}

// ---------- loaders (each throttled)

async function loadCluster() {
  await guarded("cluster-msg", async () => {
    const [cluster, nodes] = await Promise.all([get("/api/v1/cluster"), get("/api/v1/nodes")]);
    S.cluster = cluster;
    S.nodes = nodes.items;
    renderCluster();
  });
}

async function loadDepth() {
  const d = await get("/api/v1/queue/depth");
  S.depthSamples.push({ t: Date.now(), p: d.by_priority });
  const cut = Date.now() - CHART_WINDOW_MS;
  while (S.depthSamples.length > 2 && (S.depthSamples[1].t < cut || S.depthSamples.length > CHART_POINTS_MAX)) {
    S.depthSamples.shift();
  }
  renderDepth(d);
}

function taskQuery(cursor) {
  const q = new URLSearchParams({ limit: String(TASK_PAGE) });
  for (const [k, v] of Object.entries(S.filter)) if (v) q.set(k, v);
  if (cursor) q.set("cursor", cursor);
  return "/api/v1/tasks?" + q;
}

/**
 * The first page of the list (the API pages oldest first), merged into the
 * rows the page knows (tasks events brought in stay), or replacing them
 * when the filter changed.
 */
async function loadTasks(replace) {
  const page = await get(taskQuery(null));
  if (replace) {
    S.tasks.clear();
    S.pendingTasks.clear();
  }
  for (const t of page.items) S.tasks.set(t.id, t);
  S.taskCursor = replace || S.taskCursor == null ? page.next_cursor : S.taskCursor;
  renderTasks();
  if (S.selected != null) await loadDetail(S.selected);
}

async function moreTasks() {
  if (!S.taskCursor) return;
  const page = await get(taskQuery(S.taskCursor));
  for (const t of page.items) S.tasks.set(t.id, t);
  S.taskCursor = page.next_cursor;
  renderTasks();
}

function matchesFilter(t) {
  const f = S.filter;
  return (!f.status || t.status === f.status) && (!f.priority || t.priority === f.priority) && (!f.tenant || t.tenant === f.tenant);
}

/**
 * Re-reads the tasks events named: at most TASK_FETCH_MAX per call, the
 * newest first. Under a flood, rows on the page wait for the next call and
 * new tasks past the bound are not shown; the list keeps TASK_ROWS_MAX rows.
 */
async function flushTasks() {
  const ids = [...S.pendingTasks].sort((a, b) => b - a).slice(0, TASK_FETCH_MAX);
  for (const id of ids) S.pendingTasks.delete(id);
  for (const id of S.pendingTasks) if (!S.tasks.has(id)) S.pendingTasks.delete(id);
  if (S.pendingTasks.size > 0) refresh.taskRows();
  await Promise.all(
    ids.map(async (id) => {
      try {
        const t = await get("/api/v1/tasks/" + id);
        if (matchesFilter(t)) S.tasks.set(id, t);
        else S.tasks.delete(id);
        if (S.selected === id) renderDetail(t);
      } catch (e) {
        if (e.status !== 404) throw e;
        S.tasks.delete(id);
      }
    }),
  );
  const ordered = [...S.tasks.keys()].sort((a, b) => a - b);
  for (const id of ordered.slice(0, Math.max(0, ordered.length - TASK_ROWS_MAX))) S.tasks.delete(id);
  renderTasks();
}

async function loadDetail(id) {
  const t = await get("/api/v1/tasks/" + id);
  renderDetail(t);
}

async function loadDead() {
  const page = await get("/api/v1/dead-letter?limit=" + TASK_PAGE);
  renderDead(page);
}

async function loadFleet() {
  await guarded("gateways-msg", async () => {
    const [gws, agents] = await Promise.all([get("/api/v1/gateways"), get("/api/v1/agents")]);
    S.gateways = new Map(gws.items.map((g) => [g.id, g]));
    renderAgents(agents.items);
  });
  await guarded("sessions-msg", async () => {
    const sessions = await get("/api/v1/sessions?live=true&limit=" + TASK_PAGE);
    S.sessionsPerGateway = new Map();
    for (const s of sessions.items) {
      S.sessionsPerGateway.set(s.gateway, (S.sessionsPerGateway.get(s.gateway) || 0) + 1);
    }
    renderSessions(sessions);
  });
  renderGateways();
}

const refresh = {
  cluster: throttle(loadCluster, THROTTLE.cluster),
  depth: throttle(loadDepth, THROTTLE.depth),
  tasks: throttle(() => loadTasks(false), THROTTLE.tasks),
  taskRows: throttle(flushTasks, THROTTLE.tasks),
  dead: throttle(loadDead, THROTTLE.dead),
  fleet: throttle(loadFleet, THROTTLE.fleet),
};

function safetyNet() {
  refresh.cluster();
  refresh.depth();
  if (S.tab !== "overview") TAB_LOADERS[S.tab]();
}

function reloadAll() {
  for (const name of Object.keys(TAB_LOADERS)) S.dirty.add(name);
  S.dirty.delete(S.tab);
  refresh.cluster();
  refresh.depth();
  TAB_LOADERS[S.tab]();
}

// ---------- rendering

function renderCluster() {
  const c = S.cluster;
  const members = new Map(c.members.map((m) => [m.id, m]));
  $("cluster-summary").textContent = `leader ${c.leader ?? "none"}, term ${c.term}, seen from node ${c.node_id} (${c.state})`;
  const body = clearRows("nodes");
  for (const n of S.nodes) {
    const m = members.get(n.id);
    const healthy = n.heartbeat_age_ms < 5000;
    const row = el(
      "tr",
      n.draining ? "draining" : "",
      el("td", "", String(n.id)),
      el("td", "", n.region),
      el("td", "mono", n.api_addr),
      el("td", "", m ? m.role : "-"),
      el("td", "leader", c.leader === n.id ? "leader" : ""),
      el("td", "drain", n.draining ? badge("draining") : "no"),
      el("td", "health", badge(healthy ? "healthy" : "stale"), " ", el("span", "muted", ago(n.heartbeat_age_ms))),
    );
    row.dataset.node = n.id;
    body.append(row);
  }
}

function renderDepth(d) {
  const p = d.by_priority;
  $("depth-summary").textContent = `${d.pending} pending: ` + PRIORITIES.map((k) => `${k} ${p[k]}`).join(", ");
  const legend = $("depth-legend");
  legend.replaceChildren(...PRIORITIES.map((k) => {
    const sw = el("span", "swatch " + k);
    return el("span", "", sw, `${k} ${p[k]}`);
  }));
  const table = $("depth-tenants");
  table.tHead.replaceChildren(el("tr", "", el("th", "", "tenant"), ...STATUSES.map((s) => el("th", "", s))));
  const body = clearRows("depth-tenants");
  for (const [tenant, counts] of Object.entries(d.by_tenant)) {
    body.append(el("tr", "", el("td", "", tenant), ...STATUSES.map((s) => el("td", "num", counts[s] ?? 0))));
  }
  drawChart();
}

function drawChart() {
  const canvas = $("depth-chart");
  if (!canvas || canvas.offsetParent === null) return;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const pad = { l: 34, r: 6, t: 8, b: 18 };
  const now = Date.now();
  const t0 = now - CHART_WINDOW_MS;
  const samples = S.depthSamples;
  let top = 0;
  for (const s of samples) for (const k of PRIORITIES) top = Math.max(top, s.p[k]);
  const max = niceCeil(top);
  const x = (t) => pad.l + ((Math.max(t, t0) - t0) / CHART_WINDOW_MS) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  g.strokeStyle = "#d8dde6";
  g.fillStyle = "#6b7280";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (const v of [0, max / 2, max]) {
    g.beginPath();
    g.moveTo(pad.l, y(v));
    g.lineTo(w - pad.r, y(v));
    g.stroke();
    g.fillText(String(Math.round(v)), 4, y(v) + 4);
  }
  g.fillText("-10 min", pad.l, h - 4);
  g.fillText("now", w - pad.r - 22, h - 4);
  if (samples.length === 0) return;
  for (const k of PRIORITIES) {
    g.strokeStyle = COLORS[k];
    g.lineWidth = 2;
    g.beginPath();
    samples.forEach((s, i) => {
      // A step line: the depth held until the next sample.
      if (i === 0) g.moveTo(x(s.t), y(s.p[k]));
      else {
        g.lineTo(x(s.t), y(samples[i - 1].p[k]));
        g.lineTo(x(s.t), y(s.p[k]));
      }
    });
    g.lineTo(x(now), y(samples[samples.length - 1].p[k]));
    g.stroke();
  }
}

/** The smallest of 4, 10, 20, 50, 100, 200, ... that is at least `v`. */
function niceCeil(v) {
  if (v <= 4) return 4;
  let n = 10;
  for (;;) {
    for (const m of [1, 2, 5]) if (n * m >= v) return n * m;
    n *= 10;
  }
}

function renderTasks() {
  const body = clearRows("tasks");
  const tasks = [...S.tasks.values()].sort((a, b) => b.id - a.id);
  for (const t of tasks) {
    const row = el(
      "tr",
      "clickable" + (S.selected === t.id ? " selected" : ""),
      el("td", "num", t.id),
      el("td", "", t.tenant),
      el("td", "", badge(t.priority)),
      el("td", "status", badge(t.status)),
      el("td", "num", `${t.attempt_count}/${t.max_attempts}`),
      el("td", "", t.agent_id || ""),
      el("td", "muted", since(t.updated_at)),
    );
    row.dataset.task = t.id;
    row.addEventListener("click", () => select(t.id));
    body.append(row);
  }
  if (tasks.length === 0) body.append(emptyRow("no tasks match", 7));
  $("tasks-more").hidden = !S.taskCursor;
}

function select(id) {
  S.selected = id;
  renderTasks();
  loadDetail(id).catch(report);
}

function renderDetail(t) {
  $("task-detail").hidden = false;
  $("detail-id").textContent = String(t.id);
  const st = $("detail-status");
  st.textContent = t.status;
  st.className = "badge " + t.status;
  const fields = [
    ["tenant", t.tenant],
    ["priority", t.priority],
    ["attempts", `${t.attempt_count} of ${t.max_attempts}, leased ${t.lease_count} time(s)`],
    ["agent", t.agent_id || "-"],
    ["lease", t.lease ? `token ${t.lease.fencing_token} on ${t.lease.agent_id}, expires ${t.lease.expires_at}` : "-"],
    ["session key", t.session_key || "-"],
    ["capabilities", (t.capabilities || []).join(", ") || "-"],
    ["region", t.region ? `${t.region} (${t.region_required ? "required" : "preferred"})` : "-"],
    ["waiting for", t.waiting_for || "-"],
    ["depends on", (t.depends_on || []).length ? `${t.depends_on.join(", ")} (if one fails: ${t.on_dependency_failure})` : "-"],
    ["approval", approvalText(t.approval)],
    ["next attempt", t.next_attempt_at || "-"],
    ["created", t.created_at],
    ["updated", t.updated_at],
    ["trace", t.trace_id],
  ];
  $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  $("detail-error").textContent = t.error || "-";
  $("detail-result").textContent = t.result == null ? "-" : json(t.result);
  $("detail-payload").textContent = json(t.payload);
  $("detail-cancel").disabled = ENDED.has(t.status);
  $("detail-retry").disabled = !["failed", "cancelled", "dead_letter"].includes(t.status);
  $("detail-approve").hidden = $("detail-reject").hidden = t.status !== "awaiting_approval";
}

function approvalText(a) {
  if (!a) return "-";
  const d = a.decision;
  if (!d) return a.expires_at ? `awaited, lapses at ${a.expires_at}` : "awaited";
  return `${d.approved ? "approved" : "rejected"} by ${d.by} at ${d.at}${d.reason ? ": " + d.reason : ""}`;
}

async function taskAction(verb, body) {
  const id = S.selected;
  if (id == null) return;
  const t = await post(`/api/v1/tasks/${id}/${verb}`, body);
  notice(`Task ${id}: ${verb} accepted, now ${t.status}.`);
  renderDetail(t);
  S.pendingTasks.add(id);
  refresh.taskRows();
}

function renderDead(page) {
  const body = clearRows("dead");
  $("dead-summary").textContent = page.items.length ? `${page.items.length}${page.next_cursor ? "+" : ""}` : "none";
  for (const t of page.items) {
    const check = el("input");
    check.type = "checkbox";
    check.value = t.id;
    const replay = el("button", "", "Replay");
    replay.type = "button";
    replay.addEventListener("click", () => replayDead([t.id]).catch(report));
    const row = el(
      "tr",
      "",
      el("td", "", check),
      el("td", "num", t.id),
      el("td", "", t.tenant),
      el("td", "", badge(t.priority)),
      el("td", "num", `${t.attempt_count}/${t.max_attempts}`),
      el("td", "error", t.error || ""),
      el("td", "muted", since(t.updated_at)),
      el("td", "", replay),
    );
    row.dataset.task = t.id;
    body.append(row);
  }
}

async function replayDead(ids) {
  if (ids.length === 0) return;
  const r = await post("/api/v1/dead-letter/replay", { ids });
  notice(`Replayed ${r.replayed.length} task(s): ${r.replayed.join(", ") || "none"}.`);
  refresh.dead();
}

function renderGateways() {
  const body = clearRows("gateways");
  for (const g of S.gateways.values()) {
    const row = el(
      "tr",
      "",
      el("td", "", g.id),
      el("td", "", g.kind),
      el("td", "", g.region),
      el("td", "health", badge(g.health)),
      el("td", "circuit", badge(g.circuit)),
      el("td", "", g.owner ?? "-"),
      el("td", "num", `${S.sessionsPerGateway.get(g.id) || 0}/${g.max_sessions}`),
    );
    row.dataset.gateway = g.id;
    body.append(row);
  }
}

function renderAgents(items) {
  const body = clearRows("agents");
  for (const a of items) {
    const load = el("td", "", meter(a.current_load, a.capacity), ` ${a.current_load}/${a.capacity}`);
    const row = el(
      "tr",
      "",
      el("td", "", a.id),
      el("td", "", a.gateway),
      el("td", "", badge(a.status)),
      load,
      el("td", "", a.online_on ?? "-"),
      el("td", "muted", (a.capabilities || []).join(", ")),
    );
    row.dataset.agent = a.id;
    body.append(row);
  }
}

function meter(value, max) {
  const m = el("meter");
  m.min = 0;
  m.max = Math.max(1, max);
  m.value = value;
  return m;
}

function renderSessions(page) {
  const body = clearRows("sessions");
  for (const s of page.items) {
    body.append(
      el(
        "tr",
        "",
        el("td", "num", s.id),
        el("td", "", s.gateway),
        el("td", "", s.tenant),
        el("td", "", s.session_key ?? "-"),
        el("td", "", s.agent ?? "-"),
        el("td", "", badge(s.state)),
        el("td", "num", s.task ?? "-"),
      ),
    );
  }
  if (page.items.length === 0) body.append(emptyRow("no live sessions", 7));
}

function feedItem(e) {
  const d = e.data || {};
  const what = d.id != null ? `${d.id}` : "";
  const rest = Object.entries(d)
    .filter(([k]) => k !== "id")
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" ");
  const li = el(
    "li",
    "",
    el("span", "muted mono", `#${e.seq}`),
    el("span", "muted", new Date(e.time).toLocaleTimeString()),
    badge(e.type, e.type.replace(".", "-")),
    el("span", "", what),
    el("span", "muted", rest),
    el("span", "muted", e.tenant || ""),
  );
  return li;
}

function renderFeed() {
  $("feed").replaceChildren(...S.feed.map(feedItem));
  $("feed-short").replaceChildren(...S.feed.slice(0, FEED_SHORT).map(feedItem));
  $("feed-summary").textContent = `last ${S.feed.length} (newest first), through ${S.lastSeq ? position(S.lastSeq) : "-"}`;
}

const renderFeedSoon = throttle(renderFeed, 250);

// ---------- the event stream

function setConn(text, kind) {
  const c = $("conn");
  c.textContent = text;
  c.className = "badge " + kind;
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const q = S.lastSeq != null ? "?since=" + position(S.lastSeq) : "";
  const ws = new WebSocket(`${proto}//${location.host}/api/v1/events${q}`);
  S.ws = ws;
  let subscribed = false;
  setConn("connecting", "warn");
  ws.onopen = () => ws.send(JSON.stringify({ auth: S.key }));
  ws.onmessage = (m) => {
    let msg;
    try {
      msg = JSON.parse(m.data);
    } catch (_) {
      return;
    }
    if (msg.hello) {
      // Resuming from here after a drop replays what happens meanwhile.
      if (S.lastSeq == null) {
        S.lastSeq = {};
        for (const g of msg.hello.groups ?? [{ group: 0, seq: msg.hello.seq }]) {
          S.lastSeq[g.group] = g.seq;
        }
      }
      ws.send(JSON.stringify({ subscribe: [">"] }));
    } else if (msg.subscribed) {
      setConn("live", "on");
      S.backoff = 1000;
      // First connection: read everything now that nothing can be missed.
      if (!subscribed && q === "") reloadAll();
      subscribed = true;
    } else if (msg.gap) {
      notice(`Missed events ${msg.gap.from}..${msg.gap.to} (the node no longer holds them); reloaded the page's data.`, "warn");
      reloadAll();
    } else if (msg.lagged) {
      notice(`Fell behind the event stream; resuming from seq ${msg.lagged.resume}.`, "warn");
      S.lastSeq = parsePosition(msg.lagged.resume);
    } else if (msg.error) {
      notice(`Event stream: ${msg.error.code}: ${msg.error.message}`, "error");
    } else if (msg.seq != null) {
      if (S.lastSeq == null) S.lastSeq = {};
      S.lastSeq[msg.group ?? 0] = msg.seq;
      onEvent(msg);
    }
  };
  ws.onclose = (ev) => onClose(ws, ev);
}

// `since` for a position: the meta group's seq alone, or `g0:N,g1:M,...`.
function position(pos) {
  const groups = Object.keys(pos).map(Number).sort((a, b) => a - b);
  if (groups.length === 1 && groups[0] === 0) return String(pos[0]);
  return groups.map((g) => `g${g}:${pos[g]}`).join(",");
}

// A `lagged.resume`: a seq (the meta group's) or a position string.
function parsePosition(resume) {
  if (typeof resume === "number") return { 0: resume };
  const pos = {};
  for (const part of String(resume).split(",")) {
    const m = /^g(\d+):(\d+)$/.exec(part);
    if (m) pos[Number(m[1])] = Number(m[2]);
  }
  return pos;
}

function onClose(ws, ev) {
  if (S.ws !== ws) return;
  S.ws = null;
  if (ev.code === 4001) {
    signOut("The event stream refused the key: enter it again.");
    return;
  }
  if (ev.code === 4003) {
    setConn("no events", "off");
    notice("This key may not read the event stream; the page will only refresh every 15 s.", "warn");
    return;
  }
  setConn("reconnecting", "warn");
  S.reconnectTimer = setTimeout(connect, S.backoff);
  S.backoff = Math.min(RECONNECT_MAX_MS, S.backoff * 2);
}

function onEvent(e) {
  S.feed.unshift(e);
  if (S.feed.length > FEED_MAX) S.feed.length = FEED_MAX;
  renderFeedSoon();
  const [kind, change] = e.type.split(".");
  const d = e.data || {};
  if (kind === "task") {
    refresh.depth();
    // Off the tasks tab, ids wait (a bounded number) until it is shown.
    if (S.pendingTasks.size < PENDING_MAX) S.pendingTasks.add(d.id);
    if (S.tab === "tasks") refresh.taskRows();
    else S.dirty.add("tasks");
    if (change === "dead_lettered" || change === "retried") touch("dead", refresh.dead);
    if (["leased", "completed", "failed", "released", "lease_expired", "timed_out", "cancelled"].includes(change)) {
      touch("fleet", refresh.fleet);
    }
  } else if (kind === "node") {
    if (change === "draining" || change === "undrained") markDraining(d.id, change === "draining");
    refresh.cluster();
  } else if (kind === "gateway") {
    const g = S.gateways.get(d.id);
    if (g && change === "health") {
      g.health = d.health;
      g.circuit = d.circuit;
      renderGateways();
    } else {
      touch("fleet", refresh.fleet);
    }
  } else if (kind === "agent" || kind === "session") {
    touch("fleet", refresh.fleet);
  }
}

function markDraining(id, draining) {
  const n = S.nodes.find((x) => x.id === id);
  if (n && S.cluster) {
    n.draining = draining;
    renderCluster();
  }
}

// ---------- wiring

function wire() {
  $("login-form").addEventListener("submit", (ev) => signIn(ev).catch(report));
  $("logout").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", () => showTab(tabFromHash()));
  $("task-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    S.filter = { status: f.get("status"), priority: f.get("priority"), tenant: f.get("tenant").trim() };
    loadTasks(true).catch(report);
  });
  $("tasks-more").addEventListener("click", () => moreTasks().catch(report));
  $("detail-cancel").addEventListener("click", () => taskAction("cancel").catch(report));
  $("detail-retry").addEventListener("click", () => taskAction("retry").catch(report));
  $("detail-approve").addEventListener("click", () => taskAction("approve").catch(report));
  $("detail-reject").addEventListener("click", () => {
    const reason = window.prompt("Why reject this task?");
    if (reason) taskAction("reject", { reason }).catch(report);
  });
  $("detail-close").addEventListener("click", () => {
    S.selected = null;
    $("task-detail").hidden = true;
    renderTasks();
  });
  $("dead-replay").addEventListener("click", () => {
    const ids = [...document.querySelectorAll("#dead input:checked")].map((c) => Number(c.value));
    replayDead(ids).catch(report);
  });
  window.addEventListener("resize", drawChart);
  if (S.key) start();
  else signOut("");
}

document.addEventListener("DOMContentLoaded", wire);
