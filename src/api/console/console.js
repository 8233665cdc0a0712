// Herald's operator console: plain DOM, the same API as everyone else, with the operator's
// API key kept in this tab's session storage. Untrusted text is only ever set as text.
"use strict";

const KEY = "herald.console.key";
const main = () => document.getElementById("main");
let timer = null;

/** Builds an element: h("td", {class: "x"}, "text", child). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function say(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

/** Calls the API; throws an Error with the API's own message. */
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    showSignIn("That key was not accepted (missing, revoked or expired).");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function table(headings, rows) {
  return h("div", { class: "table" },
    h("table", {},
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
}

function field(id, label, control) {
  control.id = id;
  control.name = id;
  return h("div", {}, h("label", { for: id }, label), control);
}

function select(options, value) {
  return h("select", {}, options.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
}

/* ---------------------------------------------------------------- dead letters */

const dlqFilter = { status: "PENDING" };

function query(filter) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(filter)) if (v) params.set(k, v);
  return params.toString();
}

async function dlqPage() {
  const form = h("form", { class: "filters card", "aria-label": "Find dead letters" },
    field("f-domain", "Domain", select([["", "any"], ["payment", "payment"], ["subscription", "subscription"], ["order", "order"], ["api", "api"]], dlqFilter.domain || "")),
    field("f-status", "Status", select([["PENDING", "pending"], ["RETRIED", "retried"], ["DISCARDED", "discarded"], ["", "all but discarded"]], dlqFilter.status || "")),
    field("f-errorClass", "Error class", h("input", { value: dlqFilter.errorClass || "" })),
    field("f-failedChannel", "Channel", select([["", "any"], ["EMAIL", "email"], ["SLACK", "Slack"], ["IN_APP", "in-app"], ["SMS", "SMS"], ["KAKAOTALK", "KakaoTalk"], ["PUSH", "push"]], dlqFilter.failedChannel || "")),
    field("f-eventType", "Event type", h("input", { value: dlqFilter.eventType || "" })),
    field("f-q", "Message contains", h("input", { value: dlqFilter.q || "" })),
    h("button", { type: "submit", class: "primary" }, "Find"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const name of ["domain", "status", "errorClass", "failedChannel", "eventType", "q"]) {
      dlqFilter[name] = form.elements[`f-${name}`].value.trim();
    }
    delete dlqFilter.fingerprint;
    render();
  });
  const rate = h("input", { type: "number", min: "1", max: "1000", value: "50", id: "rate", name: "rate" });
  const replayResult = h("div", { id: "replay-result", "aria-live": "polite" });
  const replayFilter = () => {
    const filter = { ...dlqFilter };
    delete filter.status;
    return filter;
  };
  const replayBox = h("section", { class: "card", "aria-labelledby": "replay-h" },
    h("h2", { id: "replay-h" }, "Replay what this filter finds (pending letters)"),
    h("button", { type: "button", onclick: async () => {
      try {
        const dry = await api("/api/v1/admin/dlq/replay", { method: "POST", body: { filter: replayFilter(), dryRun: true } });
        replayResult.replaceChildren(h("p", {}, `Dry run: ${dry.matched} found, ${dry.requeue} deliveries would be sent again, ${dry.reingest} messages re-ingested`
          + (Object.keys(dry.reingestStillPoison).length ? ` (still failing: ${JSON.stringify(dry.reingestStillPoison)})` : "")
          + (Object.keys(dry.skipped).length ? `, skipped: ${JSON.stringify(dry.skipped)}` : "") + "."));
      } catch (e) { say(e.message, true); }
    } }, "Dry run"),
    " ",
    h("label", { for: "rate" }, "Letters per second "), rate, " ",
    h("button", { type: "button", class: "primary", onclick: async () => {
      try {
        const replay = await api("/api/v1/admin/dlq/replay", { method: "POST", body: { filter: replayFilter(), ratePerSecond: Number(rate.value) } });
        follow(replay.id, replayResult);
      } catch (e) { say(e.message, true); }
    } }, "Replay"),
    replayResult);

  const [counts, page] = await Promise.all([
    api(`/api/v1/admin/dlq/counts?${query(dlqFilter)}`),
    api(`/api/v1/admin/dlq?${query({ ...dlqFilter, limit: 100 })}`),
  ]);
  const causes = h("section", { class: "card", "aria-labelledby": "causes-h" },
    h("h2", { id: "causes-h" }, `Causes (${counts.total} letters)`),
    table(["Letters", "Class", "Fingerprint", ""], counts.byFingerprint.map((c) => h("tr", {},
      h("td", {}, c.count), h("td", {}, c.errorClass || ""), h("td", { class: "message" }, c.fingerprint),
      h("td", {}, h("button", { type: "button", onclick: () => { dlqFilter.fingerprint = c.fingerprint; render(); } }, "Show these"))))));
  const rows = page.items.map((letter) => h("tr", { "data-id": letter.id },
    h("td", {}, when(letter.failedAt || letter.receivedAt)),
    h("td", {}, letter.domain),
    h("td", {}, letter.errorClass || ""),
    h("td", {}, letter.failedChannel || ""),
    h("td", {}, letter.eventType || ""),
    h("td", { class: "message" }, letter.errorMessage || ""),
    h("td", { class: `status status-${letter.status}` }, letter.status + (letter.retryOutcome ? ` (${letter.retryOutcome})` : "")),
    h("td", { class: "actions" },
      h("button", { type: "button", onclick: () => letterDetail(letter.id) }, "Details"), " ",
      h("button", { type: "button", disabled: letter.status === "DISCARDED", "aria-label": `Retry dead letter ${letter.id}`, onclick: () => retry(letter.id) }, "Retry"), " ",
      h("button", { type: "button", class: "danger", disabled: letter.status === "DISCARDED", onclick: () => discard(letter.id) }, "Discard"))));
  main().replaceChildren(h("h2", {}, "Dead letters"), form, causes, replayBox,
    h("section", { "aria-labelledby": "list-h" }, h("h2", { id: "list-h" }, `Letters${page.nextCursor ? " (newest 100)" : ""}`),
      rows.length ? table(["Failed", "Domain", "Class", "Channel", "Event type", "Error", "Status", ""], rows) : h("p", {}, "None.")),
    h("div", { id: "detail" }));
}

