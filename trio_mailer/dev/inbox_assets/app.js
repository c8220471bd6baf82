// The dev inbox page. Everything a mail holds is put in the page with textContent (never
// innerHTML); its HTML part only ever goes into the sandboxed iframe, by URL.
"use strict";

const state = { mails: [], selected: null, view: "html" };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderList() {
  const list = $("mails");
  list.replaceChildren();
  $("empty").hidden = state.mails.length > 0;
  for (const mail of state.mails) {
    const item = el("li");
    item.dataset.id = String(mail.id);
    if (mail.id === state.selected) item.classList.add("selected");
    const link = el("a");
    link.href = "#mail-" + mail.id;
    link.append(el("span", "subject", mail.subject || "(no subject)"));
    link.append(el("span", "who", "To: " + (mail.to || mail.envelope_to.join(", "))));
    link.append(el("span", "when", new Date(mail.received_at * 1000).toLocaleString()));
    link.addEventListener("click", (event) => { event.preventDefault(); openMail(mail.id); });
    item.append(link);
    list.append(item);
  }
}

function showView(view) {
  state.view = view;
  for (const name of ["html", "text", "headers", "raw"]) {
    $("view-" + name).hidden = name !== view;
    $("tab-" + name).setAttribute("aria-selected", String(name === view));
  }
}

async function openMail(id) {
  const reply = await fetch("/api/mails/" + id);
  if (!reply.ok) return;
  const mail = await reply.json();
  state.selected = id;
  renderList();
  $("detail").hidden = false;
  $("subject").textContent = mail.subject || "(no subject)";
  const meta = $("meta");
  meta.replaceChildren();
  for (const [label, value] of [["From", mail.from], ["To", mail.to], ["Date", mail.date],
                                ["Language", mail.content_language], ["Size", mail.size + " bytes"]]) {
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

async function load() {
  const reply = await fetch("/api/mails");
  state.mails = await reply.json();
  renderList();
  return reply.headers.get("Inbox-Event-ID");
}

function listen(lastEventId) {
  const events = new EventSource("/api/events?last_event_id=" + encodeURIComponent(lastEventId));
  events.addEventListener("open", () => { $("live").textContent = "live"; $("live").classList.add("on"); });
  events.addEventListener("error", () => { $("live").textContent = "reconnecting…"; $("live").classList.remove("on"); });
  events.addEventListener("mail", (event) => {
    const mail = JSON.parse(event.data);
    if (!state.mails.some((m) => m.id === mail.id)) state.mails.unshift(mail);
    renderList();
  });
  events.addEventListener("clear", () => {
    state.mails = [];
    state.selected = null;
    $("detail").hidden = true;
    renderList();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("clear").addEventListener("click", async () => {
    await fetch("/api/mails", { method: "DELETE" });
  });
  showView("html");
  load().then(listen);
});
