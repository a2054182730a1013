// The upload page: files dropped on the drop zone or chosen with the picker get a card each with
// a thumbnail; "Classify" sends them one by one to POST /api/v1/predictions and each card then
// follows its job (card.js). Without JavaScript the form posts to / as before.
"use strict";

(function () {
  const { create, setState, fail, poll, retryAfterMs, el } = window.cxrCard;
  const UPLOADS_AT_ONCE = 2;
  const MAX_RETRIES = 5;
  const API = "/api/v1/predictions";

  const form = document.querySelector("form.upload");
  const input = document.getElementById("files");
  const zone = document.getElementById("dropzone");
  const queue = document.getElementById("queue");
  const submit = form.querySelector("button[type=submit]");
  const explain = document.getElementById("explain");
  const message = document.getElementById("upload-message");
  const staged = new Map(); // card id -> File, until it is sent
  const sentIds = [];

  // The picker stays the way in; the zone (shown only with JavaScript) adds dropping onto it.
  zone.hidden = false;
  input.required = false;
  input.classList.add("visually-hidden");
  input.tabIndex = -1;
  document.getElementById("files-label").classList.add("visually-hidden");

  function refreshButton() {
    const n = staged.size;
    submit.textContent = n ? `Classify ${n} file${n === 1 ? "" : "s"}` : "Classify";
  }

  function say(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  // PNG/JPEG: the file itself through an object URL; DICOM (which browsers cannot decode) and
  // anything else: a tile saying what it is. DICOM is recognised by name, type or "DICM" at 128.
  async function thumbnail(file) {
    if (/^image\/(png|jpeg)$/.test(file.type)) {
      const img = el("img", "thumb");
      img.alt = `thumbnail of ${file.name}`;
      img.src = URL.createObjectURL(file);
      img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
      img.addEventListener("error", () => img.replaceWith(tile("?", file.name)), { once: true });
      return img;
    }
    let dicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
    if (!dicom) {
      try {
        dicom = (await file.slice(128, 132).text()) === "DICM";
      } catch (err) {
        dicom = false;
      }
    }
    return tile(dicom ? "DICOM" : (file.name.split(".").pop() || "file").slice(0, 5).toUpperCase(), file.name);
  }

  function tile(text, name) {
    const node = el("span", "thumb tile", text);
    node.setAttribute("role", "img");
    node.setAttribute("aria-label", `${text} file ${name} (no preview)`);
    return node;
  }

  async function addFiles(files) {
    say("");
    for (const file of files) {
      const card = create(file.name);
      setState(card, "ready", "Ready to send");
      const remove = el("button", "small secondary remove", "Remove");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove ${file.name}`);
      remove.addEventListener("click", () => {
        staged.delete(card.id);
        card.remove();
        refreshButton();
        submit.focus();
      });
      card.querySelector(".card-head").append(remove);
      staged.set(card.id, file);
      queue.append(card);
      card.querySelector(".thumb-slot").append(await thumbnail(file));
    }
    refreshButton();
  }

  async function send(card, file) {
    card.querySelector(".remove")?.remove();
    const body = new FormData();
    body.append("file", file, file.name);
    body.append("explain", explain && !explain.checked ? "0" : "1");
    for (let attempt = 0; ; attempt++) {
      setState(card, "sending", attempt ? `Sending again (try ${attempt + 1})…` : "Sending…");
      let response;
      try {
        response = await fetch(API, { method: "POST", body, headers: { Accept: "application/json" } });
      } catch (err) {
        if (attempt >= MAX_RETRIES) return fail(card, "Not sent: the service cannot be reached.");
        await new Promise((r) => setTimeout(r, 1000 * (attempt + 1)));
        continue;
      }
      const doc = await response.json().catch(() => ({}));
      if (response.status === 202 && doc.id) {
        card.dataset.job = doc.id;
        card.dataset.url = doc.status_url;
        sentIds.push(doc.id);
        // The address becomes the results page of everything sent: a reload (or a link) shows
        // the same cards, rendered by the server.
        history.replaceState(null, "", "/results?" + sentIds.map((id) => "id=" + id).join("&"));
        setState(card, "queued", "Queued…");
        poll(card);
        return;
      }
      // A full queue or a rate limit is worth waiting for; anything else is the file's answer.
      const busy = response.status === 429 || (response.status === 503 && doc.error === "queue_full");
      if (busy && attempt < MAX_RETRIES) {
        const wait = retryAfterMs(response, 2000);
        setState(card, "sending", `The service is busy; trying again in ${Math.round(wait / 1000)} s…`);
        await new Promise((r) => setTimeout(r, wait));
        continue;
      }
      return fail(card, "Refused: " + (doc.message || `HTTP ${response.status}`));
    }
  }

  async function sendAll() {
    const work = [...staged.entries()].map(([id, file]) => [document.getElementById(id), file]);
    staged.clear();
    refreshButton();
    const workers = Array.from({ length: UPLOADS_AT_ONCE }, async () => {
      while (work.length) {
        const [card, file] = work.shift();
        if (card) await send(card, file);
      }
    });
    await Promise.all(workers);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!staged.size) {
      say("Choose at least one X-ray: drop files on the box or press it to pick them.");
      zone.focus();
      return;
    }
    sendAll();
  });

  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = ""; // the files are staged; the same file may be chosen again
  });

  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault(); // Space would scroll the page
      input.click();
    }
  });
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.classList.add("over");
  }));
  ["dragleave", "dragend"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone must not make the browser navigate away to it.
  ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => {
    if (hasFiles(event) && !zone.contains(event.target)) event.preventDefault();
  }));
})();
