// The admin page: asks for the token, then drives /api/v1/admin with fetch. The page itself holds
// no data; everything shown comes from the API and is written with textContent, never as markup.
"use strict";

const JOBS_POLL_MS = 2000;
const TOKEN_KEY = "cxr.admin.token";
const ACTOR_KEY = "cxr.admin.actor";
const ACTIVE_JOB = new Set(["queued", "running"]);

const root = document.getElementById("admin");
const API = root.dataset.api;
const $ = (id) => document.getElementById(id);
const curves = new Map(); // version -> object URL of its curves.png (a version never changes)
let jobsTimer = null;
let lastJobStates = "";

class AuthError extends Error {}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function button(label, cls, onClick) {
  const b = el("button", cls, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function fmtNumber(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "—";
}

function fmtTime(value) {
  if (value === undefined || value === null) return "—";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function fmtSeconds(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  const m = Math.floor(s / 60);
  return m ? `${m} min ${s % 60} s` : `${s} s`;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json", Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const actor = sessionStorage.getItem(ACTOR_KEY);
  if (actor) headers["X-Actor"] = actor;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 401 || response.status === 403) {
    const doc = await response.json().catch(() => ({}));
    throw new AuthError(
      response.status === 403
        ? "The admin API is disabled: set CXR_ADMIN_TOKEN on the web service to enable it."
        : "That token was refused (" + (doc.error || response.status) + "). Check CXR_ADMIN_TOKEN and try again."
    );
  }
  return { status: response.status, ok: response.ok, response };
}

async function apiJSON(method, path, body) {
  const { ok, status, response } = await api(method, path, body);
  const doc = await response.json().catch(() => ({}));
  if (!ok) {
    const err = new Error(doc.message || `HTTP ${status}`);
    err.doc = doc;
    throw err;
  }
  return doc;
}

function flash(message, bad) {
  const node = $("flash");
  node.textContent = message;
  node.className = bad ? "errors" : "notice ok";
  node.hidden = false;
}

function fail(err) {
  if (err instanceof AuthError) return signOut(err.message);
  flash(err.message || String(err), true);
}

// --- sign in / out ------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(jobsTimer);
  $("panel").hidden = true;
  $("login").hidden = false;
  const msg = $("login-message");
  msg.textContent = message || "";
  msg.hidden = !message;
  $("token").value = "";
  $("token").focus();
}

async function signIn() {
  try {
    await refreshModels(); // also checks the token
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    return signOut("Cannot reach the admin API: " + (err.message || err));
  }
  $("login").hidden = true;
  $("panel").hidden = false;
  const actor = sessionStorage.getItem(ACTOR_KEY);
  $("who").textContent = "Signed in" + (actor ? " as " + actor : "") + ".";
  refreshAudit().catch(fail);
  refreshEvalSets().catch(fail);
  pollJobs();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  const actor = $("actor").value.trim();
  if (actor) sessionStorage.setItem(ACTOR_KEY, actor);
  else sessionStorage.removeItem(ACTOR_KEY);
  signIn();
});

$("sign-out").addEventListener("click", () => signOut(""));

// --- model versions -----------------------------------------------------------------------------

async function loadCurves(version, cell) {
  try {
    let url = curves.get(version);
    if (!url) {
      const { ok, response } = await api("GET", `/models/${version}/curves.png`);
      if (!ok) return;
      url = URL.createObjectURL(await response.blob());
      curves.set(version, url);
    }
    const link = el("a");
    link.href = url;
    link.target = "_blank";
    link.title = `Training curves of version ${version} (opens full size)`;
    const img = el("img", "thumb");
    img.src = url;
    img.alt = `training curves of version ${version}`;
    link.append(img);
    cell.replaceChildren(link);
  } catch (err) {
    fail(err);
  }
}

function fmtCI(ci) {
  return Array.isArray(ci) ? ` [${fmtNumber(ci[0])}–${fmtNumber(ci[1])}]` : "";
}

