// The dev inbox page. Everything a mail holds is put in the page with textContent (never
// innerHTML); its HTML part only ever goes into the sandboxed iframe, by URL.
//
// The URL says what is shown: "#/" the list, "#/mails/ID" one mail (a link to share or reload).
// The list comes from /api/mails (with the search), then stays current through /api/events,
// which the browser resumes after a break with the id of the last event it saw.
"use strict";

const state = { mails: [], shown: null, view: "html", query: "" };
const $ = (id) => document.getElementById(id);
const MAIL_ROUTE = /^#\/mails\/(\d+)$/;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(method, path, body) {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  const reply = await fetch(path, options);
  const value = await reply.json();
  if (!reply.ok) throw new Error(value.error || reply.statusText);
  return { value, reply };
}

// ---- the service's status of a mail ----

const BADGES = { DELIVERED: "ok", QUEUED: "wait", SENDING: "wait", RETRY_WAIT: "wait",
                 FAILED: "bad", EXPIRED: "bad" };

function badge(status) {
  if (!status) return el("span", "badge", "not sent by this service");
  return el("span", "badge " + (BADGES[status.state] || ""), status.state);
}

function statusLine(status) {
  if (!status) return "Service: this service does not know this Message-ID (sent by another program, or past the status retention).";
  const parts = ["Service: " + status.state,
                 status.attempts + (status.attempts === 1 ? " attempt" : " attempts")];
  // The text is the relay's whole reply ("451 4.3.0 ..."), or the service's reason without a code.
  const code = status.last_reply_code ? String(status.last_reply_code) : "";
  const text = status.last_reply_text || "";
  const reply = code && !text.startsWith(code) ? (code + " " + text).trim() : text;
  if (reply) parts.push("last reply: " + reply);
  if (status.possible_duplicate) parts.push("possible duplicate (an attempt was cut off after the data)");
  return parts.join(" · ");
}

// ---- the list ----

function renderList() {
  const list = $("mails");
  list.replaceChildren();
  $("empty").hidden = state.mails.length > 0 || state.query !== "";
  $("no-match").hidden = state.mails.length > 0 || state.query === "";
  for (const mail of state.mails) {
    const item = el("li");
    if (state.shown && mail.id === state.shown.id) item.classList.add("selected");
    const link = el("a");
    link.href = "#/mails/" + mail.id;
    link.append(el("span", "subject", mail.subject || "(no subject)"));
    link.append(el("span", "who", "To: " + (mail.to || mail.envelope_to.join(", "))));
    const when = el("span", "when");
    when.append(el("span", "", new Date(mail.received_at * 1000).toLocaleString()), badge(mail.status));
    link.append(when);
    item.append(link);
    list.append(item);
  }
}

async function load() {
  const query = state.query ? "?q=" + encodeURIComponent(state.query) : "";
  const { value, reply } = await api("GET", "/api/mails" + query);
  state.mails = value;
  renderList();
  return reply.headers.get("Inbox-Event-ID");
}

let reloadTimer = null;
function reloadSoon() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => load().catch(showLoadError), 150);
}

function showLoadError(error) {
  $("live").textContent = "error: " + error.message;
}

// ---- one mail ----

function showView(view) {
  state.view = view;
  for (const name of ["html", "text", "headers", "raw"]) {
    $("view-" + name).hidden = name !== view;
    $("tab-" + name).setAttribute("aria-selected", String(name === view));
  }
}

function showPane(pane) {  // "list", "detail" or "gone"; narrow screens show one at a time
  $("detail").hidden = pane !== "detail";
  $("gone").hidden = pane !== "gone";
  $("layout").classList.toggle("showing", pane !== "list");
}

