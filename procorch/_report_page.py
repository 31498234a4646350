"""The run report's page: HTML, CSS and the script that draws it (see ``_report``).

The script reads the attempts from the inline JSON (columns, one entry per
attempt) and draws on two canvases: the timeline (one row per worker lane,
one bar per attempt, coloured by outcome; where bars are thinner than a
pixel, the pixel shows the most serious outcome among them) and the
concurrency over time against the call's. The mouse wheel zooms the time
axis, dragging pans it, a double click resets. ``window.procorchReport``
exposes counts and boxes for tests.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px;
  color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
.sub { color: #555; margin-bottom: 12px; }
#legend span.item { margin-right: 14px; white-space: nowrap; }
.kind { white-space: nowrap; }
.sw { display: inline-block; width: 11px; height: 11px; margin-right: 5px;
  vertical-align: -1px; border-radius: 2px; }
.chart { position: relative; border: 1px solid #ddd; margin-top: 6px; }
canvas { display: block; }
#tip { position: fixed; pointer-events: none; background: #fffffb; border: 1px solid #999;
  padding: 6px 8px; font-size: 12px; max-width: 520px; display: none; z-index: 2;
  box-shadow: 0 2px 6px rgba(0,0,0,.2); white-space: pre-wrap; }
table { border-collapse: collapse; margin: 4px 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 10px; text-align: left;
  vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.none { color: #888; }
.hint { color: #666; font-size: 12px; }
</style>
</head>
<body>
<h1>%%TITLE%%</h1>
<div class="sub">%%SUMMARY%%</div>
<div id="legend"></div>
<h2>Timeline</h2>
<div class="hint">One row per worker lane (the pids that served it, in order), one bar per
step attempt; a black tick marks a crash or a kill, a dashed line links a retry to the
attempt it repeats. Wheel: zoom; drag: pan; double click: reset.</div>
<div class="chart" id="timeline-box"><canvas id="timeline"></canvas></div>
<h2>Concurrency</h2>
<div class="hint">Steps running at each instant (the most within each pixel), against the
call's concurrency (dashed).</div>
<div class="chart" id="concurrency-box"><canvas id="concurrency"></canvas></div>
%%TABLES%%
<div id="tip"></div>
<script type="application/json" id="report-data">%%DATA%%</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const A = D.a, N = A.start.length, R = Math.max(1, D.rows.length);
  const kinds = D.kinds, K = kinds.length;
  const LEFT = 150, AXIS = 22, PAD = 8;
  const rowH = R <= 8 ? 26 : R <= 40 ? 18 : R <= 200 ? Math.max(4, Math.floor(720 / R)) : 3;
  const state = { t0: 0, t1: D.span > 0 ? D.span : 1, drawn: 0, aggregated: 0, links: 0,
    marks: 0 };
  const end = new Float64Array(N);
  for (let i = 0; i < N; i++) end[i] = A.start[i] + A.wall[i];
  // Attempts of each row, by start: rows never overlap, so a binary search finds one.
  const byRow = Array.from({ length: R }, () => []);
  for (let i = 0; i < N; i++) byRow[A.row[i]].push(i);
  for (const list of byRow) list.sort((x, y) => A.start[x] - A.start[y] || x - y);

  const legend = document.getElementById("legend");
  const present = new Set(A.kind);
  kinds.forEach((k, n) => {
    if (!present.has(n)) return;
    const item = document.createElement("span");
    item.className = "item";
    item.innerHTML = '<span class="sw" style="background:' + k.color + '"></span>';
    item.appendChild(document.createTextNode(k.name));
    legend.appendChild(item);
  });

  function fmtS(s) {
    if (s === null || s === undefined) return "unknown";
    if (s === 0) return "0 s";
    if (s >= 100) return s.toFixed(0) + " s";
    if (s >= 1) return s.toFixed(2) + " s";
    if (s >= 0.001) return (s * 1e3).toFixed(1) + " ms";
    return (s * 1e6).toFixed(0) + " µs";
  }
  function fmtB(b) {
    if (b === null || b === undefined) return "unknown";
    const u = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 1024]];
    for (const [n, s] of u) if (b >= s) return (b / s).toFixed(1) + " " + n;
    return b + " B";
  }
  function setup(canvas, width, height) {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return ctx;
  }
  function ticks(t0, t1, width) {
    const span = t1 - t0, want = Math.max(2, Math.floor(width / 90));
    const raw = span / want, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-12; t += step) out.push(t);
    return out;
  }
  function axis(ctx, width, y, plot) {
    ctx.fillStyle = "#444"; ctx.font = "11px sans-serif"; ctx.textAlign = "center";
    for (const t of ticks(state.t0, state.t1, plot)) {
      const x = LEFT + (t - state.t0) / (state.t1 - state.t0) * plot;
      ctx.fillRect(x, y, 1, 4);
      ctx.fillText(fmtS(t), x, y + 15);
    }
  }

  const tl = document.getElementById("timeline");
  const cc = document.getElementById("concurrency");
  let plotW = 0;

  function drawTimeline() {
    const width = Math.max(400, document.getElementById("timeline-box").clientWidth - 2);
    plotW = width - LEFT - PAD;
    const height = R * rowH + AXIS;
    const ctx = setup(tl, width, height);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    ctx.font = "11px sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let r = 0; r < R; r++) {
      if (r % 2) { ctx.fillStyle = "#f7f7f7"; ctx.fillRect(LEFT, r * rowH, plotW, rowH); }
      if (rowH >= 10) {
        ctx.fillStyle = "#333";
        const label = "lane " + (r + 1) + " · " + (D.rows[r] || "");
        ctx.fillText(label.length > 24 ? label.slice(0, 23) + "…" : label, LEFT - 6,
          r * rowH + rowH / 2);
      }
    }
    const scale = plotW / (state.t1 - state.t0);
    const gap = rowH >= 6 ? 1 : 0;
    // Bars a pixel wide or more are drawn one by one; thinner ones are counted into
    // their pixel, which shows the most serious outcome among them (kinds are in order).
    const cells = new Int16Array(R * Math.ceil(plotW + 1)).fill(-1);
    let drawn = 0, aggregated = 0;
    for (let i = 0; i < N; i++) {
      const x0 = (A.start[i] - state.t0) * scale, x1 = (end[i] - state.t0) * scale;
      if (x1 < 0 || x0 > plotW) continue;
      const row = A.row[i];
      if (x1 - x0 >= 1) {
        const a = Math.max(0, x0), b = Math.min(plotW, x1);
        ctx.fillStyle = kinds[A.kind[i]].color;
        ctx.fillRect(LEFT + a, row * rowH + gap, Math.max(1, b - a), rowH - 2 * gap);
        drawn++;
      } else {
        const px = Math.min(Math.floor(plotW), Math.max(0, Math.floor(x0)));
        const at = row * Math.ceil(plotW + 1) + px;
        if (cells[at] < 0 || A.kind[i] < cells[at]) cells[at] = A.kind[i];
        aggregated++;
      }
    }
    const cols = Math.ceil(plotW + 1);
    for (let r = 0; r < R; r++) {
      for (let px = 0; px < cols; px++) {
        const k = cells[r * cols + px];
        if (k < 0) continue;
        ctx.fillStyle = kinds[k].color;
        ctx.fillRect(LEFT + px, r * rowH + gap, 1, rowH - 2 * gap);
      }
    }
    let links = 0, marks = 0;
    ctx.strokeStyle = "#222"; ctx.lineWidth = 1;
    ctx.setLineDash([3, 2]);
    ctx.beginPath();
    for (let i = 0; i < N; i++) {
      const p = A.prev[i];
      if (p < 0) continue;
      const x0 = LEFT + (end[p] - state.t0) * scale, x1 = LEFT + (A.start[i] - state.t0) * scale;
      if (Math.max(x0, x1) < LEFT || Math.min(x0, x1) > LEFT + plotW) continue;
      ctx.moveTo(x0, A.row[p] * rowH + rowH / 2);
      ctx.lineTo(x1, A.row[i] * rowH + rowH / 2);
      links++;
    }
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#000";
    for (let i = 0; i < N; i++) {
      if (!A.mark[i]) continue;
      const x = LEFT + (end[i] - state.t0) * scale;
      if (x < LEFT - 1 || x > LEFT + plotW + 1) continue;
      const y = A.row[i] * rowH;
      ctx.fillRect(x - 1, y, 2, rowH);
      if (rowH >= 10) {
        ctx.beginPath(); ctx.moveTo(x - 4, y); ctx.lineTo(x + 4, y); ctx.lineTo(x, y + 5);
        ctx.fill();
      }
      marks++;
    }
    ctx.fillStyle = "#ccc"; ctx.fillRect(LEFT, R * rowH, plotW, 1);
    axis(ctx, width, R * rowH, plotW);
    Object.assign(state, { drawn, aggregated, links, marks });
  }

  function drawConcurrency() {
    const width = Math.max(400, document.getElementById("concurrency-box").clientWidth - 2);
    const plot = width - LEFT - PAD, height = 140, top = 8, h = height - AXIS - top;
    const ctx = setup(cc, width, height);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    const edges = new Float64Array(2 * N), sign = new Int8Array(2 * N);
    const order = new Uint32Array(2 * N);
    for (let i = 0; i < N; i++) {
      edges[2 * i] = A.start[i]; sign[2 * i] = 1;
      edges[2 * i + 1] = end[i]; sign[2 * i + 1] = -1;
    }
    for (let i = 0; i < 2 * N; i++) order[i] = i;
    order.sort((x, y) => edges[x] - edges[y] || sign[x] - sign[y]);
    const cols = Math.ceil(plot) + 1, most = new Float64Array(cols);
    const scale = plot / (state.t1 - state.t0);
    let level = 0, peak = 0;
    for (let j = 0; j < 2 * N; j++) {
      const e = order[j];
      level += sign[e];
      peak = Math.max(peak, level);
      const px = Math.floor((edges[e] - state.t0) * scale);
      if (px >= 0 && px < cols) most[px] = Math.max(most[px], level);
      if (px < 0) most[0] = Math.max(most[0], level);
    }
    // A level held across columns with no edge in them fills them too.
    level = 0; let k = 0;
    const held = new Float64Array(cols);
    for (let px = 0; px < cols; px++) {
      const tEnd = state.t0 + (px + 1) / scale;
      held[px] = level;
      while (k < 2 * N && edges[order[k]] < tEnd) { level += sign[order[k]]; k++; }
    }
    const top_ = Math.max(1, peak, D.hint || 0);
    ctx.fillStyle = "#6b8fb5";
    for (let px = 0; px < cols && px < plot; px++) {
      const v = Math.max(most[px], held[px]);
      if (v <= 0) continue;
      const y = top + h - v / top_ * h;
      ctx.fillRect(LEFT + px, y, 1, top + h - y);
    }
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif"; ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(String(top_), LEFT - 6, top); ctx.fillText("0", LEFT - 6, top + h);
    if (D.hint) {
      const y = top + h - D.hint / top_ * h;
      ctx.strokeStyle = "#c0392b"; ctx.setLineDash([5, 3]); ctx.beginPath();
      ctx.moveTo(LEFT, y); ctx.lineTo(LEFT + plot, y); ctx.stroke(); ctx.setLineDash([]);
      ctx.fillStyle = "#c0392b"; ctx.fillText("concurrency " + D.hint, LEFT - 6, y + 10);
    }
    ctx.fillStyle = "#ccc"; ctx.fillRect(LEFT, top + h, plot, 1);
    axis(ctx, width, top + h, plot);
    state.peak = peak;
  }

  function draw() { drawTimeline(); drawConcurrency(); }

  // -- hover, zoom, pan ------------------------------------------------------------
  const tip = document.getElementById("tip");
  function attemptAt(x, y) {
    const row = Math.floor(y / rowH);
    if (row < 0 || row >= R || x < LEFT) return -1;
    const scale = plotW / (state.t1 - state.t0), t = state.t0 + (x - LEFT) / scale;
    const list = byRow[row], slack = 3 / scale;
    let lo = 0, hi = list.length - 1, best = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (A.start[list[mid]] <= t + slack) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    for (const c of [best, best + 1]) {
      if (c < 0 || c >= list.length) continue;
      const i = list[c];
      if (A.start[i] - slack <= t && t <= end[i] + slack) return i;
    }
    return -1;
  }
  function describe(i) {
    const lines = [
      "task " + A.task[i] + " (agent " + D.agents[A.agent[i]] + "), attempt " + A.attempt[i],
      "outcome: " + kinds[A.kind[i]].name + (A.mark[i] ? " (worker died or was killed)" : ""),
      "started at " + fmtS(A.start[i]) + ", ran " + fmtS(A.wall[i]) + " on pid " + A.pid[i],
      "CPU: " + fmtS(A.cpu[i]) + ", peak memory: " + fmtB(A.rss[i]),
    ];
    if (A.err[i] > 0) lines.push("error: " + D.errors[A.err[i]]);
    if (A.prev[i] >= 0) lines.push("retries attempt " + A.attempt[A.prev[i]]);
    return lines.join("\n");
  }
  let drag = null;
  tl.addEventListener("mousemove", ev => {
    const box = tl.getBoundingClientRect(), x = ev.clientX - box.left, y = ev.clientY - box.top;
    if (drag) {
      const dt = (drag.x - x) / plotW * (drag.t1 - drag.t0);
      state.t0 = drag.t0 + dt; state.t1 = drag.t1 + dt; draw(); return;
    }
    const i = attemptAt(x, y);
    if (i < 0) { tip.style.display = "none"; return; }
    tip.textContent = describe(i);
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 530) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  });
  tl.addEventListener("mouseleave", () => { tip.style.display = "none"; drag = null; });
  tl.addEventListener("mousedown", ev => {
    const box = tl.getBoundingClientRect();
    drag = { x: ev.clientX - box.left, t0: state.t0, t1: state.t1 };
  });
  window.addEventListener("mouseup", () => { drag = null; });
  tl.addEventListener("wheel", ev => {
    ev.preventDefault();
    const box = tl.getBoundingClientRect(), x = ev.clientX - box.left - LEFT;
    const t = state.t0 + Math.max(0, Math.min(plotW, x)) / plotW * (state.t1 - state.t0);
    const f = ev.deltaY > 0 ? 1.25 : 0.8;
    state.t0 = t - (t - state.t0) * f; state.t1 = t + (state.t1 - t) * f; draw();
  }, { passive: false });
  tl.addEventListener("dblclick", () => {
    state.t0 = 0; state.t1 = D.span > 0 ? D.span : 1; draw();
  });
  window.addEventListener("resize", draw);

  draw();
  window.procorchReport = {
    attempts: N,
    rows: R,
    get drawn() { return state.drawn; },
    get aggregated() { return state.aggregated; },
    get links() { return state.links; },
    get marks() { return state.marks; },
    get peak() { return state.peak; },
    kinds: kinds.map(k => k.name),
    colors: Object.fromEntries(kinds.map(k => [k.name, k.color])),
    kindOf: i => kinds[A.kind[i]].name,
    task: i => A.task[i],
    attemptOf: i => A.attempt[i],
    // The bar of attempt i, in CSS pixels of the page.
    barBox: i => {
      const box = tl.getBoundingClientRect(), scale = plotW / (state.t1 - state.t0);
      const x0 = (A.start[i] - state.t0) * scale, x1 = (end[i] - state.t0) * scale;
      return { x: box.left + LEFT + x0, y: box.top + A.row[i] * rowH, w: x1 - x0, h: rowH };
    },
    // The colour drawn inside attempt i's bar (away from its end's mark), as #rrggbb.
    pixelOf: i => {
      const scale = plotW / (state.t1 - state.t0), ratio = window.devicePixelRatio || 1;
      const x0 = (A.start[i] - state.t0) * scale, w = A.wall[i] * scale;
      const x = LEFT + x0 + Math.max(0.5, Math.min(w * 0.25, 3));
      const y = A.row[i] * rowH + rowH * 0.75;
      const p = tl.getContext("2d").getImageData(Math.floor(x * ratio), Math.floor(y * ratio),
        1, 1).data;
      return "#" + [p[0], p[1], p[2]].map(v => v.toString(16).padStart(2, "0")).join("");
    },
    // Show attempt i large: the time axis from a wall before it to a wall after it.
    zoomTo: i => {
      const w = Math.max(A.wall[i], 1e-6);
      state.t0 = A.start[i] - w; state.t1 = end[i] + w; draw();
    },
    reset: () => { state.t0 = 0; state.t1 = D.span > 0 ? D.span : 1; draw(); },
    describe,
  };
})();
</script>
</body>
</html>
"""
