// sdxl-bento playground: submit through the task API, follow its event stream (progress, previews), keep a
// local gallery.
// Every URL is relative to this page (served at <service>/ui/), so it works behind a path prefix.
"use strict";

const ROOT = new URL("../", window.location.href); // the service's root
const KEY_STORAGE = "sdxl-bento.api-key";
const GALLERY_STORAGE = "sdxl-bento.gallery";
const GALLERY_MAX = 30;

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
let current = null; // {taskId, params, stopped}

function api(path) {
  return new URL(path, ROOT).toString();
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// An image link from the service: absolute (SDXL_BENTO_PUBLIC_URL set) or relative to its root.
function imageUrl(url) {
  return /^https?:\/\//.test(url) ? url : new URL(url.replace(/^\//, ""), ROOT).toString();
}

// A sentence from an error answer: the service's {"error": {"message"}} or BentoML's {"error", "detail"}.
async function errorText(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (Array.isArray(body)) body = body[0];
  if (body && typeof body === "object") {
    if (Array.isArray(body.detail) && body.detail.length) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    if (body.error && typeof body.error === "object" && body.error.message) return body.error.message;
    if (typeof body.error === "string") return body.error;
    if (body.message) return body.message;
  }
  return `the service answered ${response.status} ${response.statusText}`;
}

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("progress").hidden = !busy;
  form.setAttribute("aria-busy", String(busy));
}

function readParams() {
  const [width, height] = $("size").value.split("x").map(Number);
  const params = {
    prompt: $("prompt").value.trim(),
    negative_prompt: $("negative-prompt").value.trim(),
    width, height,
    steps: Number($("steps").value),
    refine: $("refine").value,
    approximation: $("approximation").value,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") params.seed = Number(seed);
  return params;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const params = readParams();
  if (!params.prompt) {
    showError("Write a prompt first.");
    $("prompt").focus();
    return;
  }
  if (!Number.isInteger(params.steps) || params.steps < 1 || params.steps > 100) {
    showError("Steps must be a whole number from 1 to 100.");
    $("steps").focus();
    return;
  }
  setBusy(true);
  $("progress").removeAttribute("value");
  setStatus("Submitting…");
  try {
    const response = await fetch(api("jobs/submit"), {method: "POST", headers: headers(true), body: JSON.stringify(params)});
    if (!response.ok) throw new Error(await errorText(response));
    const {task_id: taskId} = await response.json();
    current = {taskId, params, stopped: false, abort: new AbortController()};
    await follow(current);
  } catch (err) {
    setBusy(false);
    setStatus("");
    showError(String(err.message || err));
  }
}

// The task's Server-Sent Events (GET /jobs/events), read with fetch so that the API key goes in a header
// (EventSource cannot send one). A dropped stream resumes with Last-Event-ID: no event is lost.
const TERMINAL = {completed: "completed", failed: "failed", cancelled: "canceled"};

async function follow(task) {
  let last = null;
  let failures = 0;
  while (!task.stopped) {
    const h = headers(false);
    h["Accept"] = "text/event-stream";
    if (last) h["Last-Event-ID"] = last;
    let response;
    try {
      response = await fetch(api("jobs/events?task_id=" + encodeURIComponent(task.taskId)),
                             {headers: h, signal: task.abort.signal, cache: "no-store"});
    } catch (err) {
      if (task.stopped) return;
      if (++failures > 20) throw err;
      await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * failures)));
      continue;
    }
    if (!response.ok) throw new Error(await errorText(response));
    try {
      for await (const event of readEvents(response)) {
        if (event.id) last = event.id;
        failures = 0;
        const data = event.data ? JSON.parse(event.data) : {};
        if (event.event in TERMINAL) return finish(task, {status: TERMINAL[event.event], reason: data.reason});
        if (event.event === "preview") showPreview(data);
        else if (event.event === "queued" || event.event === "running") showProgress(data);
      }
    } catch (err) {
      if (task.stopped) return;
    }
    if (++failures > 20) throw new Error("lost the connection to the service");
    await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * failures)));
  }
}

// Server-Sent Events from a fetch response: {id, event, data} per event (comment lines, the heartbeats, skipped).
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = {id: null, event: "message", data: []};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
      if (line === "") {
        if (event.data.length) yield {id: event.id, event: event.event, data: event.data.join("\n")};
        event = {id: event.id, event: "message", data: []};
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") event.data.push(text);
      else if (field === "event") event.event = text;
      else if (field === "id") event.id = text;
    }
  }
}

function showPreview(data) {
  const image = (data.images || [])[0];
  if (!image) return;
  const preview = $("preview");
  preview.src = `data:${data.media_type || "image/jpeg"};base64,${image}`;
  preview.dataset.step = String(data.step);
  preview.alt = `Preview at step ${data.step} of ${data.total_steps}`;
  preview.hidden = false;
}

function showProgress(status) {
  const bar = $("progress");
  const eta = typeof status.eta_s === "number" ? ` · about ${Math.max(1, Math.round(status.eta_s))} s left` : "";
  if (status.state === "running" && status.total_steps) {
    bar.max = status.total_steps;
    bar.value = status.step || 0;
    setStatus(`Step ${status.step || 0} of ${status.total_steps}${eta}`);
  } else if (status.queue_position !== undefined && status.queue_position !== null) {
    bar.removeAttribute("value");
    setStatus(`Queued: position ${status.queue_position + 1}${eta}`);
  } else {
    bar.removeAttribute("value");
    setStatus("Waiting for the GPU…");
  }
}

