// gpuwarden dashboard: plain JavaScript, no build step. Data from /api/v1, live updates from
// the /api/v1/stream WebSocket (debounced refresh, no page reload). Host grids are drawn on
// canvas so that 10,000 hosts stay cheap to render.
"use strict";

const STATUS_COLOR = { critical: "#d93025", warning: "#f29900", unknown: "#9aa0a6", info: "#4285f4", healthy: "#1e8e3e" };
const ORDER = ["critical", "warning", "unknown", "info", "healthy"];
const CELL = 11, GAP = 2;
const $ = (sel) => document.querySelector(sel);
const state = { providers: [], hosts: [], alerts: [], incidents: [], openIncidents: new Set(), view: "overview", host: null, token: sessionStorage.getItem("gw-token") || "" };
window.gw = { renders: 0, firstRenderMs: null, hosts: 0, state };

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function toast(msg) {
  const t = $("#toast");
  t.textContent = msg;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 2500);
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.token && !headers.Authorization) headers.Authorization = `Bearer ${state.token}`;  // [api] read_tokens
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 204) return null;
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const err = new Error((body && body.message) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return body;
}

async function all(path) {
  let items = [], cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=10000${cursor ? "&cursor=" + cursor : ""}`);
    items = items.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

function fmt(v, digits = 0, unit = "") {
  return v === null || v === undefined ? "–" : `${Number(v).toFixed(digits)}${unit}`;
}

// ------------------------------------------------------------------ overview

async function loadOverview() {
  const t0 = performance.now();
  const [providers, hosts, alerts, incidents, actions] = await Promise.all([
    all("/api/v1/providers"),
    all("/api/v1/hosts"),
    all("/api/v1/alerts?fold=true"),  // one item per root: what it inhibits is folded under it
    api("/api/v1/incidents?open=true&limit=50"),
    api("/api/v1/actions?limit=50").catch(() => null),  // remediation (docs/remediation.md)
  ]);
  Object.assign(state, { providers, hosts, alerts: alerts.filter((a) => a.state !== "resolved"), incidents: incidents.items, actions });
  renderOverview();
  window.gw.renders += 1;
  window.gw.hosts = hosts.length;
  if (window.gw.firstRenderMs === null) window.gw.firstRenderMs = performance.now() - t0;
  document.body.dataset.ready = "1";
}

function renderOverview() {
  const hostsTotal = state.hosts.length;
  const gpus = state.providers.reduce((n, p) => n + p.gpus, 0);
  const usable = state.providers.reduce((n, p) => n + p.gpus_usable, 0);
  $("#fleet-summary").textContent = `${state.providers.length} providers · ${hostsTotal} hosts · ${usable}/${gpus} GPUs usable`;
  $("#providers").innerHTML = state.providers.map(providerCard).join("");
  renderAlerts($("#alerts tbody"), state.alerts);
  $("#alert-count").textContent = `(${state.alerts.length})`;
  for (const d of document.querySelectorAll("#incidents details[data-incident]")) {  // as the user left them
    if (d.open) state.openIncidents.add(d.dataset.incident);
    else state.openIncidents.delete(d.dataset.incident);
  }
  $("#incidents").innerHTML = state.incidents.length ? state.incidents.map(incidentItem).join("") : '<p class="muted">none</p>';
  renderRemediation();
  renderGrids();
  $("#host-names").innerHTML = hostsTotal <= 2000 ? state.hosts.map((h) => `<option value="${esc(h.name)}">`).join("") : "";
}

// Remediation: open circuit breakers (with Reset), recent actions, Approve / Deny for those
// awaiting approval (a write token; its name is recorded as who decided).
function renderRemediation() {
  const r = state.actions;
  const sec = $("#remediation");
  sec.hidden = !r || !r.remediation.enabled;
  if (sec.hidden) return;
  const rem = r.remediation;
  $("#remediation-summary").textContent = `(${rem.rules.map((x) => `${x.name}: ${x.mode}`).join(", ")} · ${rem.running}/${rem.max_running} running)`;
  $("#breakers").innerHTML = rem.breakers.filter((b) => b.open).map((b) =>
    `<p class="breaker"><span class="badge critical">circuit breaker open</span> <b>${esc(b.provider)}</b>: ${esc(b.reason)} <button class="breaker-reset" data-provider="${esc(b.provider)}">Reset</button></p>`).join("");
  $("#actions tbody").innerHTML = r.items.length ? r.items.map(actionRow).join("") : '<tr><td colspan="7" class="muted">none</td></tr>';
}

function actionRow(a) {
  const buttons = a.state === "awaiting_approval"
    ? `<button class="approve" data-id="${esc(a.id)}">Approve</button> <button class="deny" data-id="${esc(a.id)}">Deny</button>` : "";
  return `<tr data-action="${esc(a.id)}"><td>${esc(a.rule)}<div class="small">${esc(a.action)}</div></td>
    <td>${a.host ? `<a href="#/host/${encodeURIComponent(a.host)}">${esc(a.host)}</a>` : ""}<div class="small">node ${esc(a.node)}</div></td>
    <td>${esc(a.alert_rule)} <span class="badge ${esc(a.severity)}">${esc(a.severity)}</span></td>
    <td>${esc(a.mode)}</td>
    <td class="state">${esc(a.state)}${a.reason ? `<div class="small">${esc(a.reason)}</div>` : ""}${a.by ? `<div class="small">by ${esc(a.by)}</div>` : ""}</td>
    <td>${age(a.updated_at)}</td><td>${buttons}</td></tr>`;
}

function providerCard(p) {
  const bar = ORDER.map((s) => p.gpus_by_status[s] ? `<span class="bg-${s}" style="width:${(100 * p.gpus_by_status[s]) / Math.max(1, p.gpus)}%" title="${p.gpus_by_status[s]} ${s}"></span>` : "").join("");
  const hosts = ORDER.filter((s) => p.hosts_by_status[s]).map((s) => `<span class="badge ${s}">${p.hosts_by_status[s]} ${s}</span>`).join(" ");
  return `<div class="card ${p.status}" data-provider="${esc(p.name)}">
    <h3><span>${esc(p.name)}</span><span class="badge ${p.status}">${p.status}</span></h3>
    <div><span class="big">${p.usable_pct.toFixed(1)}%</span> <span class="muted">usable · ${p.gpus_usable}/${p.gpus} GPUs</span></div>
    <div class="bar">${bar}</div>
    <div>${p.hosts} hosts: ${hosts}</div>${driverDrift(p)}</div>`;
}

function driverDrift(p) {
  const off = p.driver_drift || [];
  if (!off.length) return "";
  const list = off.slice(0, 5).map((d) => `${esc(d.host)} (${esc(d.driver_version)})`).join(", ");
  return `<div class="small driver-drift">driver drift: ${off.length} host${off.length > 1 ? "s" : ""} off ${esc(p.driver_majority)}: ${list}${off.length > 5 ? ", …" : ""}</div>`;
}

function renderAlerts(tbody, alerts) {
  tbody.innerHTML = alerts.length ? alerts.map(alertRow).join("") : '<tr><td colspan="8" class="muted">no active alerts</td></tr>';
}

// One item per incident: its members, which are acknowledged (and whether through the
// incident), and one Acknowledge for the incident while a member is unacknowledged.
function incidentItem(i) {
  const where = i.host ? `${i.provider} / ${i.host}` : `${i.provider} (provider-wide)`;
  const live = (i.members || []).filter((m) => m.state !== "resolved");
  const members = live.map((m) => {
    const ack = m.acknowledged ? (m.ack_incident ? "acknowledged with the incident" : `acknowledged by ${m.ack_by}`) : "unacknowledged";
    return `<li class="member ${m.acknowledged ? "acked" : ""}" data-member="${esc(m.id)}">${esc(m.host || "")}${m.gpu !== null && m.gpu !== undefined ? ` gpu${esc(m.gpu)}` : ""} ${esc(m.rule)} <span class="badge ${esc(m.severity)}">${esc(m.severity)}</span> <span class="small">${esc(ack)}${m.inhibited_by ? " · inhibited" : ""}</span></li>`;
  }).join("");
  const head = i.acknowledged ? `<span class="badge info">acknowledged${i.ack ? ` by ${esc(i.ack.by)}` : ""}</span>` : `<button class="ack-incident" data-id="${esc(i.id)}">Acknowledge</button>`;
  // an incident the user opened stays open across the live re-renders
  const open = state.openIncidents.has(i.id) ? " open" : "";
  return `<details class="incident ${i.acknowledged ? "acked" : ""}" data-incident="${esc(i.id)}"${open}><summary><b>${esc(where)}</b> <span class="muted">${live.length} alerts (${i.unacknowledged} unacknowledged) · ${(i.hosts || []).length || 1} hosts · opened ${age(i.opened_at)} ago</span> ${head}</summary><ul>${members}</ul></details>`;
}

function alertRow(a) {
  const l = a.labels;
  const subject = [l.provider, l.host, l.gpu !== undefined ? `gpu${l.gpu}` : "", l.xid ? `xid ${l.xid}` : ""].filter(Boolean).join(" / ");
  const flags = Object.entries(a.flags).filter(([, v]) => v).map(([k]) => k).join(", ");
  const folded = a.folded || [];
  const acked = a.flags.acknowledged && folded.every((f) => f.flags.acknowledged);
  const group = folded.length ? `<div class="group small" title="${esc(folded.map((f) => `${f.rule} ${f.labels.gpu !== undefined ? `gpu${f.labels.gpu}` : ""}`).join(", "))}">${esc(a.group)}</div>` : "";
  return `<tr class="${acked ? "acked" : ""}${folded.length ? " grouped" : ""}" data-alert="${esc(a.id)}" data-folded="${folded.length}">
    <td><span class="badge ${esc(a.severity)}">${esc(a.severity)}</span></td>
    <td>${esc(a.rule)}<div class="small action">${esc(a.action || "")}</div>${group}</td>
    <td>${l.host ? `<a href="#/host/${encodeURIComponent(l.host)}">${esc(subject)}</a>` : esc(subject)}</td>
    <td class="advice">${esc(a.summary)}<div class="small">${esc(a.advice)}</div></td>
    <td title="${new Date((a.fired_at || a.started_at) * 1000).toISOString()}">${age(a.fired_at || a.started_at)}</td>
    <td>${a.escalation.level >= 0 ? a.escalation.level : "–"}</td>
    <td class="state">${esc(a.state)}${flags ? `<div class="small">${esc(flags)}</div>` : ""}</td>
    <td>${acked ? "" : `<button class="ack" data-id="${esc(a.id)}">Acknowledge</button>`}
        <button class="silence" data-host="${esc(l.host || "")}" data-rule="${folded.length ? "" : esc(a.rule)}">Silence</button></td></tr>`;
}

function renderGrids() {
  const byProvider = new Map();
  for (const h of state.hosts) {
    if (!byProvider.has(h.provider)) byProvider.set(h.provider, []);
    byProvider.get(h.provider).push(h);
  }
  const box = $("#grids");
  const width = Math.max(300, box.clientWidth - 22);
  const cols = Math.max(1, Math.floor(width / (CELL + GAP)));
  const existing = new Map([...box.querySelectorAll(".grid")].map((el) => [el.dataset.provider, el]));
  for (const [provider, hosts] of byProvider) {
    let el = existing.get(provider);
    if (!el) {
      el = document.createElement("div");
      el.className = "grid";
      el.dataset.provider = provider;
      el.innerHTML = `<h3></h3><canvas></canvas>`;
      el.querySelector("canvas").addEventListener("click", (ev) => gridClick(ev, el));
      el.querySelector("canvas").addEventListener("mousemove", (ev) => gridHover(ev, el));
      el.querySelector("canvas").addEventListener("mouseleave", () => { tip().style.display = "none"; });
      box.appendChild(el);
    }
    existing.delete(provider);
    el.hosts = hosts;
    el.cols = cols;
    const bad = hosts.filter((h) => h.status !== "healthy").length;
    el.querySelector("h3").textContent = `${provider} — ${hosts.length} hosts, ${bad} not healthy`;
    const c = el.querySelector("canvas");
    const rows = Math.ceil(hosts.length / cols);
    c.width = cols * (CELL + GAP);
    c.height = rows * (CELL + GAP);
    const ctx = c.getContext("2d");
    for (const status of ORDER) {  // one fillStyle change per status: cheap at 10,000 cells
      ctx.fillStyle = STATUS_COLOR[status];
      hosts.forEach((h, i) => {
        if (h.status === status) ctx.fillRect((i % cols) * (CELL + GAP), Math.floor(i / cols) * (CELL + GAP), CELL, CELL);
      });
    }
  }
  for (const el of existing.values()) el.remove();
}

function cellHost(ev, el) {
  const r = ev.target.getBoundingClientRect();
  const col = Math.floor((ev.clientX - r.left) / (CELL + GAP));
  const row = Math.floor((ev.clientY - r.top) / (CELL + GAP));
  return el.hosts[row * el.cols + col];
}

function tip() {
  let t = $("#tooltip");
  if (!t) {
    t = document.createElement("div");
    t.id = "tooltip";
    document.body.appendChild(t);
  }
  return t;
}

function gridHover(ev, el) {
  const h = cellHost(ev, el);
  const t = tip();
  if (!h) { t.style.display = "none"; return; }
  t.textContent = `${h.name}: ${h.status}, ${h.gpus_usable}/${h.gpus} GPUs usable`;
  t.style.left = `${ev.clientX + 12}px`;
  t.style.top = `${ev.clientY + 12}px`;
  t.style.display = "block";
}

function gridClick(ev, el) {
  const h = cellHost(ev, el);
  if (h) location.hash = `#/host/${encodeURIComponent(h.name)}`;
}

