// fedq's dashboard: draws the JSON document of fedq/dashboard/data.py as SVG charts and tables.
// No library, no network but the page's own /api/data: the same code draws the live dashboard
// (polling) and fedq report's file (its data inlined).
(function () {
  "use strict";
  var SVG = "http" + "://www.w3.org/2000/svg";
  var COLORS = { applied: "#2b8a3e", rejected: "#c92a2a", pending: "#e8a33d", line: "#1c7ed6", bar: "#5c7cfa" };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    var units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
    for (var i = 0; i < units.length; i++) if (n >= units[i][1]) return (n / units[i][1]).toFixed(1) + " " + units[i][0];
    return n + " B";
  }
  function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
  function ticks(lo, hi, n) {
    if (hi <= lo) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }
  function frame(w, h) { return svg("svg", { viewBox: "0 0 " + w + " " + h, width: "100%", role: "img" }); }
  function empty(box, text) { box.appendChild(el("p", { "class": "empty" }, text)); }

  // A line chart of points {x, y, attrs}: axes with ticks, a polyline, a circle per point.
  function lineChart(box, points, o) {
    if (!points.length) return empty(box, "no data yet");
    var W = 560, H = 240, L = 48, R = 12, T = 12, B = 36;
    var xs = points.map(function (p) { return p.x; }), ys = points.map(function (p) { return p.y; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) x1 = x0 + 1;
    var y0 = o.y0 !== undefined ? o.y0 : Math.min.apply(null, ys), y1 = o.y1 !== undefined ? o.y1 : Math.max.apply(null, ys);
    if (y1 === y0) y1 = y0 + 1;
    function X(v) { return L + (v - x0) / (x1 - x0) * (W - L - R); }
    function Y(v) { return H - B - (v - y0) / (y1 - y0) * (H - T - B); }
    var s = frame(W, H);
    s.setAttribute("class", "chart " + (o.cls || ""));
    ticks(y0, y1, 5).forEach(function (v) {
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), "class": "grid" }));
      s.appendChild(svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", "class": "tick" }, o.yfmt ? o.yfmt(v) : v));
    });
    ticks(x0, x1, 6).forEach(function (v) {
      s.appendChild(svg("text", { x: X(v), y: H - B + 16, "text-anchor": "middle", "class": "tick" }, v));
    });
    s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "class": "label" }, o.xlabel));
    s.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }));
    s.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, "class": "axis" }));
    s.appendChild(svg("polyline", {
      points: points.map(function (p) { return X(p.x).toFixed(1) + "," + Y(p.y).toFixed(1); }).join(" "),
      fill: "none", stroke: COLORS.line, "stroke-width": 2
    }));
    points.forEach(function (p) {
      var c = svg("circle", Object.assign({ cx: X(p.x).toFixed(1), cy: Y(p.y).toFixed(1), r: 3, fill: COLORS.line, "class": "pt" }, p.attrs));
      c.appendChild(svg("title", {}, p.title));
      s.appendChild(c);
    });
    box.appendChild(s);
  }

  // Bars of {label, parts: [{value, color, name}], attrs}: one stacked bar per label.
  function barChart(box, bars, o) {
    if (!bars.length) return empty(box, o.none || "none");
    var W = 560, H = 220, L = 40, R = 8, T = 12, B = 44;
    var top = Math.max.apply(null, bars.map(function (b) { return b.parts.reduce(function (a, p) { return a + p.value; }, 0); })) || 1;
    var s = frame(W, H), slot = (W - L - R) / bars.length, w = Math.max(2, Math.min(48, slot * 0.7));
    s.setAttribute("class", "chart " + (o.cls || ""));
    function Y(v) { return H - B - v / top * (H - T - B); }
    ticks(0, top, 4).forEach(function (v) {
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), "class": "grid" }));
      s.appendChild(svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", "class": "tick" }, v));
    });
    bars.forEach(function (b, i) {
      var x = L + i * slot + (slot - w) / 2, base = 0;
      var g = svg("g", Object.assign({ "class": "bar" }, b.attrs || {}));
      b.parts.forEach(function (p) {
        if (!p.value) return;
        var r = svg("rect", { x: x.toFixed(1), y: Y(base + p.value).toFixed(1), width: w.toFixed(1), height: (Y(base) - Y(base + p.value)).toFixed(1), fill: p.color });
        r.appendChild(svg("title", {}, b.label + ": " + p.value + (p.name ? " " + p.name : "")));
        g.appendChild(r);
        base += p.value;
      });
      var label = b.label.length > 14 ? b.label.slice(0, 13) + "\u2026" : b.label;
      g.appendChild(svg("text", { x: (x + w / 2).toFixed(1), y: H - B + 14, "text-anchor": "middle", "class": "tick" + (b.dim ? " dim" : "") }, label));
      s.appendChild(g);
    });
    s.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }));
    if (o.xlabel) s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "class": "label" }, o.xlabel));
    box.appendChild(s);
  }

  function table(box, head, rows, cls) {
    if (!rows.length) return empty(box, "none");
    var t = el("table", { "class": cls || "" }), tr = el("tr");
    head.forEach(function (h) { tr.appendChild(el("th", {}, h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr");
      r.forEach(function (c) {
        var td = el("td", {}, c === null || c === undefined ? "-" : c);
        if (typeof c === "number") td.setAttribute("class", "num");
        row.appendChild(td);
      });
      t.appendChild(row);
    });
    box.appendChild(t);
  }

  function card(id, title, note) {
    var box = document.getElementById(id);
    box.textContent = "";
    box.appendChild(el("h2", {}, title));
    if (note) box.appendChild(el("p", { "class": "note" }, note));
    return box;
  }

  function draw(d) {
    var h = d.headline;
    document.getElementById("title").textContent = "fedq job " + (d.job || "?");
    var state = document.getElementById("state");
    state.textContent = d.live ? "LIVE" : "finished" + (h.stop_reason ? " (" + h.stop_reason + ")" : "");
    state.className = d.live ? "live" : "done";
    document.getElementById("meta").textContent = d.run + " \u00b7 as of " + new Date(d.now * 1000).toLocaleString();
    var heads = document.getElementById("headline");
    heads.textContent = "";
    [["version", h.version], ["accuracy", pct(h.accuracy)], ["best", pct(h.best_accuracy)],
     ["updates applied", h.updates_applied], ["rejected", h.updates_rejected],
     ["workers live", h.workers_live], ["gone", h.workers_gone], ["mode", h.mode || "-"]].forEach(function (kv) {
      var b = el("div", { "class": "stat" });
      b.appendChild(el("span", { "class": "v" }, kv[1] === null || kv[1] === undefined ? "-" : kv[1]));
      b.appendChild(el("span", { "class": "k" }, kv[0]));
      heads.appendChild(b);
    });

    function accPoints(xKey) {
      return d.accuracy.filter(function (p) { return p[xKey] !== null; }).map(function (p) {
        return {
          x: p[xKey], y: p.accuracy,
          attrs: { "data-version": p.version, "data-accuracy": p.accuracy, "data-t": p.t === null ? "" : p.t },
          title: "v" + p.version + ": " + pct(p.accuracy) + (p.t === null ? "" : " at " + p.t.toFixed(1) + " s")
        };
      });
    }
    lineChart(card("acc-time", "Accuracy against time"), accPoints("t"), { xlabel: "seconds since the first task", y0: 0, y1: 1, yfmt: pct, cls: "accuracy acc-time" });
    lineChart(card("acc-version", "Accuracy against version"), accPoints("version"), { xlabel: "version", y0: 0, y1: 1, yfmt: pct, cls: "accuracy acc-version" });

    var live = d.participation.filter(function (w) { return w.status === "live"; }).map(function (w) { return w.worker; });
    var gone = d.participation.filter(function (w) { return w.status === "gone"; }).map(function (w) { return w.worker; });
    var part = card("participation", "Updates per worker",
      "live: " + (live.join(", ") || "none") + " \u00b7 gone: " + (gone.join(", ") || "none"));
    barChart(part, d.participation.map(function (w) {
      return {
        label: w.worker, dim: w.status !== "live", attrs: { "data-worker": w.worker, "data-applied": w.applied, "data-status": w.status },
        parts: [{ value: w.applied, color: COLORS.applied, name: "applied" }, { value: w.rejected, color: COLORS.rejected, name: "rejected" },
                { value: w.pending, color: COLORS.pending, name: "pending" }]
      };
    }), { cls: "participation", none: "no worker yet" });
    var legend = el("p", { "class": "legend" });
    [["applied", COLORS.applied], ["rejected", COLORS.rejected], ["pending", COLORS.pending]].forEach(function (kv) {
      var key = el("span", { style: "color:" + kv[1] }, "\u25a0 ");
      legend.appendChild(key);
      legend.appendChild(document.createTextNode(kv[0] + "  "));
    });
    legend.appendChild(document.createTextNode("\u00b7 grey label: gone"));
    part.appendChild(legend);

    var sizes = d.update_sizes;
    barChart(card("sizes", "Update sizes", sizes.count + " updates, mean " + bytes(sizes.mean)), sizes.bins.map(function (b) {
      return { label: bytes(b.lo), parts: [{ value: b.count, color: COLORS.bar, name: "updates of " + bytes(b.lo) + "\u2013" + bytes(b.hi) }] };
    }), { cls: "sizes", xlabel: "bytes on the wire", none: "no update yet" });
    barChart(card("staleness", "Staleness of applied updates"), d.staleness.map(function (s) {
      return { label: String(s.staleness), attrs: { "data-staleness": s.staleness }, parts: [{ value: s.count, color: COLORS.bar, name: "updates" }] };
    }), { cls: "staleness", xlabel: "versions behind", none: "no update applied yet" });
    barChart(card("rejections", "Rejections by reason"), d.rejections.map(function (r) {
      return { label: r.reason, attrs: { "data-reason": r.reason }, parts: [{ value: r.count, color: COLORS.rejected, name: "rejected" }] };
    }), { cls: "rejections", none: "no update rejected" });

    var q = d.queues;
    var qbox = card("queues", "Queues", q.source + (q.at ? " \u00b7 looked " + Math.max(0, d.now - q.at).toFixed(0) + " s ago" : ""));
    if (q.error) qbox.appendChild(el("p", { "class": "warn" }, q.error));
    table(qbox, ["queue", "for", "ready", "consumers"], q.rows.map(function (r) {
      return [r.queue, r.role, r.messages === null ? "missing" : r.messages, r.consumers];
    }));
    var sbox = card("services", "Services", d.health_source);
    table(sbox, ["process", "pid", "health", "last sign", "seconds ago", "metrics port"], d.services.map(function (s) {
      return [s.name, s.pid, s.health, s.sign, s.age, s.metrics_port || "-"];
    }), "services");

    var c = d.cost;
    var cbox = card("cost", "Cost (fedq cost)", c.store_known === false ? "store bytes unknown: the store is not a local folder" : "");
    var bytesCol = function (name) { return name.indexOf("bytes") === 0 || name === "store_bytes"; };
    table(cbox, c.columns, c.rows.map(function (r) {
      return r.map(function (v, i) { return bytesCol(c.keys[i]) ? bytes(v) : (typeof v === "number" && v % 1 ? +v.toFixed(2) : v); });
    }), "cost");
    document.body.setAttribute("data-drawn", String(d.accuracy.length));
  }

  function boot() {
    var inline = document.getElementById("fedq-data");
    if (inline && inline.textContent.trim()) return draw(JSON.parse(inline.textContent));
    var token = new URLSearchParams(window.location.search).get("token");
    var status = document.getElementById("poll");
    function poll() {
      fetch("api/data", { headers: token ? { Authorization: "Bearer " + token } : {}, cache: "no-store" })
        .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
        .then(function (d) { draw(d); status.textContent = ""; })
        .catch(function (e) { status.textContent = "cannot reach the dashboard server: " + e.message; })
        .then(function () { setTimeout(poll, window.FEDQ_POLL_MS || 2000); });
    }
    poll();
  }
  boot();
})();
