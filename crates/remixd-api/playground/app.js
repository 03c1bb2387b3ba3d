// The remixd playground: a form over the public API. No framework, no build step.
// The API key lives in localStorage and travels only in the Authorization header.
"use strict";

const KEY_STORE = "remixd.apiKey";
const $ = (id) => document.getElementById(id);
const FIELDS = ["image_url", "reference_image_urls", "reference_mask_urls", "image_urls",
  "prompt", "negative_prompt", "strength", "style", "rendering_speed", "image_size",
  "num_images", "seed"];
let config = null;
let historyCursor = null;
let lastRecord = null;

// ---- the key and the API ------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  let doc = null;
  try {
    doc = await resp.json();
  } catch (_) {
    doc = { code: resp.status, msg: `the server answered ${resp.status} without a JSON body` };
  }
  return doc;
}

async function refreshBalance() {
  if (!apiKey()) {
    $("balance").textContent = "Paste an API key to start.";
    return;
  }
  const doc = await api("/api/v1/chat/credit");
  $("balance").textContent = doc.code === 200 ? `Balance: ${doc.data} credits` : `Key: ${doc.msg}`;
}

// ---- images: upload on choice, preview only through this server's URLs ---------------

/** The URLs chosen for each image field (after upload), by field name. */
const chosen = { image_url: [], reference_image_urls: [], reference_mask_urls: [], image_urls: [] };

function slot(field) {
  return $(`slot-${field}`);
}

function setStatus(field, text) {
  slot(field).querySelector(".status").textContent = text;
}

function showChosen(field) {
  const s = slot(field);
  const urls = chosen[field];
  const drop = s.querySelector(".drop");
  drop.querySelectorAll(":scope > .foreign").forEach((e) => e.remove());
  if (s.classList.contains("multi")) {
    const thumbs = s.querySelector(".thumbs");
    thumbs.replaceChildren(...urls.map((u, i) => {
      if (!isOwnFile(u)) return foreignName("span", `Style image ${i + 1}`, u);
      const img = document.createElement("img");
      img.src = u;
      img.alt = `Style image ${i + 1}`;
      img.className = "preview";
      return img;
    }));
  } else {
    const img = s.querySelector(".preview");
    const own = urls.length > 0 && isOwnFile(urls[0]);
    const label = s.querySelector("legend").firstChild.textContent.trim();
    img.hidden = !own;
    if (own) {
      img.src = urls[0];
      img.alt = `${label} preview`;
    } else {
      img.removeAttribute("src");
      if (urls.length) drop.prepend(foreignName("span", label, urls[0]));
    }
  }
  s.querySelector(".drop-hint").hidden = urls.length > 0;
  refreshCurl();
}

// Another server's image (an input of a task a client made through the API) is never
// loaded by this page, whose policy allows only this server's images: it is named.
function foreignName(tag, label, url) {
  const e = document.createElement(tag);
  e.className = "foreign";
  e.textContent = `${label}: another server's image, not shown (${url})`;
  return e;
}

function isOwnFile(url) {
  try {
    const u = new URL(url, location.href);
    return u.origin === location.origin && u.pathname.startsWith("/files/");
  } catch (_) {
    return false;
  }
}