// ------------------------------------------------------------------ host page

async function loadHost(name) {
  const [h, alerts] = await Promise.all([
    api(`/api/v1/hosts/${encodeURIComponent(name)}`),
    all(`/api/v1/alerts?fold=true&host=${encodeURIComponent(name)}`),
  ]);
  state.hostData = h;
  $("#host-title").innerHTML = `${esc(h.name)} <span class="badge ${h.status}">${h.status}</span> <span class="muted">${esc(h.provider)} · ${h.gpus_usable}/${h.gpus} GPUs usable · driver ${esc(h.driver_version || "–")} · last seen ${age(h.last_seen)} ago</span>`;
  const problems = h.problems.concat(...h.gpu_list.map((g) => g.problems.map((p) => ({ ...p, gpu: g.index }))));
  $("#host-problems").innerHTML = problems.map((p) => `<div class="problem ${p.status}"><b>${p.gpu !== undefined ? `GPU ${p.gpu}: ` : ""}${esc(p.summary || p.check)}</b><div class="small">${esc(p.advice)}</div></div>`).join("");
  const o = h.publish_outage;  // the agent's own report of a time it could not publish: explains a gap
  if (o) $("#host-problems").insertAdjacentHTML("beforeend", `<div class="problem info outage"><b>Agent could not publish for ${fmt(o.seconds, 0, " s")} (${esc(new Date(o.since * 1000).toLocaleString())} to ${esc(new Date(o.until * 1000).toLocaleTimeString())})</b><div class="small">${o.buffered_frames} frames buffered and sent since, ${o.dropped_frames} dropped: a gap in its history is the agent's outage, not the host's.</div></div>`);
  $("#gpus tbody").innerHTML = h.gpu_list.map((g) => {
    const r = g.readings;
    const mem = r.mem_total_bytes ? `${fmt(r.mem_used_bytes / 2 ** 30, 1)} / ${fmt(r.mem_total_bytes / 2 ** 30, 0)} GiB` : "–";
    const xids = Object.entries(g.xids).map(([c, n]) => `${c}×${n}`).join(" ") || "–";
    const procs = g.processes.map((p) => `${esc(p.name || p.pid)}${p.container ? ` <span class="small">(${esc(p.container)})</span>` : ""}${p.gpu_instance_id !== null && p.gpu_instance_id !== undefined ? ` <span class="small">[GI ${p.gpu_instance_id}/CI ${p.compute_instance_id}]</span>` : ""}`).join("<br>") || "–";
    const mig = (g.mig || []).map((m) => `<div class="small mig">MIG ${esc(m.profile || "?")} GI ${m.gpu_instance_id}/CI ${m.compute_instance_id}: ${m.mem_total_bytes ? `${fmt((m.mem_used_bytes || 0) / 2 ** 30, 1)} / ${fmt(m.mem_total_bytes / 2 ** 30, 1)} GiB` : "–"}${m.pids.length ? ` · ${m.pids.length} proc` : ""}</div>`).join("");
    return `<tr><td>${g.index} <div class="small">${esc(g.name || "")}</div>${mig}</td><td><span class="badge ${g.status}">${g.status}</span>${g.lost ? " lost" : ""}</td>
      <td>${fmt(r.temp_c, 0, " °C")}</td><td>${fmt(r.util_gpu_pct, 0, " %")}</td><td>${mem}</td>
      <td>${fmt(r.power_w, 0)} / ${fmt(r.power_limit_w, 0, " W")}</td><td>${fmt(r.ecc_sbe_volatile)} / ${fmt(r.ecc_dbe_volatile)}</td>
      <td>${xids}</td><td>${procs}</td></tr>`;
  }).join("");
  renderAlerts($("#host-alerts tbody"), alerts.filter((a) => a.state !== "resolved"));
  const until = Date.now() / 1000, since = until - 1800;
  for (const metric of ["temp_c", "util_gpu_pct", "power_w"]) {  // one at a time: [api] max_heavy_queries
    try {
      const hist = await api(`/api/v1/hosts/${encodeURIComponent(name)}/history?metric=${metric}&since=${since}&until=${until}&step=15`);
      drawChart($(`#chart-${metric}`), hist.points, since, until);
    } catch (e) {
      drawChart($(`#chart-${metric}`), [], since, until);
    }
  }
}

