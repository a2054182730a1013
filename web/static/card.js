// Result cards, one per prediction job: the X-ray with its Grad-CAM overlay, the probability bars,
// the model version and decision rule, a link to the JSON. Shared by the upload page (upload.js)
// and the results page (results.js) as window.cxrCard. Everything shown comes from the JSON API
// and is written with textContent, never as markup.
"use strict";

(function () {
  const POLL_MS = 400;
  const MAX_POLL_MS = 3000;
  const DEFAULT_OPACITY = 55; // percent
  const OVERLAY_MAX_PX = 768; // the longer side the map is drawn at (CSS scales it to the image)
  // matplotlib's viridis at nine stops: perceptually uniform, readable in grayscale print.
  const VIRIDIS = [
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
  ];
  const REFUSED_TEXT = "Not recognised as a frontal chest X-ray — no prediction";
  let serial = 0;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Messages mark commands with backticks (worker.client.NO_MODEL_MESSAGE): shown as <code>.
  function withCode(node, text) {
    const parts = String(text).split("`");
    if (parts.length % 2 === 0) {
      node.textContent = text; // an unpaired backtick: plain text
      return;
    }
    node.replaceChildren(...parts.map((part, i) => (i % 2 ? el("code", null, part) : document.createTextNode(part))));
  }

  function colour(v) {
    const x = Math.min(1, Math.max(0, Number(v) || 0)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const t = x - i;
    return VIRIDIS[i].map((c, k) => Math.round(c + t * (VIRIDIS[i + 1][k] - c)));
  }

  function legendGradient() {
    return "linear-gradient(to right, " + VIRIDIS.map((c) => `rgb(${c.join(",")})`).join(", ") + ")";
  }

  // --- the card's skeleton ------------------------------------------------------------------------

  // Builds (or rebuilds, for a card the server rendered) the parts every card has.
  function skeleton(card, name) {
    const head = el("div", "card-head");
    const thumb = card.querySelector(".thumb-slot") || el("div", "thumb-slot");
    head.append(thumb, el("h2", "filename", name));
    const body = el("div", "card-body");
    const readout = el("div", "readout");
    readout.append(el("div", "bars"), el("p", "reason"), el("p", "meta"), el("p", "links"));
    body.append(el("div", "figure-slot"), readout);
    const status = el("p", "status", "Queued…");
    status.setAttribute("aria-live", "polite");
    card.replaceChildren(head, status, body);
    card.querySelector(".reason").hidden = true;
    if (!card.id) card.id = "card-" + ++serial;
    return card;
  }

  function create(name) {
    const card = el("section", "card");
    card.dataset.state = "ready";
    return skeleton(card, name);
  }

  // A card the server rendered (results.html): rebuilt empty, then filled from the API.
  function adopt(card) {
    const name = card.querySelector(".filename");
    return skeleton(card, name ? name.textContent : card.dataset.job);
  }

  function setState(card, state, text) {
    card.dataset.state = state;
    const status = card.querySelector(".status");
    status.className = "status " + state;
    withCode(status, text);
  }

  function fail(card, message) {
    setState(card, "failed", message);
  }

  // --- a finished prediction ------------------------------------------------------------------------

  function bars(probabilities) {
    return Object.entries(probabilities || {}).map(([name, p]) => {
      const row = el("div", "bar-row");
      const track = el("span", "bar-track");
      const fill = el("span", "bar-fill");
      fill.style.width = (p * 100).toFixed(1) + "%";
      track.append(fill);
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", `p(${name})`);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      row.append(el("span", "bar-name", name), track, el("span", "bar-value", (p * 100).toFixed(1) + " %"));
      return row;
    });
  }

  function ruleText(result) {
    return result.decision_threshold == null
      ? "decision: the most probable class (no threshold)"
      : "screening threshold: a finding when 1 − p(NORMAL) ≥ " + result.decision_threshold.toFixed(3);
  }

  function metaText(doc) {
    const result = doc.result;
    const seconds = doc.elapsed_ms != null ? (doc.elapsed_ms / 1000).toFixed(2) + " s" : "?";
    const t = result.timings_ms || {};
    const model = t.model != null
      ? " (model " + t.model.toFixed(0) + " ms" + (t.explain != null ? ", Grad-CAM " + t.explain.toFixed(0) + " ms" : "") + ")"
      : "";
    return "Model version " + result.model_version + " · " + ruleText(result) + " · " +
      seconds + " from upload to result" + model +
      (result.ood_ignored ? " · out-of-distribution gate ignored on request" : "");
  }

  function link(href, text, cls) {
    const a = el("a", cls, text);
    a.href = href;
    return a;
  }

  function showResult(card, doc) {
    const result = doc.result;
    if (doc.filename) card.querySelector(".filename").textContent = doc.filename;
    const reason = card.querySelector(".reason");
    const ood = result.out_of_distribution;
    if (result.label == null && ood) {
      setState(card, "refused", REFUSED_TEXT);
      card.querySelector(".bars").replaceChildren();
      reason.textContent = (ood.reason || "") +
        (typeof ood.score === "number" && typeof ood.threshold === "number"
          ? ` (score ${ood.score.toFixed(3)}, threshold ${ood.threshold.toFixed(3)})` : "");
      reason.hidden = false;
    } else {
      setState(card, "done", String(result.label));
      card.querySelector(".status").classList.add("label-" + String(result.label).toLowerCase());
      card.querySelector(".bars").replaceChildren(...bars(result.probabilities));
      reason.hidden = true;
    }
    card.querySelector(".meta").textContent = metaText(doc);
    const links = [link(card.dataset.url, "Result as JSON", "json-link")];
    const exp = result.label == null ? null : result.explanation;
    if (exp && exp.heatmap_url) links.push(link(exp.heatmap_url, "Overlay with legend (PNG)", "heatmap-link"));
    const linkBox = card.querySelector(".links");
    linkBox.replaceChildren();
    links.forEach((a, i) => linkBox.append(...(i ? [" · ", a] : [a])));
    showImage(card, doc, exp || null, result.label == null ? "no prediction was made" : result.explanation_reason);
    if (window.cxrUntrained && typeof window.cxrUntrained.mark === "function") {
      window.cxrUntrained.mark(card, result);
    }
  }

  // The de-identified X-ray the model judged, once /image.png answers; no figure otherwise.
  function showImage(card, doc, exp, reason) {
    const slot = card.querySelector(".figure-slot");
    const name = doc.filename || "the upload";
    const img = new Image();
    img.className = "xray-image";
    img.alt = `The X-ray the model judged (${name}), de-identified`;
    img.addEventListener("load", () => slot.replaceChildren(figure(card, img, exp, reason)));
    img.addEventListener("error", () => {
      // Without the plain image, the server's overlay (which includes the X-ray) still shows it.
      if (exp && exp.heatmap_url && !img.dataset.fallback) {
        img.dataset.fallback = "1";
        img.src = exp.heatmap_url;
        exp = null;
      } else {
        slot.replaceChildren();
      }
    });
    img.src = card.dataset.url + "/image.png";
  }

  function figure(card, img, exp, reason) {
    const fig = el("figure", "xray");
    const frame = el("div", "xray-frame");
    if (img.naturalWidth && img.naturalHeight) frame.style.setProperty("--aspect", String(img.naturalWidth / img.naturalHeight));
    frame.append(img);
    fig.append(frame);
    if (!exp || !exp.map_url) {
      const why = reason ? `No heatmap: ${reason}.` : "No heatmap for this result.";
      fig.append(el("figcaption", "hint", exp ? "The heatmap data is not available." : why));
      return fig;
    }
    const canvas = el("canvas", "heatmap");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `Grad-CAM heatmap for ${exp.class_explained}`);
    frame.append(canvas);
    const caption = el("figcaption", "hint",
      `Grad-CAM (${exp.layer || "last convolutional layer"}): where the evidence for ` +
      `${exp.class_explained} was strongest. It shows what drove the model, not a finding.`);
    fig.append(controls(card, canvas), caption);
    drawMap(canvas, img, exp.map_url).catch(() => {
      canvas.remove();
      caption.textContent = "The heatmap data could not be loaded; the overlay PNG is linked below.";
    });
    return fig;
  }

  function controls(card, canvas) {
    const box = el("div", "overlay-controls");
    const toggleId = card.id + "-heatmap";
    const opacityId = card.id + "-opacity";
    const toggle = el("input", "toggle-heatmap");
    toggle.type = "checkbox";
    toggle.id = toggleId;
    toggle.checked = true;
    const toggleLabel = el("label", "toggle", "Show heatmap");
    toggleLabel.htmlFor = toggleId;
    toggleLabel.prepend(toggle, " ");

    const opacity = el("input", "opacity");
    opacity.type = "range";
    opacity.id = opacityId;
    opacity.min = "0";
    opacity.max = "100";
    opacity.step = "5";
    opacity.value = String(DEFAULT_OPACITY);
    const opacityLabel = el("label", "opacity-label", "Opacity");
    opacityLabel.htmlFor = opacityId;
    const shown = el("output", "opacity-value", DEFAULT_OPACITY + " %");
    shown.htmlFor = opacityId;

    const apply = () => {
      canvas.hidden = !toggle.checked;
      opacity.disabled = !toggle.checked;
      canvas.style.opacity = String(Number(opacity.value) / 100);
      shown.textContent = opacity.value + " %";
      opacity.setAttribute("aria-valuetext", opacity.value + " %");
    };
    toggle.addEventListener("change", apply);
    opacity.addEventListener("input", apply);
    apply();

    const legend = el("span", "legend");
    const bar = el("span", "legend-bar");
    bar.style.backgroundImage = legendGradient();
    legend.append(el("span", null, "low"), bar, el("span", null, "high"));
    legend.title = "Grad-CAM weight, normalised to 0–1 per image";
    box.append(toggleLabel, el("span", "opacity-group"), legend);
    box.querySelector(".opacity-group").append(opacityLabel, opacity, shown);
    return box;
  }

  // Draws the normalised map ({"shape": [h, w], "values": [[...]]}, 0..1) over the whole image:
  // the model saw the image squashed to a square, so the map stretches back to the image's aspect.
  async function drawMap(canvas, img, url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const doc = await response.json();
    const values = doc.values;
    const h = values.length;
    const w = h ? values[0].length : 0;
    if (!h || !w) throw new Error("empty map");
    const small = document.createElement("canvas");
    small.width = w;
    small.height = h;
    const sctx = small.getContext("2d");
    const data = sctx.createImageData(w, h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const v = Math.min(1, Math.max(0, Number(values[y][x]) || 0));
        const [r, g, b] = colour(v);
        const o = 4 * (y * w + x);
        data.data[o] = r;
        data.data[o + 1] = g;
        data.data[o + 2] = b;
        // Weak evidence fades out so the X-ray stays readable under it.
        data.data[o + 3] = Math.round(255 * Math.sqrt(v));
      }
    }
    sctx.putImageData(data, 0, 0);
    const scale = OVERLAY_MAX_PX / Math.max(img.naturalWidth || 1, img.naturalHeight || 1);
    canvas.width = Math.max(1, Math.round((img.naturalWidth || w) * Math.min(1, scale)));
    canvas.height = Math.max(1, Math.round((img.naturalHeight || h) * Math.min(1, scale)));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = `${h}x${w}`;
  }

  // --- polling --------------------------------------------------------------------------------------

  function retryAfterMs(response, fallback) {
    const s = Number(response.headers.get("Retry-After"));
    return Number.isFinite(s) && s > 0 ? s * 1000 : fallback;
  }

  // Asks the API for the job until it is done or failed, backing off to MAX_POLL_MS.
  async function poll(card, delay = POLL_MS) {
    const base = Math.max(delay, POLL_MS);
    const next = (ms) => setTimeout(() => poll(card, Math.min(base * 1.5, MAX_POLL_MS)), ms);
    let response;
    try {
      response = await fetch(card.dataset.url, { headers: { Accept: "application/json" }, cache: "no-store" });
    } catch (err) {
      next(base);
      return;
    }
    const doc = await response.json().catch(() => ({}));
    if (response.status === 404 || response.status === 410) {
      fail(card, "This result has expired or never existed. Upload the image again.");
      return;
    }
    if (!response.ok) {
      setState(card, card.dataset.state === "running" ? "running" : "queued",
        "Waiting for the service (" + response.status + ")…");
      next(retryAfterMs(response, base));
      return;
    }
    if (doc.filename) card.querySelector(".filename").textContent = doc.filename;
    if (doc.status === "done" && doc.result) return showResult(card, doc);
    if (doc.status === "failed") return fail(card, "Failed: " + (doc.error || "unknown error"));
    setState(card, doc.status === "running" ? "running" : "queued", doc.status === "running" ? "Running…" : "Queued…");
    next(base);
  }

  window.cxrCard = { create, adopt, setState, fail, poll, showResult, withCode, retryAfterMs, el };
})();