async function openMail(id) {
  let mail;
  try {
    mail = (await api("GET", "/api/mails/" + id)).value;
  } catch (error) {
    state.shown = null;
    $("gone-text").textContent = "Cannot show this mail: " + error.message;
    showPane("gone");
    renderList();
    return;
  }
  state.shown = mail;
  renderList();
  showPane("detail");
  $("subject").textContent = mail.subject || "(no subject)";
  $("status").textContent = statusLine(mail.status);
  const meta = $("meta");
  meta.replaceChildren();
  for (const [label, value] of [["From", mail.from], ["To", mail.to], ["Date", mail.date],
                                ["Message-ID", mail.message_id], ["Language", mail.content_language],
                                ["Size", mail.size + " bytes"], ["File", mail.file]]) {
    meta.append(el("dt", "", label), el("dd", "", value || "—"));
  }
  const frame = $("html-frame");
  if (mail.html !== null) {
    frame.hidden = false;
    $("no-html").hidden = true;
    frame.src = "/api/mails/" + id + "/html";
  } else {
    frame.hidden = true;
    frame.removeAttribute("src");
    $("no-html").hidden = false;
  }
  $("text").textContent = mail.text === null ? "(no text part)" : mail.text;
  const body = $("headers").tBodies[0];
  body.replaceChildren();
  for (const [name, value] of mail.headers) {
    const row = el("tr");
    row.append(el("td", "", name), el("td", "", value));
    body.append(row);
  }
  $("raw").textContent = mail.raw;
  $("raw-link").href = "/api/mails/" + id + "/raw";
  showView(mail.html !== null ? state.view : (state.view === "html" ? "text" : state.view));
}

function route() {
  const match = MAIL_ROUTE.exec(location.hash);
  if (match) {
    openMail(Number(match[1]));
    return;
  }
  state.shown = null;
  showPane("list");
  renderList();
}

function showList() {
  if (location.hash !== "#/") location.hash = "#/";  // hashchange routes
  else route();
}

// ---- relay faults ----

function renderChaos(chaos) {
  const on = chaos.count > 0;
  $("chaos").classList.toggle("on", on);
  $("chaos-state").textContent = on
    ? chaos.stage + ": " + chaos.reply + " (" + chaos.count + " left)"
    : "off";
}

async function setChaos(method, body) {
  $("chaos-error").textContent = "";
  try {
    renderChaos((await api(method, "/api/chaos", body)).value);
  } catch (error) {
    $("chaos-error").textContent = error.message;
  }
}

function chaosCount(text) {  // the server checks it; a number is sent as a number
  return /^\d+$/.test(text.trim()) ? Number(text) : text;
}

// ---- live ----

function listen(lastEventId) {
  const events = new EventSource("/api/events?last_event_id=" + encodeURIComponent(lastEventId));
  events.addEventListener("open", () => { $("live").textContent = "live"; $("live").classList.add("on"); });
  events.addEventListener("error", () => { $("live").textContent = "reconnecting…"; $("live").classList.remove("on"); });
  events.addEventListener("mail", (event) => {
    const mail = JSON.parse(event.data);
    if (state.query) { reloadSoon(); return; }  // does it match? the server says
    if (!state.mails.some((m) => m.id === mail.id)) state.mails.unshift(mail);
    renderList();
  });
  events.addEventListener("status", (event) => {
    const { message_id: messageId, status } = JSON.parse(event.data);
    for (const mail of state.mails) if (mail.message_id === messageId) mail.status = status;
    renderList();
    if (state.shown && state.shown.message_id === messageId) {
      state.shown.status = status;
      $("status").textContent = statusLine(status);
    }
  });
  events.addEventListener("delete", (event) => {
    const { id } = JSON.parse(event.data);
    state.mails = state.mails.filter((m) => m.id !== id);
    if (state.shown && state.shown.id === id) showList();
    else renderList();
  });
  events.addEventListener("clear", () => {
    state.mails = [];
    showList();
    renderList();
  });
  events.addEventListener("reset", () => { load().then(route).catch(showLoadError); });
  events.addEventListener("chaos", (event) => renderChaos(JSON.parse(event.data)));
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("clear").addEventListener("click", () => api("DELETE", "/api/mails").catch(showLoadError));
  $("delete").addEventListener("click", async () => {
    if (!state.shown) return;
    try {
      await api("DELETE", "/api/mails/" + state.shown.id);
      showList();
    } catch (error) {
      $("status").textContent = "Cannot delete: " + error.message;
    }
  });
  $("search").addEventListener("input", () => {
    state.query = $("search").value.trim();
    reloadSoon();
  });
  $("chaos-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setChaos("PUT", { stage: $("chaos-stage").value, reply: $("chaos-reply").value,
                      count: chaosCount($("chaos-count").value) });
  });
  $("chaos-off").addEventListener("click", () => setChaos("DELETE"));
  window.addEventListener("hashchange", route);
  showView("html");
  api("GET", "/api/chaos").then(({ value }) => renderChaos(value)).catch(showLoadError);
  load().then((lastEventId) => { route(); listen(lastEventId); }).catch(showLoadError);
});