function drawChart(canvas, points, since, until) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 36, B = 18;
  ctx.clearRect(0, 0, W, H);
  const vals = points.map((p) => p.value).filter((v) => v !== null);
  ctx.fillStyle = "#6b7280";
  ctx.font = "11px system-ui";
  if (!vals.length) { ctx.fillText("no data", W / 2 - 20, H / 2); return; }
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (hi - lo < 1) { hi += 0.5; lo -= 0.5; }
  const x = (t) => L + ((t - since) / (until - since)) * (W - L - 4);
  const y = (v) => 4 + (1 - (v - lo) / (hi - lo)) * (H - B - 8);
  ctx.strokeStyle = "#e3e6ea";
  ctx.beginPath(); ctx.moveTo(L, 4); ctx.lineTo(L, H - B); ctx.lineTo(W, H - B); ctx.stroke();
  ctx.fillText(hi.toFixed(0), 2, 12); ctx.fillText(lo.toFixed(0), 2, H - B);
  ctx.fillText("-30m", L, H - 4); ctx.fillText("now", W - 26, H - 4);
  const byGpu = new Map();
  for (const p of points) {
    if (p.value === null) continue;
    if (!byGpu.has(p.gpu)) byGpu.set(p.gpu, []);
    byGpu.get(p.gpu).push(p);
  }
  const palette = ["#4285f4", "#db4437", "#f4b400", "#0f9d58", "#ab47bc", "#00acc1", "#ff7043", "#9e9d24"];
  for (const [gpu, pts] of byGpu) {
    ctx.strokeStyle = palette[(gpu ?? 0) % palette.length];
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(x(p.ts), y(p.value)) : ctx.moveTo(x(p.ts), y(p.value))));
    ctx.stroke();
  }
}