async function uploadFile(field, file) {
  setStatus(field, `Uploading ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("uploadPath", "playground");
  form.append("fileName", file.name.replace(/[^A-Za-z0-9._-]/g, "_"));
  const doc = await api("/api/file-stream-upload", { method: "POST", body: form });
  return uploaded(field, doc, file.name);
}

async function uploadUrl(field, url) {
  if (isOwnFile(url)) return url;
  setStatus(field, "Copying the image to this server…");
  const doc = await api("/api/file-url-upload", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ fileUrl: url, uploadPath: "playground" }),
  });
  return uploaded(field, doc, url);
}

function uploaded(field, doc, what) {
  if (doc.code !== 200 || !doc.data) {
    setStatus(field, "");
    fieldError(field, `${what}: ${doc.msg}`);
    return null;
  }
  setStatus(field, `Uploaded ${doc.data.fileName}`);
  return doc.data.downloadUrl;
}

async function choose(field, items) {
  clearError(field);
  const multi = slot(field).classList.contains("multi");
  const urls = [];
  for (const item of items) {
    const url = typeof item === "string" ? await uploadUrl(field, item) : await uploadFile(field, item);
    if (url) urls.push(url);
    if (!multi) break;
  }
  if (!urls.length) return;
  chosen[field] = multi ? chosen[field].concat(urls) : urls;
  showChosen(field);
  updateCost();
}

function wireSlot(field) {
  const s = slot(field);
  const file = s.querySelector(".file");
  const url = s.querySelector(".url");
  file.addEventListener("change", () => {
    if (file.files.length) choose(field, Array.from(file.files));
  });
  url.addEventListener("change", () => {
    if (url.value.trim()) choose(field, [url.value.trim()]);
  });
  const clear = s.querySelector(".clear");
  if (clear) {
    clear.addEventListener("click", () => {
      chosen[field] = [];
      file.value = "";
      url.value = "";
      setStatus(field, "");
      showChosen(field);
    });
  }
  const drop = s.querySelector(".drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const files = Array.from(e.dataTransfer.files || []);
    const text = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
    if (files.length) choose(field, files);
    else if (text) choose(field, [text.split("\n")[0].trim()]);
  });
}

// ---- the form -------------------------------------------------------------------------

function fieldError(field, msg) {
  const el = $(`err-${field}`) || $("err-form");
  el.textContent = msg;
  const control = $(field) || slot(field);
  if (control && control.setAttribute) control.setAttribute("aria-invalid", "true");
}

function clearError(field) {
  const el = $(`err-${field}`);
  if (el) el.textContent = "";
  const control = $(field);
  if (control) control.removeAttribute("aria-invalid");
}

function clearErrors() {
  FIELDS.forEach(clearError);
  $("err-form").textContent = "";
}

/** Shows an API message next to the field it names ("input.prompt …"). */
function showMessage(msg) {
  const m = /^input\.([a-z_]+)/.exec(msg || "");
  if (m && FIELDS.includes(m[1])) fieldError(m[1], msg);
  else $("err-form").textContent = msg;
}

function requestBody() {
  const input = {
    prompt: $("prompt").value,
    image_url: chosen.image_url[0] || $("url-image_url").value.trim(),
    reference_image_urls: chosen.reference_image_urls.length
      ? chosen.reference_image_urls
      : [$("url-reference_image_urls").value.trim()].filter(Boolean),
    rendering_speed: $("rendering_speed").value,
    style: $("style").value,
    expand_prompt: $("expand_prompt").checked,
    image_size: $("image_size").value,
    num_images: $("num_images").value,
    strength: Number($("strength").value),
  };
  if ($("negative_prompt").value) input.negative_prompt = $("negative_prompt").value;
  if ($("seed").value !== "") input.seed = Number($("seed").value);
  if (chosen.reference_mask_urls.length) input.reference_mask_urls = chosen.reference_mask_urls[0];
  if (chosen.image_urls.length) input.image_urls = chosen.image_urls;
  return { model: config ? config.model : "ideogram/character-remix", input };
}

function updateCost() {
  if (!config) return;
  const per = config.prices[$("rendering_speed").value];
  const n = Number($("num_images").value);
  $("cost").textContent = `Cost: ${per * n} credits (${per} per image)`;
}

function updateCounts() {
  const p = $("prompt").value.length;
  const n = $("negative_prompt").value.length;
  $("prompt-count").textContent = `${p} / ${config ? config.promptMaxChars : 5000}`;
  $("negative-count").textContent = `${n} / ${config ? config.negativePromptMaxChars : 500}`;
}

function shellQuote(s) {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

function curlCommand() {
  const body = JSON.stringify(requestBody());
  return [
    `curl -X POST ${shellQuote(`${location.origin}/api/v1/jobs/createTask`)}`,
    `  -H "Authorization: Bearer $REMIXD_API_KEY"`,
    `  -H 'Content-Type: application/json'`,
    `  -d ${shellQuote(body)}`,
  ].join(" \\\n");
}

// Once shown, the command follows the form: it is always the request "Remix" would send.
function refreshCurl() {
  const pre = $("curl");
  if (!pre.hidden) pre.textContent = curlCommand();
}

async function copyCurl() {
  const cmd = curlCommand();
  const pre = $("curl");
  pre.textContent = cmd;
  pre.hidden = false;
  try {
    await navigator.clipboard.writeText(cmd);
    $("copy-curl").textContent = "Copied";
  } catch (_) {
    $("copy-curl").textContent = "Shown below";
  }
  setTimeout(() => { $("copy-curl").textContent = "Copy as curl"; }, 2000);
}

async function submit(e) {
  e.preventDefault();
  clearErrors();
  if (!apiKey()) {
    $("err-form").textContent = "Paste an API key first.";
    $("api-key").focus();
    return;
  }
  $("submit").disabled = true;
  try {
    const doc = await api("/api/v1/jobs/createTask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    if (doc.code !== 200) {
      showMessage(doc.msg);
      return;
    }
    await follow(doc.data.taskId);
  } finally {
    $("submit").disabled = false;
  }
}

// ---- a task: progress from the SSE stream, results in a gallery -----------------------

function showRecord(rec) {
  lastRecord = rec;
  $("run").hidden = false;
  $("task-id").textContent = `Task ${rec.taskId}`;
  $("progress").value = rec.progress || 0;
  const cost = rec.creditsConsumed ? ` · ${rec.creditsConsumed} credits` : "";
  $("state").textContent = rec.state === "fail"
    ? `Failed: ${rec.failMsg}`
    : `${rec.state}${cost}`;
  let param = {};
  try { param = JSON.parse(rec.param || "{}"); } catch (_) { /* shown without inputs */ }
  const input = param.input || {};
  const inputUrls = [input.image_url].concat(input.reference_image_urls || []).filter(Boolean);
  $("inputs").replaceChildren(...inputUrls.map((u, i) => figure(u, i === 0 ? "Base image" : "Character reference", null, false)));
  let result = {};
  try { result = JSON.parse(rec.resultJson || "{}"); } catch (_) { /* no results */ }
  const size = config && config.sizes.find((s) => s.name === input.image_size);
  $("results").replaceChildren(...(result.resultUrls || []).map((u, i) =>
    figure(u, `Result ${i + 1}`, size, true)));
  $("remix-again").hidden = !input.image_url;
}

/** A figure of one image; `result`: this server's output (its own or its bucket's URL),
 *  shown at its size with a download link. */
function figure(url, caption, size, result) {
  const fig = document.createElement("figure");
  if (!result && !isOwnFile(url)) {
    fig.append(foreignName("figcaption", caption, url));
    return fig;
  }
  const img = document.createElement("img");
  img.src = url;
  img.alt = caption;
  img.loading = "lazy";
  if (size) {
    img.width = size.width;
    img.height = size.height;
  }
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  if (result) {
    const a = document.createElement("a");
    a.href = url;
    a.download = `${caption.replace(/\s+/g, "-").toLowerCase()}.png`;
    a.textContent = "Download";
    a.className = "download";
    cap.append(" ", a);
  }
  fig.append(img, cap);
  return fig;
}

/** Reads the task's SSE stream (fetch, so the key stays in a header) to its end. */
async function follow(taskId) {
  $("run").hidden = false;
  $("results").replaceChildren();
  const resp = await fetch(`/api/v1/jobs/stream?taskId=${encodeURIComponent(taskId)}`, {
    headers: { Authorization: `Bearer ${apiKey()}` },
  });
  if (!resp.ok || !resp.body) {
    const doc = await resp.json().catch(() => ({ msg: `stream answered ${resp.status}` }));
    $("state").textContent = doc.msg;
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (!data) continue;
      last = JSON.parse(data);
      showRecord(last);
    }
  }
  if (last && last.state === "fail") showMessage(last.failMsg);
  await refreshBalance();
  await loadHistory(true);
}

function remixAgain(rec) {
  let param = {};
  try { param = JSON.parse(rec.param || "{}"); } catch (_) { return; }
  const input = param.input || {};
  clearErrors();
  document.querySelectorAll(".slot .url, .slot .file").forEach((e) => { e.value = ""; });
  document.querySelectorAll(".slot .status").forEach((e) => { e.textContent = ""; });
  chosen.image_url = input.image_url ? [input.image_url] : [];
  chosen.reference_image_urls = (input.reference_image_urls || []).slice(0, 1);
  const mask = Array.isArray(input.reference_mask_urls) ? input.reference_mask_urls[0] : input.reference_mask_urls;
  chosen.reference_mask_urls = mask ? [mask] : [];
  chosen.image_urls = input.image_urls || [];
  Object.keys(chosen).forEach(showChosen);
  $("prompt").value = input.prompt || "";
  $("negative_prompt").value = input.negative_prompt || "";
  $("strength").value = input.strength ?? 0.8;
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
  $("style").value = input.style || "AUTO";
  $("rendering_speed").value = input.rendering_speed || "BALANCED";
  $("image_size").value = input.image_size || "square_hd";
  $("num_images").value = String(input.num_images || "1");
  $("seed").value = input.seed ?? "";
  $("expand_prompt").checked = input.expand_prompt !== false;
  updateCounts();
  updateCost();
  refreshCurl();
  $("prompt").focus();
}

// ---- history ------------------------------------------------------------------------------

async function loadHistory(reset) {
  if (!apiKey()) return;
  if (reset) historyCursor = null;
  const q = historyCursor ? `&cursor=${encodeURIComponent(historyCursor)}` : "";
  const doc = await api(`/api/v1/jobs/list?limit=10${q}`);
  if (doc.code !== 200) {
    $("history").replaceChildren();
    return;
  }
  const items = doc.data.tasks.map(historyItem);
  if (reset) $("history").replaceChildren(...items);
  else $("history").append(...items);
  historyCursor = doc.data.nextCursor;
  $("more-history").hidden = !historyCursor;
}

function historyItem(rec) {
  const li = document.createElement("li");
  let result = {};
  try { result = JSON.parse(rec.resultJson || "{}"); } catch (_) { /* no thumbnail */ }
  const thumb = document.createElement("img");
  thumb.className = "thumb";
  thumb.alt = "";
  thumb.width = 64;
  thumb.height = 64;
  if (result.resultUrls && result.resultUrls[0]) thumb.src = result.resultUrls[0];
  const text = document.createElement("span");
  const when = new Date(rec.createTime).toLocaleString();
  text.textContent = `${rec.state} · ${rec.creditsConsumed || 0} credits · ${when}`;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "secondary";
  open.textContent = "Open";
  open.setAttribute("aria-label", `Open task ${rec.taskId}`);
  open.addEventListener("click", () => {
    showRecord(rec);
    $("run").scrollIntoView();
  });
  const again = document.createElement("button");
  again.type = "button";
  again.className = "secondary";
  again.textContent = "Remix again";
  again.setAttribute("aria-label", `Remix task ${rec.taskId} again`);
  again.addEventListener("click", () => remixAgain(rec));
  li.append(thumb, text, open, again);
  return li;
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, apiKey());
    refreshBalance();
    loadHistory(true);
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    key.value = "";
    $("history").replaceChildren();
    refreshBalance();
  });
  config = await (await fetch("/playground/config.json")).json();
  const sizeSelect = $("image_size");
  sizeSelect.replaceChildren(...config.sizes.map((s) => {
    const o = document.createElement("option");
    o.value = s.name;
    o.textContent = `${s.name} (${s.width} × ${s.height})`;
    o.selected = s.name === "square_hd";
    return o;
  }));
  ["image_url", "reference_image_urls", "reference_mask_urls", "image_urls"].forEach(wireSlot);
  $("prompt").addEventListener("input", updateCounts);
  $("negative_prompt").addEventListener("input", updateCounts);
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  });
  $("rendering_speed").addEventListener("change", updateCost);
  $("num_images").addEventListener("change", updateCost);
  $("dice").addEventListener("click", () => {
    const r = new Uint32Array(1);
    crypto.getRandomValues(r);
    $("seed").value = r[0] % 2147483648;
    refreshCurl();
  });
  $("remix").addEventListener("input", refreshCurl);
  $("remix").addEventListener("change", refreshCurl);
  FIELDS.forEach((f) => {
    const el = $(f);
    if (el) el.addEventListener("input", () => clearError(f));
  });
  $("remix").addEventListener("submit", submit);
  $("copy-curl").addEventListener("click", copyCurl);
  $("remix-again").addEventListener("click", () => lastRecord && remixAgain(lastRecord));
  $("refresh-history").addEventListener("click", () => loadHistory(true));
  $("more-history").addEventListener("click", () => loadHistory(false));
  updateCounts();
  updateCost();
  await refreshBalance();
  await loadHistory(true);
}

document.addEventListener("DOMContentLoaded", start);