async function retry(id) {
  try {
    const result = await api(`/api/v1/admin/dlq/${id}/retry`, { method: "POST" });
    await render();
    say(`Dead letter ${id} retried: ${result.retry}.`);
  } catch (e) { say(e.message, true); }
}

async function discard(id) {
  if (!confirm("Discard this dead letter? It stays in the audit.")) return;
  try {
    await api(`/api/v1/admin/dlq/${id}`, { method: "DELETE" });
    await render();
    say(`Dead letter ${id} discarded.`);
  } catch (e) { say(e.message, true); }
}

async function letterDetail(id) {
  const letter = await api(`/api/v1/admin/dlq/${id}`);
  const detail = document.getElementById("detail");
  const editor = letter.deliveryId
    ? h("form", { class: "filters" },
        field("c-address", "Corrected address", h("input", { placeholder: "leave empty to keep" })),
        h("button", { type: "submit" }, "Save correction"))
    : h("form", {},
        field("c-payload", "Corrected event (JSON)", h("textarea", {}, letter.edited || letter.payload)),
        h("button", { type: "submit" }, "Save correction"));
  editor.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const body = letter.deliveryId
        ? { address: editor.elements["c-address"].value.trim() }
        : { payload: JSON.parse(editor.elements["c-payload"].value) };
      await api(`/api/v1/admin/dlq/${id}`, { method: "PATCH", body });
      say(`Dead letter ${id} corrected; retry it to send the correction.`);
      await letterDetail(id);
    } catch (e) { say(e.message, true); }
  });
  detail.replaceChildren(h("section", { class: "card", "aria-labelledby": "detail-h" },
    h("h2", { id: "detail-h", tabindex: "-1" }, `Dead letter ${letter.id}`),
    h("p", {}, `${letter.status}, replayed ${letter.replayCount} times; ${letter.errorClass || ""}: ${letter.errorMessage || ""}`),
    letter.notificationId ? h("p", {}, h("a", { href: `#timeline/${letter.notificationId}` }, "The notification's timeline")) : null,
    h("h3", {}, "Headers"), h("pre", {}, JSON.stringify(letter.headers, null, 2)),
    h("h3", {}, "Payload (as it arrived)"), h("pre", {}, letter.payload),
    (letter.edits || []).length ? [h("h3", {}, "Corrections"), h("pre", {}, JSON.stringify(letter.edits, null, 2))] : null,
    letter.status === "PENDING" ? [h("h3", {}, "Correct before retrying"), editor] : null));
  document.getElementById("detail-h").focus();
}