// ------------------------------------------------------------------ actions

function askToken() {
  return new Promise((resolve) => {
    const d = $("#token-dialog");
    $("#token-input").value = state.token;
    d.onclose = () => {
      if (d.returnValue === "ok") {
        state.token = $("#token-input").value.trim();
        sessionStorage.setItem("gw-token", state.token);
      }
      resolve(state.token);
    };
    d.showModal();
  });
}

async function write(path, method, body) {
  if (!state.token) await askToken();
  const opts = { method, headers: { "Content-Type": "application/json", Authorization: `Bearer ${state.token}` }, body: JSON.stringify(body) };
  try {
    return await api(path, opts);
  } catch (e) {
    if (e.status === 401 || (e.status === 403 && e.message.includes("token is not valid"))) {
      toast("token refused");
      state.token = "";
      sessionStorage.removeItem("gw-token");
    } else if (e.status === 403) {
      toast(e.message);  // writes disabled, a read token, or another origin: says which setting
    } else {
      toast(`failed: ${e.message}`);
    }
    return null;
  }
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button");
  if (!b) return;
  if (b.id === "token-button") { await askToken(); return; }
  if (b.classList.contains("ack")) {
    const res = await write(`/api/v1/alerts/${encodeURIComponent(b.dataset.id)}/ack`, "POST", {});  // "by": the token's name
    if (res) { toast(`acknowledged ${res.rule}${res.folded && res.folded.length ? ` and ${res.folded.length} folded` : ""}`); refresh(); }
  } else if (b.classList.contains("approve") || b.classList.contains("deny")) {
    const verb = b.classList.contains("approve") ? "approve" : "deny";
    const res = await write(`/api/v1/actions/${encodeURIComponent(b.dataset.id)}/${verb}`, "POST", {});
    if (res) { toast(`${verb === "approve" ? "approved" : "denied"} ${res.rule} on ${res.host}`); refresh(); }
  } else if (b.classList.contains("breaker-reset")) {
    const res = await write(`/api/v1/remediation/breakers/${encodeURIComponent(b.dataset.provider)}/reset`, "POST", {});
    if (res) { toast(`circuit breaker of ${res.provider} reset`); refresh(); }
  } else if (b.classList.contains("ack-incident")) {
    ev.preventDefault();  // the button sits in the incident's <summary>
    const res = await write(`/api/v1/incidents/${encodeURIComponent(b.dataset.id)}/ack`, "POST", {});
    if (res) { toast(`acknowledged the incident (${res.members.length} members)`); refresh(); }
  } else if (b.classList.contains("silence")) {
    const m = [b.dataset.host ? `host=${b.dataset.host}` : "", b.dataset.rule ? `rule=${b.dataset.rule}` : ""].filter(Boolean).join(", ");  // a group: its host
    $("#silence-matchers").value = m;
    const d = $("#silence-dialog");
    d.onclose = async () => {
      if (d.returnValue !== "ok") return;
      const matchers = $("#silence-matchers").value.split(",").map((s) => s.trim()).filter(Boolean);
      const res = await write("/api/v1/silences", "POST", { matchers, duration: Number($("#silence-duration").value), comment: $("#silence-comment").value });
      if (res) { toast(`silence ${res.id} added`); refresh(); }
    };
    d.showModal();
  }
});

