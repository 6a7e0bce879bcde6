// mlx_tune studio: playground, runs and data views over the server's own API.
// No framework, no build step; charts by the vendored uPlot. Everything it fetches is on
// this origin (the page's Content-Security-Policy allows nothing else).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
};
const fmt = (v, digits = 4) => (v === null || v === undefined ? "-" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(digits)) : String(v));

// -- API access: the key is asked for once, on the first 401, and kept for this tab --------
const KEY = "mlx_tune_studio_key";
let keyWaiters = [];

function setStatus(text, error = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

function askKey() {
  $("#key-form").hidden = false;
  $("#api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#api-key").value);
  $("#key-form").hidden = true;
  const waiting = keyWaiters;
  keyWaiters = [];
  waiting.forEach((resolve) => resolve());
});

async function api(path, opts = {}) {
  for (;;) {
    const headers = Object.assign({}, opts.headers || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers["Authorization"] = "Bearer " + key;
    if (opts.body && !headers["Content-Type"]) headers["Content-Type"] = "application/json";
    const res = await fetch(path, Object.assign({}, opts, { headers }));
    if (res.status === 401) {
      sessionStorage.removeItem(KEY);
      await askKey();
      continue;
    }
    return res;
  }
}

async function apiJSON(path, opts) {
  const res = await api(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.statusText);
  return data;
}

// -- views --------------------------------------------------------------------------------
const VIEWS = ["playground", "runs", "data"];
const loaded = {};

function route() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "playground";
  for (const v of VIEWS) {
    $("#view-" + v).hidden = v !== name;
    $("#tab-" + v).classList.toggle("active", v === name);
  }
  if (!loaded[name]) {
    loaded[name] = true;
    ({ playground: loadModels, runs: loadRuns, data: loadDatasets })[name]().catch((e) => setStatus(e.message, true));
  }
  if (name !== "runs") stopPolling();
}
window.addEventListener("hashchange", route);

// -- playground ---------------------------------------------------------------------------
async function loadModels() {
  const data = await apiJSON("/v1/models");
  const box = $("#models");
  box.querySelectorAll("label").forEach((n) => n.remove());
  data.data.forEach((m, i) => {
    const input = el("input", { type: "checkbox", value: m.id, checked: i < 2 });
    box.append(el("label", {}, input, " " + m.id + (m.kind === "adapter" ? " (adapter)" : "")));
  });
  setStatus(data.data.length + " models");
}

function selectedModels() {
  return [...document.querySelectorAll("#models input:checked")].map((n) => n.value);
}

async function streamAnswer(model, messages, params, card) {
  const out = card.querySelector(".output");
  const stats = card.querySelector(".stats");
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  const res = await api("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify(Object.assign({ model, messages, stream: true, stream_options: { include_usage: true } }, params)),
  });
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || res.statusText);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const msg = JSON.parse(payload);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) usage = msg.usage;
        const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          chunks += 1;
          out.textContent += delta.content;
        }
        for (const call of (delta && delta.tool_calls) || []) {
          if (first === null) first = performance.now();
          // A call arrives as its name first, then its arguments in fragments.
          out.textContent += call.function.name ? `${out.textContent ? "\n" : ""}→ ${call.function.name}(` : "";
          out.textContent += call.function.arguments || "";
          card.dataset.calls = String(Number(card.dataset.calls || 0) + (call.function.name ? 1 : 0));
        }
        const reason = msg.choices && msg.choices[0] && msg.choices[0].finish_reason;
        if (reason === "tool_calls") out.textContent += ")";
      }
    }
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  // End to end (request sent to last token): a server that holds back partial characters
  // sends several tokens at once, so a rate after the first token would overstate.
  const rate = end > started && tokens > 0 ? (tokens / ((end - started) / 1000)).toFixed(1) : "-";
  stats.textContent = `first token ${first === null ? "-" : Math.round(first - started) + " ms"} · ${tokens} tokens · ${rate} tokens/s · ${Math.round(end - started)} ms`;
  card.dataset.done = "1";
}

function send() {
  const prompt = $("#prompt").value.trim();
  const models = selectedModels();
  if (!prompt) return setStatus("type a prompt first", true);
  if (!models.length) return setStatus("choose at least one model", true);
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: prompt });
  const params = { temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value) };
  try {
    const format = $("#format").value;
    if (format === "json_object") params.response_format = { type: "json_object" };
    if (format === "json_schema") {
      params.response_format = { type: "json_schema", json_schema: { name: "studio", schema: JSON.parse($("#schema").value), strict: true } };
    }
    const tools = $("#tools").value.trim();
    if (tools) {
      params.tools = JSON.parse(tools);
      params.tool_choice = $("#tool-choice").value;
    }
  } catch (e) {
    return setStatus("schema or tools: not valid JSON (" + e.message + ")", true);
  }
  const answers = $("#answers");
  answers.replaceChildren();
  setStatus("generating...");
  const jobs = models.map((model) => {
    const card = el("div", { class: "answer", dataset: { model } }, el("h3", {}, model), el("pre", { class: "output" }),
      el("div", { class: "stats" }, "waiting..."));
    answers.append(card);
    return streamAnswer(model, messages, params, card).catch((e) => {
      card.classList.add("failed");
      card.querySelector(".output").textContent = e.message;
      card.dataset.done = "1";
    });
  });
  Promise.all(jobs).then(() => setStatus("done"));
}