async function follow(id, where) {
  clearInterval(timer);
  const show = async () => {
    const r = await api(`/api/v1/admin/dlq/replays/${id}`);
    const cancel = h("button", { type: "button", class: "danger", onclick: async () => {
      try { await api(`/api/v1/admin/dlq/replays/${id}/cancel`, { method: "POST" }); } catch (e) { say(e.message, true); }
      await show();
    } }, "Cancel");
    where.replaceChildren(h("p", {},
      h("label", { for: "replay-progress" }, `Replay ${r.status}: ${r.done} of ${r.total} `),
      h("progress", { id: "replay-progress", max: String(Math.max(r.total, 1)), value: String(r.done) }),
      ` requeued ${r.requeued}, re-ingested ${r.reingested}, skipped ${r.skipped}, failed ${r.failed} `,
      r.status === "RUNNING" ? cancel : null));
    if (r.status !== "RUNNING") clearInterval(timer);
  };
  await show();
  timer = setInterval(() => show().catch((e) => say(e.message, true)), 1000);
}

/* ---------------------------------------------------------------- broadcasts */

async function broadcastsPage() {
  const draw = async () => {
    const page = await api("/api/v1/broadcasts?limit=50");
    const rows = page.items.map((b) => h("tr", {},
      h("td", {}, b.name || b.broadcastId),
      h("td", {}, b.eventType),
      h("td", { class: `status status-${b.status}` }, b.status),
      h("td", {}, h("progress", { max: "100", value: String(b.progress || 0), "aria-label": `${b.name || b.broadcastId} progress` }), ` ${Math.round(b.progress || 0)} %`),
      h("td", {}, `${b.totals.sent} sent, ${b.totals.failed} failed, ${b.totals.pending} pending of ${b.totals.audience}`),
      h("td", {}, ["SCHEDULED", "RUNNING"].includes(b.status)
        ? h("button", { type: "button", class: "danger", onclick: async () => {
            try { await api(`/api/v1/broadcasts/${b.broadcastId}/cancel`, { method: "POST" }); await draw(); say("Broadcast cancelled."); } catch (e) { say(e.message, true); }
          } }, "Cancel")
        : "")));
    main().replaceChildren(h("h2", {}, "Broadcasts"),
      rows.length ? table(["Name", "Event type", "Status", "Progress", "Deliveries", ""], rows) : h("p", {}, "No broadcasts."));
  };
  await draw();
  timer = setInterval(() => draw().catch((e) => say(e.message, true)), 2000);
}

/* ---------------------------------------------------------------- delivery */

const COLOURS = ["#0b5cad", "#b3261e", "#1a7f37", "#9a6700", "#8250df", "#bf3989"];