$("#host-search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("#host-input").value.trim();
  if (name) location.hash = `#/host/${encodeURIComponent(name)}`;
});

// ------------------------------------------------------------------ routing and live updates

// The collector's own health (/readyz "self"): a banner, so its outages are not read as the fleet's.
async function loadSelf() {
  const b = $("#self-banner");
  let msgs = [];
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    msgs = ((body.self && body.self.problems) || []).map((p) => `<b>${esc(p.summary)}</b> <span class="small">${esc(p.advice)}</span>`);
    if (!msgs.length && body.self && body.self.impaired_since) msgs = ["<b>collector pipeline impaired: host staleness suspended</b>"];
  } catch (e) {
    msgs = ["<b>the collector is not answering: what this page shows may be out of date</b>"];
  }
  b.innerHTML = msgs.map((m) => `<div>${m}</div>`).join("");
  b.hidden = msgs.length === 0;
}

async function refresh() {
  loadSelf();
  try {
    if (state.view === "host") await loadHost(state.host);
    else await loadOverview();
  } catch (e) {
    if (e.status === 401 && !state.askedForReads) {  // reads need a token ([api] read_tokens)
      state.askedForReads = true;
      toast("this collector needs a token to read");
      if (await askToken()) scheduleRefresh();
      return;
    }
    toast(e.status === 404 ? "not found" : `cannot load: ${e.message}`);
  }
}