// One line per registered evaluation set: AUC and sensitivity with their 95% intervals, and a
// warning when the sensitivity falls short of the version's target beyond its interval.
function externalCell(v) {
  const cell = el("td", "external");
  const sets = Object.entries(v.external || {});
  if (!sets.length) {
    cell.append(el("span", "hint", "—"));
    return cell;
  }
  for (const [name, e] of sets) {
    const line = el("div", "external-set");
    line.dataset.set = name;
    if (e.error) {
      line.append(el("strong", "", name), ": ", el("span", "failed", "not evaluated"));
      line.title = e.error;
    } else {
      line.append(el("strong", "", name),
        `: AUC ${fmtNumber(e.roc_auc)}${fmtCI(e.roc_auc_ci)}, sens ${fmtNumber(e.sensitivity)}${fmtCI(e.sensitivity_ci)}, ` +
        `spec ${fmtNumber(e.specificity)} (n=${e.n ?? "?"})`);
      line.title = `accuracy ${fmtNumber(e.accuracy)}; at ${e.threshold == null ? "argmax" : "threshold " + fmtNumber(e.threshold)}`;
    }
    if (e.warning) {
      const badge = el("span", "badge warning", "below target");
      badge.title = e.warning;
      line.append(" ", badge, el("div", "warning-text", e.warning));
    }
    cell.append(line);
  }
  return cell;
}

function gateLabel(g) {
  if (!g || g.method === "none") return "gate: none";
  const pct = (x) => (x == null ? "?" : (x * 100).toFixed(1) + "%");
  const state = g.enabled ? "" : " (off)";
  return `${g.method} ≤ ${fmtNumber(g.threshold)} · val ${pct(g.val_acceptance)} · test ${pct(g.test_acceptance)}${state}`;
}

async function openCard(version) {
  try {
    const { ok, response } = await api("GET", `/models/${version}/card?format=html`);
    if (!ok) return;
    const url = URL.createObjectURL(new Blob([await response.text()], { type: "text/html" }));
    window.open(url, "_blank", "noopener");
  } catch (err) {
    fail(err);
  }
}

function baseLabel(v) {
  if (v.parent_version !== null && v.parent_version !== undefined) return `v${v.parent_version}`;
  return v.base_weights || "none";
}

async function changePointer(path, question) {
  if (!window.confirm(question)) return;
  const reason = $("reason").value.trim();
  try {
    const doc = await apiJSON("POST", path, reason ? { reason } : undefined);
    const a = doc.audit;
    flash(`Version ${doc.active_version} is now active (${a.action}, was ${a.from_version ?? "none"}). Workers switch within seconds.`);
    $("reason").value = "";
    await Promise.all([refreshModels(), refreshAudit()]);
  } catch (err) {
    fail(err);
  }
}

