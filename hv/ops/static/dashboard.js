// hv's dashboard: SVG line charts drawn from /api/history, no library.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;
const STATE_COLORS = { high: "#2e7d32", soft: "#f9a825", hard: "#ef6c00", low: "#c62828" };
const VM_SERIES = [  // a field of a point's per-VM array (vm_fields), colour, width, dashes
  ["target", "#1565c0", 1.6], ["balloon", "#6a1b9a", 1.6], ["resident", "#2e7d32", 3],
  ["swapped", "#c62828", 1.6], ["active", "#ef6c00", 1.6, "5 3"]];

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = [["G", 2 ** 30], ["M", 2 ** 20], ["K", 2 ** 10]];
  for (const [u, n] of units) {
    if (Math.abs(bytes) >= n) return (bytes / n).toFixed(bytes / n < 10 ? 2 : 1) + u;
  }
  return bytes + "B";
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function clock(t, span) {  // HH:MM, with seconds when the chart spans under 10 minutes
  return new Date(t * 1000).toTimeString().slice(0, span < 600 ? 8 : 5);
}

// series: [{name, color, values: [[t, v], ...]}]; band: [[t, state], ...] drawn below.
function lineChart(box, series, band, opts) {
  const W = opts.width || 900, H = opts.height || 200, L = 58, R = 8, T = 8;
  const B = band ? 34 : 20;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", class: "chart" });
  for (const [k, v] of Object.entries(opts.data || {})) svg.dataset[k] = v;
  const all = series.flatMap(s => s.values);
  const ts = all.map(p => p[0]).concat((band || []).map(p => p[0]));
  const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
  const vmax = Math.max(1, ...all.map(p => p[1]));
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = v => T + (H - T - B) * (1 - v / vmax);
  for (let i = 0; i <= 4; i++) {  // grid and y labels
    const v = vmax * i / 4;
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }, svg);
    el("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, svg).textContent = size(v);
  }
  for (let i = 0; i <= 4; i++) {  // time labels
    const t = t0 + (t1 - t0) * i / 4;
    const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
    el("text", { x: x(t), y: H - 4, "text-anchor": anchor }, svg).textContent = clock(t, t1 - t0);
  }
  if (band && band.length) {  // one rectangle per run of the same state
    const runs = band.filter((p, i) => i === 0 || p[1] !== band[i - 1][1]);
    runs.forEach(([t, state], i) => {
      const tn = i + 1 < runs.length ? runs[i + 1][0] : t1;
      el("rect", { x: x(t), y: H - B + 4, width: Math.max(1, x(tn) - x(t)), height: 10,
                   fill: STATE_COLORS[state] || "#999", "data-state": state,
                   "shape-rendering": "crispEdges" }, svg);
    });
  }
  for (const s of series) {
    const d = s.values.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    el("path", { d: d.join(""), fill: "none", stroke: s.color, "stroke-width": s.width || 1.6,
                 "stroke-dasharray": s.dash || "none", "data-series": s.name,
                 "data-points": s.values.length }, svg);
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const last = s.values.length ? s.values[s.values.length - 1][1] : null;
    const span = document.createElement("span");
    span.style.setProperty("--c", s.color);
    span.textContent = `${s.name} ${size(last)}`;
    legend.appendChild(span);
  }
  box.replaceChildren(svg, legend);
}

function values(points, get) {
  const out = [];
  for (const p of points) {
    const v = get(p);
    if (v !== null && v !== undefined) out.push([p.t, v]);
  }
  return out;
}

function renderHost(history, status) {
  const pts = history.points;
  const snap = status.snapshot;
  const line = document.getElementById("host-line");
  if (snap) {
    const ksm = snap.ksm ? `KSM ${snap.ksm.mode}` : "KSM off";
    line.innerHTML = "";
    const st = document.createElement("span");
    st.className = `state state-${snap.state}`;
    st.textContent = snap.state;
    line.append(st, ` free ${size(snap.free_bytes)} · pool ${size(snap.pool_bytes)} · ` +
      `${Object.keys(snap.vms).length} VMs · ${ksm} · tick ${snap.tick} · hv ${snap.version}`);
  }
  lineChart(document.getElementById("host-chart"),
    [{ name: "free", color: "#1565c0", values: values(pts, p => p.free) },
     { name: "pool", color: "#999", values: values(pts, p => p.pool) }],
    pts.map(p => [p.t, p.state]), { height: 180, data: { chart: "host" } });
  lineChart(document.getElementById("sharing-chart"),
    [{ name: "potential", color: "#6a1b9a", values: values(pts, p => p.potential) },
     { name: "realized", color: "#2e7d32", values: values(pts, p => p.realized) }],
    null, { height: 160, data: { chart: "sharing" } });
  const table = document.getElementById("sharing-table");
  table.innerHTML = "<tr><th>VM</th><th>potential</th><th>realized</th><th>merged</th></tr>";
  for (const [name, row] of Object.entries(snap ? snap.vms : {})) {
    const s = row.sharing || {};
    const tr = table.insertRow();
    tr.dataset.vm = name;
    const page = status.page_size;
    for (const text of [name, size(s.potential_pages * page), size(s.realized_pages * page),
                        s.merging_pages === undefined ? "-" : `${s.merging_pages} pages`]) {
      tr.insertCell().textContent = text;
    }
  }
}

function renderVMs(history) {
  const fields = history.vm_fields;
  const names = [...new Set(history.points.flatMap(p => Object.keys(p.vms)))].sort();
  const box = document.getElementById("vm-charts");
  box.replaceChildren();
  for (const name of names) {
    const card = document.createElement("div");
    card.className = "vm-chart";
    card.dataset.vm = name;
    const h = document.createElement("h3");
    h.textContent = name;
    const chart = document.createElement("div");
    card.append(h, chart);
    box.appendChild(card);
    const series = VM_SERIES.map(([field, color, width, dash]) => {
      const i = fields.indexOf(field);
      return { name: field, color, width, dash,
               values: values(history.points, p => p.vms[name] ? p.vms[name][i] : null) };
    });
    lineChart(chart, series, null, { width: 460, height: 170, data: { vm: name } });
  }
}

async function refresh() {
  try {
    const [history, status] = await Promise.all(
      ["/api/history", "/api/status"].map(u => fetch(u).then(r => r.json())));
    renderHost(history, status);
    renderVMs(history);
    document.body.dataset.rendered = String(history.points.length);
  } catch (err) {
    document.getElementById("host-line").textContent = `cannot reach hv run: ${err}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
