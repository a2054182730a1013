// Polls /api/v1/predictions/<id> for every result card until the job is done or failed.
"use strict";

const POLL_MS = 500;
const MAX_POLL_MS = 5000;
const OOD_TEXT = "Not recognised as a frontal chest X-ray — no prediction";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showResult(card, doc) {
  const result = doc.result;
  if (result.label === null) {
    // Refused by the out-of-distribution gate: no prediction; the probabilities stay below.
    card.querySelector(".status").textContent = OOD_TEXT;
    card.querySelector(".status").className = "status done refused";
  } else {
    card.querySelector(".status").textContent = result.label;
    card.querySelector(".status").className = "status done label-" + result.label.toLowerCase();
  }
  const bars = card.querySelector(".bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(result.probabilities)) {
    const row = el("div", "bar-row");
    row.append(el("span", "bar-name", name));
    const track = el("span", "bar-track");
    const fill = el("span", "bar-fill");
    fill.style.width = (p * 100).toFixed(1) + "%";
    track.append(fill);
    row.append(track, el("span", "bar-value", (p * 100).toFixed(1) + " %"));
    bars.append(row);
  }
  const seconds = doc.elapsed_ms !== undefined ? (doc.elapsed_ms / 1000).toFixed(2) + " s" : "?";
  card.querySelector(".meta").textContent =
    "Model version " + result.model_version + " · " + seconds + " from upload to result" +
    " (model " + result.timings_ms.model.toFixed(0) + " ms)" +
    (result.ood_ignored ? " · out-of-distribution gate ignored on request" : "") +
    (result.decision_threshold == null ? "" :
      " · screening threshold: a finding when 1 − p(NORMAL) ≥ " + result.decision_threshold.toFixed(3));
}

// Messages mark commands with backticks (worker.client.NO_MODEL_MESSAGE): shown as <code>.
function withCode(node, text) {
  const parts = String(text).split("`");
  if (parts.length % 2 === 0) {
    node.textContent = text;  // an unpaired backtick: plain text
    return;
  }
  node.replaceChildren(...parts.map((part, i) => (i % 2 ? el("code", null, part) : document.createTextNode(part))));
}

function showError(card, message) {
  const status = card.querySelector(".status");
  withCode(status, message);
  status.className = "status failed";
}

async function poll(card, delay) {
  let response;
  try {
    response = await fetch(card.dataset.url, { headers: { Accept: "application/json" } });
  } catch (err) {
    setTimeout(() => poll(card, Math.min(delay * 2, MAX_POLL_MS)), delay);
    return;
  }
  const doc = await response.json().catch(() => ({}));
  if (response.status === 404 || response.status === 410) {
    showError(card, "This result has expired or never existed. Upload the image again.");
    return;
  }
  if (!response.ok) {
    card.querySelector(".status").textContent = "Waiting for the service (" + response.status + ")…";
    setTimeout(() => poll(card, Math.min(delay * 2, MAX_POLL_MS)), delay);
    return;
  }
  if (doc.filename) card.querySelector(".filename").textContent = doc.filename;
  if (doc.status === "done") return showResult(card, doc);
  if (doc.status === "failed") return showError(card, "Failed: " + (doc.error || "unknown error"));
  card.querySelector(".status").textContent = doc.status === "running" ? "Running…" : "Queued…";
  setTimeout(() => poll(card, POLL_MS), POLL_MS);
}

document.querySelectorAll(".card[data-job]").forEach((card) => poll(card, POLL_MS));
