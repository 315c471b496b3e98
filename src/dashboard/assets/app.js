// stockflow dashboard: plain JavaScript, no dependencies, served from the binary.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const fmt = new Intl.NumberFormat("en-US");
  const view = { q: "", sort: "available", order: "asc", negative: false, offset: 0, limit: 50 };
  const points = [];
  let total = 0;
  let stockTimer = null;
  let liveAlerts = 0;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return e;
  }
  const num = (v) => (v == null ? "–" : fmt.format(v));
  const cover = (v) => (v == null ? "∞" : v.toFixed(1));
  const time = (ms) => {
    const d = new Date(ms);
    // Event times are any 64-bit integer: out of Date's range, show the number.
    return Number.isFinite(d.getTime()) ? d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : String(ms);
  };

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  // ---- stock table --------------------------------------------------------------------------
  async function loadStock() {
    const p = new URLSearchParams({ sort: view.sort, order: view.order, offset: view.offset, limit: view.limit });
    if (view.q) p.set("q", view.q);
    if (view.negative) p.set("negative", "true");
    try {
      const data = await getJSON("/api/stock?" + p);
      total = data.total;
      renderStock(data);
    } catch (e) {
      $("stock-count").textContent = String(e.message);
    }
  }

  function renderStock(data) {
    const body = $("stock-body");
    const rows = data.items.map((r) => {
      const tr = el("tr", { "data-sku": r.sku, class: r.available < 0 ? "negative" : r.days_of_cover != null && r.days_of_cover < 3 ? "low" : "" },
        el("td", {}, r.sku),
        el("td", { class: "num avail" }, num(r.available)),
        el("td", { class: "num" }, num(r.on_hand)),
        el("td", { class: "num" }, num(r.reserved)),
        el("td", { class: "num" }, num(r.velocity_per_day)),
        el("td", { class: "num" }, cover(r.days_of_cover)),
        el("td", { class: "num" }, num(r.oversells)));
      tr.addEventListener("click", () => openDetail(r.sku));
      return tr;
    });
    body.replaceChildren(...rows);
    const last = Math.min(data.offset + data.items.length, data.total);
    $("page-info").textContent = data.total ? `${num(data.offset + 1)}–${num(last)} of ${num(data.total)}` : "no SKUs";
    $("stock-count").textContent = view.q || view.negative ? `${num(data.total)} matching of ${num(data.skus)}` : "";
    $("prev").disabled = data.offset === 0;
    $("next").disabled = last >= data.total;
    document.querySelectorAll("th[data-sort]").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.sort === view.sort);
      th.classList.toggle("desc", th.dataset.sort === view.sort && view.order === "desc");
    });
  }

  function refreshStockSoon(resetPage) {
    if (resetPage) view.offset = 0;
    clearTimeout(stockTimer);
    stockTimer = setTimeout(loadStock, 150);
  }

  document.querySelectorAll("th[data-sort]").forEach((th) =>
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      view.order = view.sort === key && view.order === "asc" ? "desc" : "asc";
      view.sort = key;
      refreshStockSoon(true);
    }));
  $("search").addEventListener("input", (e) => { view.q = e.target.value.trim(); refreshStockSoon(true); });
  $("negative-only").addEventListener("change", (e) => { view.negative = e.target.checked; refreshStockSoon(true); });
  $("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - view.limit); loadStock(); });
  $("next").addEventListener("click", () => { if (view.offset + view.limit < total) { view.offset += view.limit; loadStock(); } });

  // ---- alerts -------------------------------------------------------------------------------
  const oversellOnly = () => $("oversell-only").checked;

  function alertItem(a, fresh) {
    const what = a.kind === "oversell"
      ? `oversold by ${num(a.shortfall)} (asked ${num(a.requested)}, available ${num(a.available)})`
      : `low stock: ${num(a.available)} available, reorder point ${num(a.reorder_point)}`;
    const li = el("li", { class: a.kind + (fresh ? " fresh" : ""), "data-id": a.id, "data-seq": a.seq },
      el("div", {}, el("span", { class: "sku" }, a.sku), " — ", what),
      el("div", { class: "meta" }, (a.order_id ? `order ${a.order_id} · ` : a.cause === "count" ? "stock count · " : "") + time(a.ts)));
    li.addEventListener("click", () => openDetail(a.sku));
    return li;
  }

  // Alerts pushed since the last full load, merged into the next one by `seq`.
  let pushed = [];

  async function loadAlerts() {
    const p = new URLSearchParams({ limit: 100 });
    if (oversellOnly()) p.set("kind", "oversell");
    try {
      const data = await getJSON("/api/alerts?" + p);
      const newest = data.items.length ? data.items[0].seq : -1;
      const later = pushed.filter((a) => a.seq > newest && (!oversellOnly() || a.kind === "oversell"));
      pushed = [];
      $("alerts-list").replaceChildren(...later.map((a) => alertItem(a, true)), ...data.items.map((a) => alertItem(a, false)));
      setCounts(data.oversell, data.low_stock);
    } catch (_) { /* the stream reconnects and resyncs */ }
  }

  function addLiveAlert(a) {
    pushed.push(a);
    if (pushed.length > 200) pushed.shift();
    if (oversellOnly() && a.kind !== "oversell") return;
    const list = $("alerts-list");
    list.prepend(alertItem(a, true));
    while (list.children.length > 200) list.lastChild.remove();
    liveAlerts += 1;
    list.dataset.live = String(liveAlerts);
  }
  $("oversell-only").addEventListener("change", loadAlerts);

  // ---- cards and charts ---------------------------------------------------------------------
  function setCounts(oversell, lowStock) {
    $("k-oversell").textContent = num(oversell);
    $("k-lowstock").textContent = num(lowStock);
  }

  function applyTick(t) {
    $("k-skus").textContent = num(t.skus);
    $("k-negative").textContent = num(t.negative);
    setCounts(t.oversell, t.low_stock);
    $("k-stale").textContent = t.staleness_ms == null ? "–" : (t.staleness_ms / 1000).toFixed(1) + " s";
    if (t.point) {
      points.push(t.point);
      while (points.length > 600) points.shift();
      $("k-rate").textContent = t.point.applied_per_s == null ? "–" : num(Math.round(t.point.applied_per_s));
      drawCharts();
    }
  }

  function lagOf(p) {
    if (p.lag_seconds != null) return [p.lag_seconds, "Consumer lag (seconds behind, worst shard)"];
    if (p.lag_records != null) return [p.lag_records, "Consumer lag (records behind)"];
    if (p.lag_bytes != null) return [p.lag_bytes / 1e6, "Consumer lag (MB not yet read)"];
    return [null, "Consumer lag"];
  }

  function draw(svg, values) {
    const W = 600, H = 120, pad = 14;
    const vs = values.map((v) => (v == null ? 0 : v));
    const max = Math.max(1e-9, ...vs);
    const x = (i) => (vs.length < 2 ? W : (i / (vs.length - 1)) * W);
    const y = (v) => H - pad - (v / max) * (H - 2 * pad);
    const d = vs.map((v, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1)).join(" ");
    const ns = "http://www.w3.org/2000/svg";
    const path = (cls, dd) => { const p = document.createElementNS(ns, "path"); p.setAttribute("class", cls); p.setAttribute("d", dd); return p; };
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 4); label.setAttribute("y", 12);
    label.textContent = "max " + fmt.format(Math.round(max * 10) / 10) + " · now " + fmt.format(Math.round((vs[vs.length - 1] || 0) * 10) / 10);
    svg.replaceChildren(...(vs.length ? [path("area", d + ` L${W} ${H} L0 ${H} Z`), path("line", d)] : []), label);
  }

  function drawCharts() {
    draw($("chart-throughput"), points.map((p) => p.applied_per_s));
    const last = points.length ? lagOf(points[points.length - 1]) : [null, "Consumer lag"];
    $("lag-caption").textContent = last[1];
    draw($("chart-lag"), points.map((p) => lagOf(p)[0]));
  }

  // ---- SKU detail ---------------------------------------------------------------------------
  async function openDetail(sku) {
    let d;
    try { d = await getJSON("/api/stock/" + encodeURIComponent(sku)); } catch (e) { return; }
    const r = d.row;
    const facts = el("table", {}, el("tbody", {},
      ...[["Available", num(r.available)], ["On hand", num(r.on_hand)], ["Reserved", num(r.reserved)], ["Open order lines", num(r.open_lines)],
        ["Sold in 24 h", num(r.velocity_per_day)], ["Days of cover", cover(r.days_of_cover)], ["Oversell alerts", num(r.oversells)],
        ["Average cost", r.avg_cost ? `${r.avg_cost} ${r.currency}` : "–"], ["COGS booked", r.cogs],
        ["Latest event", r.last_event_ms ? time(r.last_event_ms) : "–"]].map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { class: "num" }, v)))));
    const max = Math.max(1, ...d.hourly.map((h) => h.units));
    const bars = el("div", { class: "bars" }, ...d.hourly.map((h) => {
      const b = el("div", { title: `${time(h.hour)}: ${h.units} units` }); b.style.height = (100 * h.units / max) + "%"; return b;
    }));
    const windows = el("table", {}, el("thead", {}, el("tr", {}, ...["Window", "Start", "Ordered", "Cancelled", "Shipped", "Orders"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...d.windows.map((w) => el("tr", {},
        el("td", {}, w.size_ms >= 3600000 ? (w.size_ms / 3600000) + " h" : (w.size_ms / 60000) + " min"), el("td", {}, time(w.start)),
        el("td", { class: "num" }, num(w.counts.units_ordered)), el("td", { class: "num" }, num(w.counts.units_cancelled)),
        el("td", { class: "num" }, num(w.counts.units_shipped)), el("td", { class: "num" }, num(w.counts.orders))))));
    const alerts = el("ol", { class: "alerts" }, ...d.alerts.map((a) => alertItem(a, false)));
    $("detail-body").replaceChildren(el("h2", {}, sku), facts, el("h2", {}, "Units ordered per hour (24 h)"), bars,
      el("h2", {}, "Open windows"), d.windows.length ? windows : el("p", { class: "muted" }, "none open"),
      el("h2", {}, "Recent alerts"), d.alerts.length ? alerts : el("p", { class: "muted" }, "none"));
    $("detail").showModal();
  }

  // ---- live stream --------------------------------------------------------------------------
  function connect() {
    const status = $("status");
    const es = new EventSource("/api/stream");
    // On every (re)connect: the list as of now, merged with what the stream pushes meanwhile.
    es.addEventListener("hello", () => { status.dataset.state = "live"; status.textContent = "live"; loadAlerts(); });
    es.addEventListener("alert", (e) => addLiveAlert(JSON.parse(e.data)));
    es.addEventListener("tick", (e) => applyTick(JSON.parse(e.data)));
    es.addEventListener("resync", loadAlerts);
    es.onerror = () => { status.dataset.state = "down"; status.textContent = "reconnecting…"; };
  }

  // ---- consumer group (dashboard --dynamodb) ----------------------------------------------------
  async function loadGroup() {
    let data;
    try { data = await getJSON("/api/group"); } catch (e) { return; }
    if (!data.shards) return;
    $("group").hidden = false;
    const owners = new Set(data.shards.filter((r) => r.state === "live").map((r) => r.owner));
    $("group-summary").textContent = data.shards.length + " shards, " + owners.size + " members";
    const now = Date.now();
    $("group-body").replaceChildren(...data.shards.map((r) => el("tr", { "data-state": r.state },
      el("td", {}, r.shard),
      el("td", {}, r.state),
      el("td", {}, r.owner || "–"),
      el("td", { class: "num" }, String(r.epoch)),
      el("td", { class: "mono" }, r.checkpoint || "–"),
      el("td", { class: "num" }, r.committed_at_ms == null ? "–" : ((now - r.committed_at_ms) / 1000).toFixed(1) + " s ago"),
      el("td", { class: "num" }, r.lag_ms == null ? "–" : (r.lag_ms / 1000).toFixed(1) + " s"))));
  }

  // ---- reconciliation (the latest `stockflow reconcile` report) -----------------------------------
  async function loadReconcile() {
    let data;
    try { data = await getJSON("/api/reconcile"); } catch (e) { return; }
    const r = data.report;
    if (!r) return;
    $("reconcile").hidden = false;
    const c = r.totals.classes;
    $("reconcile-summary").textContent = "as of " + r.as_of + " — " + r.outcome + ": " + num(r.totals.skus) + " SKUs, " +
      num(c.match) + " match, " + num(c.timing) + " timing, " + num(c.explained) + " explained, " +
      num(c.unexplained) + " unexplained (" + num(r.totals.unexplained_units) + " units, " + r.totals.unexplained_value + ")";
    const v = r.value;
    const books = v && v.inventory_difference != null ? " Books: inventory differs by " + v.inventory_difference +
      " " + v.currency + (v.cogs_difference != null ? ", COGS by " + v.cogs_difference : "") + "." : "";
    $("reconcile-reasons").textContent = r.reasons.join("; ") + books;
    $("reconcile").dataset.outcome = r.outcome;
    $("reconcile-body").replaceChildren(...r.unexplained.map((l) => el("tr", {},
      el("td", {}, l.sku),
      el("td", { class: "num" }, num(l.stockflow_on_hand)),
      el("td", { class: "num" }, l.amazon_count == null ? "not listed" : num(l.amazon_count)),
      el("td", { class: "num" }, num(l.difference)),
      el("td", {}, Object.entries(l.explained).map(([k, n]) => k + " " + n).join(", ")),
      el("td", { class: "num" }, num(l.unexplained_units)),
      el("td", { class: "num" }, l.unexplained_value))));
  }

  async function start() {
    try {
      const s = await getJSON("/api/series");
      points.push(...s.points);
      drawCharts();
      const o = await getJSON("/api/overview");
      delete o.point; // already among the series
      applyTick(o);
    } catch (_) { /* filled by the stream */ }
    connect();
    await loadStock();
    setInterval(loadStock, 500);
    loadGroup();
    setInterval(loadGroup, 2000);
    loadReconcile();
    setInterval(loadReconcile, 10000);
  }
  start();
})();