async function refreshModels() {
  const doc = await apiJSON("GET", "/models");
  const active = doc.active_version;
  $("active-version").textContent = active === null ? "none" : `version ${active}`;
  const tbody = $("versions").querySelector("tbody");
  const rows = doc.versions.map((v) => {
    const tr = el("tr", v.active ? "active-row" : "");
    const name = el("td", "num", `v${v.version}`);
    if (v.active) name.append(" ", el("span", "badge active", "active"));
    // Never fine-tuned (init-model): its answers are not a diagnosis.
    if (v.trained === false) {
      const badge = el("span", "badge untrained", "UNTRAINED");
      badge.title = "never fine-tuned: its answers are not a diagnosis";
      name.append(" ", badge);
    }
    const m = v.metrics || {};
    tr.append(
      name,
      el("td", "", fmtTime(v.created_at)),
      el("td", "", baseLabel(v)),
      el("td", "num", `${v.input_size} px`),
      el("td", "", v.decision_threshold == null ? "argmax" : `threshold ${fmtNumber(v.decision_threshold)}`),
      el("td", "num", fmtNumber(m.accuracy)),
      el("td", "num", fmtNumber(m.sensitivity)),
      el("td", "num", fmtNumber(m.specificity)),
      el("td", "num", fmtNumber(m.roc_auc)),
      el("td", "", gateLabel(v.gate)),
      externalCell(v),
    );
    const curvesCell = el("td", "", v.has_curves ? "…" : "—");
    if (v.has_curves) loadCurves(v.version, curvesCell);
    const actions = el("td", "actions");
    actions.append(button("Card", "small secondary", () => openCard(v.version)));
    if (!v.active && (active === null || v.version > active)) {
      actions.append(button("Promote", "small", () =>
        changePointer(`/models/${v.version}/promote`, `Promote version ${v.version}? Every worker will serve it.`)));
    } else if (!v.active) {
      actions.append(button("Pin", "small secondary", () =>
        changePointer(`/models/${v.version}/pin`, `Pin the older version ${v.version}? Every worker will serve it.`)));
    }
    tr.append(curvesCell, actions);
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "hint");
    td.append("No model versions yet: run ",
      el("code", null, "docker compose run --rm worker cxr init-model --base imagenet"),
      " (Docker Compose) or ", el("code", null, "cxr init-model"), " (local install), or start a job below.");
    td.colSpan = 12;
    tr.append(td);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
}

$("rollback").addEventListener("click", () =>
  changePointer("/models/rollback", "Roll back to the previously active version?"));

// --- evaluation sets ----------------------------------------------------------------------------

async function refreshEvalSets() {
  const doc = await apiJSON("GET", "/eval-datasets");
  const rows = doc.datasets.map((d) => {
    const tr = el("tr");
    const actions = el("td", "actions");
    if (d.source === "admin") {
      actions.append(button("Remove", "small secondary", async () => {
        if (!window.confirm(`Forget evaluation set ${d.name}? Stored results stay with the versions.`)) return;
        try {
          const { ok, status } = await api("DELETE", `/eval-datasets/${encodeURIComponent(d.name)}`);
          if (!ok) throw new Error(`HTTP ${status}`);
          await refreshEvalSets();
        } catch (err) {
          fail(err);
        }
      }));
    }
    tr.append(el("td", "", d.name), el("td", "", d.path),
      el("td", "", d.source === "config" ? "CXR_EVAL_DATASETS" : `admin API${d.actor ? " (" + d.actor + ")" : ""}`), actions);
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "hint", "None registered: versions are scored on their own test split only.");
    td.colSpan = 4;
    tr.append(td);
    rows.push(tr);
  }
  $("eval-sets").querySelector("tbody").replaceChildren(...rows);
}

$("eval-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const name = form.elements.name.value.trim();
  try {
    const doc = await apiJSON("PUT", `/eval-datasets/${encodeURIComponent(name)}`, { path: form.elements.path.value.trim() });
    flash(`Registered evaluation set ${doc.name}: versions published from now on are scored on it.` + (doc.warning ? " " + doc.warning : ""));
    form.reset();
    await refreshEvalSets();
  } catch (err) {
    fail(err);
  }
});

// --- audit log ----------------------------------------------------------------------------------

async function refreshAudit() {
  const doc = await apiJSON("GET", "/audit?limit=50");
  const rows = doc.entries.map((e) => {
    const tr = el("tr");
    tr.append(
      el("td", "", fmtTime(e.at)),
      el("td", "", e.actor),
      el("td", "", e.action),
      el("td", "num", e.from_version === null ? "—" : `v${e.from_version}`),
      el("td", "num", `v${e.to_version}`),
      el("td", "", e.reason || ""),
    );
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "hint", "No changes yet.");
    td.colSpan = 6;
    tr.append(td);
    rows.push(tr);
  }
  $("audit").querySelector("tbody").replaceChildren(...rows);
}

// --- fine-tuning jobs ---------------------------------------------------------------------------

function progressBlock(job) {
  const p = job.progress;
  const box = el("div", "progress");
  if (!p) {
    box.append(el("span", "hint", job.status === "running" ? "Starting…" : "Waiting for a trainer…"));
    return box;
  }
  // While an epoch runs, `epoch` is the running one and `batch`/`batches` say how far it is;
  // after an epoch ends, `epoch` is the finished one.
  const total = Number(p.total_epochs) || 0;
  const running = Number(p.batches) ? (Number(p.batch) || 0) / Number(p.batches) : null;
  const done = (Number(p.epoch) || 0) - (running === null ? 0 : 1 - running);
  const pct = total ? Math.min(100, Math.max(0, (100 * done) / total)) : 0;
  const track = el("div", "bar-track");
  const fill = el("span", "bar-fill");
  fill.style.width = pct.toFixed(1) + "%";
  track.append(fill);
  track.setAttribute("role", "progressbar");
  track.setAttribute("aria-valuemin", "0");
  track.setAttribute("aria-valuemax", "100");
  track.setAttribute("aria-valuenow", pct.toFixed(0));
  const parts = [
    p.phase ? `phase ${p.phase}` : "",
    total ? `epoch ${p.epoch}/${total}` : "",
    running === null ? "" : `batch ${p.batch}/${p.batches}`,
  ];
  for (const [k, v] of Object.entries(p.metrics || {})) {
    if (typeof v === "number") parts.push(`${k} ${v.toFixed(3)}`);
  }
  const eta = fmtSeconds(p.eta_seconds);
  if (eta) parts.push(`about ${eta} left`);
  box.append(track, el("span", "meta", parts.filter(Boolean).join(" · ")));
  return box;
}