$("#send").addEventListener("click", send);
$("#prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    send();
  }
});

// -- runs ---------------------------------------------------------------------------------
let runsRoot = "";
let current = null; // {name, rows, plots: [{keys, plot}]}
let pollTimer = null;

function stopPolling() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

async function loadRuns() {
  const data = await apiJSON("/studio/api/runs");
  runsRoot = data.root;
  $("#runs-root").textContent = "runs under " + data.root;
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const r of data.runs) {
    const link = el("a", { class: "run-link", onclick: () => openRun(r.name) }, r.name);
    const name = el("td", {}, link);
    if (r.live) name.append(el("span", { class: "live" }, "training"));
    const load = r.has_adapter ? el("button", { class: "secondary load-adapter", onclick: () => loadAdapter(r.name) }, "Load adapter") : "";
    body.append(el("tr", { dataset: { run: r.name } }, name, el("td", { class: "num" }, fmt(r.steps)),
      el("td", { class: "num" }, fmt(r.last_loss)), el("td", { class: "num" }, fmt(r.best_val_loss)),
      el("td", { class: "num" }, fmt(r.tokens_per_sec, 3)), el("td", { class: "num" }, fmt(r.peak_memory_gb, 3)),
      el("td", {}, load)));
  }
  setStatus(data.runs.length === 1 ? "1 run" : data.runs.length + " runs");
}

function adapterName(run) {
  const name = run.replace(/[^A-Za-z0-9._:-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "");
  return name || "run";
}

async function loadAdapter(run) {
  const name = adapterName(run);
  try {
    await apiJSON("/v1/adapters", { method: "POST", body: JSON.stringify({ name, path: runsRoot + "/" + run }) });
    await loadModels(); // it reports the model count: the load's own message goes last
    setStatus(`loaded adapter '${name}'`);
  } catch (e) {
    setStatus(`loading ${run}: ${e.message}`, true);
  }
}

function kvRows(table, obj) {
  table.replaceChildren();
  if (!obj) {
    table.append(el("tr", {}, el("td", {}, "none")));
    return;
  }
  for (const [k, v] of Object.entries(obj)) {
    const shown = v !== null && typeof v === "object" ? JSON.stringify(v) : fmt(v);
    table.append(el("tr", {}, el("td", {}, k), el("td", {}, shown)));
  }
}

function reportTable(report) {
  const reports = report.compare || [report];
  const t = el("table", { class: "grid" }, el("tr", {}, ...["model", "accuracy", "correct", "p50 latency s", "tokens/s", "errors"].map((h) => el("th", {}, h))));
  for (const r of reports) {
    t.append(el("tr", {}, el("td", {}, r.model), el("td", { class: "num" }, r.accuracy === null ? "-" : (100 * r.accuracy).toFixed(1) + "%"),
      el("td", { class: "num" }, `${r.correct}/${r.scored}`), el("td", { class: "num" }, fmt(r.latency_s_p50, 3)),
      el("td", { class: "num" }, fmt(r.tokens_per_sec, 3)), el("td", { class: "num" }, fmt(r.errors))));
  }
  return t;
}

function chartData(rows, keys) {
  // One x (step) per row that has any of the keys; gaps are null so uPlot leaves them out.
  const picked = rows.filter((r) => keys.some((k) => k in r) && "step" in r);
  return [picked.map((r) => r.step), ...keys.map((k) => picked.map((r) => (k in r ? r[k] : null)))];
}

const COLORS = ["#2f6fdf", "#e07b24", "#1f9d55", "#c53030", "#7c3aed", "#0f766e"];

function drawCharts(detail) {
  const box = $("#charts");
  box.replaceChildren();
  current.plots = [];
  // All holders first: the grid sizes its columns by how many charts there are.
  const holders = Object.entries(detail.charts).map(([title, keys]) => {
    const holder = el("div", { class: "chart", dataset: { chart: title } }, el("h4", {}, title));
    box.append(holder);
    return [holder, keys];
  });
  for (const [holder, keys] of holders) {
    const opts = {
      width: Math.max(300, holder.clientWidth - 14), height: 220,
      scales: { x: { time: false } },
      series: [{ label: "step" }, ...keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 4 } }))],
      axes: [{ label: "step" }, {}],
    };
    const plot = new uPlot(opts, chartData(current.rows, keys), holder);
    current.plots.push({ keys, plot });
  }
  box.dataset.rows = current.rows.length;
}

