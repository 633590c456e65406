// The web page of `latentkit serve`: a client of the native API (/api/v1), nothing more.
// No framework and no build step. Sections: API calls (with the optional token), the
// settings form, the event stream of a job, the gallery, the mask painter, start-up.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "latentkit-token";
const GALLERY_LIMIT = 60; // pictures shown on load; newer ones are added on top
const NUMBER_FIELDS = ["steps", "cfg", "width", "height", "seed", "n"];
const TEXT_FIELDS = ["prompt", "negative_prompt", "sampler", "schedule", "model"];

const ONE_COLUMN = window.matchMedia("(max-width: 879px)"); // as style.css lays it out

const $ = (id) => document.getElementById(id);

const state = {
  job: null, // the id of the job this page follows, or null
  initImage: null, // the init image as a PNG data: URL, or null
  maskPainted: false, // whether any stroke is on the mask
  sizes: {}, // model name -> [width, height] it makes by default (capabilities)
};

// ---------------------------------------------------------------- messages

function showError(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("message").hidden = true;
  $("message").textContent = "";
}

// ---------------------------------------------------------------- API calls

class ApiError extends Error {}

let tokenAsked = null; // one pending token question, shared by every call that needs it

/** Show the token field and resolve once the user submits a token. */
function askToken(refused) {
  if (!tokenAsked) {
    const form = $("token-form");
    $("token-note").textContent = refused ? "That token was refused; try again." : "";
    form.hidden = false;
    $("token").focus();
    tokenAsked = new Promise((resolve) => {
      form.addEventListener(
        "submit",
        (event) => {
          event.preventDefault();
          sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
          form.hidden = true;
          tokenAsked = null;
          resolve();
        },
        { once: true },
      );
    });
  }
  return tokenAsked;
}