function chart(items) {
  const days = [...new Set(items.map((i) => i.day))].sort();
  const channels = [...new Set(items.map((i) => i.channel))].sort();
  const width = 900, height = 260, pad = 36;
  const x = (d) => pad + (days.length < 2 ? 0 : (days.indexOf(d) * (width - 2 * pad)) / (days.length - 1));
  const y = (rate) => height - pad - (rate / 100) * (height - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Success rate per channel and day");
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text) el.textContent = text;
    svg.append(el);
  };
  for (const rate of [0, 50, 90, 100]) {
    add("line", { x1: pad, x2: width - pad, y1: y(rate), y2: y(rate), stroke: "#d0d7de" });
    add("text", { x: 2, y: y(rate) + 4, "font-size": "11" }, `${rate}%`);
  }
  days.forEach((d) => add("text", { x: x(d) - 18, y: height - 10, "font-size": "11" }, d.slice(5)));
  channels.forEach((channel, n) => {
    const colour = COLOURS[n % COLOURS.length];
    const known = items.filter((i) => i.channel === channel && i.successRate !== null);
    const points = known.map((i) => `${x(i.day)},${y(i.successRate * 100)}`).join(" ");
    add("polyline", { points, fill: "none", stroke: colour, "stroke-width": "2" });
    // A marker per day, so that a single day shows too; its title reads on hover.
    for (const i of known) {
      add("circle", { cx: x(i.day), cy: y(i.successRate * 100), r: "4", fill: colour });
      svg.lastChild.append(document.createElementNS(ns, "title"));
      svg.lastChild.lastChild.textContent = `${channel} ${i.day}: ${(i.successRate * 100).toFixed(1)} % of ${i.sent}`;
    }
  });
  const legend = h("p", { class: "legend" }, channels.map((c, n) => {
    const key = h("span", {}, `■ ${c}`);
    key.style.color = COLOURS[n % COLOURS.length]; // CSSOM, which the page's policy allows
    return key;
  }));
  return [svg, legend];
}

async function deliveryPage() {
  const to = new Date();
  const from = new Date(to.getTime() - 6 * 86400000);
  const day = (d) => d.toISOString().slice(0, 10);
  const [daily, channels, failures] = await Promise.all([
    api(`/api/v1/dashboard/delivery?from=${day(from)}&to=${day(to)}`),
    api("/api/v1/dashboard/delivery/channels"),
    api("/api/v1/dashboard/delivery/failures?limit=20"),
  ]);
  let alerts = null;
  try { alerts = await api("/api/v1/admin/alerts"); } catch (e) { alerts = null; }
  main().replaceChildren(h("h2", {}, `Delivery, ${daily.from} to ${daily.to} (${daily.timezone})`),
    daily.items.length ? h("div", {}, chart(daily.items)) : h("p", {}, "Nothing sent in these days."),
    h("h2", {}, "Per channel"),
    table(["Channel", "Sent", "Succeeded", "Failed", "Success rate"], channels.items.map((c) => h("tr", {},
      h("td", {}, c.channel), h("td", {}, c.sent), h("td", {}, c.success), h("td", {}, c.failed),
      h("td", {}, c.successRate === null || c.successRate === undefined ? "" : `${(c.successRate * 100).toFixed(1)} %`)))),
    h("h2", {}, "Recent failures"),
    failures.length ? table(["Failed", "Channel", "Event type", "Reason", ""], failures.map((f) => h("tr", {},
      h("td", {}, when(f.failedAt)), h("td", {}, f.channel), h("td", {}, f.eventType),
      h("td", { class: "message" }, f.reason || ""),
      h("td", {}, h("a", { href: `#timeline/${f.notificationId}` }, "Timeline"))))) : h("p", {}, "None."),
    h("h2", {}, "Alerts (queue, success rates, send times)"),
    !alerts ? h("p", {}, "This key may not read alerts.")
      : !(alerts.alerts || []).length ? h("p", {}, `No alert evaluated yet (every ${alerts.intervalSeconds} s).`)
      : table(["Alert", "Subject", "State", "Value", "Threshold"], alerts.alerts.map((a) => h("tr", {},
      h("td", {}, a.alert || a.name || ""), h("td", {}, a.subject || ""), h("td", {}, a.state || a.status || ""),
      h("td", {}, a.value === null || a.value === undefined ? "" : String(a.value)), h("td", {}, a.threshold === undefined ? "" : String(a.threshold))))));
}

/* ---------------------------------------------------------------- timeline */