async function openRun(name) {
  stopPolling();
  const detail = await apiJSON("/studio/api/run?name=" + encodeURIComponent(name));
  current = { name, rows: detail.rows, plots: [], charts: JSON.stringify(detail.charts) };
  document.querySelectorAll("#runs-table tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.run === name));
  $("#run-detail").hidden = false;
  $("#run-title").textContent = name + (detail.live ? " (training)" : "");
  drawCharts(detail);
  kvRows($("#run-config"), detail.config);
  kvRows($("#run-fuse"), detail.fuse_report && flatTop(detail.fuse_report));
  const tests = $("#run-tests");
  tests.replaceChildren();
  if (!detail.test_reports.length) tests.append(el("p", { class: "muted" }, "none"));
  for (const t of detail.test_reports) tests.append(el("p", {}, t.file), reportTable(t.report));
  if (detail.live) pollTimer = setInterval(() => poll(name).catch((e) => setStatus(e.message, true)), 2000);
}

function flatTop(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v !== null && typeof v === "object" && !Array.isArray(v)) for (const [k2, v2] of Object.entries(v)) out[k + "." + k2] = v2;
    else out[k] = v;
  }
  return out;
}

async function poll(name) {
  if (!current || current.name !== name) return;
  const detail = await apiJSON("/studio/api/run?name=" + encodeURIComponent(name) + "&since=" + current.rows.length);
  if (!detail.rows.length) {
    if (!detail.live) stopPolling();
    return;
  }
  current.rows = current.rows.concat(detail.rows);
  if (JSON.stringify(detail.charts) !== current.charts) {
    current.charts = JSON.stringify(detail.charts);
    drawCharts(detail); // a new series appeared (say the first eval row)
  } else {
    for (const p of current.plots) p.plot.setData(chartData(current.rows, p.keys));
  }
  $("#run-title").textContent = name + (detail.live ? " (training)" : "");
  $("#charts").dataset.rows = current.rows.length;
  if (!detail.live) stopPolling(); // finished: nothing more will come
}

// -- data ---------------------------------------------------------------------------------
async function loadDatasets() {
  const data = await apiJSON("/studio/api/datasets");
  const select = $("#data-folder");
  select.replaceChildren();
  for (const f of data.folders) {
    select.append(el("option", { value: JSON.stringify(f) }, f.root + ":" + (f.path || ".")));
  }
  if (data.folders.length) await showData();
  else setStatus("no data folders (train.jsonl) under the configured roots");
}

async function showData() {
  const f = JSON.parse($("#data-folder").value);
  const q = new URLSearchParams({ root: f.root, path: f.path, split: $("#data-split").value, rows: $("#data-rows").value });
  const data = await apiJSON("/studio/api/data?" + q);
  const counts = $("#data-counts");
  counts.replaceChildren(el("tr", {}, ...Object.keys(data.counts).map((k) => el("th", {}, k))),
    el("tr", {}, ...Object.values(data.counts).map((v) => el("td", { class: "num" }, v))));
  const hist = $("#data-hist");
  hist.replaceChildren();
  document.querySelectorAll(".hist-axis").forEach((n) => n.remove());
  const top = Math.max(1, ...data.lengths.counts);
  data.lengths.counts.forEach((c, i) => {
    const bar = el("div", { class: "bar", title: `${data.lengths.edges[i]}-${data.lengths.edges[i + 1] - 1} tokens: ${c} rows` });
    bar.style.height = (100 * c / top) + "%";
    hist.append(bar);
  });
  const axis = el("div", { class: "hist-axis" }, el("span", {}, (data.lengths.edges[0] || 0) + " tokens"),
    el("span", {}, `tokens per row, ${data.lengths_of} rows of ${data.split}`),
    el("span", {}, (data.lengths.edges[data.lengths.edges.length - 1] || 0) + " tokens"));
  hist.after(axis);
  const out = $("#data-rows-out");
  out.replaceChildren();
  for (const r of data.rows) {
    const pre = el("pre");
    for (const s of r.segments) pre.append(el("span", { class: s.cut ? "cut" : s.trained ? "trained" : "" }, s.text));
    out.append(el("div", { class: "data-row", dataset: { line: r.line } }, el("div", { class: "muted" }, `line ${r.line}: ${r.summary}`), pre));
  }
  setStatus(`${data.rows.length} rows of ${data.split} (${data.format})`);
}
$("#data-show").addEventListener("click", () => showData().catch((e) => setStatus(e.message, true)));

fetch("/studio/needs-key").then((r) => r.json()).then(async (need) => {
  if (need.api_key && !sessionStorage.getItem(KEY)) await askKey();
  route();
});