function outcomeText(job) {
  const o = job.outcome;
  if (!o || typeof o !== "object") return "";
  const parts = [];
  if (o.version !== undefined && o.version !== null) parts.push(`published version ${o.version}`);
  // The trainer records the decision under "promotion" (its reason names a blocking set).
  const d = o.promotion && typeof o.promotion === "object" ? o.promotion : o;
  if (d.promoted === true) parts.push("promoted");
  else if (d.promoted === false) parts.push("not promoted");
  if (d.reason) parts.push(String(d.reason));
  return parts.join(" · ");
}

function jobCard(job) {
  const card = el("div", "job");
  const head = el("div", "job-head");
  const id = el("code", "", job.id.slice(0, 12));
  id.title = job.id;
  head.append(el("span", "badge " + job.status, job.status), id,
    el("span", "hint", `${fmtTime(job.created_at)} by ${job.actor || "?"}`));
  if (ACTIVE_JOB.has(job.status)) {
    const cancel = button(job.cancel_requested ? "Cancelling…" : "Cancel", "small secondary", async () => {
      cancel.disabled = true;
      try {
        await apiJSON("DELETE", `/training-jobs/${job.id}`);
        await refreshJobs();
      } catch (err) {
        fail(err);
      }
    });
    cancel.disabled = Boolean(job.cancel_requested);
    head.append(cancel);
  }
  const p = job.params || {};
  card.append(head, el("p", "meta",
    `${p.dataset ?? "?"} · from ${p.base ?? "?"} · ${p.input_size ?? "?"} px · ` +
    `epochs ${p.epochs_head ?? "?"} + ${p.epochs_finetune ?? "?"} · promotion ${p.promotion ?? "?"}`));
  if (ACTIVE_JOB.has(job.status)) card.append(progressBlock(job));
  const outcome = outcomeText(job);
  if (outcome) card.append(el("p", "meta", outcome));
  if (job.error) card.append(el("p", "meta failed", job.error));
  return card;
}

async function refreshJobs() {
  const doc = await apiJSON("GET", "/training-jobs?limit=20");
  const box = $("jobs");
  if (!doc.jobs.length) {
    box.replaceChildren(el("p", "hint", "No jobs yet."));
  } else {
    box.replaceChildren(...doc.jobs.map(jobCard));
  }
  // A job that finished may have published (and promoted) a version.
  const states = doc.jobs.map((j) => j.id + ":" + j.status).join(",");
  if (lastJobStates && states !== lastJobStates) {
    await Promise.all([refreshModels(), refreshAudit()]);
  }
  lastJobStates = states;
}

async function pollJobs() {
  clearTimeout(jobsTimer);
  try {
    await refreshJobs();
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    flash("Cannot refresh the jobs: " + (err.message || err), true);
  }
  jobsTimer = setTimeout(pollJobs, JOBS_POLL_MS);
}

$("train-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const errors = $("train-errors");
  errors.hidden = true;
  const body = {};
  for (const field of event.target.elements) {
    if (!field.name || field.value === "") continue;
    body[field.name] = field.type === "number" ? Number(field.value) : field.value;
  }
  try {
    const doc = await apiJSON("POST", "/training-jobs", body);
    flash(`Queued fine-tuning job ${doc.id}.`);
    await refreshJobs();
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    const list = el("ul");
    for (const d of (err.doc && err.doc.details) || []) {
      list.append(el("li", "", `${(d.loc || []).join(".") || "body"}: ${d.msg}`));
    }
    errors.replaceChildren(el("p", "", err.message), list);
    errors.hidden = false;
  }
});

// --- start ----------------------------------------------------------------------------------------

if (sessionStorage.getItem(TOKEN_KEY)) {
  $("actor").value = sessionStorage.getItem(ACTOR_KEY) || "";
  signIn();
} else {
  signOut("");
}