let pending = null;
function scheduleRefresh() {
  if (pending) return;
  const wait = state.hosts.length > 2000 ? 2000 : 400;  // big fleets: fewer, larger refreshes
  pending = setTimeout(() => { pending = null; refresh(); }, wait);
}

function route() {
  const m = location.hash.match(/^#\/host\/(.+)$/);
  state.view = m ? "host" : "overview";
  state.host = m ? decodeURIComponent(m[1]) : null;
  $("#overview-view").hidden = state.view !== "overview";
  $("#host-view").hidden = state.view !== "host";
  refresh();
}

function connect(delay = 1000) {
  const auth = state.token ? `?access_token=${encodeURIComponent(state.token)}` : "";  // no headers on a WebSocket
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/stream${auth}`);
  ws.onopen = () => { $("#live").textContent = "live"; $("#live").classList.remove("off"); delay = 1000; };
  ws.onmessage = (ev) => {
    const e = JSON.parse(ev.data);
    if (e.type === "hello") return;
    if (state.view === "host" && e.host && e.host !== state.host) return;
    scheduleRefresh();
  };
  ws.onclose = () => {
    $("#live").textContent = "offline";
    $("#live").classList.add("off");
    setTimeout(() => { scheduleRefresh(); connect(Math.min(delay * 2, 30000)); }, delay);
  };
}

window.addEventListener("hashchange", route);
window.addEventListener("resize", () => state.view === "overview" && renderGrids());
setInterval(scheduleRefresh, 15000);  // readings change without events: keep them fresh
setInterval(loadSelf, 5000);  // the collector's own health, even when nothing else changes
route();
connect();