/** fetch() on the API with the token, if any; asks for one on 401 and tries again. */
async function api(path, options = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { ...(options.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(API + path, { ...options, headers });
    if (response.status === 401) {
      await askToken(Boolean(token));
      continue;
    }
    if (!response.ok) throw new ApiError(await errorText(response));
    return response;
  }
}

/** The API's one-sentence error ({"error": "..."}), or the HTTP status. */
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch {
    // not JSON: fall through to the status line
  }
  return `the server answered ${response.status} ${response.statusText}.`;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function postJson(path, body) {
  return apiJson(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

/** A result image as a blob: URL (an <img src> could not send the token). */
async function imageUrl(jobId, name) {
  const response = await api(`/jobs/${jobId}/images/${encodeURIComponent(name)}`);
  return URL.createObjectURL(await response.blob());
}

// ---------------------------------------------------------------- the settings form

function fillSelect(select, values, chosen) {
  select.replaceChildren(
    ...values.map((value) => new Option(value, value, false, value === chosen)),
  );
}

/** The form as the server knows it: capabilities' models, samplers, defaults, limits. */
function applyCapabilities(caps) {
  const defaults = caps.defaults || {};
  fillSelect($("model"), caps.models, caps.default);
  fillSelect($("sampler"), caps.samplers, defaults.sampler);
  fillSelect($("schedule"), caps.schedules, defaults.schedule);
  for (const name of ["steps", "cfg", "n", "width", "height"]) {
    if (defaults[name] != null) $(name).value = defaults[name];
  }
  state.sizes = caps.sizes || {};
  showModelSize();
  const limits = caps.limits || {};
  if (limits.max_steps) $("steps").max = limits.max_steps;
  if (limits.max_images) $("n").max = limits.max_images;
  if (limits.max_side) for (const side of ["width", "height"]) $(side).max = limits.max_side;
  $("server-status").textContent = `serving ${caps.models.join(", ")}`;
}

/** Empty width and height mean the model's own size: say which in their placeholders. */
function showModelSize() {
  const size = state.sizes[$("model").value];
  $("width").placeholder = size ? `${size[0]} (model's)` : "model's";
  $("height").placeholder = size ? `${size[1]} (model's)` : "model's";
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

/** The job's settings from the form; an empty seed is a random one, chosen here. */
function readSettings() {
  const body = {};
  for (const name of TEXT_FIELDS) body[name] = $(name).value;
  for (const name of NUMBER_FIELDS) {
    const text = $(name).value.trim();
    if (text !== "") body[name] = Number(text);
  }
  if (body.seed === undefined) body.seed = randomSeed();
  if (!body.model) delete body.model;
  if (state.initImage) {
    body.init_image = state.initImage;
    body.strength = Number($("strength").value);
    if (state.maskPainted) body.mask = maskPng();
  }
  return body;
}

/** Put a job's settings back into the form ("reuse"). */
function writeSettings(options, model) {
  for (const name of [...TEXT_FIELDS, ...NUMBER_FIELDS]) {
    const value = name === "model" ? model : options[name];
    if (value !== undefined) $(name).value = value ?? "";
  }
  if (options.strength != null) setStrength(options.strength);
  showModelSize();
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

// ---------------------------------------------------------------- a job: submit, follow, cancel

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
}

async function generate() {
  if (state.job) return; // one job at a time from this page
  clearError();
  setBusy(true);
  try {
    const { id } = await postJson("/jobs", readSettings());
    state.job = id;
    showProgress({ step: 0, total: Number($("steps").value) || 0 });
    $("preview").hidden = true;
    if (ONE_COLUMN.matches) $("job").scrollIntoView({ block: "nearest" }); // phones
    await followJob(id);
  } catch (err) {
    showError(err.message);
  } finally {
    state.job = null;
    setBusy(false);
  }
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`/jobs/${state.job}/cancel`, { method: "POST" });
  } catch (err) {
    showError(err.message);
  }
}

/** Follow a job's events to its end: progress, previews, then its pictures. */
async function followJob(id) {
  for await (const { event, data } of readEvents(`/jobs/${id}/events`)) {
    if (event === "step") {
      showProgress(data);
    } else if (event === "done") {
      showProgress({ step: 1, total: 1, eta: 0, done: true });
      const [first] = await addJob(await apiJson(`/jobs/${id}`), { top: true });
      if (first) showPreview(first.querySelector("img").src); // the picture itself
      return;
    } else if (event === "cancelled") {
      $("progress-text").textContent = "Cancelled.";
      return;
    } else if (event === "failed") {
      throw new ApiError(data.error || "the job failed.");
    }
  }
  throw new ApiError("the job's event stream ended early; reload to see how it ended.");
}

/**
 * Server-sent events read with fetch() (an EventSource cannot send the token):
 * yields {event, data} for each message of the stream.
 */
async function* readEvents(path) {
  const response = await api(path, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (message) yield message;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // the caller stopped early: close the stream
  }
}

/** One SSE message ("event: NAME" and "data: JSON" lines), or null for a comment. */
function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

function showProgress({ step, total, eta, its, preview, done }) {
  $("job").hidden = false;
  const bar = $("progress");
  bar.max = Math.max(total, 1);
  bar.value = step;
  const parts = done ? ["Done."] : [`step ${step} / ${total}`];
  if (!done && its) parts.push(`${its.toFixed(1)} it/s`);
  if (!done && eta != null) parts.push(`ETA ${formatSeconds(eta)}`);
  $("progress-text").textContent = parts.join(" · ");
  if (preview) showPreview(preview);
}

function showPreview(url) {
  $("preview").src = url;
  $("preview").hidden = false;
}

function formatSeconds(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

// ---------------------------------------------------------------- the gallery

/** Add a finished job's pictures: on top (a new job) or at the end (listing on load);
 * returns their gallery items. */
async function addJob(job, { top }) {
  const items = await Promise.all(job.images.map((name, i) => galleryItem(job, name, i)));
  const gallery = $("gallery");
  if (top) gallery.prepend(...items);
  else gallery.append(...items);
  $("gallery-empty").hidden = gallery.children.length > 0;
  return items;
}

/** One picture: a button that reuses its settings, its prompt and settings below. */
async function galleryItem(job, name, index) {
  const options = job.options;
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.job = job.id;

  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.title = "Reuse these settings";
  reuse.setAttribute("aria-label", `Reuse the settings of: ${options.prompt || "(empty prompt)"}`);
  reuse.addEventListener("click", () => reuseSettings(job));

  const image = document.createElement("img");
  image.alt = options.prompt;
  image.src = await imageUrl(job.id, name);

  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = options.prompt || "(empty prompt)";

  const details = document.createElement("p");
  details.className = "params small muted";
  details.textContent = describe(job, index);

  reuse.append(image, prompt, details);
  item.append(reuse);
  if (job.kind === "txt2img") item.append(explainButton(job, index));
  return item;
}

// ---------------------------------------------------------------- the explain view

/** A button that asks the server to explain this picture (POST /jobs/ID/explain). */
function explainButton(job, index) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "explain-button";
  button.textContent = "Explain";
  button.setAttribute("aria-label", `Explain: ${job.options.prompt || "(empty prompt)"}`);
  button.addEventListener("click", () => explain(job, index));
  return button;
}

/** Queue an explain job, wait for its two figures (attention per token, the steps), show them. */
async function explain(job, index) {
  clearError();
  const panel = $("explain");
  panel.hidden = false;
  $("explain-figures").replaceChildren();
  $("explain-status").textContent = "Explaining… (the picture is drawn again, twice)";
  panel.scrollIntoView({ block: "nearest" });
  try {
    const { id } = await postJson(`/jobs/${job.id}/explain`, { index });
    for await (const { event, data } of readEvents(`/jobs/${id}/events`)) {
      if (event === "done") return showExplained(await apiJson(`/jobs/${id}`));
      if (event === "failed" || event === "cancelled") {
        throw new ApiError(data.error || `the explain job was ${event}.`);
      }
    }
    throw new ApiError("the explain job's event stream ended early.");
  } catch (err) {
    $("explain-status").textContent = "";
    showError(err.message);
  }
}

const EXPLAIN_CAPTIONS = [
  "Cross-attention per token: where each word of the prompt looks, over all layers and steps.",
  "The denoising steps: the latents, the predicted clean picture and the predicted noise.",
];

async function showExplained(job) {
  const figures = await Promise.all(
    job.images.map(async (name, i) => {
      const figure = document.createElement("figure");
      const image = document.createElement("img");
      image.src = await imageUrl(job.id, name);
      image.alt = EXPLAIN_CAPTIONS[i] || name;
      const caption = document.createElement("figcaption");
      caption.className = "small muted";
      caption.textContent = EXPLAIN_CAPTIONS[i] || name;
      figure.append(image, caption);
      return figure;
    }),
  );
  $("explain-figures").replaceChildren(...figures);
  $("explain-status").textContent = `Seed ${job.options.seed}; tokens: ${job.tokens.join(" ")}`;
}

/** A job's settings in one line, as shown under its picture. */
function describe(job, index) {
  const o = job.options;
  const parts = [
    `seed ${o.seed}${o.n > 1 ? ` (${index + 1} of ${o.n})` : ""}`,
    `${o.steps} steps`,
    `cfg ${o.cfg}`,
    `${o.sampler}${o.schedule && o.schedule !== "default" ? `/${o.schedule}` : ""}`,
    o.width && o.height ? `${o.width}×${o.height}` : null,
    job.model,
    job.kind && job.kind !== "txt2img" ? job.kind : null,
    o.strength != null ? `strength ${o.strength}` : null,
    o.negative_prompt ? `not: ${o.negative_prompt}` : null,
  ];
  return parts.filter(Boolean).join(" · ");
}

function reuseSettings(job) {
  writeSettings(job.options, job.model);
  clearError();
  $("prompt").focus();
}

async function loadGallery() {
  const { jobs } = await apiJson("/jobs");
  let shown = 0;
  for (const job of jobs) {
    if (job.state !== "done" || job.kind === "explain" || shown >= GALLERY_LIMIT) continue;
    await addJob(job, { top: false });
    shown += job.images.length;
  }
}

// ---------------------------------------------------------------- init image and mask

/** Read a chosen file as an image and keep it as a PNG data: URL. */
async function loadInitImage(file) {
  const bitmap = await createImageBitmap(file);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  state.initImage = canvas.toDataURL("image/png");
  $("init-preview").src = state.initImage;
  const mask = $("mask");
  mask.width = bitmap.width; // the mask is drawn at the init image's own size
  mask.height = bitmap.height;
  clearMask();
  $("mask-editor").hidden = false;
}

function removeInitImage() {
  state.initImage = null;
  $("init-file").value = "";
  $("mask-editor").hidden = true;
  clearMask();
}

function clearMask() {
  const mask = $("mask");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  state.maskPainted = false;
}

/** The mask as a PNG data: URL: white where painted (repaint), black elsewhere (keep). */
function maskPng() {
  const painted = $("mask");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const ctx = out.getContext("2d");
  ctx.drawImage(painted, 0, 0);
  ctx.globalCompositeOperation = "source-in"; // the strokes' shape, in white
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over"; // black under them
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}

/** Mouse, pen and touch painting on the mask canvas (pointer events). */
function setUpMaskPainter() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  let last = null; // the previous point of the stroke being drawn

  // A pointer position in the canvas' own pixels (it is shown scaled).
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width;
    return {
      x: (event.clientX - box.left) * scale,
      y: (event.clientY - box.top) * (canvas.height / box.height),
      scale,
    };
  };
  const paint = (point) => {
    ctx.strokeStyle = ctx.fillStyle = "#ff3d7f";
    ctx.lineWidth = Number($("brush").value) * point.scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo((last || point).x, (last || point).y);
    ctx.lineTo(point.x + (last ? 0 : 0.01), point.y);
    ctx.stroke();
    last = point;
    state.maskPainted = true;
  };

  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = null;
    paint(at(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last) paint(at(event));
  });
  for (const end of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(end, () => (last = null));
  }
}

// ---------------------------------------------------------------- start-up

function wireControls() {
  $("settings").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("explain-close").addEventListener("click", () => ($("explain").hidden = true));
  $("model").addEventListener("change", showModelSize);
  $("dice").addEventListener("click", () => ($("seed").value = randomSeed()));
  $("strength").addEventListener("input", (e) => setStrength(e.target.value));
  $("brush").addEventListener("input", (e) => ($("brush-value").textContent = e.target.value));
  $("init-file").addEventListener("change", async (event) => {
    const [file] = event.target.files;
    if (!file) return removeInitImage();
    try {
      await loadInitImage(file);
    } catch {
      removeInitImage();
      showError("That file could not be read as an image.");
    }
  });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-init").addEventListener("click", removeInitImage);
  setUpMaskPainter();
}

async function start() {
  wireControls();
  try {
    applyCapabilities(await apiJson("/capabilities"));
    await loadGallery();
  } catch (err) {
    $("server-status").textContent = "not connected";
    showError(err.message);
  }
  document.body.dataset.ready = "true"; // for tests and scripts: the page is set up
}

start();
