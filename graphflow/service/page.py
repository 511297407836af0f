"""The web page `graphflow serve` offers at `/`: one self-contained HTML file, no build step, nothing fetched from
outside. It holds no data: everything comes from the API with the token the user pastes (kept in localStorage),
sent as a header by fetch, event streams included (so the token never appears in a URL)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graphflow</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:sans-serif;margin:0;display:grid;grid-template-columns:220px 1fr 300px;min-height:100vh;color:#222}
aside,main,section{padding:12px}main{min-width:0}#graph{overflow-x:auto}
#graph svg{display:block;max-width:100%;height:auto}
aside{background:#f4f4f4}section{background:#fafafa;border-left:1px solid #ddd}
h2{font-size:15px;margin:8px 0}button{cursor:pointer}label{display:block;margin:6px 0 2px;font-weight:bold}
small{display:block;color:#666;font-weight:normal}input,select,textarea{width:95%}
.tpl{display:block;width:100%;text-align:left;margin:2px 0}.tpl.on{background:#cde}
.graph .node rect{fill:#fff;stroke:#888}.graph .node.running rect{fill:#ffe08a;stroke:#c90}
.graph .node.done rect{fill:#b8e6b8;stroke:#393}.graph .node.cached rect{fill:#cfe0ff;stroke:#36c}
.graph .node.failed rect{fill:#f7b0b0;stroke:#c33}
#bar{height:10px;background:#eee;margin:8px 0}#bar div{height:10px;width:0;background:#4a4}
#gallery figure{display:inline-block;margin:4px;vertical-align:top;font-size:11px;max-width:140px}
#gallery img{max-width:128px;image-rendering:pixelated;border:1px solid #ccc}
.job{font-size:12px;margin:3px 0}.error{color:#b00;white-space:pre-wrap;font-size:12px}
</style></head><body>
<aside>
<h2>Token</h2><input id="token" type="password" placeholder="from DATA/token">
<h2>Templates</h2><div id="templates"></div>
</aside>
<main>
<h2 id="title">Choose a template</h2><p id="description"></p>
<form id="form"></form>
<div id="status"></div><div id="bar"><div></div></div><div id="graph"></div>
<h2>Gallery</h2><div id="gallery"></div>
</main>
<section><h2>Queue</h2><div id="queue"></div></section>
<script>
const $ = (id) => document.getElementById(id);
const tokenBox = $("token");
tokenBox.value = localStorage.getItem("graphflow-token") || "";
tokenBox.onchange = () => { localStorage.setItem("graphflow-token", tokenBox.value); start(); };
let templates = {}, current = null;

async function api(path, options = {}) {
  const headers = {"Authorization": "Bearer " + tokenBox.value, ...(options.headers || {})};
  const response = await fetch(path, {...options, headers});
  if (!response.ok && response.status !== 422) throw new Error(response.status + " " + await response.text());
  return response;
}

async function start() {
  if (!tokenBox.value) return;
  const list = await (await api("/api/templates")).json();
  templates = Object.fromEntries(list.map((t) => [t.name, t]));
  $("templates").replaceChildren(...list.map((t) => {
    const button = document.createElement("button");
    button.className = "tpl"; button.textContent = t.name; button.onclick = () => choose(t.name);
    return button;
  }));
  refresh();
}

function choose(name, values = {}) {
  current = templates[name];
  document.querySelectorAll(".tpl").forEach((b) => b.classList.toggle("on", b.textContent === name));
  $("title").textContent = name; $("description").textContent = current.description;
  const form = $("form"); form.replaceChildren();
  for (const [param, spec] of Object.entries(current.params)) {
    const label = document.createElement("label");
    label.textContent = param + " (" + spec.type + (spec.list ? " list" : "") + ")";
    const hint = document.createElement("small"); hint.textContent = spec.description; label.append(hint);
    let input;
    if (spec.choices) {
      input = document.createElement("select");
      spec.choices.forEach((c) => input.add(new Option(c, JSON.stringify(c))));
    } else {
      input = document.createElement("input");
      if (spec.type === "BOOL") input.type = "checkbox";
      else if (!spec.list && (spec.type === "INT" || spec.type === "FLOAT")) {
        input.type = "number"; input.step = spec.type === "INT" ? "1" : "any";
        if (spec.min !== null) input.min = spec.min; if (spec.max !== null) input.max = spec.max;
      }
    }
    input.name = param; input.dataset.type = spec.type; input.dataset.list = spec.list;
    const value = param in values ? values[param] : spec.default;
    if (value !== undefined && value !== null) {
      if (input.type === "checkbox") input.checked = value;
      else if (spec.choices) input.value = JSON.stringify(value);
      else input.value = spec.list ? JSON.stringify(value) : value;
    }
    form.append(label, input);
  }
  const batch = document.createElement("label"); batch.textContent = "Batch (optional JSON)";
  const hint = document.createElement("small");
  hint.textContent = 'e.g. {"groups": [{"seed": [1, 2, 3]}]}: zipped within a group, multiplied across';
  batch.append(hint);
  const area = document.createElement("textarea"); area.name = "__batch"; area.rows = 2;
  const submit = document.createElement("button"); submit.type = "submit"; submit.textContent = "Run";
  form.append(batch, area, document.createElement("br"), submit);
  form.onsubmit = (event) => { event.preventDefault(); run(); };
}

function formParams() {
  const params = {};
  for (const input of $("form").querySelectorAll("input,select")) {
    if (input.value === "" && input.type !== "checkbox") continue;
    const type = input.dataset.type;
    if (input.tagName === "SELECT" || input.dataset.list === "true") params[input.name] = JSON.parse(input.value);
    else if (input.type === "checkbox") params[input.name] = input.checked;
    else if (type === "INT") params[input.name] = parseInt(input.value, 10);
    else if (type === "FLOAT") params[input.name] = parseFloat(input.value);
    else params[input.name] = input.value;
  }
  return params;
}

async function run() {
  const batchText = $("form").querySelector("textarea").value.trim();
  const body = {template: current.name};
  if (batchText) body.batch = {...JSON.parse(batchText), fixed: formParams()}; else body.params = formParams();
  const answer = await (await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                                 body: JSON.stringify(body)})).json();
  if (answer.errors) { $("status").innerHTML = ""; const p = document.createElement("div"); p.className = "error";
    p.textContent = answer.message + "\\n" + answer.errors.map((e) => (e.node || "") + " " + (e.input || "") + ": "
      + e.message).join("\\n"); $("status").append(p); return; }
  const ids = answer.ids || [answer.id];
  for (const id of ids) await watch(id);
}

async function watch(id) {
  $("graph").innerHTML = await (await api("/api/jobs/" + id + "/graph.svg")).text();
  $("status").textContent = "job " + id.slice(0, 8) + ": queued"; $("bar").firstChild.style.width = "0";
  const response = await api("/api/jobs/" + id + "/events");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = block.split("\\n").find((line) => line.startsWith("data: "));
      if (data) show(JSON.parse(data.slice(6)));
    }
  }
  refresh();
}

function show(event) {
  const box = event.node && document.getElementById("node-" + event.node);
  const mark = (state) => { if (box) { box.classList.remove("running"); box.classList.add(state); } };
  if (event.kind === "node_started") mark("running");
  else if (event.kind === "node_cached") mark("cached");
  else if (event.kind === "node_finished") mark("done");
  else if (event.kind === "node_failed") mark("failed");
  else if (event.kind === "node_progress")
    $("bar").firstChild.style.width = (100 * event.step / event.total) + "%";
  if (event.kind.startsWith("job_")) $("status").textContent = "job " + event.job.slice(0, 8) + ": "
    + event.kind.slice(4) + (event.error ? " - " + event.error.message : "");
  if (event.kind === "job_completed") $("bar").firstChild.style.width = "100%";
}

async function refresh() {
  const {jobs} = await (await api("/api/jobs?limit=60")).json();
  $("queue").replaceChildren(...jobs.filter((j) => j.status === "pending" || j.status === "running").map((j) => {
    const row = document.createElement("div"); row.className = "job";
    row.textContent = j.status + " " + (j.template || "document") + " " + j.id.slice(0, 8) + " ";
    const cancel = document.createElement("button"); cancel.textContent = "cancel";
    cancel.onclick = async () => { await api("/api/jobs/" + j.id + "/cancel", {method: "POST"}); refresh(); };
    row.append(cancel); return row;
  }));
  const figures = [];
  for (const j of jobs.filter((j) => j.status === "completed" && j.files.length)) {
    const figure = document.createElement("figure"); const img = document.createElement("img");
    img.src = URL.createObjectURL(await (await api(j.files[0])).blob());
    const caption = document.createElement("figcaption");
    caption.textContent = (j.template || "document") + " " + JSON.stringify(j.params);
    figure.append(img, caption);
    if (j.template && templates[j.template]) {
      const again = document.createElement("button"); again.textContent = "run again with these params";
      again.onclick = () => choose(j.template, j.params); figure.append(again);
    }
    figures.push(figure);
  }
  $("gallery").replaceChildren(...figures);
}
start();
</script></body></html>
"""
