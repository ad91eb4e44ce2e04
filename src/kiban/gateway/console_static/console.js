// kiban console: polls /admin/state with the admin key and draws tables and uPlot charts.
// Plain browser JavaScript, no build step; every value goes into the page as text.
"use strict";

(function () {
  const POLL_MS = 2000;
  const STORE = "kiban-admin-key";
  const $ = (id) => document.getElementById(id);
  let timer = null;
  const charts = {};

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  function cell(row, value, cls) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function fill(tableId, rows, render, emptyText) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren();
    if (!rows.length) {
      const tr = body.insertRow();
      const td = cell(tr, emptyText, "empty");
      td.colSpan = $(tableId).querySelectorAll("th").length;
      return;
    }
    for (const item of rows) render(body.insertRow(), item);
  }

  const num = (v, digits) => (v === null || v === undefined ? null : Number(v).toFixed(digits));
  const pct = (v) => (v === null || v === undefined ? null : (100 * v).toFixed(1) + " %");
  const int = (v) => (v === null || v === undefined ? null : Math.round(v).toLocaleString("en"));
  const gib = (v) => (v === null || v === undefined ? null : (v / 2 ** 30).toFixed(2) + " GiB");

  function duration(s) {
    if (s === null || s === undefined) return null;
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function renderEngines(engines) {
    fill("engines", engines, (tr, e) => {
      tr.dataset.engine = e.name;
      cell(tr, e.name);
      cell(tr, e.kind);
      cell(tr, e.state || "external");
      cell(tr, e.healthy ? "up" : "down" + (e.health_error ? ": " + e.health_error : ""),
        e.healthy ? "ok" : "bad");
      cell(tr, e.circuit, e.circuit === "closed" ? "ok" : "warn");
      cell(tr, e.gpu_verified === null || e.gpu_verified === undefined ? "–" : e.gpu_verified ? "yes" : "NO",
        e.gpu_verified === false ? "bad" : "");
      cell(tr, e.restarts, "num");
      cell(tr, duration(e.uptime_s), "num");
      cell(tr, num(e.tokens_per_s, 1), "num");
      cell(tr, int(e.running), "num");
      cell(tr, int(e.waiting), "num");
      cell(tr, pct(e.kv_cache_usage), "num");
      cell(tr, e.in_flight + " / " + e.max_concurrency, "num");
    }, "no engines");
  }

  function renderGpus(gpus) {
    fill("gpus", gpus, (tr, g) => {
      cell(tr, g.gpu);
      cell(tr, g.name);
      cell(tr, g.memory_used_bytes === null ? null : gib(g.memory_used_bytes) + " of " + gib(g.memory_total_bytes), "num");
      const shares = Object.entries(g.planned || {}).map(([name, b]) => name + " " + gib(b));
      cell(tr, shares.join(", "));
      cell(tr, pct(g.utilization), "num");
      cell(tr, g.temperature_c === null ? null : g.temperature_c + " °C", "num");
      cell(tr, g.power_w === null ? null : num(g.power_w, 0) + " W", "num");
    }, "no GPU read by this gateway (NVML absent, or the exporter runs standalone)");
  }

  function renderRoutes(routes) {
    fill("routes", routes, (tr, r) => {
      cell(tr, r.name);
      cell(tr, r.strategy);
      cell(tr, r.healthy.length + " of " + r.engines.length + (r.healthy.length ? " (" + r.healthy.join(", ") + ")" : ""),
        r.healthy.length ? "ok" : "bad");
      cell(tr, int(r.requests), "num");
      cell(tr, int(r.failovers), "num");
    }, "no routes");
  }

  function renderKeys(keys) {
    fill("keys", keys, (tr, k) => {
      tr.dataset.key = k.name;
      cell(tr, k.name);
      cell(tr, k.admin ? "admin" : "");
      cell(tr, k.models ? k.models.join(", ") : "all");
      cell(tr, (k.requests_per_minute || "–") + ", " + (k.tokens_per_minute || "–"));
      cell(tr, int(k.this_hour.requests), "num");
      cell(tr, int(k.this_hour.prompt_tokens) + " / " + int(k.this_hour.completion_tokens), "num");
      cell(tr, int(k.last_24h.requests), "num");
      cell(tr, int(k.last_24h.prompt_tokens) + " / " + int(k.last_24h.completion_tokens), "num");
      cell(tr, int(k.rate_limit_rejections), "num");
    }, "no keys");
  }

  function renderErrors(errors) {
    fill("errors", errors, (tr, e) => {
      cell(tr, new Date(e.at * 1000).toLocaleTimeString("en-GB"));
      cell(tr, e.request_id);
      cell(tr, e.route);
      cell(tr, e.engine);
      cell(tr, e.status, "num");
      cell(tr, e.code);
    }, "no errors since this worker started");
  }

  function renderPlan(plan) {
    const box = $("plan");
    box.replaceChildren();
    const note = plan.error || plan.note;
    if (note) {
      const p = document.createElement("p");
      p.className = plan.error ? "bad" : "empty";
      p.textContent = note;
      box.appendChild(p);
    }
    if (!plan.engines || !plan.engines.length) return;
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const h of ["engine", "kind", "device", "weights", "KV cache", "KV format", "context",
      "concurrency", "required", "fits"]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const e of plan.engines) {
      const tr = body.insertRow();
      cell(tr, e.engine);
      cell(tr, e.kind);
      cell(tr, e.device_name + (e.gpus && e.gpus.length ? " (GPU " + e.gpus.join(", ") + ")" : ""));
      cell(tr, gib(e.weights_bytes), "num");
      cell(tr, gib(e.kv_cache_bytes), "num");
      cell(tr, e.kv_format && e.kv_format.name);
      cell(tr, int(e.context), "num");
      cell(tr, int(e.concurrency), "num");
      cell(tr, gib(e.required_bytes) + " of " + gib(e.device_total_bytes), "num");
      cell(tr, e.fits ? "yes, " + gib(e.margin_bytes) + " spare" : "no, short " + gib(-e.margin_bytes),
        e.fits ? "ok" : "bad");
    }
    box.appendChild(table);
  }

  function chart(id, series, data) {
    const el = $(id);
    const finite = data.slice(1).flat().filter((v) => v !== null && isFinite(v));
    el.dataset.points = String(data[0].length);
    el.dataset.max = String(finite.length ? Math.max(...finite) : 0);
    if (!charts[id]) {
      const width = Math.max(300, el.clientWidth || 360);
      charts[id] = new uPlot({
        width: width, height: 180, series: [{}].concat(series),
        scales: { x: { time: true } }, axes: [{}, { size: 60 }],
      }, data, el);
    } else {
      charts[id].setData(data);
    }
  }

  function renderCharts(s) {
    const ms = (v) => (v === null ? null : v * 1000);
    chart("chart-rps", [{ label: "requests/s", stroke: "#1f6feb", width: 2 }],
      [s.t, s.requests_per_s]);
    $("chart-rps").dataset.requests = String(s.requests.reduce((a, b) => a + b, 0));
    chart("chart-ttft", [
      { label: "p50", stroke: "#1a7f37", width: 2, spanGaps: true },
      { label: "p95", stroke: "#c62828", width: 2, spanGaps: true },
    ], [s.t, s.ttft_p50_s.map(ms), s.ttft_p95_s.map(ms)]);
    chart("chart-tps", [{ label: "tokens/s", stroke: "#8250df", width: 2 }],
      [s.t, s.tokens_per_s]);
  }

  function render(doc) {
    renderCharts(doc.series);
    renderEngines(doc.engines);
    renderGpus(doc.gpus);
    renderRoutes(doc.routes);
    renderKeys(doc.keys);
    renderErrors(doc.errors);
    renderPlan(doc.plan);
    $("footer").textContent = "configuration generation " + doc.generation + ", worker " + doc.worker +
      ", updated " + new Date(doc.at * 1000).toLocaleTimeString("en-GB");
  }

  async function poll() {
    const key = sessionStorage.getItem(STORE);
    if (!key) return;
    let resp;
    try {
      resp = await fetch("/admin/state", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    } catch (err) {
      setStatus("gateway unreachable: " + err, true);
      return;
    }
    if (resp.status === 401 || resp.status === 403) {
      let message = "refused (HTTP " + resp.status + ")";
      try { message = (await resp.json()).error.message; } catch (err) { /* keep the status */ }
      logout();
      setStatus(message, true);
      return;
    }
    if (!resp.ok) {
      setStatus("HTTP " + resp.status + " from /admin/state", true);
      return;
    }
    const doc = await resp.json();
    $("board").hidden = false;
    $("logout").hidden = false;
    setStatus("live, every " + POLL_MS / 1000 + " s", false);
    render(doc);
  }

  function start() {
    stop();
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  function logout() {
    stop();
    sessionStorage.removeItem(STORE);
    $("board").hidden = true;
    $("logout").hidden = true;
    setStatus("", false);
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (!key) return;
    sessionStorage.setItem(STORE, key);
    setStatus("opening…", false);
    start();
  });
  $("logout").addEventListener("click", logout);
  if (sessionStorage.getItem(STORE)) start();
})();
