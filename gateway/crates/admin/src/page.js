
"use strict";
// The gateway's status page: renders /status.json (the admin crate's api::Overview) and
// fetches it again every two seconds. Every value from the document is set as text, never
// as markup. Actions call the /admin/ API with the token held in sessionStorage.
(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "gateway-admin-token";
  const SIGNALS = [
    { key: "request_rate", field: "rate_per_s", label: "Requests", unit: rate, floor: 1 },
    { key: "error_ratio", field: "error_ratio", label: "Errors (5xx)", unit: percent, floor: 0.01 },
    { key: "p99_latency", field: "p99_ms", label: "p99 latency", unit: millis, floor: 1 },
  ];
  const FAILURES = ["trap", "timeout", "memory", "bad_output", "unavailable"];

  let inFlight = false;
  let failures = 0;
  let refreshes = 0;
  let lastOk = 0;
  let current = null;
  let shownReload = null;
  // Failures of the page's own code, for whoever checks it (the browser test does).
  let scriptErrors = 0;
  function scriptError(where, e) {
    scriptErrors += 1;
    document.body.dataset.scriptErrors = String(scriptErrors);
    console.error(where, e);
  }
  window.addEventListener("error", (ev) => scriptError("uncaught", ev.error || ev.message));
  window.addEventListener("unhandledrejection", (ev) => scriptError("unhandled rejection", ev.reason));

  const $ = (id) => document.getElementById(id);

  // --- building DOM -------------------------------------------------------------------
  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }
  /** Replaces a container's content, keeping keyboard focus on the element with the same key. */
  function fill(container, ...children) {
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.key : null;
    container.replaceChildren();
    append(container, children);
    if (key) {
      const again = [...container.querySelectorAll("[data-key]")].find((e) => e.dataset.key === key);
      if (again) again.focus();
    }
  }

  // --- formatting ---------------------------------------------------------------------
  const formats = new Map();
  function fmt(x, digits) {
    if (!formats.has(digits)) {
      formats.set(digits, new Intl.NumberFormat("en", { maximumFractionDigits: digits }));
    }
    return formats.get(digits).format(x);
  }
  const known = (x) => x !== null && x !== undefined && Number.isFinite(x);
  function count(x) { return known(x) ? fmt(x, 0) : "–"; }
  function rate(x) {
    if (!known(x)) return "–";
    return (x >= 100 ? fmt(x, 0) : x >= 10 ? fmt(x, 1) : fmt(x, 2)) + "/s";
  }
  function percent(x) {
    if (!known(x)) return "–";
    const p = x * 100;
    return (p === 0 ? "0" : p >= 10 ? fmt(p, 1) : fmt(p, 2)) + " %";
  }
  function millis(x) {
    if (!known(x)) return "–";
    if (x >= 1000) return fmt(x / 1000, 2) + " s";
    if (x >= 10) return fmt(x, 0) + " ms";
    if (x >= 1) return fmt(x, 1) + " ms";
    return fmt(x, 2) + " ms";
  }
  function bytes(n) {
    if (!known(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return fmt(n, i === 0 ? 0 : 1) + " " + units[i];
  }
  function span(msecs) {
    const s = Math.max(0, Math.round(msecs / 1000));
    if (s < 90) return s + " s";
    if (s < 90 * 60) return Math.round(s / 60) + " min";
    if (s < 48 * 3600) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }
  function clock(ms) {
    const d = new Date(ms);
    const time = d.toLocaleTimeString("en-GB", { hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : d.toLocaleDateString("en-CA") + " " + time;
  }
  function when(ms, now) { return `${clock(ms)} (${span(now - ms)} ago)`; }
  function time(ms, now, text) {
    return h("time", { datetime: new Date(ms).toISOString(), title: new Date(ms).toString() }, text || when(ms, now));
  }
  function pill(cls, ...children) { return h("span", { class: "pill " + (cls || "") }, ...children); }
  function outcomes(map, failing) {
    const entries = Object.entries(map || {}).filter(([, n]) => n > 0);
    if (!entries.length) return h("span", { class: "muted" }, "no calls yet");
    return entries.map(([k, n]) =>
      pill(failing.includes(k) ? "bad" : k === "ok" ? "ok" : "", `${k.replace(/_/g, " ")} ${count(n)}`));
  }
  function table(headers, rows) {
    return h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows));
  }
  function empty(text) { return h("p", { class: "empty" }, text); }

  // --- charts -------------------------------------------------------------------------
  /** A small line chart of one signal over the samples, with the detector's band shaded. */
  function chart(samples, sig, state, routeName) {
    const points = samples.filter((s) => known(s[sig.field]));
    if (samples.length < 2) {
      return h("div", { class: "chart-wait" },
        svg("svg", { viewBox: "0 0 240 56", role: "img", "aria-label": `${sig.label} of ${routeName}: collecting samples` },
          svg("title", {}, "Collecting samples")));
    }
    const W = 240, H = 56, PAD = 3;
    const t0 = samples[0].at_unix_ms, t1 = samples[samples.length - 1].at_unix_ms;
    const values = points.map((s) => s[sig.field]);
    let top = Math.max(sig.floor, ...values);
    if (state && known(state.high)) top = Math.max(top, Math.min(state.high, top * 3));
    top *= 1.15;
    const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * W;
    const y = (v) => H - PAD - (Math.min(v, top) / top) * (H - 2 * PAD);
    const parts = [];
    if (state && known(state.low) && known(state.high)) {
      const yh = y(Math.max(0, state.high)), yl = y(Math.max(0, state.low));
      parts.push(svg("rect", { class: "band", x: 0, width: W, y: yh, height: Math.max(1, yl - yh) }));
    }
    let d = "";
    let pen = false;
    for (const s of samples) {
      const v = s[sig.field];
      if (!known(v)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(s.at_unix_ms).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    const alert = state && state.alert ? " alert" : "";
    if (d) parts.push(svg("path", { class: "line" + alert, d, "vector-effect": "non-scaling-stroke" }));
    const summary = values.length
      ? `now ${sig.unit(values[values.length - 1])}, lowest ${sig.unit(Math.min(...values))}, highest ${sig.unit(Math.max(...values))}`
      : "no figures in this window";
    const label = `${sig.label} of ${routeName} over the last ${span(t1 - t0)}: ${summary}`;
    return svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": label },
      svg("title", {}, label), parts);
  }

  // --- sections -----------------------------------------------------------------------
  function renderHeader(d) {
    const now = d.generated_unix_ms;
    const reload = d.last_reload
      ? (d.last_reload.ok ? `last reload ok at ${clock(d.last_reload.at_unix_ms)}` : `last reload FAILED at ${clock(d.last_reload.at_unix_ms)}`)
      : "not reloaded since start";
    fill($("node"),
      `Configuration generation ${d.generation} · up since ${when(d.started_unix_ms, now)} · ${reload} · sampled every ${millis(d.sample_interval_ms)}`);
  }

  function allSignals(d) {
    return d.routes.flatMap((r) => r.signals.map((s) => ({ route: r.name, ...s })));
  }

  function renderSummary(d) {
    const last = (r) => (r.history.length ? r.history[r.history.length - 1] : null);
    const totalRate = d.routes.reduce((a, r) => a + (last(r) ? last(r).rate_per_s : 0), 0);
    const requests = d.routes.reduce((a, r) => a + r.requests, 0);
    const errors = d.routes.reduce((a, r) => a + r.errors, 0);
    const backends = d.upstreams.flatMap((u) => u.backends);
    const healthy = backends.filter((b) => b.healthy).length;
    const emptyPool = d.upstreams.some((u) => u.available === 0);
    const alerts = allSignals(d).filter((s) => s.alert).length;
    const pluginFailures = d.plugins.reduce((a, p) =>
      a + FAILURES.reduce((b, k) => b + (p.outcomes[k] || 0), 0), 0);
    const running = d.experiments.filter((e) => e.rollout && e.rollout.state === "Running").length;
    const stat = (key, cls, label, value, sub) =>
      h("div", { class: "stat " + cls, dataset: { stat: key } },
        h("div", { class: "label" }, label), h("div", { class: "value" }, value), h("div", { class: "sub" }, sub));
    fill($("summary"),
      stat("rate", "", "Request rate", rate(totalRate), `${d.routes.length} route${d.routes.length === 1 ? "" : "s"}, last sample`),
      stat("requests", errors > 0 ? "warn" : "ok", "Requests", count(requests), `${count(errors)} answered 5xx since start`),
      stat("backends", healthy === backends.length ? "ok" : emptyPool ? "bad" : "warn", "Healthy backends",
        `${healthy} / ${backends.length}`, `${d.upstreams.length} upstream pool${d.upstreams.length === 1 ? "" : "s"}`),
      stat("anomalies", alerts ? "bad" : "ok", "Anomalies", String(alerts), alerts ? "signals outside their baseline" : "every signal within its baseline"),
      stat("plugins", pluginFailures ? "warn" : "ok", "Plugins", String(d.plugins.length), `${count(pluginFailures)} failed calls (live versions)`),
      stat("models", "", "Models", String(d.models.length), d.scoring_device ? `on ${d.scoring_device.backend}` : "no scoring device"),
      stat("rollouts", "", "Rollouts running", String(running), `${d.experiments.length} experiment${d.experiments.length === 1 ? "" : "s"}`),
      stat("hints", d.hints.length ? "warn" : "ok", "Tuning hints", String(d.hints.length), d.hints.length ? "see below" : "nothing to change"));
  }

  function signalLabel(key) { return (SIGNALS.find((s) => s.key === key) || { label: key }).label; }
  function signalUnit(key) { return (SIGNALS.find((s) => s.key === key) || { unit: (x) => fmt(x, 3) }).unit; }

  function renderAlerts(d) {
    const alerts = allSignals(d).filter((s) => s.alert);
    $("alerts").hidden = alerts.length === 0;
    fill($("alerts-list"), alerts.map((s) => {
      const u = signalUnit(s.signal);
      const band = known(s.low) && known(s.high) ? ` (baseline ${u(Math.max(0, s.low))} – ${u(s.high)})` : "";
      return h("li", {}, h("strong", {}, s.route), `: ${signalLabel(s.signal).toLowerCase()} is ${u(s.value)}${band}`);
    }));
  }

  function renderRoutes(d) {
    const now = d.generated_unix_ms;
    const longest = Math.max(0, ...d.routes.map((r) => r.history.length ? r.history[r.history.length - 1].at_unix_ms - r.history[0].at_unix_ms : 0));
    fill($("routes-note"),
      `Charts span the last ${span(longest)} (one sample every ${millis(d.sample_interval_ms)}, at most 15 min). ` +
      "The shaded band is the anomaly detector's adaptive baseline; a line turns red while its signal is in alert.");
    if (!d.routes.length) { fill($("routes"), empty("No routes configured.")); return; }
    fill($("routes"), d.routes.map((r) => {
      const alerting = r.signals.filter((s) => s.alert);
      const warming = r.signals.length === 0 || r.signals.every((s) => !known(s.low));
      const status = alerting.length
        ? pill("bad", "▲ anomaly: " + alerting.map((s) => signalLabel(s.signal).toLowerCase()).join(", "))
        : warming ? pill("", "baseline warming up") : pill("ok", "● normal");
      const upstream = d.upstreams.find((u) => u.name === r.upstream);
      const facts = [
        "hosts ", h("b", {}, r.hosts.join(", ") || "*"), " · prefix ", h("b", { class: "mono" }, r.path_prefix),
        " → upstream ", h("b", {}, r.upstream),
        upstream ? ` (${upstream.available}/${upstream.backends.length} available)` : "",
        r.plugins.length ? [" · plugins ", h("b", {}, r.plugins.join(" → "))] : " · no plugins",
        r.variants.length ? [" · variants ", h("b", {}, r.variants.map((v) => `${v.name} → ${v.upstream}`).join(", "))] : "",
        r.experiment ? [" · experiment ", h("b", {}, r.experiment)] : "",
      ];
      const lastSample = r.history.length ? r.history[r.history.length - 1] : null;
      const signals = SIGNALS.map((sig) => {
        const state = r.signals.find((s) => s.signal === sig.key);
        const value = lastSample ? lastSample[sig.field] : null;
        const peak = Math.max(...r.history.map((s) => s[sig.field]).filter(known), Number.NEGATIVE_INFINITY);
        return h("div", { class: "signal" + (state && state.alert ? " alert" : ""), dataset: { signal: sig.key } },
          h("div", { class: "name" }, sig.label),
          h("div", { class: "now" }, sig.unit(value)),
          chart(r.history, sig, state, r.name),
          h("div", { class: "axis" },
            h("span", {}, r.history.length > 1 ? `−${span(r.history[r.history.length - 1].at_unix_ms - r.history[0].at_unix_ms)}` : "collecting…"),
            h("span", {}, Number.isFinite(peak) ? `peak ${sig.unit(peak)}` : "")));
      });
      const classes = Object.entries(r.by_class).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${count(n)}`);
      return h("article", { class: "card" + (alerting.length ? " alerting" : ""), dataset: { route: r.name }, "aria-label": `Route ${r.name}` },
        h("div", { class: "card-head" }, h("h3", {}, r.name), status),
        h("p", { class: "facts" }, facts),
        h("div", { class: "signals" }, signals),
        h("div", { class: "totals" },
          h("span", { class: "requests", dataset: { requests: r.requests } }, `${count(r.requests)} requests since start`),
          classes.length ? " · " + classes.join(" · ") : "",
          lastSample ? ` · last sample ${clock(lastSample.at_unix_ms)}` : ""));
    }));
  }

  function renderUpstreams(d) {
    if (!d.upstreams.length) { fill($("upstreams"), empty("No upstreams.")); return; }
    fill($("upstreams"), table(["Upstream", "Backends", "Available", "Balancing", "Failed attempts", "Retries"],
      d.upstreams.map((u) => {
        const cls = u.available === u.backends.length ? "ok" : u.available === 0 ? "bad" : "warn";
        const errs = Object.entries(u.errors).filter(([, n]) => n > 0);
        const retries = Object.entries(u.retries).filter(([, n]) => n > 0);
        return h("tr", { dataset: { upstream: u.name } },
          h("td", {}, h("strong", {}, u.name)),
          h("td", {}, u.backends.map((b) =>
            pill(b.healthy ? "ok" : "bad", b.healthy ? "●" : "✕", h("span", { class: "mono" }, b.address), b.healthy ? "healthy" : "down"))),
          h("td", { class: "num" }, pill(cls, `${u.available} / ${u.backends.length}`),
            u.panics > 0 ? pill("warn", `panic mode ×${count(u.panics)}`) : ""),
          h("td", {}, `${u.balance.replace(/_/g, " ")} · ${u.protocol}`, h("br"),
            h("span", { class: "muted" }, u.health_checks ? "active health checks" : "passive ejection only")),
          h("td", {}, errs.length ? errs.map(([k, n]) => pill("bad", `${k.replace(/_/g, " ")} ${count(n)}`)) : h("span", { class: "muted" }, "none")),
          h("td", {}, retries.length ? retries.map(([k, n]) => pill(k === "budget_exhausted" ? "warn" : "", `${k.replace(/_/g, " ")} ${count(n)}`)) : h("span", { class: "muted" }, "none")));
      })));
  }

  function actionButton(key, text, enabled, onClick, danger) {
    const allowed = enabled && current && current.admin_api && token();
    const why = !current || !current.admin_api ? "The admin API is disabled on this node"
      : !token() ? "Paste the admin token under Actions first" : enabled ? null : "Not possible in this state";
    return h("button", {
      type: "button", class: danger ? "danger" : null, disabled: !allowed, title: why,
      dataset: { key }, onclick: onClick,
    }, text);
  }

  function renderPlugins(d) {
    const now = d.generated_unix_ms;
    if (!d.plugins.length) { fill($("plugins"), empty("No route runs a plugin.")); return; }
    fill($("plugins"), table(["Plugin", "Version", "Routes", "Outcomes (live version)", "Hook p99 / deadline", "Ready instances", "Last swap", ""],
      d.plugins.map((p) => h("tr", { dataset: { plugin: p.name } },
        h("td", {}, h("strong", {}, p.name)),
        h("td", {}, h("code", { class: "version" }, p.version)),
        h("td", {}, p.routes.join(", ") || h("span", { class: "muted" }, "variants only")),
        h("td", {}, outcomes(p.outcomes, FAILURES)),
        h("td", { class: "num" }, p.hooks.length
          ? p.hooks.map((k) => h("div", {}, `${k.hook.replace("on_", "")}: ${millis(k.p99_ms)} / ${millis(p.deadline_ms)}`))
          : h("span", { class: "muted" }, `deadline ${millis(p.deadline_ms)}`)),
        h("td", { class: "num" }, String(p.idle_instances)),
        h("td", {}, p.last_swap_unix_ms ? time(p.last_swap_unix_ms, now) : h("span", { class: "muted" }, "since start")),
        h("td", {}, actionButton(`rollback-plugin-${p.name}`, "Roll back", true,
          () => act("POST", `/admin/plugins/${encodeURIComponent(p.name)}/rollback`,
            `Roll plugin ${p.name} back to its previous upload?`)))))));
  }

  function deviceCell(m) {
    if (m.device === "gpu") return pill("ok", "GPU", m.adapter ? h("span", { class: "muted" }, m.adapter) : "");
    if (m.device === "software-gpu") return pill("warn", "software GPU", m.adapter ? h("span", { class: "muted" }, m.adapter) : "");
    if (m.fallback_reason) return h("span", {}, pill("warn", "CPU fallback"), h("div", { class: "muted" }, m.fallback_reason));
    return pill("", "CPU");
  }

  function renderSources(d) {
    const sources = d.sources || [];
    $("sources-section").hidden = !sources.length;
    if (!sources.length) return;
    fill($("sources"), table(["Kind", "Name", "Reference", "Serving digest", "Tag checked every"],
      sources.map((s) => h("tr", { dataset: { source: `${s.kind}/${s.name}` } },
        h("td", {}, s.kind),
        h("td", {}, h("strong", {}, s.name)),
        h("td", {}, h("code", {}, s.reference)),
        h("td", {}, s.digest ? h("code", { class: "version" }, s.digest.slice(0, 19)) : h("span", { class: "muted" }, "not pulled yet")),
        h("td", { class: "num" }, s.resolve_interval_s ? `${s.resolve_interval_s} s` : "pinned / at reload")))));
  }

  function renderModels(d) {
    const now = d.generated_unix_ms;
    const dev = d.scoring_device;
    const adapter = dev && dev.adapter ? ` · ${dev.adapter}` : "";
    fill($("device"), dev
      ? `Scoring device: ${dev.backend}${adapter}. Batching figures are since start.`
      : "Batching figures are since start.");
    if (!d.models.length) { fill($("models"), empty("No models served.")); return; }
    fill($("models"), table(["Model", "Version", "Device", "Batches", "Queue wait", "Requests (live version)", "Last swap", ""],
      d.models.map((m) => {
        const b = m.batching;
        return h("tr", { dataset: { model: m.name } },
          h("td", {}, h("strong", {}, m.name), h("div", { class: "muted" }, `${m.kind} · ${m.storage} · ${bytes(m.held_bytes)}`)),
          h("td", {}, h("code", { class: "version" }, m.version),
            m.history.length ? h("div", { class: "muted" }, "previous: ", m.history.map((v) => h("code", {}, v, " "))) : ""),
          h("td", {}, deviceCell(m), m.cpu_fallbacks > 0 ? pill("bad", `${count(m.cpu_fallbacks)} batches fell back to CPU`) : ""),
          h("td", { class: "num" },
            h("div", {}, `${count(b.batches)} batches`),
            h("div", { class: "muted" }, `mean ${known(b.mean_size) ? fmt(b.mean_size, 2) : "–"} · p99 ${known(b.p99_size) ? fmt(b.p99_size, 0) : "–"} of max ${b.max_batch}`),
            h("div", { class: "muted" }, `compute p99 ${millis(b.compute_p99_ms)}`)),
          h("td", { class: "num" },
            h("div", {}, `p50 ${millis(b.queue_p50_ms)} · p99 ${millis(b.queue_p99_ms)}`),
            h("div", { class: "muted" }, `max delay ${fmt(b.max_queue_delay_us, 0)} µs`)),
          h("td", {}, outcomes(m.requests, ["failed"])),
          h("td", {}, m.last_swap_unix_ms ? time(m.last_swap_unix_ms, now) : h("span", { class: "muted" }, "since start")),
          h("td", {}, actionButton(`rollback-model-${m.name}`, "Roll back", true,
            () => act("POST", `/admin/models/${encodeURIComponent(m.name)}/rollback`,
              `Roll model ${m.name} back to its previous version?`))));
      })));
  }

  function describeAction(a) {
    if (typeof a === "string") {
      return {
        Promote: "promoted: the plan is complete", Pause: "paused by an operator", Resume: "resumed by an operator",
        Abort: "aborted by an operator", ManualPromote: "promoted by an operator",
      }[a] || a;
    }
    if (a.Advance) return `advanced to ${a.Advance.to_percent} %`;
    if (a.RollBack) return `rolled back: the ${a.RollBack.guard.replace(/_/g, " ")} guard broke`;
    return JSON.stringify(a);
  }
  const STATE_CLASS = { Running: "ok", Paused: "warn", Promoted: "ok", RolledBack: "bad", Aborted: "bad" };

  function renderExperiments(d) {
    const now = d.generated_unix_ms;
    if (!d.experiments.length) { fill($("experiments"), empty("No experiments or rollouts configured.")); return; }
    fill($("experiments"), d.experiments.map((e) => {
      const total = e.variants.reduce((a, v) => a + v.weight, 0) || 1;
      const bar = h("div", { class: "weights", role: "img", "aria-label": "Weights: " + e.variants.map((v) => `${v.name} ${fmt(100 * v.weight / total, 1)} %`).join(", ") },
        e.variants.filter((v) => v.weight > 0).map((v) => {
          const part = h("span", { title: `${v.name}: weight ${v.weight}` }, `${v.name} ${fmt(100 * v.weight / total, 0)} %`);
          part.style.flexGrow = String(v.weight);
          part.style.flexBasis = "0";
          return part;
        }));
      const variants = table(["Variant", "Weight", "Requests (step)", "Errors", "p99", "CTR", "CVR", "Last 5 min"],
        e.variants.map((v) => h("tr", { dataset: { variant: v.name } },
          h("td", {}, h("strong", {}, v.name)),
          h("td", { class: "num" }, `${v.weight} (${fmt(100 * v.weight / total, 1)} %)`),
          h("td", { class: "num" }, count(v.step.requests)),
          h("td", { class: "num" }, percent(v.step.error_rate)),
          h("td", { class: "num" }, millis(v.step.p99_ms)),
          h("td", { class: "num" }, v.step.impressions ? percent(v.step.ctr) : "–"),
          h("td", { class: "num" }, v.step.impressions ? percent(v.step.cvr) : "–"),
          h("td", { class: "num" }, `${count(v.last_5_minutes.requests)} req · ${percent(v.last_5_minutes.error_rate)} · p99 ${millis(v.last_5_minutes.p99_ms)}`))));
      let rollout = "";
      if (e.rollout) {
        const r = e.rollout;
        const ev = r.evidence;
        const name = encodeURIComponent(e.name);
        const command = (c, label, states, danger, ask) => actionButton(`rollout-${e.name}-${c}`, label, states.includes(r.state),
          () => act("POST", `/admin/rollouts/${name}/${c}`, ask ? `${label} the rollout of ${e.name}?` : null), danger);
        const reached = r.steps.filter((p) => p <= r.canary_percent);
        rollout = h("div", { class: "rollout" },
          h("h4", {}, "Rollout ", pill(STATE_CLASS[r.state] || "", r.state), ` canary ${r.canary} at ${r.canary_percent} % of shoppers, against ${r.baseline}`),
          h("div", { class: "steps", "aria-label": "Steps of the plan" },
            r.steps.map((p) => h("span", { class: "step " + (p === r.canary_percent ? "now" : reached.includes(p) ? "done" : "") }, `${p} %`)),
            h("span", { class: "muted" }, ` step began ${when(r.step_started_ms, now)}`)),
          h("p", { class: "muted" },
            `Last evaluation: baseline ${count(ev.baseline.requests)} requests, ${percent(ev.baseline.error_rate)} errors, p99 ${millis(ev.baseline.p99_ms)}; ` +
            `canary ${count(ev.canary.requests)} requests, ${percent(ev.canary.error_rate)} errors, p99 ${millis(ev.canary.p99_ms)}; ` +
            `p(error worse) ${fmt(ev.p_error, 3)}` + (known(ev.psi) ? `; score PSI ${fmt(ev.psi, 3)}` : "")),
          h("div", { class: "actions" },
            command("pause", "Pause", ["Running"]),
            command("resume", "Resume", ["Paused"]),
            command("promote", "Promote", ["Running", "Paused"], false, true),
            command("abort", "Abort", ["Running", "Paused"], true, true)),
          r.decisions.length
            ? h("div", { class: "table-wrap decisions" }, table(["When", "Decision", "At step", "Canary errors", "Canary p99", "p(error worse)"],
              r.decisions.slice().reverse().map((dec) => h("tr", {},
                h("td", {}, time(dec.at_ms, now)),
                h("td", {}, describeAction(dec.action)),
                h("td", { class: "num" }, `${dec.evidence.step_percent} %`),
                h("td", { class: "num" }, percent(dec.evidence.canary.error_rate)),
                h("td", { class: "num" }, millis(dec.evidence.canary.p99_ms)),
                h("td", { class: "num" }, fmt(dec.evidence.p_error, 3))))))
            : h("p", { class: "muted" }, "No decisions yet."));
      }
      return h("article", { class: "card experiment", dataset: { experiment: e.name } },
        h("div", { class: "card-head" }, h("h3", {}, e.name), h("span", { class: "muted" }, `splits ${e.routes.join(", ") || "the scoring endpoint"} by ${e.assign_by}`)),
        bar, h("div", { class: "table-wrap" }, variants), rollout);
    }));
  }

  function renderHints(d) {
    if (!d.hints.length) {
      fill($("hints"), empty("No hints: nothing in the gateway's own series suggests a change."));
      return;
    }
    fill($("hints"), d.hints.map((x) => h("div", { class: "hint", role: "note" },
      h("div", { class: "subject" }, x.subject),
      h("div", { class: "advice" }, x.advice),
      h("div", { class: "evidence" }, x.evidence))));
  }

  // --- the token and actions ------------------------------------------------------------
  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
  }
  function setToken(t) {
    try {
      if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage disabled: actions stay off */ }
  }
  function result(cls, text) {
    const el = $("action-result");
    el.className = "result " + cls;
    el.textContent = text;
  }
  async function admin(method, path) {
    const r = await fetch(path, {
      method, cache: "no-store", headers: { authorization: "Bearer " + token() },
    });
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    return { status: r.status, ok: r.ok, body };
  }
  async function act(method, path, ask) {
    if (ask && !window.confirm(ask)) return;
    result("", `${method} ${path} …`);
    try {
      const r = await admin(method, path);
      if (r.ok) result("ok", `${method} ${path}: done (${r.status})`);
      else result("bad", `${method} ${path}: ${r.status} ${r.body && r.body.error ? r.body.error : "refused"}`);
      if (r.status === 401) { setToken(""); renderToken(); }
    } catch (e) {
      result("bad", `${method} ${path}: ${e.message}`);
    }
    shownReload = null;
    refresh();
    loadAudit();
  }
  function renderToken() {
    const state = !current ? "" : !current.admin_api
      ? "The admin API is disabled on this node (no token is configured), so the page is read-only."
      : token() ? "A token is held for this tab; the buttons act with it." : "No token: the page is read-only.";
    $("token-state").textContent = state;
    $("reload").disabled = !(current && current.admin_api && token());
    $("forget").disabled = !token();
  }
  async function loadAudit() {
    if (!token() || !current || !current.admin_api) {
      fill($("audit"), h("p", { class: "muted empty" }, "Shown with a token (GET /admin/audit)."));
      return;
    }
    try {
      const r = await admin("GET", "/admin/audit?limit=10");
      if (!r.ok) { fill($("audit"), empty(`GET /admin/audit: ${r.status} ${r.body && r.body.error || ""}`)); return; }
      const now = Date.now();
      const entries = (r.body.entries || []).slice().reverse();
      fill($("audit"), entries.length
        ? table(["When", "Who", "Action", "Target", "Outcome"], entries.map((e) => h("tr", {},
          h("td", {}, e.at_ms ? time(e.at_ms, now) : String(e.seq)),
          h("td", {}, h("code", {}, e.actor)), h("td", {}, e.action), h("td", {}, e.target), h("td", {}, e.outcome))))
        : empty("No management actions recorded."));
    } catch (e) {
      fill($("audit"), empty("GET /admin/audit failed: " + e.message));
    }
  }
  async function showReloadError(d) {
    const key = d.last_reload ? `${d.last_reload.at_unix_ms}:${d.last_reload.ok}:${token() !== ""}` : "none";
    if (key === shownReload) return;
    shownReload = key;
    if (!d.last_reload || d.last_reload.ok) { fill($("reload-error")); return; }
    if (!token() || !d.admin_api) {
      fill($("reload-error"), h("p", { class: "banner bad" }, "The last reload failed; the previous configuration keeps serving. Paste the token to see why."));
      return;
    }
    try {
      const r = await admin("GET", "/admin/reload");
      const why = r.ok && r.body.last_reload ? r.body.last_reload.error : `GET /admin/reload: ${r.status}`;
      fill($("reload-error"), h("div", { class: "banner bad" }, h("strong", {}, "The last reload failed; the previous configuration keeps serving."), h("pre", { class: "mono" }, why || "")));
    } catch (e) { shownReload = null; }
  }

  // --- the refresh loop -------------------------------------------------------------------
  function render(d) {
    const parts = [renderHeader, renderSummary, renderAlerts, renderRoutes, renderUpstreams,
      renderPlugins, renderModels, renderSources, renderExperiments, renderHints, renderToken];
    for (const part of parts) {
      try { part(d); } catch (e) { scriptError(part.name, e); }
    }
    showReloadError(d);
  }
  function showLiveness() {
    const pulse = $("pulse");
    if (failures === 0) {
      pulse.className = "dot ok flash";
      setTimeout(() => { pulse.className = "dot ok"; }, 400);
      $("updated").textContent = `Live · updated ${clock(lastOk)}`;
      $("stale").hidden = true;
    } else {
      pulse.className = "dot bad";
      $("updated").textContent = lastOk ? `Not updating since ${clock(lastOk)}` : "Cannot reach the gateway";
      $("stale").hidden = false;
      $("stale").textContent = `Cannot fetch /status.json (${failures} tries)` +
        (lastOk ? `; the figures below are from ${clock(lastOk)}.` : ".");
    }
  }
  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const r = await fetch("/status.json", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const d = await r.json();
      const first = current === null;
      current = d;
      lastOk = Date.now();
      failures = 0;
      refreshes += 1;
      render(d);
      if (first) loadAudit();
      document.body.dataset.refreshes = String(refreshes);
      document.body.dataset.generated = String(d.generated_unix_ms);
    } catch (e) {
      failures += 1;
      console.warn("status refresh failed", e);
    } finally {
      inFlight = false;
      showLiveness();
    }
  }
  function loop() {
    const next = () => setTimeout(loop, REFRESH_MS);
    if (document.hidden) { next(); return; }
    refresh().finally(next);
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("token");
    const t = input.value.trim();
    input.value = "";
    if (!t) return;
    setToken(t);
    renderToken();
    result("", "Token held for this tab.");
    shownReload = null;
    loadAudit();
    refresh();
  });
  $("forget").addEventListener("click", () => {
    setToken("");
    result("", "Token forgotten.");
    shownReload = null;
    renderToken();
    loadAudit();
    refresh();
  });
  $("reload").addEventListener("click", () => act("POST", "/admin/reload", "Reload the configuration file now?"));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  loop();
})();
