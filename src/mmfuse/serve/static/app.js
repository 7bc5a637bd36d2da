// The mmfuse page: builds one input per modality from /info, posts the form to /predict and
// draws the answer. Plain JS, no build step.
"use strict";

const ACCEPT = { image: "image/*", audio: "audio/*,.wav,.flac,.ogg,.mp3" };
const KEY_STORE = "mmfuse-api-key";  // sessionStorage: gone when the tab closes, never sent to other sites

// The headers of every API call: the API key, when the user gave one (servers without keys ignore none).
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

// Shows the key field and resolves once the user has entered a key (stored for this tab).
function askForKey(message) {
  const form = document.getElementById("access");
  form.hidden = false;
  showError(message);
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = document.getElementById("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
      document.getElementById("error").hidden = true;
      form.hidden = true;
      resolve();
    }, { once: true });
  });
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function addInput(container, name, kind) {
  const id = "input-" + name;
  container.append(el("label", { for: id }, name + " (" + kind + ")"));
  if (kind === "image" || kind === "audio") {
    container.append(el("input", { type: "file", id, name, accept: ACCEPT[kind] }));
  } else {
    const placeholder = kind === "features" ? "[0.1, 0.2, …] as JSON" : "type the " + name;
    container.append(el("textarea", { id, name, placeholder }));
  }
}

function drawBars(container, values, signed) {
  container.replaceChildren();
  const largest = Math.max(1e-9, ...Object.values(values).map(Math.abs));
  for (const [name, value] of Object.entries(values)) {
    const row = el("div", { class: "row", "data-name": name });
    const track = el("div", { class: "track" });
    const width = signed ? Math.abs(value) / largest : Math.max(0, Math.min(1, value));
    const bar = el("div", { class: "bar" + (value < 0 ? " negative" : "") });
    bar.style.width = (100 * width).toFixed(1) + "%";
    track.append(bar);
    row.append(el("span", { class: "name" }, name), track, el("span", { class: "value" }, Number(value).toFixed(4)));
    container.append(row);
  }
}

function showResult(answer) {
  const label = answer.label ?? (answer.labels ? answer.labels.join(", ") || "(none)" : null);
  document.getElementById("result-label").textContent =
    label ?? (Array.isArray(answer.value) ? answer.value.map((v) => v.toFixed(4)).join(", ") : Number(answer.value).toFixed(4));
  document.getElementById("result-modalities").textContent = answer.modalities.join(", ");
  const scores = answer.probabilities ?? null;
  document.getElementById("scores-title").hidden = scores === null;
  drawBars(document.getElementById("probabilities"), scores ?? {}, false);
  const explanation = document.getElementById("explanation");
  explanation.hidden = !answer.contributions;
  if (answer.contributions) {
    const scalar = Object.fromEntries(Object.entries(answer.contributions)
      .map(([name, value]) => [name, Array.isArray(value) ? value[0] : value]));
    drawBars(document.getElementById("contributions"), scalar, true);
    document.getElementById("explained").textContent = "(to the " + answer.explained.quantity + ")";
  }
  document.getElementById("result").hidden = false;
}

function showError(message) {
  const error = document.getElementById("error");
  error.textContent = message;
  error.hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const status = document.getElementById("status");
  document.getElementById("error").hidden = true;
  status.textContent = "predicting…";
  const explain = document.getElementById("explain").checked ? "?explain=1" : "";
  try {
    const response = await fetch("/predict" + explain,
      { method: "POST", body: new FormData(event.target), headers: authHeaders() });
    const answer = await response.json();
    if (response.status === 401) {
      document.getElementById("result").hidden = true;
      askForKey("error 401: " + answer.detail);  // not awaited: the form stays usable
    } else if (!response.ok) {
      const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail);
      showError("error " + response.status + ": " + detail);
      document.getElementById("result").hidden = true;
    } else {
      showResult(answer);
    }
  } catch (exc) {
    showError("the server did not answer: " + exc);
  } finally {
    status.textContent = "";
  }
}

async function start() {
  let info = null;
  for (let attempt = 0; info === null; attempt++) {
    const response = await fetch("/info", { headers: authHeaders() });
    if (response.ok) info = await response.json();
    else if (response.status === 401) await askForKey("error 401: " + (await response.json()).detail);
    else await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 200 * (attempt + 1))));
  }
  const labels = info.labels ? ", labels: " + info.labels.join(", ") : "";
  document.getElementById("model").textContent =
    info.task + " with " + info.fusion + " fusion (" + info.backend + ", mmfuse " + info.mmfuse_version + labels + ")";
  const container = document.getElementById("inputs");
  for (const [name, kind] of Object.entries(info.modalities)) addInput(container, name, kind);
  document.getElementById("explain").disabled = !info.explain;
  document.getElementById("explain").checked = info.explain;
  document.getElementById("submit").disabled = false;
  document.getElementById("predict-form").addEventListener("submit", submit);
}

start();