async function finish(task, status) {
  current = null;
  setBusy(false);
  $("preview").hidden = true;
  if (status.status === "canceled") {
    setStatus("Cancelled.");
    return;
  }
  const response = await fetch(api("jobs/get?task_id=" + encodeURIComponent(task.taskId)), {headers: headers(false)});
  if (status.status !== "completed" || !response.ok) {
    setStatus("");
    showError("The generation failed: " + (response.ok ? status.status : await errorText(response)));
    return;
  }
  const result = await response.json();
  const image = result.images.find((i) => i.url);
  if (!image) {
    setStatus("");
    showError("The image was withheld by the service's safety check.");
    return;
  }
  const entry = {
    url: imageUrl(image.url), id: image.id, seed: image.seed, width: image.width, height: image.height,
    prompt: task.params.prompt, negative_prompt: task.params.negative_prompt, steps: task.params.steps,
    refine: task.params.refine, approximation: task.params.approximation, model: result.model, synthetic: !!result.synthetic, created: Date.now(),
  };
  showResult(entry);
  remember(entry);
  setStatus(`Done in ${result.timings.total_s.toFixed(1)} s · seed ${image.seed}` +
            (image.finish_reason === "content_filtered" ? " · blurred by the safety check" : "") +
            (result.synthetic ? " · synthetic model: the image is noise" : ""));
}

function describe(entry) {
  return `${entry.width}×${entry.height} · ${entry.steps} steps · seed ${entry.seed}` +
         (entry.refine && entry.refine !== "none" ? ` · refiner ${entry.refine}` : "") +
         (entry.approximation && entry.approximation !== "none" ? ` · approximate (${entry.approximation})` : "");
}

function showResult(entry) {
  const img = $("result-image");
  img.src = entry.url;
  img.alt = entry.prompt;
  img.dataset.seed = String(entry.seed);
  $("result-caption").textContent = `${entry.prompt} — ${describe(entry)}`;
  const link = $("download");
  link.href = entry.url;
  link.setAttribute("download", `sdxl-${entry.seed}.png`);
  $("reuse-seed").dataset.seed = String(entry.seed);
  $("result").hidden = false;
}

async function cancel() {
  const task = current;
  if (!task) return;
  task.stopped = true;
  task.abort.abort();
  $("cancel").disabled = true;
  $("preview").hidden = true;
  setStatus("Cancelling…");
  const response = await fetch(api("jobs/cancel?task_id=" + encodeURIComponent(task.taskId)), {method: "PUT", headers: headers(false)});
  current = null;
  setBusy(false);
  if (response.ok) setStatus("Cancelled.");
  else showError(await errorText(response));
}

function reuseSeed(seed) {
  $("seed").value = seed;
  $("seed").focus();
  setStatus(`Seed ${seed} set: the next image uses it.`);
}

// -- gallery (localStorage: links and parameters, not the image bytes) --------------------------
function loadGallery() {
  try { return JSON.parse(localStorage.getItem(GALLERY_STORAGE)) || []; } catch (_) { return []; }
}

function remember(entry) {
  const items = [entry, ...loadGallery().filter((e) => e.id !== entry.id)].slice(0, GALLERY_MAX);
  try { localStorage.setItem(GALLERY_STORAGE, JSON.stringify(items)); } catch (_) { /* storage full or off */ }
  renderGallery();
}

function renderGallery() {
  const items = loadGallery();
  const list = $("gallery-list");
  list.replaceChildren();
  $("gallery-empty").hidden = items.length > 0;
  $("clear-gallery").disabled = items.length === 0;
  for (const entry of items) {
    const li = document.createElement("li");
    li.className = "gallery-item";
    li.dataset.seed = String(entry.seed);
    const img = document.createElement("img");
    img.src = entry.url;
    img.alt = entry.prompt;
    img.loading = "lazy";
    img.addEventListener("error", () => li.classList.add("missing"), {once: true});
    const text = document.createElement("div");
    text.className = "meta";
    const prompt = document.createElement("p");
    prompt.className = "prompt";
    prompt.textContent = entry.prompt;
    const params = document.createElement("p");
    params.className = "params";
    params.textContent = describe(entry) + ` · ${new Date(entry.created).toLocaleString()}`;
    const actions = document.createElement("div");
    actions.className = "actions";
    const download = document.createElement("a");
    download.className = "button";
    download.href = entry.url;
    download.textContent = "Download";
    download.setAttribute("download", `sdxl-${entry.seed}.png`);
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse settings";
    reuse.addEventListener("click", () => reuseSettings(entry));
    actions.append(download, reuse);
    text.append(prompt, params, actions);
    li.append(img, text);
    list.append(li);
  }
}

function reuseSettings(entry) {
  $("prompt").value = entry.prompt;
  $("negative-prompt").value = entry.negative_prompt || "";
  const size = `${entry.width}x${entry.height}`;
  if ([...$("size").options].some((o) => o.value === size)) $("size").value = size;
  $("steps").value = entry.steps;
  $("refine").value = entry.refine || "none";
  $("approximation").value = entry.approximation || "none";
  reuseSeed(entry.seed);
}

// -- wiring ---------------------------------------------------------------------------------------
$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
});
if ($("api-key").value) $("key-settings").open = true;
form.addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("reuse-seed").addEventListener("click", (e) => reuseSeed(e.currentTarget.dataset.seed));
$("clear-gallery").addEventListener("click", () => {
  localStorage.removeItem(GALLERY_STORAGE);
  renderGallery();
});
renderGallery();
