// FlashCP plan explorer: plain JS over the sidecar's HTTP API (POST /v1/compare, GET /v1/strategies,
// /v1/cost-models, /v1/workloads, /v1/recent, /metrics). No dependencies, no build step.
"use strict";
(() => {
  // Okabe-Ito colours (see app.css); the two shades of each document class tell neighbours apart.
  const C = {
    linear: "#0072B2", attention: "#E69F00", comm: "#D55E00", intra: "#009E73", inter: "#CC79A7",
    whole: ["#56B4E9", "#9BD3F2"], split: ["#F0E442", "#C9BC1A"], highlight: "#000000",
    axis: "#555555", node: "#222222", lb: "#000000",
  };
  const SERIES = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"];
  const LEFT = 46;  // px of rank labels left of every per-rank chart
  const MIB = 1024 * 1024;
  const $ = (sel) => document.querySelector(sel);
  const state = { costModels: {}, defaultCostModel: "", strategies: [], view: null, highlight: -1 };

  class ApiError extends Error {}

  async function api(path, init) {
    const response = await fetch(path, init);
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON: reported below */ }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : `HTTP ${response.status} ${response.statusText}`;
      throw new ApiError(message);
    }
    return body;
  }

  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    node.append(...children);
    return node;
  };
  const fmtMs = (v) => v.toFixed(3);
  const fmtPct = (v) => (100 * v).toFixed(1) + " %";
  const fmtInt = (v) => v.toLocaleString("en-US");
  const fmtMiB = (bytes) => (bytes / MIB).toFixed(1);

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = !message;
  }
  const setStatus = (text) => { $("#status").textContent = text; };

  // ---------------------------------------------------------------- set-up

  async function init() {
    setupTabs();
    $("#plan-form").addEventListener("submit", (e) => { e.preventDefault(); runPlan(); });
    $("#generate").addEventListener("click", generateLengths);
    $("#lengths-file").addEventListener("change", loadFile);
    $("#lengths").addEventListener("input", summariseLengths);
    $("#cost-model").addEventListener("change", () => {
      const custom = $("#cost-model").value === "custom";
      $("#cost-json").hidden = !custom;
      $("#cost-json-label").hidden = !custom;
    });
    window.addEventListener("resize", debounce(() => state.view && drawAll(state.view), 150));
    try {
      const [strategies, costModels, workloads] = await Promise.all(
        [api("/v1/strategies"), api("/v1/cost-models"), api("/v1/workloads")]);
      state.strategies = strategies.strategies;
      const boxes = $("#strategies");
      for (const s of state.strategies) {
        const box = el("input", { type: "checkbox", value: s.name, id: `strategy-${s.name}` });
        box.checked = !s.is_optimal;
        boxes.append(el("label", { title: s.description }, box, s.name));
      }
      for (const cm of costModels.cost_models) state.costModels[cm.name] = cm;
      state.defaultCostModel = costModels.default_cost_model;
      const select = $("#cost-model");
      for (const name of Object.keys(state.costModels)) select.append(el("option", { value: name, text: name }));
      select.append(el("option", { value: "custom", text: "custom (JSON)…" }));
      select.value = state.defaultCostModel;
      for (const w of workloads.workloads) {
        $("#workload").append(el("option", { value: w.name, title: w.description, text: w.name }));
      }
      setStatus("");
    } catch (e) {
      showError(`cannot reach the planner API: ${e.message}`);
    }
    document.body.dataset.ready = "1";
  }

  function setupTabs() {
    const tabs = [...document.querySelectorAll("[role=tab]")];
    const select = (tab) => {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", String(on));
        t.tabIndex = on ? 0 : -1;
        document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
      }
      tab.focus();
      if (tab.id === "tab-live") live.start(); else live.stop();
    };
    for (const [i, tab] of tabs.entries()) {
      tab.addEventListener("click", () => select(tab));
      tab.addEventListener("keydown", (e) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
        if (step) { e.preventDefault(); select(tabs[(i + step + tabs.length) % tabs.length]); }
      });
    }
  }

  // ---------------------------------------------------------------- input

  /** Micro-batches from the text box: whitespace/comma separated integers, or a JSON list (of lists).
   *  Tokens that are not integers are sent as they are, so the API names the bad field. */
  function parseLengths(text) {
    const t = text.trim();
    if (!t) throw new ApiError("Enter document lengths (or load a file, or generate them) first.");
    if (t.startsWith("[")) {
      let value;
      try { value = JSON.parse(t); } catch (e) { throw new ApiError(`lengths: not valid JSON (${e.message})`); }
      return Array.isArray(value) && value.length && Array.isArray(value[0]) ? value : [value];
    }
    return [t.split(/[\s,]+/).filter(Boolean).map((tok) => (/^[+-]?\d+(\.\d+)?$/.test(tok) ? Number(tok) : tok))];
  }

  function summariseLengths() {
    let text = "";
    try {
      const mbs = parseLengths($("#lengths").value);
      const n = mbs.reduce((a, mb) => a + (Array.isArray(mb) ? mb.length : 0), 0);
      const tokens = mbs.flat().reduce((a, v) => a + (typeof v === "number" ? v : 0), 0);
      text = `${fmtInt(n)} documents, ${fmtInt(tokens)} tokens` + (mbs.length > 1 ? ` in ${mbs.length} micro-batches` : "");
    } catch (e) { /* shown when planning */ }
    $("#lengths-summary").textContent = text;
  }

  async function generateLengths() {
    showError("");
    const name = $("#workload").value;
    const query = new URLSearchParams({ context: $("#context").value, seed: $("#seed").value });
    try {
      const body = await api(`/v1/workloads/${encodeURIComponent(name)}?${query}`);
      $("#lengths").value = body.lengths.join(" ");
      summariseLengths();
    } catch (e) { showError(e.message); }
  }

  function loadFile() {
    const file = $("#lengths-file").files[0];
    if (!file) return;
    file.text().then((text) => { $("#lengths").value = text; summariseLengths(); });
  }

  function costModelChoice() {
    const name = $("#cost-model").value;
    if (name !== "custom") return { request: name, model: state.costModels[name] };
    let custom;
    try { custom = JSON.parse($("#cost-json").value); } catch (e) {
      throw new ApiError(`cost model JSON: ${e.message}`);
    }
    const base = state.costModels[(custom && custom.base) || state.defaultCostModel] || {};
    return { request: custom, model: { ...base, ...custom } };
  }

  function requestBody() {
    const strategies = [...document.querySelectorAll("#strategies input:checked")].map((b) => b.value);
    if (!strategies.length) throw new ApiError("Choose at least one strategy.");
    const cp = $("#cp").value.trim();
    const limit = Number($("#time-limit").value);
    const cost = costModelChoice();
    const body = {
      micro_batches: parseLengths($("#lengths").value),
      cp_size: /^-?\d+$/.test(cp) ? Number(cp) : cp,
      cost_model: cost.request,
      strategies,
    };
    if (limit > 0) body.options = { time_limit_s: limit };
    return { body, model: cost.model };
  }

  // ---------------------------------------------------------------- planning

  async function runPlan() {
    showError("");
    let req;
    try { req = requestBody(); } catch (e) { showError(e.message); return; }
    const button = $("#plan");
    button.disabled = true;
    setStatus("Planning…");
    const t0 = performance.now();
    try {
      const response = await api("/v1/compare", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(req.body),
      });
      const t1 = performance.now();
      state.last = { comparisons: response.comparisons, model: req.model };
      showResults(0);
      const t2 = performance.now();
      const timing = { request_ms: t1 - t0, render_ms: t2 - t1, documents: req.body.micro_batches[0].length };
      window.flashcpTiming = timing;
      requestAnimationFrame(() => setTimeout(() => { timing.painted_ms = performance.now() - t1; }, 0));
      setStatus(`Planned in ${timing.request_ms.toFixed(0)} ms, drawn in ${timing.render_ms.toFixed(0)} ms.`);
    } catch (e) {
      setStatus("");
      showError(e.message);
    } finally {
      button.disabled = false;
    }
  }

  /** Per-rank KV tokens received [intra-node, inter-node] (as flashcp_planner.comm derives them). */
  function kvTraffic(plan, gpn) {
    const n = plan.cp_size;
    const intra = new Float64Array(n), inter = new Float64Array(n);
    if (plan.comm === "all_gather") {
      const nodeTokens = new Map();
      let total = 0;
      for (const r of plan.ranks) {
        const node = Math.floor(r.rank / gpn);
        nodeTokens.set(node, (nodeTokens.get(node) || 0) + r.tokens);
        total += r.tokens;
      }
      for (const r of plan.ranks) {
        const local = nodeTokens.get(Math.floor(r.rank / gpn));
        intra[r.rank] = local - r.tokens;
        inter[r.rank] = total - local;
      }
    } else {
      for (const [src, dst, , start, end] of plan.transfers || []) {
        if (Math.floor(src / gpn) === Math.floor(dst / gpn)) intra[dst] += end - start; else inter[dst] += end - start;
      }
    }
    return { intra, inter };
  }

  /** Flat per-segment arrays of a plan (fast hit tests and highlights at 16k+ documents). */
  function prepare(result, model) {
    const plan = result.plan;
    const gpn = model.gpus_per_node;
    const kvPerToken = 2 * model.num_kv_heads * model.head_dim * model.bytes_per_element;
    const count = plan.ranks.reduce((a, r) => a + r.segments.length, 0);
    const seg = { doc: new Int32Array(count), rank: new Int32Array(count), x0: new Float64Array(count),
      x1: new Float64Array(count) };
    const rankFirst = new Int32Array(plan.cp_size + 1);
    let i = 0;
    for (const r of plan.ranks) {
      rankFirst[r.rank] = i;
      let x = 0;
      for (const [doc, start, end] of r.segments) {
        seg.doc[i] = doc; seg.rank[i] = r.rank; seg.x0[i] = x; x += end - start; seg.x1[i] = x; i++;
      }
    }
    rankFirst[plan.cp_size] = i;
    const split = new Uint8Array(plan.doc_lengths.length);
    for (const d of plan.documents) split[d.doc] = d.sharding === "whole" ? 0 : 1;
    const kv = kvTraffic(plan, gpn);
    return { strategy: result.strategy, plan, gpn, kvPerToken, seg, rankFirst, split,
      kvIntra: Array.from(kv.intra, (t) => t * kvPerToken), kvInter: Array.from(kv.inter, (t) => t * kvPerToken) };
  }

  /** Draw micro-batch ``index`` of the last answer: summary table, legend, one card per strategy. */
  function showResults(index) {
    const { comparisons, model } = state.last;
    const results = comparisons[index].results;
    const root = $("#results");
    root.replaceChildren();
    if (comparisons.length > 1) {
      const select = el("select", { id: "micro-batch" },
        ...comparisons.map((_, i) => el("option", { value: String(i), text: `micro-batch ${i}` })));
      select.value = String(index);
      select.addEventListener("change", () => { showResults(Number(select.value)); $("#micro-batch").focus(); });
      root.append(el("label", {}, `Showing ${comparisons.length} micro-batches: `, select));
    }
    const planned = results.filter((r) => r.plan).map((r) => prepare(r, model));
    const optimum = results.find((r) => r.plan && r.plan.optimality);
    const view = {
      planned, optimum,
      maxTime: Math.max(...planned.map((p) => p.plan.makespan_ms), 1e-9),
      maxKV: Math.max(...planned.flatMap((p) => p.kvIntra.map((v, r) => v + p.kvInter[r])), 1),
      cards: [],
    };
    state.view = view;
    state.highlight = -1;
    root.append(summaryTable(results, view));
    root.append(el("div", { class: "legend" },
      ...[["linear", C.linear], ["attention", C.attention], ["exposed comm", C.comm], ["whole document", C.whole[0]],
        ["split document", C.split[0]], ["KV intra-node", C.intra], ["KV inter-node", C.inter],
        ["hovered document", C.highlight]].map(([t, c]) => el("span", { style: `--c:${c}`, text: t }))));
    const docInput = el("input", { type: "number", id: "highlight-doc", min: "0", step: "1",
      max: String((planned[0] ? planned[0].plan.doc_lengths.length : 1) - 1) });
    docInput.addEventListener("input", () => setHighlight(docInput.value === "" ? -1 : Number(docInput.value)));
    root.append(el("div", { class: "highlight-row" },
      el("label", { for: "highlight-doc", text: "Show document #" }), docInput,
      el("span", { class: "muted", text: "or hover a document (arrow keys on a focused chart)" })));
    root.append(el("p", { id: "doc-info", "aria-live": "polite" }));
    const cards = el("div", { class: "cards" });
    root.append(cards);
    for (const p of planned) {
      const card = planCard(p);
      cards.append(card.node);
      view.cards.push(card);
    }
    drawAll(view);
  }

  function summaryTable(results, view) {
    const opt = view.optimum && view.optimum.plan;
    const optLabel = opt ? (opt.optimality.status === "optimal" ? "optimum" : "best found") : "optimum";
    const head = ["strategy", "makespan ms", "lower bound ms", "over lower bound", `over ${optLabel}`,
      "KV intra MiB", "KV inter MiB"];
    const body = el("tbody");
    for (const r of results) {
      const row = el("tr", { "data-strategy": r.strategy }, el("td", { text: r.strategy }));
      if (!r.plan) {
        row.append(el("td", { colspan: String(head.length - 1), class: "muted error", text: r.error || "no plan" }));
      } else {
        const p = view.planned.find((q) => q.strategy === r.strategy);
        const cells = [
          ["makespan", fmtMs(r.plan.makespan_ms)],
          ["lower_bound", fmtMs(r.plan.lower_bound_ms)],
          ["gap_lower_bound", fmtPct(r.plan.makespan_ms / r.plan.lower_bound_ms - 1)],
          ["gap_optimum", opt ? fmtPct(r.plan.makespan_ms / opt.makespan_ms - 1) : "–"],
          ["kv_intra", fmtMiB(p.kvIntra.reduce((a, b) => a + b, 0))],
          ["kv_inter", fmtMiB(p.kvInter.reduce((a, b) => a + b, 0))],
        ];
        for (const [field, text] of cells) row.append(el("td", { "data-field": field, text }));
      }
      body.append(row);
    }
    const caption = opt ? `Strategies side by side (${optLabel}: ${fmtMs(opt.makespan_ms)} ms, bound ` +
      `${fmtMs(opt.optimality.bound_ms)} ms)` : "Strategies side by side (tick optimum for the gap to the optimum)";
    return el("div", { class: "table-wrap" }, el("table", { id: "summary" }, el("caption", { text: caption }),
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))), body));
  }

  function planCard(p) {
    const plan = p.plan;
    const n = plan.cp_size;
    const nodes = Math.ceil(n / p.gpn);
    const label = (what) => `${what} of ${p.strategy}, ${n} ranks`;
    const time = el("canvas", { role: "img", "aria-label": label("time per rank") });
    const docs = el("canvas", { role: "img", tabindex: "0", "data-role": "docs",
      "aria-label": label("documents on ranks") + "; arrow keys move between documents" });
    const kv = el("canvas", { role: "img", "aria-label": label("KV received per rank") });
    const details = el("details", {}, el("summary", { text: "Per-rank numbers" }));
    details.addEventListener("toggle", () => {
      if (details.open && details.children.length === 1) details.append(rankTable(p));
    }, { once: false });
    const node = el("article", { class: "card", "data-strategy": p.strategy },
      el("h2", { text: `${p.strategy}: ${fmtMs(plan.makespan_ms)} ms` }),
      el("p", { class: "muted", text: `${plan.comm}, capacity ${fmtInt(plan.capacity)} tokens/rank, ` +
        `${nodes} node${nodes > 1 ? "s" : ""} of ${p.gpn} GPUs` }),
      el("h3", { text: "Time per rank (linear, attention, exposed comm; dashed: lower bound)" }), time,
      el("h3", { text: "Documents on ranks (token positions)" }), docs,
      el("h3", { text: "KV received per rank (intra-node, inter-node)" }), kv,
      el("div", { class: "buttons" },
        el("button", { type: "button", text: "Export JSON", onclick: () => exportJson(p) }),
        el("button", { type: "button", text: "Export PNG", onclick: () => exportPng(card) })),
      details);
    const card = { p, node, time, docs, kv, docsBase: null };
    docs.addEventListener("mousemove", (e) => hover(card, e));
    docs.addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
    docs.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
      const count = plan.doc_lengths.length;
      if (step) { e.preventDefault(); setHighlight((Math.max(state.highlight, step > 0 ? -1 : 0) + step + count) % count); }
      if (e.key === "Escape") setHighlight(-1);
    });
    return card;
  }

  function rankTable(p) {
    const head = ["rank", "node", "tokens", "linear ms", "attention ms", "exposed comm ms", "total ms",
      "KV intra MiB", "KV inter MiB", "KV recv bytes"];
    const body = el("tbody");
    for (const r of p.plan.ranks) {
      body.append(el("tr", { "data-rank": String(r.rank) }, ...[r.rank, Math.floor(r.rank / p.gpn), fmtInt(r.tokens),
        fmtMs(r.linear_ms), fmtMs(r.attention_ms), fmtMs(r.exposed_comm_ms), fmtMs(r.total_ms),
        fmtMiB(p.kvIntra[r.rank]), fmtMiB(p.kvInter[r.rank]), fmtInt(r.recv_bytes)].map((v) => el("td", { text: String(v) }))));
    }
    return el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))), body));
  }

  // ---------------------------------------------------------------- drawing

  function rowHeight(n) { return Math.max(2, Math.min(18, Math.floor(320 / n))); }

  /** Size ``canvas`` to its CSS width at the device pixel ratio; returns a context in CSS pixels. */
  function sized(canvas, cssHeight) {
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 400;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(cssHeight * dpr);
    canvas.style.height = `${cssHeight}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, cssHeight);
    return { ctx, width };
  }

  function rankAxis(ctx, p, rowH, height, width) {
    const n = p.plan.cp_size;
    const every = Math.max(1, Math.ceil(12 / rowH));
    ctx.fillStyle = C.axis;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (let r = 0; r < n; r += every) ctx.fillText(`r${r}`, 2, r * rowH + rowH / 2);
    ctx.strokeStyle = C.node;
    ctx.lineWidth = 1;
    for (let r = p.gpn; r < n; r += p.gpn) {  // node boundaries
      ctx.beginPath(); ctx.moveTo(LEFT - 6, r * rowH + 0.5); ctx.lineTo(width, r * rowH + 0.5); ctx.stroke();
    }
  }

  function drawAll(view) {
    for (const card of view.cards) {
      drawTime(card, view);
      drawDocs(card);
      drawKV(card, view);
    }
    drawHighlight();
  }

  function drawTime(card, view) {
    const plan = card.p.plan;
    const rowH = rowHeight(plan.cp_size);
    const height = plan.cp_size * rowH + 16;
    const { ctx, width } = sized(card.time, height);
    const scale = (width - LEFT - 4) / view.maxTime;
    const gap = rowH > 4 ? 1 : 0;
    for (const r of plan.ranks) {
      let x = LEFT;
      const y = r.rank * rowH;
      for (const [value, colour] of [[r.linear_ms, C.linear], [r.attention_ms, C.attention], [r.exposed_comm_ms, C.comm]]) {
        ctx.fillStyle = colour;
        ctx.fillRect(x, y + gap, value * scale, rowH - 2 * gap);
        x += value * scale;
      }
    }
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = C.lb;
    const lb = LEFT + plan.lower_bound_ms * scale;
    ctx.beginPath(); ctx.moveTo(lb, 0); ctx.lineTo(lb, height - 14); ctx.stroke();
    ctx.setLineDash([]);
    rankAxis(ctx, card.p, rowH, height, width);
    ctx.fillStyle = C.axis;
    ctx.fillText("0", LEFT, height - 6);
    const end = `${fmtMs(view.maxTime)} ms`;
    ctx.fillText(end, width - ctx.measureText(end).width - 2, height - 6);
  }

  function drawDocs(card) {
    const { plan, seg, split } = card.p;
    const rowH = rowHeight(plan.cp_size);
    const height = plan.cp_size * rowH + 16;
    const { ctx, width } = sized(card.docs, height);
    const scale = (width - LEFT - 4) / plan.capacity;
    const gap = rowH > 4 ? 1 : 0;
    card.docLayout = { rowH, scale };
    for (let i = 0; i < seg.doc.length; i++) {
      const doc = seg.doc[i];
      ctx.fillStyle = (split[doc] ? C.split : C.whole)[doc & 1];
      const x = LEFT + seg.x0[i] * scale;
      // At least 0.5 px so every segment shows; documents thinner than a pixel blend into a band.
      ctx.fillRect(x, seg.rank[i] * rowH + gap, Math.max(0.5, (seg.x1[i] - seg.x0[i]) * scale), rowH - 2 * gap);
    }
    rankAxis(ctx, card.p, rowH, height, width);
    ctx.fillStyle = C.axis;
    ctx.fillText("0", LEFT, height - 6);
    const end = `capacity ${fmtInt(plan.capacity)} tokens`;
    ctx.fillText(end, width - ctx.measureText(end).width - 2, height - 6);
    // Keep the un-highlighted picture (a canvas copy, no pixel readback); highlights are drawn over it.
    card.docsBase = card.docsBase || document.createElement("canvas");
    card.docsBase.width = card.docs.width;
    card.docsBase.height = card.docs.height;
    card.docsBase.getContext("2d").drawImage(card.docs, 0, 0);
  }

  function drawKV(card, view) {
    const p = card.p;
    const rowH = rowHeight(p.plan.cp_size);
    const height = p.plan.cp_size * rowH + 16;
    const { ctx, width } = sized(card.kv, height);
    const scale = (width - LEFT - 4) / view.maxKV;
    const gap = rowH > 4 ? 1 : 0;
    for (let r = 0; r < p.plan.cp_size; r++) {
      ctx.fillStyle = C.intra;
      ctx.fillRect(LEFT, r * rowH + gap, p.kvIntra[r] * scale, rowH - 2 * gap);
      ctx.fillStyle = C.inter;
      ctx.fillRect(LEFT + p.kvIntra[r] * scale, r * rowH + gap, p.kvInter[r] * scale, rowH - 2 * gap);
    }
    rankAxis(ctx, p, rowH, height, width);
    ctx.fillStyle = C.axis;
    ctx.fillText("0", LEFT, height - 6);
    const end = `${fmtMiB(view.maxKV)} MiB`;
    ctx.fillText(end, width - ctx.measureText(end).width - 2, height - 6);
  }

  function drawHighlight() {
    const view = state.view;
    if (!view) return;
    const doc = state.highlight;
    for (const card of view.cards) {
      if (!card.docsBase) continue;
      const ctx = card.docs.getContext("2d");
      ctx.save();
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, card.docs.width, card.docs.height);
      ctx.drawImage(card.docsBase, 0, 0);
      ctx.restore();
      if (doc < 0) continue;
      const { seg } = card.p;
      const { rowH, scale } = card.docLayout;
      ctx.fillStyle = C.highlight;
      for (let i = 0; i < seg.doc.length; i++) {
        if (seg.doc[i] !== doc) continue;
        // Wide enough to find at any zoom: at least 3 px.
        const x = LEFT + seg.x0[i] * scale;
        const w = Math.max(3, (seg.x1[i] - seg.x0[i]) * scale);
        ctx.fillRect(x - (w > 3 ? 0 : 1), seg.rank[i] * rowH, w, rowH);
      }
    }
  }

  function ranges(values) {
    const out = [];
    for (let i = 0; i < values.length; i++) {
      let j = i;
      while (j + 1 < values.length && values[j + 1] === values[j] + 1) j++;
      out.push(j > i ? `${values[i]}–${values[j]}` : `${values[i]}`);
      i = j;
    }
    return out.join(", ");
  }

  function describeDoc(doc) {
    const view = state.view;
    const first = view.planned[0].plan;
    const parts = [`Document ${doc}: ${fmtInt(first.doc_lengths[doc])} tokens.`];
    for (const p of view.planned) {
      const d = p.plan.documents[doc];
      const nodes = [...new Set(d.ranks.map((r) => Math.floor(r / p.gpn)))];
      const where = `rank${d.ranks.length > 1 ? "s" : ""} ${ranges(d.ranks)} (node${nodes.length > 1 ? "s" : ""} ${ranges(nodes)})`;
      parts.push(`${p.strategy}: ${d.sharding === "whole" ? "whole on" : `split (${d.sharding}) over`} ${where}.`);
    }
    return parts.join(" ");
  }

  function setHighlight(doc) {
    const view = state.view;
    if (!view || !view.planned.length) return;
    const count = view.planned[0].plan.doc_lengths.length;
    state.highlight = Number.isInteger(doc) && doc >= 0 && doc < count ? doc : -1;
    drawHighlight();
    $("#doc-info").textContent = state.highlight >= 0 ? describeDoc(state.highlight) : "";
    const input = $("#highlight-doc");
    if (input && document.activeElement !== input) input.value = state.highlight >= 0 ? String(state.highlight) : "";
    return state.highlight >= 0 ? describeDoc(state.highlight) : "";
  }

  /** The document under the pointer: the rank row, then a binary search of that rank's segments. */
  function hover(card, event) {
    const { rowH, scale } = card.docLayout || {};
    if (!rowH) return;
    const box = card.docs.getBoundingClientRect();
    const rank = Math.floor((event.clientY - box.top) / rowH);
    const x = (event.clientX - box.left - LEFT) / scale;
    const { seg, rankFirst, plan } = card.p;
    let doc = -1;
    if (rank >= 0 && rank < plan.cp_size && x >= 0) {
      let lo = rankFirst[rank], hi = rankFirst[rank + 1] - 1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (seg.x1[mid] <= x) lo = mid + 1; else if (seg.x0[mid] > x) hi = mid - 1; else { doc = seg.doc[mid]; break; }
      }
    }
    const tip = $("#tooltip");
    if (doc !== state.highlight) setHighlight(doc);
    if (doc < 0) { tip.hidden = true; return; }
    tip.textContent = describeDoc(doc);
    tip.hidden = false;
    tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4)}px`;
    tip.style.top = `${event.clientY + 14}px`;
  }

  // ---------------------------------------------------------------- export

  function download(blob, name) {
    const a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  function exportJson(p) {
    download(new Blob([JSON.stringify(p.plan)], { type: "application/json" }), `flashcp-plan-${p.strategy}.json`);
  }

  /** One PNG of a card's three charts with titles and a legend (the charts as drawn, highlight included). */
  function exportPng(card) {
    const dpr = window.devicePixelRatio || 1;
    const parts = [["Time per rank", card.time], ["Documents on ranks", card.docs], ["KV received per rank", card.kv]];
    const line = 20 * dpr;
    const legend = [["linear", C.linear], ["attention", C.attention], ["exposed comm", C.comm],
      ["whole doc", C.whole[0]], ["split doc", C.split[0]], ["KV intra-node", C.intra], ["KV inter-node", C.inter]];
    const width = Math.max(560 * dpr, ...parts.map(([, c]) => c.width));
    const head = 4 * line;
    const out = el("canvas", { width: String(width), height: String(head + parts.reduce((a, [, c]) => a + line + c.height, 0)) });
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, out.width, out.height);
    ctx.fillStyle = "#000"; ctx.textBaseline = "middle";
    const plan = card.p.plan;
    ctx.font = `bold ${15 * dpr}px system-ui, sans-serif`;
    ctx.fillText(`${plan.strategy}: makespan ${fmtMs(plan.makespan_ms)} ms, lower bound ${fmtMs(plan.lower_bound_ms)} ms`,
      4, line / 2);
    ctx.font = `${12 * dpr}px system-ui, sans-serif`;
    ctx.fillText(`N=${plan.cp_size} (${card.p.gpn} GPUs per node), ${plan.doc_lengths.length} documents, ` +
      `${plan.comm}, cost model ${plan.cost_model}`, 4, 1.5 * line);
    let x = 4, y = 2.5 * line;
    for (const [name, colour] of legend) {
      const w = 16 * dpr + ctx.measureText(name).width;
      if (x + w > width) { x = 4; y += line; }
      ctx.fillStyle = colour; ctx.fillRect(x, y - 5 * dpr, 10 * dpr, 10 * dpr);
      ctx.fillStyle = "#000"; ctx.fillText(name, x + 14 * dpr, y);
      x += w + 10 * dpr;
    }
    y = head;
    for (const [text, canvas] of parts) {
      ctx.fillText(text, 4, y + line / 2);
      ctx.drawImage(canvas, 0, y + line);
      y += line + canvas.height;
    }
    out.toBlob((blob) => download(blob, `flashcp-plan-${plan.strategy}.png`), "image/png");
  }

  // ---------------------------------------------------------------- live view

  /** Prometheus histogram_quantile over cumulative buckets [[le, count], ...] sorted by le. */
  function quantile(q, buckets) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!total) return NaN;
    const rank = q * total;
    let prevLe = 0, prevCount = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (!Number.isFinite(le)) return prevLe;
        return prevLe + (le - prevLe) * (count > prevCount ? (rank - prevCount) / (count - prevCount) : 0);
      }
      prevLe = le; prevCount = count;
    }
    return prevLe;
  }

  /** Summed latency buckets of successful plan / compare requests (both transports) from /metrics. */
  function planLatencyBuckets(text) {
    const sums = new Map();
    for (const line of text.split("\n")) {
      if (!line.startsWith("flashcp_request_duration_seconds_bucket{")) continue;
      const close = line.lastIndexOf("}");
      const labels = Object.fromEntries([...line.slice(0, close).matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
      if (!/plan|compare/i.test(labels.route || "") || !["200", "OK"].includes(labels.status)) continue;
      const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
      sums.set(le, (sums.get(le) || 0) + Number(line.slice(close + 1)));
    }
    return [...sums.entries()].sort((a, b) => a[0] - b[0]);
  }

  const live = {
    timer: null, lastSeq: 0, plans: [], capacity: 0, latency: [], previous: null,
    start() { if (!this.timer) { this.poll(); this.timer = setInterval(() => this.poll(), 2000); } },
    stop() { clearInterval(this.timer); this.timer = null; },

    async poll() {
      try {
        const recent = await api(`/v1/recent?after=${this.lastSeq}`);
        this.capacity = recent.capacity;
        if (recent.plans.length) {
          this.plans.push(...recent.plans);
          this.plans.splice(0, Math.max(0, this.plans.length - recent.capacity));
          this.lastSeq = recent.plans[recent.plans.length - 1].seq;
        }
        const metrics = await fetch("/metrics").then((r) => r.text());
        this.addLatency(planLatencyBuckets(metrics));
        $("#live-status").textContent = recent.enabled
          ? `Recording the last ${recent.capacity} plans` +
            (recent.sample_every > 1 ? ` (one in ${recent.sample_every})` : "") + `; ${this.plans.length} shown.`
          : "The server keeps no recent plans: start it with --recent-plans K (flashcp explore does). " +
            "Latency below is still measured.";
        this.render();
      } catch (e) {
        $("#live-status").textContent = `cannot reach the server: ${e.message}`;
      }
    },

    addLatency(buckets) {
      const now = Date.now() / 1000;
      const total = { p50: quantile(0.5, buckets), p99: quantile(0.99, buckets),
        n: buckets.length ? buckets[buckets.length - 1][1] : 0 };
      if (this.previous) {
        const before = new Map(this.previous);
        const since = buckets.map(([le, c]) => [le, c - (before.get(le) || 0)]);
        const n = since.length ? since[since.length - 1][1] : 0;
        if (n > 0) this.latency.push({ t: now, p50: quantile(0.5, since), p99: quantile(0.99, since), n });
        this.latency.splice(0, Math.max(0, this.latency.length - 300));
      }
      this.previous = buckets;
      $("#latency-now").textContent = total.n
        ? `since start: p50 ${(1000 * total.p50).toFixed(1)} ms, p99 ${(1000 * total.p99).toFixed(1)} ms over ` +
          `${fmtInt(total.n)} requests; from histogram buckets`
        : "no plan requests yet";
    },

    render() {
      const strategies = [...new Set(this.plans.map((p) => p.strategy))];
      const colour = (s) => SERIES[strategies.indexOf(s) % SERIES.length];
      timeChart($("#live-ratio"), this.plans.map((p) => ({ t: p.unix_time_s, y: p.makespan_ms / p.lower_bound_ms,
        colour: colour(p.strategy) })), { min: 1, unit: "×", legend: strategies.map((s) => [s, colour(s)]) });
      timeChart($("#live-latency"), this.latency.flatMap((l) => [
        { t: l.t, y: 1000 * l.p50, colour: SERIES[0] }, { t: l.t, y: 1000 * l.p99, colour: SERIES[4] }]),
        { min: 0, unit: " ms", legend: [["p50", SERIES[0]], ["p99", SERIES[4]]] });
      const body = $("#live-table tbody");
      body.replaceChildren(...this.plans.slice().reverse().map((p) => el("tr", { "data-seq": String(p.seq) },
        ...[p.seq, new Date(p.unix_time_s * 1000).toLocaleTimeString(), p.strategy, p.cp_size, fmtInt(p.num_documents),
          fmtInt(p.tokens), fmtMs(p.makespan_ms), fmtMs(p.lower_bound_ms),
          (p.makespan_ms / p.lower_bound_ms).toFixed(3)].map((v) => el("td", { text: String(v) })),
        el("td", {}, el("button", { type: "button", text: "Explore", onclick: () => openInExplore(p) })))));
    },
  };

  /** A scatter of points over wall time; ``opts.min`` is the lowest y shown. */
  function timeChart(canvas, points, opts) {
    const width = canvas.clientWidth || 600, height = 220;
    const { ctx } = sized(canvas, height);
    const left = 52, bottom = 18, top = 20;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    let x = left;
    for (const [name, colour] of opts.legend) {
      ctx.fillStyle = colour; ctx.fillRect(x, 4, 10, 10);
      ctx.fillStyle = C.axis; ctx.fillText(name, x + 14, 9);
      x += 24 + ctx.measureText(name).width;
    }
    if (!points.length) { ctx.fillStyle = C.axis; ctx.fillText("no data yet", left, height / 2); return; }
    const t0 = Math.min(...points.map((p) => p.t)), t1 = Math.max(...points.map((p) => p.t), t0 + 1);
    const yMax = Math.max(...points.map((p) => p.y)) * 1.05 || 1, yMin = Math.min(opts.min, yMax * 0.95);
    const px = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - 8);
    const py = (y) => top + (1 - (y - yMin) / (yMax - yMin || 1)) * (height - top - bottom);
    ctx.strokeStyle = C.axis;
    ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, height - bottom); ctx.lineTo(width, height - bottom); ctx.stroke();
    ctx.fillStyle = C.axis;
    ctx.fillText(`${yMax.toFixed(yMax < 10 ? 3 : 1)}${opts.unit}`, 2, top);
    ctx.fillText(`${yMin.toFixed(yMin < 10 && yMin ? 3 : 0)}${opts.unit}`, 2, height - bottom);
    ctx.fillText(new Date(t0 * 1000).toLocaleTimeString(), left, height - 7);
    const last = new Date(t1 * 1000).toLocaleTimeString();
    ctx.fillText(last, width - ctx.measureText(last).width - 4, height - 7);
    for (const p of points) {
      ctx.fillStyle = p.colour;
      ctx.beginPath(); ctx.arc(px(p.t), py(p.y), 3, 0, 2 * Math.PI); ctx.fill();
    }
  }

  async function openInExplore(summary) {
    try {
      const got = await api(`/v1/recent?after=${summary.seq - 1}&lengths=true`);
      const kept = got.plans.find((p) => p.seq === summary.seq);
      if (!kept) throw new ApiError("that plan has left the recent-plans buffer");
      if (!kept.lengths) throw new ApiError("that plan had too many documents to keep their lengths");
      $("#lengths").value = kept.lengths.join(" ");
      $("#cp").value = String(kept.cp_size);
      if (state.costModels[kept.cost_model]) $("#cost-model").value = kept.cost_model;
      for (const box of document.querySelectorAll("#strategies input")) box.checked = box.value === kept.strategy;
      summariseLengths();
      $("#tab-explore").click();
      runPlan();
    } catch (e) {
      $("#live-status").textContent = e.message;
    }
  }

  function debounce(fn, ms) {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  }

  // For tests and the console: the explorer's state and its document highlight.
  window.flashcp = { state, setHighlight, quantile, parseLengths };
  init();
})();
