// rtserve live dashboard: polls dashboard.json once a second and draws it with SVG.
// No libraries and no request but dashboard.json. Every figure is written with
// textContent (a route name is data, never markup), and carries its raw value in data-v
// and its key in data-k, so a test can read exactly what a person sees.
"use strict";
(function () {
  const POLL_MS = 1000;
  const SVG = "http://www.w3.org/2000/svg";
  const C = {
    p50: "#58a6ff", p99: "#e3b341", p999: "#ff7b72", deadline: "#f85149",
    rate: "#56d364", within: "#56d364", target: "#8b949e", fallback: "#e3b341",
    shed: "#bc8cff", timeout: "#ff7b72", queue: "#58a6ff", busy: "#56d364",
    cpu: "#e3b341", conns: "#79c0ff", miss: "#ff7b72", stuck: "#f85149",
  };
  const SHED_COLORS = { codel: "#bc8cff", limit: "#d2a8ff", deadline: "#ff7b72", draining: "#8b949e" };
  const SLO_TARGET = 0.999; // the target deploy/prometheus/alerts.yml pages on

  const $ = (id) => document.getElementById(id);
  const cards = new Map(); // route name -> card state
  let last = null;
  let lastPid = null;
  let lastOk = 0;

  // ---- small DOM helpers -------------------------------------------------------------
  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function s(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  // ---- number formats ------------------------------------------------------------------
  function fmtMs(v) {
    if (v === null || v === undefined) return "–";
    if (v >= 100 || (v >= 10 && Number.isInteger(v))) return v.toFixed(0);
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }
  function fmtNum(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 100000) return (v / 1000).toFixed(0) + "k";
    if (a >= 10000) return (v / 1000).toFixed(1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }
  function fmtTick(v) {
    if (Math.abs(v) >= 10000) return Number((v / 1000).toPrecision(3)) + "k";
    return String(Number(v.toPrecision(4)));
  }
  function fmtInt(v) { return v === null || v === undefined ? "–" : String(Math.round(v)); }
  function fmtPct(v) {
    if (v === null || v === undefined) return "–";
    const p = v * 100;
    if (p >= 99.995 && p < 100) return "99.99";
    return p >= 99 ? p.toFixed(2) : p.toFixed(1);
  }
  function fmtAge(sec) {
    if (sec < 90) return Math.round(sec) + " s";
    if (sec < 5400) return Math.round(sec / 60) + " min";
    if (sec < 172800) return (sec / 3600).toFixed(1) + " h";
    return (sec / 86400).toFixed(1) + " d";
  }

  // ---- tiles -----------------------------------------------------------------------------
  function tile(parent, key, label, unit) {
    const t = h("div", "tile");
    t.appendChild(h("div", "k", label));
    const v = h("div", "v");
    const num = h("span", "num", "–");
    num.dataset.k = key;
    v.appendChild(num);
    if (unit) v.appendChild(h("span", "u", unit));
    t.appendChild(v);
    const x = h("div", "x", "\u00a0");
    t.appendChild(x);
    parent.appendChild(t);
    return { t, num, x };
  }
  function setTile(tl, value, text, extra, level) {
    tl.num.dataset.v = value === null || value === undefined ? "" : String(value);
    tl.num.textContent = text;
    tl.x.textContent = extra || "\u00a0";
    tl.t.classList.remove("ok", "warn", "bad");
    if (level) tl.t.classList.add(level);
  }

  // ---- charts ----------------------------------------------------------------------------
  const H = 170, PL = 46, PR = 10, PT = 10, PB = 20;
  let W = 600; // set per chart to its width in CSS pixels, so the text is never scaled

  function chartBox(parent, title, legend, wide) {
    const box = h("div", "chart" + (wide ? " wide" : ""));
    const head = h("div", "title");
    head.appendChild(h("span", "", title));
    const lg = h("span", "legend");
    for (const [name, color] of legend) {
      const e = h("span", "", name);
      e.style.color = color;
      lg.appendChild(e);
    }
    head.appendChild(lg);
    box.appendChild(head);
    const svg = s("svg", { class: "plot", viewBox: `0 0 600 ${H}`, role: "img" });
    svg.setAttribute("aria-label", title);
    box.appendChild(svg);
    parent.appendChild(box);
    const chart = { svg, spec: null };
    svg.addEventListener("mousemove", (ev) => hover(chart, ev));
    svg.addEventListener("mouseleave", () => { $("tip").hidden = true; drawCross(chart, null); });
    return chart;
  }

  function niceStep(max, n) {
    const raw = max / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
    return 10 * mag;
  }

  // spec: {t, dt, series: [{label, color, values, kind: line|area|bar}], hlines: [{value,
  // color, label}], log: bool, fmt, min, max, stack: bool}
  function draw(chart, spec) {
    chart.spec = spec;
    const svg = chart.svg;
    W = Math.max(220, Math.round(svg.getBoundingClientRect().width) || 600);
    chart.w = W;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const t = spec.t;
    const n = t.length;
    const tEnd = n ? t[n - 1] : 0;
    const span = 60;
    const x = (tv) => PL + ((tv - (tEnd - span)) / span) * (W - PL - PR);
    chart.x = x;
    // y domain
    let vals = [];
    if (spec.stack) {
      for (let i = 0; i < n; i++) {
        let sum = 0;
        for (const se of spec.series) sum += se.values[i] || 0;
        vals.push(sum);
      }
    } else {
      for (const se of spec.series) for (const v of se.values) if (v !== null) vals.push(v);
    }
    for (const hl of spec.hlines || []) if (hl.value !== null && hl.value !== undefined) vals.push(hl.value * (spec.log ? 1.6 : 1.12));
    const dataMax = vals.length ? Math.max(...vals) : 0;
    let y, ticks = [];
    if (spec.log) {
      const lo = spec.min || 0.1;
      const hiDec = Math.max(Math.ceil(Math.log10(Math.max(dataMax, lo * 10))), Math.log10(lo) + 1);
      const lgLo = Math.log10(lo);
      y = (v) => {
        const c = Math.max(v, lo);
        return H - PB - ((Math.log10(c) - lgLo) / (hiDec - lgLo)) * (H - PT - PB);
      };
      for (let d = lgLo; d <= hiDec + 1e-9; d++) ticks.push(Math.pow(10, d));
    } else {
      const lo = spec.min || 0;
      let hi = spec.max !== undefined ? spec.max : Math.max(dataMax, spec.floor || 1);
      if (spec.max === undefined) {
        const step = niceStep(hi - lo, 4);
        hi = lo + Math.ceil((hi - lo) / step - 1e-9) * step;
        for (let v = lo; v <= hi + 1e-9; v += step) ticks.push(v);
      } else {
        const step = (hi - lo) / 4;
        for (let i = 0; i <= 4; i++) ticks.push(lo + i * step);
      }
      y = (v) => H - PB - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo || 1)) * (H - PT - PB);
    }
    chart.y = y;
    // grid and axes
    for (const tv of ticks) {
      const yy = y(tv);
      svg.appendChild(s("line", { class: "grid", x1: PL, x2: W - PR, y1: yy, y2: yy }));
      const lab = s("text", { x: PL - 6, y: yy + 3.5, "text-anchor": "end" });
      lab.textContent = (spec.tick || fmtTick)(tv);
      svg.appendChild(lab);
    }
    for (const ago of W < 340 ? [60, 30, 0] : [60, 45, 30, 15, 0]) {
      const xx = x(tEnd - ago);
      const lab = s("text", { x: xx, y: H - 5, "text-anchor": ago === 60 ? "start" : ago === 0 ? "end" : "middle" });
      lab.textContent = ago === 0 ? "now" : "−" + ago + " s";
      svg.appendChild(lab);
    }
    if (!n) {
      const e = s("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" });
      e.textContent = "waiting for the first second…";
      svg.appendChild(e);
      return;
    }
    const base = y(spec.log ? (spec.min || 0.1) : (spec.min || 0));
    // bars (stacked)
    const bars = spec.series.filter((se) => se.kind === "bar");
    if (bars.length) {
      for (let i = 0; i < n; i++) {
        const x1 = x(t[i] - spec.dt[i]) + 0.8, x2 = x(t[i]) - 0.8;
        if (x2 <= PL) continue;
        let acc = 0;
        for (const se of bars) {
          const v = se.values[i] || 0;
          if (v <= 0) continue;
          const y1 = y(acc), y2 = y(acc + v);
          svg.appendChild(s("rect", { x: Math.max(x1, PL), y: y2, width: Math.max(x2 - Math.max(x1, PL), 0.6), height: Math.max(y1 - y2, 0.8), fill: se.color, "fill-opacity": 0.85 }));
          acc += v;
        }
      }
    }
    // areas and lines (gaps where a value is null)
    for (const se of spec.series) {
      if (se.kind === "bar") continue;
      let d = "", area = "", run = [];
      const flush = () => {
        if (!run.length) return;
        d += run.map((p, j) => (j ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1)).join("");
        if (se.kind === "area") {
          area += "M" + run[0][0].toFixed(1) + " " + base.toFixed(1) + run.map((p) => "L" + p[0].toFixed(1) + " " + p[1].toFixed(1)).join("") + "L" + run[run.length - 1][0].toFixed(1) + " " + base.toFixed(1) + "Z";
        }
        run = [];
      };
      for (let i = 0; i < n; i++) {
        const v = se.values[i];
        if (v === null || v === undefined) { flush(); continue; }
        const xx = x(t[i]);
        if (xx < PL) continue;
        run.push([xx, y(v)]);
      }
      if (run.length === 1) run.push([run[0][0] + 0.01, run[0][1]]); // a lone point: a dot
      flush();
      if (area) svg.appendChild(s("path", { d: area, fill: se.color, "fill-opacity": 0.14, stroke: "none" }));
      if (d) svg.appendChild(s("path", { d, fill: "none", stroke: se.color, "stroke-width": se.width || 1.8, "stroke-linejoin": "round", "stroke-linecap": "round" }));
    }
    // reference lines on top (deadline, capacity, target)
    for (const hl of spec.hlines || []) {
      if (hl.value === null || hl.value === undefined) continue;
      const yy = y(hl.value);
      svg.appendChild(s("line", { class: "hline", x1: PL, x2: W - PR, y1: yy, y2: yy, stroke: hl.color }));
      const lab = s("text", { class: "hlabel", x: PL + 4, y: yy - 4, "text-anchor": "start", fill: hl.color });
      lab.textContent = hl.label;
      svg.appendChild(lab);
    }
    chart.cross = s("line", { class: "cross", x1: 0, x2: 0, y1: PT, y2: H - PB, visibility: "hidden" });
    svg.appendChild(chart.cross);
  }

  function drawCross(chart, xx) {
    if (!chart.cross) return;
    if (xx === null) { chart.cross.setAttribute("visibility", "hidden"); return; }
    chart.cross.setAttribute("x1", xx);
    chart.cross.setAttribute("x2", xx);
    chart.cross.setAttribute("visibility", "visible");
  }

  function hover(chart, ev) {
    const spec = chart.spec;
    if (!spec || !spec.t.length) return;
    const rect = chart.svg.getBoundingClientRect();
    const px = ((ev.clientX - rect.left) / rect.width) * chart.w;
    let best = -1, bd = Infinity;
    for (let i = 0; i < spec.t.length; i++) {
      const d = Math.abs(chart.x(spec.t[i]) - px);
      if (d < bd) { bd = d; best = i; }
    }
    if (best < 0) return;
    drawCross(chart, chart.x(spec.t[best]));
    const tip = $("tip");
    while (tip.firstChild) tip.removeChild(tip.firstChild);
    const ago = spec.t[spec.t.length - 1] - spec.t[best];
    tip.appendChild(h("div", "row", ago < 0.5 ? "now" : "−" + ago.toFixed(0) + " s"));
    for (const se of spec.series) {
      const row = h("div", "row");
      const k = h("i", "", se.label);
      k.style.color = se.color;
      row.appendChild(k);
      row.appendChild(h("b", "", (spec.fmt || fmtNum)(se.values[best])));
      tip.appendChild(row);
    }
    tip.hidden = false;
    const tx = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = tx + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  }

  // ---- the server card -------------------------------------------------------------------
  const server = {};
  function buildServer() {
    const tiles = $("server-tiles");
    server.queue = tile(tiles, "server|queue_depth", "queue depth", "now");
    server.busy = tile(tiles, "server|busy_workers", "busy workers", "now");
    server.cpu = tile(tiles, "server|cpu_inflight_ms", "CPU in flight", "ms");
    server.conns = tile(tiles, "server|open_connections", "connections", "now");
    server.miss = tile(tiles, "server|deadline_misses", "deadline misses", "/s");
    server.fb = tile(tiles, "server|fallbacks", "fallbacks", "/s");
    server.shed = tile(tiles, "server|sheds", "sheds", "/s");
    server.late = tile(tiles, "server|late_dropped", "late results", "/s");
    const charts = $("server-charts");
    server.cQueue = chartBox(charts, "queue depth", [["queue", C.queue]]);
    server.cBusy = chartBox(charts, "busy workers", [["busy", C.busy], ["stuck", C.stuck]]);
    server.cCpu = chartBox(charts, "CPU in flight (ms)", [["CPU", C.cpu]]);
    server.cBad = chartBox(charts, "misses and sheds per second", [["misses", C.miss], ["codel", SHED_COLORS.codel], ["limit", SHED_COLORS.limit], ["draining", SHED_COLORS.draining]]);
  }

  function sum(a) { let x = 0; for (const v of a) x += v || 0; return x; }
  function lastOf(a) { return a && a.length ? a[a.length - 1] : null; }
  // JSON series are per-entry counts and microseconds; the charts want rates and ms.
  const perS = (counts, dt) => counts.map((c, i) => c / dt[i]);
  const toMs = (us) => us.map((v) => (v === null ? null : v / 1000));

  function renderServer(d) {
    const sv = d.server, span = d.span_s || 0;
    const rate = (total) => (span ? total / span : 0);
    const workers = lastOf(sv.workers);
    const busy = lastOf(sv.busy_workers), stuck = lastOf(sv.stuck_workers);
    const queue = lastOf(sv.queue_depth);
    setTile(server.queue, queue, fmtInt(queue), "max " + fmtInt(sv.queue_depth.length ? Math.max(...sv.queue_depth) : null), queue ? "warn" : null);
    setTile(server.busy, busy, fmtInt(busy), "of " + fmtInt(workers) + (stuck ? " · " + fmtInt(stuck) + " stuck" : ""), stuck ? "bad" : null);
    const cpuMs = toMs(sv.cpu_inflight_us);
    const cpu = lastOf(cpuMs);
    const relaxed = sv.relaxed && lastOf(sv.relaxed);  // nothing at stake: the gate stands open
    setTile(server.cpu, cpu, fmtNum(cpu), !d.cpu_cap_ms ? "no cap" : relaxed ? "relaxed: gate open" : "cap " + fmtNum(d.cpu_cap_ms) + " ms");
    setTile(server.conns, lastOf(sv.open_connections), fmtInt(lastOf(sv.open_connections)), "open now");
    const missT = sv.deadline_misses_total;
    setTile(server.miss, rate(missT), fmtNum(rate(missT)), missT + " in window", missT ? "warn" : "ok");
    const fbT = sv.fallbacks_total;
    setTile(server.fb, rate(fbT), fmtNum(rate(fbT)), fbT + " in window", fbT ? "warn" : null);
    const shedT = sum(Object.values(sv.shed_total));
    const reasons = Object.entries(sv.shed_total).filter(([, v]) => v).map(([k, v]) => k + " " + v).join(" · ");
    setTile(server.shed, rate(shedT), fmtNum(rate(shedT)), reasons || shedT + " in window", shedT ? "bad" : null);
    const lateT = sv.late_dropped_total;
    setTile(server.late, rate(lateT), fmtNum(rate(lateT)), lateT + " in window");
    $("server-sub").textContent = fmtInt(workers) + " workers" + (d.cpu_cap_ms ? " · CPU cap " + fmtNum(d.cpu_cap_ms) + " ms" : "");
    draw(server.cQueue, { t: d.t, dt: d.dt, series: [{ label: "queue", color: C.queue, values: sv.queue_depth, kind: "area" }], floor: 4, fmt: fmtInt });
    draw(server.cBusy, { t: d.t, dt: d.dt, series: [{ label: "busy", color: C.busy, values: sv.busy_workers, kind: "area" }, { label: "stuck", color: C.stuck, values: sv.stuck_workers, kind: "line" }], hlines: [{ value: workers, color: C.target, label: "pool " + fmtInt(workers) }], fmt: fmtInt });
    draw(server.cCpu, { t: d.t, dt: d.dt, series: [{ label: "CPU ms", color: C.cpu, values: cpuMs, kind: "area" }], hlines: d.cpu_cap_ms ? [{ value: d.cpu_cap_ms, color: C.target, label: "cap " + fmtNum(d.cpu_cap_ms) + " ms" }] : [], floor: 1 });
    draw(server.cBad, { t: d.t, dt: d.dt, stack: true, series: [
      { label: "misses", color: C.miss, values: perS(sv.deadline_misses, d.dt), kind: "bar" },
      { label: "codel", color: SHED_COLORS.codel, values: perS(sv.shed.codel, d.dt), kind: "bar" },
      { label: "limit", color: SHED_COLORS.limit, values: perS(sv.shed.limit, d.dt), kind: "bar" },
      { label: "draining", color: SHED_COLORS.draining, values: perS(sv.shed.draining, d.dt), kind: "bar" },
    ], floor: 1 });
  }

  // ---- route cards -----------------------------------------------------------------------
  function buildRoute(r) {
    const card = h("section", "card route");
    card.dataset.route = r.route;
    const head = h("div", "card-head");
    head.appendChild(h("h2", "route", r.route));
    if (r.deadline_ms !== null) head.appendChild(h("span", "badge deadline", "deadline " + fmtMs(r.deadline_ms) + " ms"));
    const sub = h("span", "sub", "");
    head.appendChild(sub);
    card.appendChild(head);
    const tiles = h("div", "tiles");
    const k = (name) => r.route + "|" + name;
    const st = {
      card, sub,
      requests: tile(tiles, k("requests"), "requests", ""),
      rate: tile(tiles, k("rate"), "rate", "/s"),
      p50: tile(tiles, k("p50_ms"), "p50", "ms"),
      p99: tile(tiles, k("p99_ms"), "p99", "ms"),
      p999: tile(tiles, k("p999_ms"), "p99.9", "ms"),
      within: tile(tiles, k("within"), "within deadline", "%"),
      fallbacks: tile(tiles, k("fallbacks"), "fallbacks", "/s"),
      sheds: tile(tiles, k("sheds"), "sheds (503)", "/s"),
      timeouts: tile(tiles, k("timeouts"), "timeouts (504)", "/s"),
    };
    card.appendChild(tiles);
    const charts = h("div", "charts");
    st.cLat = chartBox(charts, "latency (ms, log scale)", [["p50", C.p50], ["p99", C.p99], ["p99.9", C.p999], ["deadline", C.deadline]], true);
    st.cRate = chartBox(charts, "requests per second", [["rate", C.rate]]);
    st.cWithin = chartBox(charts, "within the deadline (%)", [["within", C.within]]);
    st.cBad = chartBox(charts, "degraded answers per second", [["fallbacks", C.fallback], ["sheds", C.shed], ["504", C.timeout]]);
    card.appendChild(charts);
    return st;
  }

  function renderRoute(st, r, d) {
    const w = r.window, ps = r.per_s;
    const dl = r.deadline_ms;
    setTile(st.requests, w.requests, fmtInt(w.requests), "in " + fmtInt(d.span_s) + " s");
    const reqPerS = perS(ps.requests, d.dt);
    const p50 = toMs(ps.p50_us), p99 = toMs(ps.p99_us), p999 = toMs(ps.p999_us);
    setTile(st.rate, w.rate, fmtNum(w.rate), "now " + fmtNum(lastOf(reqPerS)));
    const lvl = (v) => (dl === null || v === null ? null : v <= dl * 0.8 ? "ok" : v <= dl ? "warn" : "bad");
    setTile(st.p50, w.p50_ms, fmtMs(w.p50_ms), "now " + fmtMs(lastOf(p50)), lvl(w.p50_ms));
    setTile(st.p99, w.p99_ms, fmtMs(w.p99_ms), "now " + fmtMs(lastOf(p99)), lvl(w.p99_ms));
    setTile(st.p999, w.p999_ms, fmtMs(w.p999_ms), "now " + fmtMs(lastOf(p999)), lvl(w.p999_ms));
    const wl = w.within === null ? null : w.within >= SLO_TARGET ? "ok" : w.within >= 0.99 ? "warn" : "bad";
    const slo = r.slo_ms === null ? "no deadline" : r.slo_ms === dl ? "≤ " + fmtMs(dl) + " ms" : "≤ " + fmtMs(r.slo_ms) + " ms bucket";
    setTile(st.within, w.within, fmtPct(w.within), slo, wl);
    setTile(st.fallbacks, w.fallbacks_per_s, fmtNum(w.fallbacks_per_s), w.fallbacks + " in window", w.fallbacks ? "warn" : null);
    setTile(st.sheds, w.sheds_per_s, fmtNum(w.sheds_per_s), w.sheds + " in window", w.sheds ? "bad" : null);
    setTile(st.timeouts, w.timeouts_per_s, fmtNum(w.timeouts_per_s), w.timeouts + " in window", w.timeouts ? "bad" : null);
    const idle = !w.requests && !w.fallbacks;
    st.sub.textContent = idle ? "no requests in the last minute" : "";
    st.card.classList.toggle("idle", idle); // an idle route folds to its header
    if (idle) return;
    draw(st.cLat, { t: d.t, dt: d.dt, log: true, min: 0.1, fmt: fmtMs, tick: (v) => (v >= 1000 ? v / 1000 + " s" : String(Number(v.toPrecision(2)))), series: [
      { label: "p50", color: C.p50, values: p50, kind: "line", width: 2 },
      { label: "p99", color: C.p99, values: p99, kind: "line" },
      { label: "p99.9", color: C.p999, values: p999, kind: "line", width: 1.4 },
    ], hlines: dl !== null ? [{ value: dl, color: C.deadline, label: "deadline " + fmtMs(dl) + " ms" }] : [] });
    draw(st.cRate, { t: d.t, dt: d.dt, series: [{ label: "req/s", color: C.rate, values: reqPerS, kind: "area" }], floor: 1 });
    const wv = ps.within === null ? ps.requests.map(() => null)
      : ps.within.map((v, i) => (ps.requests[i] ? (100 * v) / ps.requests[i] : null));
    const present = wv.filter((v) => v !== null);
    const minW = present.length ? Math.min(...present) : 100;
    const lo = [99, 96, 80, 60].find((x) => minW >= x) || 0;
    draw(st.cWithin, { t: d.t, dt: d.dt, min: lo, max: 100, fmt: (v) => fmtPct(v === null ? null : v / 100), tick: (v) => fmtTick(v) + "%", series: [
      { label: "within", color: C.within, values: wv, kind: "area" },
    ], hlines: r.slo_ms !== null ? [{ value: SLO_TARGET * 100, color: C.target, label: "target " + (SLO_TARGET * 100).toFixed(1) + "%" }] : [] });
    draw(st.cBad, { t: d.t, dt: d.dt, stack: true, floor: 1, series: [
      { label: "fallbacks", color: C.fallback, values: perS(ps.fallbacks, d.dt), kind: "bar" },
      { label: "sheds", color: C.shed, values: perS(ps.sheds, d.dt), kind: "bar" },
      { label: "504", color: C.timeout, values: perS(ps.timeouts, d.dt), kind: "bar" },
    ] });
  }

  // Paths the conductor answers itself (health, metrics, this page, unrouted): one row
  // each, since they have no deadline to draw against.
  const rows = new Map();
  function renderServerRoutes(d) {
    const list = d.routes.filter((r) => r.server);
    const card = $("conductor-paths");
    card.hidden = !list.length;
    const body = $("conductor-rows");
    const names = list.map((r) => r.route);
    for (const [name, row] of rows) if (!names.includes(name)) { row.tr.remove(); rows.delete(name); }
    for (const r of list) {
      let row = rows.get(r.route);
      if (!row) {
        row = { tr: h("tr"), cells: {} };
        row.tr.appendChild(h("td", "mono", r.route));
        for (const key of ["requests", "rate", "p50_ms", "p99_ms", "p999_ms"]) {
          const td = h("td", "num");
          td.dataset.k = r.route + "|" + key;
          row.cells[key] = td;
          row.tr.appendChild(td);
        }
        rows.set(r.route, row);
      }
      body.appendChild(row.tr); // (re)appended in the JSON's order
      const w = r.window;
      for (const [key, text] of [["requests", fmtInt(w.requests)], ["rate", fmtNum(w.rate)], ["p50_ms", fmtMs(w.p50_ms)], ["p99_ms", fmtMs(w.p99_ms)], ["p999_ms", fmtMs(w.p999_ms)]]) {
        row.cells[key].dataset.v = w[key] === null ? "" : String(w[key]);
        row.cells[key].textContent = text;
      }
    }
  }

  function render(d) {
    $("pid").textContent = String(d.pid);
    $("span").textContent = fmtInt(d.span_s || 0);
    $("uptime").textContent = fmtAge(Math.max(0, (lastOf(d.t) || d.started) - d.started));
    if (lastPid !== null && d.pid !== lastPid) {
      const note = $("note");
      note.textContent = "This poll was answered by another process (pid " + lastPid + " → " + d.pid + "): each rtserve process keeps its own figures; Prometheus adds them up.";
      note.hidden = false;
    }
    lastPid = d.pid;
    renderServer(d);
    renderServerRoutes(d);
    const holder = $("routes");
    const appRoutes = d.routes.filter((r) => !r.server);
    const names = appRoutes.map((r) => r.route);
    for (const [name, st] of cards) {
      if (!names.includes(name)) { st.card.remove(); cards.delete(name); }
    }
    let prev = null;
    const none = $("no-routes");
    if (none) none.hidden = appRoutes.length > 0;
    for (const r of appRoutes) {
      let st = cards.get(r.route);
      if (!st) { st = buildRoute(r); cards.set(r.route, st); }
      const want = prev ? prev.card.nextSibling : holder.firstChild;
      if (want !== st.card) holder.insertBefore(st.card, want);
      renderRoute(st, r, d);
      prev = st;
    }
    document.body.dataset.seq = String(d.seq);
  }

  function setState(state, text) {
    document.body.dataset.state = state;
    $("status-text").textContent = text;
  }

  async function poll() {
    try {
      const resp = await fetch("dashboard.json", { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const d = await resp.json();
      lastOk = Date.now();
      if (!last || d.seq !== last.seq || d.pid !== last.pid) render(d);
      last = d;
      setState("live", "live");
    } catch (err) {
      const ago = lastOk ? " (last data " + fmtAge((Date.now() - lastOk) / 1000) + " ago)" : "";
      setState(lastOk ? "stale" : "error", "no answer from the server" + ago);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (last) render(last); }, 150);
  });

  buildServer();
  poll();
})();
