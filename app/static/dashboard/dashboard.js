// The Octopus admin dashboard (served at /_/). Plain JavaScript, no framework, no build.
//
// Every 2 s (or ?refresh=SECONDS) it fetches the admin JSON documents with relative URLs
// (stats, routes, services, plugins), so it works on the admin listener, under /_/ on the
// data port, below a root path and behind basic auth. /_/stats holds running totals; the
// rates, error ratios and latency quantiles are computed here from successive answers.
//
// Data only ever reaches the DOM through text nodes, textContent and setAttribute.
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART_W = 300;
  const CHART_H = 80;
  const MAX_POINTS = 90;
  const BREAKER_CLASSES = { closed: "badge-ok", "half-open": "badge-warn", open: "badge-bad" };

  const params = new URLSearchParams(window.location.search);
  const requested = Number(params.get("refresh"));
  const REFRESH_MS = requested > 0 ? Math.min(Math.max(requested, 0.5), 60) * 1000 : 2000;

  const state = {
    paused: false,
    inflight: false,
    timer: null,
    polls: 0,
    previous: null, // the last /_/stats answer
    series: { rate: [], errors: [], p50: [], p99: [] },
    window: [], // the times of the samples the series cover
    routes: null,
    routeStats: new Map(),
    filter: "",
    lastKeys: {},
  };

  // ---- DOM helpers ---------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  // el("td", {class: "num", title: "x"}, "text" | Node | [children])
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (value !== null && value !== undefined) node.setAttribute(name, String(value));
      }
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    if (children === null || children === undefined) return;
    if (Array.isArray(children)) {
      for (const child of children) append(node, child);
    } else if (children instanceof Node) {
      node.appendChild(children);
    } else {
      node.appendChild(document.createTextNode(String(children)));
    }
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function setText(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function badge(text, cls) {
    return el("span", { class: "badge " + cls }, text);
  }

  // Replace a table body only when its data changed (keeps text selection stable).
  function fillBody(table, key, rows, emptyText, columns) {
    if (state.lastKeys[table.id] === key) return;
    state.lastKeys[table.id] = key;
    const body = table.tBodies[0];
    body.replaceChildren();
    if (rows.length === 0) {
      body.appendChild(el("tr", { class: "empty" }, el("td", { colspan: columns }, emptyText)));
      return;
    }
    for (const row of rows) body.appendChild(row);
  }

  // ---- formatting ------------------------------------------------------------------

  function fixed(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    const abs = Math.abs(value);
    if (abs >= 100) return value.toFixed(0);
    if (abs >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  // Two significant-ish digits, for the narrow summary cards.
  function compact(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (Math.abs(value) >= 100) return value.toFixed(0);
    if (Math.abs(value) >= 1) return value.toFixed(1);
    return value.toFixed(2);
  }

  function duration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "–";
    const s = Math.floor(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function ago(timestamp, now) {
    if (timestamp === null || timestamp === undefined) return "never";
    return duration(now - timestamp) + " ago";
  }

  function clock(timestamp) {
    return new Date(timestamp * 1000).toLocaleTimeString();
  }

  // ---- fetching --------------------------------------------------------------------

  function getJSON(path) {
    return fetch(path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    }).then(function (response) {
      if (!response.ok) {
        const error = new Error(path + " answered HTTP " + response.status);
        error.status = response.status;
        throw error;
      }
      return response.json();
    });
  }

  function poll() {
    state.timer = null;
    if (state.inflight) return;
    state.inflight = true;
    Promise.all([getJSON("stats"), getJSON("routes"), getJSON("services"), getJSON("plugins")])
      .then(function (docs) {
        state.polls += 1;
        render(docs[0], docs[1], docs[2], docs[3]);
        document.body.dataset.polls = String(state.polls);
        showBanner(null);
      })
      .catch(function (error) {
        setState("unreachable", "badge-bad");
        if (error && error.status === 401) {
          showBanner("The admin API asks for credentials again: reload the page to sign in.");
        } else {
          const detail = error && error.message ? error.message : String(error);
          showBanner("Cannot reach the admin API (" + detail + "); retrying.");
        }
      })
      .finally(function () {
        state.inflight = false;
        schedule();
      });
  }

  function schedule() {
    if (!state.paused && state.timer === null) state.timer = window.setTimeout(poll, REFRESH_MS);
  }

  function showBanner(text) {
    const banner = $("banner");
    if (text === null) {
      banner.hidden = true;
      banner.textContent = "";
    } else {
      banner.textContent = text;
      banner.hidden = false;
    }
  }

  function setState(text, cls) {
    const node = $("gateway-state");
    node.textContent = text;
    node.className = "badge " + cls;
  }

  // ---- time series -----------------------------------------------------------------

  // The q-quantile (0..1) of the requests between two cumulative histograms, in seconds,
  // interpolated inside the bucket like Prometheus' histogram_quantile.
  function quantile(q, before, after) {
    const earlier = new Map((before || []).map((bucket) => [bucket.le, bucket.count]));
    const counts = after.map(function (bucket) {
      return { le: bucket.le, count: bucket.count - (earlier.get(bucket.le) || 0) };
    });
    const total = counts.length ? counts[counts.length - 1].count : 0;
    if (total <= 0) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const bucket of counts) {
      if (bucket.count >= rank) {
        if (bucket.le === "+Inf") return lower;
        const inBucket = bucket.count - below;
        const share = inBucket > 0 ? (rank - below) / inBucket : 1;
        return lower + (bucket.le - lower) * share;
      }
      if (bucket.le !== "+Inf") lower = bucket.le;
      below = bucket.count;
    }
    return lower;
  }

  function pushTime(t) {
    state.window.push(t);
    if (state.window.length > MAX_POINTS) state.window.shift();
  }

  function push(name, value) {
    const list = state.series[name];
    list.push(value);
    if (list.length > MAX_POINTS) list.shift();
  }

  function resetSeries() {
    for (const name of Object.keys(state.series)) state.series[name] = [];
    state.window = [];
  }

  function record(stats) {
    const before = state.previous;
    state.previous = stats;
    if (!before) return;
    const dt = stats.time - before.time;
    const delta = stats.requests.total - before.requests.total;
    if (dt <= 0) return;
    // Totals only fall when the gateway restarted. (started_at is no sign: with several
    // workers, successive polls may be answered by different workers of one instance,
    // whose totals are the instance's.)
    if (delta < 0) {
      resetSeries();
      return;
    }
    const errors = stats.requests.by_class["5xx"] - before.requests.by_class["5xx"];
    if (state.window.length === 0) pushTime(before.time);
    pushTime(stats.time);
    push("rate", delta / dt);
    push("errors", delta > 0 ? (100 * errors) / delta : 0);
    const p50 = quantile(0.5, before.latency.buckets, stats.latency.buckets);
    const p99 = quantile(0.99, before.latency.buckets, stats.latency.buckets);
    push("p50", p50 === null ? null : p50 * 1000);
    push("p99", p99 === null ? null : p99 * 1000);
  }

  function latest(name) {
    const list = state.series[name];
    for (let i = list.length - 1; i >= 0; i -= 1) if (list[i] !== null) return list[i];
    return null;
  }

  // ---- charts ----------------------------------------------------------------------

  function niceMax(value, floor) {
    const top = Math.max(value, floor);
    const power = Math.pow(10, Math.floor(Math.log10(top)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= top) return step * power;
    return 10 * power;
  }

  // Points spread over the width, newest on the right (the window grows to MAX_POINTS
  // polls, then slides); a null is a gap (no requests, so no latency).
  function pathFor(values, top, closeArea) {
    const step = CHART_W / Math.max(values.length - 1, 1);
    const offset = CHART_W - (values.length - 1) * step;
    let d = "";
    let run = [];
    const flush = function () {
      if (run.length === 0) return;
      if (run.length === 1) run.unshift([run[0][0] - step / 2, run[0][1]]);
      d += "M" + run.map((p) => p[0].toFixed(1) + " " + p[1].toFixed(1)).join(" L");
      if (closeArea) {
        d += " L" + run[run.length - 1][0].toFixed(1) + " " + CHART_H;
        d += " L" + run[0][0].toFixed(1) + " " + CHART_H + " Z";
      }
      d += " ";
      run = [];
    };
    values.forEach(function (value, i) {
      if (value === null || !isFinite(value)) {
        flush();
        return;
      }
      const y = CHART_H - 2 - (Math.min(value, top) / top) * (CHART_H - 6);
      run.push([offset + i * step, y]);
    });
    flush();
    return d.trim();
  }

  function drawChart(figureId, lines, floor, unit) {
    const figure = $(figureId);
    const chart = figure.querySelector("svg");
    let peak = 0;
    for (const line of lines) {
      for (const value of line.values) if (value !== null && isFinite(value)) peak = Math.max(peak, value);
    }
    const top = niceMax(peak, floor);
    const nodes = [];
    for (const fraction of [0.25, 0.5, 0.75]) {
      const y = (CHART_H - 2 - fraction * (CHART_H - 6)).toFixed(1);
      nodes.push(svg("line", { class: "grid", x1: 0, x2: CHART_W, y1: y, y2: y }));
    }
    for (const line of lines) {
      if (line.area) {
        const area = pathFor(line.values, top, true);
        if (area) nodes.push(svg("path", { class: "area " + line.cls, d: area }));
      }
      const d = pathFor(line.values, top, false);
      if (d) {
        nodes.push(svg("path", { class: "line " + line.cls, d: d, "vector-effect": "non-scaling-stroke" }));
      }
    }
    chart.replaceChildren.apply(chart, nodes);
    const points = Math.max.apply(null, lines.map((l) => l.values.length));
    chart.dataset.points = String(points);
    figure.querySelector('[data-role="max"]').textContent = "max " + fixed(top) + unit;
    const span = state.window.length > 1 ? state.window[state.window.length - 1] - state.window[0] : 0;
    figure.querySelector('[data-role="window"]').textContent = points ? "last " + duration(span) : "waiting for data";
  }

  function drawCharts() {
    const s = state.series;
    drawChart("chart-rate", [{ values: s.rate, cls: "series-a", area: true }], 1, "/s");
    drawChart("chart-errors", [{ values: s.errors, cls: "series-err", area: true }], 1, "%");
    drawChart(
      "chart-latency",
      [
        { values: s.p99, cls: "series-b", area: false },
        { values: s.p50, cls: "series-a", area: true },
      ],
      1,
      " ms"
    );
  }

  // ---- sections --------------------------------------------------------------------

  function renderSummary(stats, routes, services) {
    setText("card-rate", fixed(latest("rate")));
    setText("card-errors", latest("errors") === null ? "–" : fixed(latest("errors")) + " %");
    const p50 = latest("p50");
    const p99 = latest("p99");
    setText("card-latency", p50 === null ? "–" : compact(p50) + " / " + compact(p99));
    setText("card-active", String(stats.active_connections));
    setText("card-routes", String(routes.routes.length));
    let endpoints = 0;
    let healthy = 0;
    let open = 0;
    for (const upstream of services.upstreams) {
      for (const endpoint of upstream.endpoints) {
        endpoints += 1;
        if (endpoint.healthy && !endpoint.ejected) healthy += 1;
        if (endpoint.breaker === "open") open += 1;
      }
    }
    setText("card-endpoints", healthy + " / " + endpoints);
    $("card-endpoints").className = "card-value" + (healthy < endpoints ? " warn" : "");
    setText("card-breakers", String(open));
    $("card-breakers").className = "card-value" + (open > 0 ? " bad" : "");
    setText("card-table", "v" + stats.table_version);

    if (stats.draining) setState("draining", "badge-warn");
    else if (stats.ready) setState("ready", "badge-ok");
    else setState("starting", "badge-warn");
    setText("uptime", "up " + duration(stats.time - stats.started_at));
    setText("updated", "updated " + clock(stats.time));
  }

  function sourceBadge(source) {
    if (source === "static") return badge("static", "badge-neutral");
    if (typeof source === "string" && source.indexOf("farp:") === 0) {
      return el("span", { class: "badge badge-farp", title: "registered through FARP" }, [
        "FARP ",
        el("strong", null, source.slice(5)),
      ]);
    }
    return badge(String(source), "badge-neutral");
  }

  function routeRows() {
    const needle = state.filter.toLowerCase();
    const rows = [];
    for (const route of state.routes.routes) {
      const text = [route.name, route.source, route.path, route.host || "", route.upstream]
        .join(" ")
        .toLowerCase();
      if (needle && text.indexOf(needle) < 0) continue;
      const counts = state.routeStats.get(route.path) || { requests: 0, errors: 0 };
      rows.push(
        el("tr", { "data-route": route.name }, [
          el("td", { class: "strong" }, route.name),
          el("td", null, sourceBadge(route.source)),
          el("td", null, route.methods.length ? route.methods.join(" ") : "any"),
          el("td", null, route.host || "any"),
          el("td", { class: "mono" }, route.path),
          el("td", null, route.upstream || "–"),
          el("td", { class: "num" }, route.priority),
          el("td", { class: "num" }, counts.requests),
          el("td", { class: "num" + (counts.errors ? " bad" : "") }, counts.errors),
        ])
      );
    }
    return rows;
  }

  function renderRoutes(routes, stats) {
    state.routes = routes;
    state.routeStats = new Map(stats.routes.map((r) => [r.route, r]));
    setText("routes-count", String(routes.routes.length));
    const key = JSON.stringify([routes.routes, stats.routes, state.filter]);
    fillBody($("routes"), key, routeRows(), state.filter ? "No route matches the filter." : "No routes.", 9);

    const conflicts = routes.conflicts || [];
    setText("conflicts-count", conflicts.length ? String(conflicts.length) : "");
    const rows = conflicts.map(function (conflict) {
      if (conflict && typeof conflict === "object" && "path" in conflict) {
        return el("tr", null, [
          el("td", null, conflict.method || "–"),
          el("td", { class: "mono" }, conflict.path),
          el("td", null, conflict.host || "any"),
          el("td", null, conflict.winner || "–"),
          el("td", null, (conflict.losers || []).join(", ")),
          el("td", null, conflict.reason || "–"),
        ]);
      }
      return el("tr", null, el("td", { colspan: 6, class: "mono" }, JSON.stringify(conflict)));
    });
    fillBody($("conflicts"), JSON.stringify(conflicts), rows, "No conflicts.", 6);
  }

  function endpointRow(endpoint) {
    const health = endpoint.ejected
      ? badge("ejected", "badge-bad")
      : endpoint.healthy
        ? badge("healthy", "badge-ok")
        : badge("unhealthy", "badge-bad");
    const breaker = badge(endpoint.breaker, BREAKER_CLASSES[endpoint.breaker] || "badge-neutral");
    return el("tr", null, [
      el("td", { class: "mono" }, endpoint.url),
      el("td", null, health),
      el("td", null, breaker),
      el("td", { class: "num" }, endpoint.weight),
      el("td", { class: "num" }, endpoint.in_flight),
      el("td", { class: "num" }, fixed(endpoint.ewma_ms)),
    ]);
  }

  function renderServices(services, routes, stats) {
    const container = $("services");
    setText("services-count", String(services.upstreams.length));
    const upstreamStats = new Map(stats.upstreams.map((u) => [u.name, u]));
    const key = JSON.stringify([services.upstreams, routes.routes.map((r) => [r.name, r.upstream]), stats.upstreams]);
    if (state.lastKeys.services !== key) {
      state.lastKeys.services = key;
      const cards = services.upstreams.map(function (upstream) {
        const using = routes.routes.filter((r) => r.upstream === upstream.name).map((r) => r.name);
        const healthy = upstream.endpoints.filter((e) => e.healthy && !e.ejected).length;
        const counts = upstreamStats.get(upstream.name) || { requests: 0, errors: 0 };
        const cls = healthy === upstream.endpoints.length ? "badge-ok" : healthy ? "badge-warn" : "badge-bad";
        return el("article", { class: "service", "data-upstream": upstream.name }, [
          el("header", { class: "service-head" }, [
            el("h3", null, upstream.name),
            badge(healthy + "/" + upstream.endpoints.length + " healthy", cls),
            el("span", { class: "muted" }, upstream.load_balance),
            el("span", { class: "muted" }, counts.requests + " requests, " + counts.errors + " failed"),
          ]),
          el("div", { class: "service-routes muted" }, using.length ? "routes: " + using.join(", ") : "no routes"),
          el("div", { class: "table-wrap" }, [
            el("table", { class: "endpoints" }, [
              el(
                "thead",
                null,
                el("tr", null, [
                  el("th", null, "Endpoint"),
                  el("th", null, "Health"),
                  el("th", null, "Breaker"),
                  el("th", { class: "num" }, "Weight"),
                  el("th", { class: "num" }, "In flight"),
                  el("th", { class: "num" }, "EWMA ms"),
                ])
              ),
              el("tbody", null, upstream.endpoints.map(endpointRow)),
            ]),
          ]),
        ]);
      });
      if (cards.length === 0) cards.push(el("p", { class: "muted" }, "No upstreams."));
      container.replaceChildren.apply(container, cards);
    }

    const now = stats.time;
    const discovery = services.discovery || [];
    const rows = discovery.map(function (backend) {
      const ok = backend.state === "synced";
      return el("tr", null, [
        el("td", { class: "strong" }, backend.backend),
        el("td", null, badge(backend.state, ok ? "badge-ok" : "badge-warn")),
        el(
          "td",
          { title: backend.last_sync ? new Date(backend.last_sync * 1000).toISOString() : null },
          ago(backend.last_sync, now)
        ),
      ]);
    });
    // Keyed on the rounded age too, so "5 s ago" keeps counting.
    const discoveryKey = JSON.stringify(discovery.map((d) => [d.backend, d.state, ago(d.last_sync, now)]));
    fillBody($("discovery"), discoveryKey, rows, "Discovery is off (static routes only).", 3);
  }

  function renderPlugins(plugins) {
    const list = plugins.plugins || [];
    setText("plugins-count", String(list.length));
    const rows = list.map(function (plugin) {
      let scope = plugin.middleware ? "every route (middleware)" : "";
      if (!plugin.middleware) scope = plugin.routes.length ? plugin.routes.join(", ") : "no route";
      return el("tr", null, [
        el("td", { class: "strong" }, plugin.name),
        el("td", null, plugin.version),
        el("td", null, plugin.kind),
        el("td", null, plugin.source),
        el("td", null, scope),
        el("td", { class: "muted" }, plugin.description || ""),
      ]);
    });
    fillBody($("plugins"), JSON.stringify(list), rows, "No plugins loaded.", 6);
  }

  function render(stats, routes, services, plugins) {
    record(stats);
    renderSummary(stats, routes, services);
    drawCharts();
    renderRoutes(routes, stats);
    renderServices(services, routes, stats);
    renderPlugins(plugins);
  }

  // ---- wiring ----------------------------------------------------------------------

  function start() {
    $("pause").addEventListener("click", function () {
      state.paused = !state.paused;
      this.textContent = state.paused ? "Resume" : "Pause";
      this.setAttribute("aria-pressed", String(state.paused));
      if (state.paused) {
        if (state.timer !== null) window.clearTimeout(state.timer);
        state.timer = null;
        setText("updated", "paused");
      } else {
        poll();
      }
    });
    $("route-filter").addEventListener("input", function () {
      state.filter = this.value.trim();
      if (!state.routes) return;
      const key = JSON.stringify([state.routes.routes, [...state.routeStats.values()], state.filter]);
      fillBody($("routes"), key, routeRows(), "No route matches the filter.", 9);
    });
    drawCharts();
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