async function timelinePage(id) {
  const form = h("form", { class: "filters card" },
    field("t-id", "Notification id", h("input", { value: id || "", size: "38" })),
    h("button", { type: "submit", class: "primary" }, "Show"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#timeline/${form.elements["t-id"].value.trim()}`;
  });
  if (!id) { main().replaceChildren(h("h2", {}, "A notification's timeline"), form); return; }
  const n = await api(`/api/v1/notifications/${encodeURIComponent(id)}`);
  const events = [{ at: n.createdAt, text: `Notification ${n.eventType} for user ${n.userId ?? ""} stored (${n.status})` }];
  if (n.scheduledAt) events.push({ at: n.scheduledAt, text: "Scheduled to be sent" });
  for (const d of n.deliveries) {
    events.push({ at: d.createdAt, text: `${d.channel}: created${d.address ? ` for ${d.address}` : ""}` });
    for (const a of d.attemptLog || []) {
      events.push({ at: a.startedAt, text: `${d.channel}: attempt ${a.attempt}${a.channel !== d.channel ? ` (as ${a.channel})` : ""}: ${a.outcome}${a.error ? `: ${a.error}` : ""} (${a.latencyMs} ms)` });
    }
    if (d.lastError && !(d.attemptLog || []).length) events.push({ at: d.updatedAt, text: `${d.channel}: ${d.lastError}` });
    if (d.status === "PENDING" && d.nextAttemptAt) events.push({ at: d.nextAttemptAt, text: `${d.channel}: next attempt due${d.holdReason ? ` (held: ${d.holdReason.replace(/_/g, " ")})` : ""}` });
    if (d.digestId) events.push({ at: d.createdAt, text: `${d.channel}: in digest ${d.digestId}` });
    if (d.completedAt) events.push({ at: d.completedAt, text: `${d.channel}: ${d.status}${d.skipReason ? ` (${d.skipReason})` : ""} after ${d.attempts} attempt(s)${d.sentVia && d.sentVia !== d.channel ? ` via ${d.sentVia}` : ""}` });
    if (d.receipt) events.push({ at: d.receipt.at, text: `${d.channel}: provider says ${d.receipt.status}${d.receipt.reason ? `: ${d.receipt.reason}` : ""}` });
  }
  events.sort((a, b) => new Date(a.at) - new Date(b.at));
  main().replaceChildren(h("h2", {}, "A notification's timeline"), form,
    h("p", {}, `Status ${n.status}`),
    h("ol", { class: "timeline" }, events.map((e) => h("li", {}, h("time", { datetime: e.at }, when(e.at)), e.text))));
}

/* ---------------------------------------------------------------- shell */

function showSignIn(message) {
  document.getElementById("nav").hidden = true;
  clearInterval(timer);
  const form = h("form", { id: "sign-in", class: "card" },
    h("h2", {}, "Sign in"),
    h("p", {}, "An API key with the scopes of the pages you use, or the admin token. It is kept in this browser tab only, never in a URL."),
    h("label", { for: "key" }, "API key"), " ",
    h("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true }), " ",
    h("button", { type: "submit", class: "primary" }, "Sign in"));
  form.addEventListener("submit", signIn);
  main().replaceChildren(form);
  if (message) say(message, true);
}

function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, event.target.elements.key.value.trim());
  say("");
  render();
}

async function render() {
  clearInterval(timer);
  say("");
  if (!sessionStorage.getItem(KEY)) { showSignIn(); return; }
  document.getElementById("nav").hidden = false;
  const [page, arg] = (location.hash.slice(1) || "dlq").split("/");
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#${page}`);
    if (link.getAttribute("href") === `#${page}`) link.setAttribute("aria-current", "page");
  }
  try {
    if (page === "broadcasts") await broadcastsPage();
    else if (page === "delivery") await deliveryPage();
    else if (page === "timeline") await timelinePage(arg);
    else await dlqPage();
  } catch (e) {
    if (e.message !== "unauthorized") say(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showSignIn();
  });
  window.addEventListener("hashchange", render);
  render();
});
