// The playground: a page over this server's own OpenAI routes (no build step, nothing from elsewhere).
// A request of one image is streamed (server-sent events: previews, then the image); more images come in one
// JSON answer. Each image's generation parameters are read back from its PNG "parameters" text chunk.
"use strict";
const $ = (id) => document.getElementById(id);
const PARTIAL_IMAGES = 3;
const HISTORY_KEY = "sd-api-server.history", KEY_KEY = "sd-api-server.key", HISTORY_MAX = 24;
let mode = "generate";

function headers(json) {
  const h = {};
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}

function fill(select, values, chosen) {
  const keep = select.value;
  for (const o of [...select.options]) if (o.value) o.remove();
  for (const v of values) select.add(new Option(v, v));
  select.value = values.includes(keep) ? keep : (chosen ?? select.options[0]?.value ?? "");
}

// The choices come from the server: its models, and its samplers and schedulers as /openapi.json lists them.
async function loadChoices() {
  try {
    const models = await fetch("v1/models", { headers: headers() });
    if (!models.ok) { status(await errorText(models), true); return; }
    fill($("model"), (await models.json()).data.map((m) => m.id));
    const spec = await (await fetch("openapi.json", { headers: headers() })).json();
    const props = spec.components.schemas.GenerationRequest.properties;
    fill($("sampler"), props.sample_method.enum, props.sample_method.default);
    fill($("scheduler"), props.scheduler.enum.filter((s) => s));
    status("");
  } catch (e) { status("cannot reach the server: " + e, true); }
}

function fields() {
  const f = { prompt: $("prompt").value, negative_prompt: $("negative").value, model: $("model").value,
              sample_method: $("sampler").value, steps: +$("steps").value, cfg_scale: +$("cfg").value,
              seed: +$("seed").value, n: +$("n").value };
  if ($("scheduler").value) f.scheduler = $("scheduler").value;
  if ($("width").value && $("height").value) f.size = $("width").value + "x" + $("height").value;
  return f;
}

function request(f, stream) {
  const url = mode === "edit" ? "v1/images/edits" : "v1/images/generations";
  const body = { ...f, response_format: "b64_json" };
  if (stream) Object.assign(body, { stream: true, partial_images: PARTIAL_IMAGES });
  if (mode === "generate") return fetch(url, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const form = new FormData();
  for (const [k, v] of Object.entries(body)) form.append(k, String(v));
  form.append("strength", $("strength").value);
  form.append("image", $("image").files[0]);
  if ($("mask").files[0]) form.append("mask", $("mask").files[0]);
  return fetch(url, { method: "POST", headers: headers(false), body: form });
}

// Server-sent events from a fetch body: blocks separated by a blank line, "event:" and "data:" fields.
async function* events(resp) {
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const ev = {};
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const at = line.indexOf(":");
        if (at > 0) ev[line.slice(0, at)] = (ev[line.slice(0, at)] ?? "") + line.slice(at + 1).trimStart();
      }
      if (ev.data) yield { event: ev.event, data: JSON.parse(ev.data) };
    }
  }
}

// The PNG's "parameters" text (tEXt or uncompressed iTXt), as the server writes it: the infotext.
function infotext(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer), utf8 = new TextDecoder();
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at), type = utf8.decode(bytes.slice(at + 4, at + 8));
    const data = bytes.slice(at + 8, at + 8 + length);
    const nul = data.indexOf(0);
    if ((type === "tEXt" || type === "iTXt") && utf8.decode(data.slice(0, nul)) === "parameters") {
      if (type === "tEXt") return new TextDecoder("latin1").decode(data.slice(nul + 1));
      if (data[nul + 1] === 0) {                      // not compressed: skip the language tag and keyword
        let p = data.indexOf(0, nul + 3); p = data.indexOf(0, p + 1);
        return utf8.decode(data.slice(p + 1));
      }
    }
    at += 12 + length;
  }
  return "";
}

function showPreview(b64, format) {
  const img = new Image();
  img.className = "preview";
  img.src = `data:image/${format};base64,${b64}`;
  $("previews").append(img);
}

function showImage(b64, format, seed) {
  const src = `data:image/${format};base64,${b64}`;
  const text = format === "png" ? infotext(b64) : "";
  const figure = document.createElement("figure");
  const img = new Image();
  img.className = "result";
  img.src = src;
  img.alt = $("prompt").value;
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.className = "info";
  pre.textContent = text;
  const link = document.createElement("a");
  link.className = "download";
  link.href = src;
  link.download = `image-${seed ?? "stream"}.${format}`;
  link.textContent = "download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse small";
  reuse.textContent = "reuse seed";
  const found = seed ?? (text.match(/Seed: (\d+)/) || [])[1];
  reuse.onclick = () => { if (found !== undefined) $("seed").value = found; };
  caption.append(pre, link, " ", reuse);
  figure.append(img, caption);
  $("results").append(figure);
  remember(img, text);
}

function remember(img, text) {
  img.decode().then(() => {
    const canvas = document.createElement("canvas"), side = 96;
    canvas.width = side; canvas.height = Math.round(side * img.naturalHeight / img.naturalWidth);
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    const history = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    history.unshift({ thumb: canvas.toDataURL("image/png"), text, at: Date.now() });
    try { localStorage.setItem(HISTORY_KEY, JSON.stringify(history.slice(0, HISTORY_MAX))); } catch (e) { /* full */ }
    showHistory();
  }).catch(() => {});
}

function showHistory() {
  const box = $("history");
  box.replaceChildren();
  for (const item of JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]")) {
    const img = new Image();
    img.src = item.thumb;
    img.title = item.text;
    img.onclick = () => { const m = item.text.match(/^(.*)\n/); if (m) $("prompt").value = m[1]; };
    box.append(img);
  }
}

async function generate(ev) {
  ev.preventDefault();
  if (mode === "edit" && !$("image").files[0]) { status("choose an image to edit", true); return; }
  const f = fields(), stream = f.n === 1;
  $("previews").replaceChildren();
  $("results").replaceChildren();
  $("generate").disabled = true;
  status("generating…");
  const started = performance.now();
  try {
    const resp = await request(f, stream);
    if (!resp.ok) { status(await errorText(resp), true); return; }
    if (stream) {
      for await (const { event, data } of events(resp)) {
        if (event === "error") { status(data.error.message, true); return; }
        if (event.endsWith(".partial_image")) {
          showPreview(data.b64_json, data.output_format);
          status(`preview ${data.partial_image_index + 1} of ${PARTIAL_IMAGES}…`);
        } else if (event.endsWith(".completed")) {
          showImage(data.b64_json, data.output_format, null);
        }
      }
    } else {
      const body = await resp.json();
      for (const item of body.data) showImage(item.b64_json, body.output_format || "png", item.seed);
    }
    status(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } catch (e) {
    status("failed: " + e, true);
  } finally {
    $("generate").disabled = false;
  }
}

function setMode(m) {
  mode = m;
  $("tab-generate").classList.toggle("active", m === "generate");
  $("tab-edit").classList.toggle("active", m === "edit");
  $("edit-fields").hidden = m !== "edit";
}

$("apikey").value = localStorage.getItem(KEY_KEY) || "";
$("apikey").addEventListener("change", () => { localStorage.setItem(KEY_KEY, $("apikey").value.trim()); loadChoices(); });
$("form").addEventListener("submit", generate);
$("tab-generate").onclick = () => setMode("generate");
$("tab-edit").onclick = () => setMode("edit");
$("clear-history").onclick = () => { localStorage.removeItem(HISTORY_KEY); showHistory(); };
showHistory();
loadChoices();
