// streamcap live page, history part: the search box (GET api/search) and a timeline per
// source card (GET api/history, then extended live by the WebSocket feed). app.js owns the
// cards and the feed and calls in through window.streamcapHistory. Plain DOM, no framework;
// every piece of text from the server goes through textContent, never parsed as markup.
"use strict";

(function () {
  const HOUR_S = 3600;
  const SPANS = [[HOUR_S, "1 h"], [6 * HOUR_S, "6 h"], [24 * HOUR_S, "24 h"], [7 * 24 * HOUR_S, "7 d"]];
  const DEFAULT_SPAN_S = 6 * HOUR_S;
  const PAGE_LIMIT = 500;          // items per /api/history request (the API's maximum)
  const MAX_PAGES = 6;             // next cursors followed per load: at most 3000 items
  const MAX_ITEMS = 5000;          // per timeline, live additions included; the oldest go first
  const SEARCH_LIMIT = 20;         // hits asked for per search (the API allows 1..100)
  const JOIN_GAP_S = 1.0;          // the same caption again within this gap extends its segment
  const REFRESH_S = 30;            // how often a timeline showing "now" follows the clock
  const MAX_TICKS = 6;
  const TICK_STEPS_S = [300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800];
  const CLIP_NAME = /^[A-Za-z0-9._-]{1,200}\.flac$/;

  const ui = {
    form: document.getElementById("search"),
    q: document.getElementById("search-q"),
    source: document.getElementById("search-source"),
    since: document.getElementById("search-since"),
    notice: document.getElementById("notice"),
    results: document.getElementById("results"),
    resultsStatus: document.getElementById("results-status"),
    resultsClose: document.getElementById("results-close"),
    hits: document.getElementById("hits"),
  };

  const timelines = new Map();     // source_id -> timeline state (see attach)
  let ensureCard = null;           // app.js: source_id -> its card exists afterwards
  let searchTicket = 0;
  let noticeIsOurs = false;        // the notice shows a search error (app.js shares it)

  // ------------------------------------------------------------------ helpers

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function button(text, className, label) {
    const node = make("button", className, text);
    node.type = "button";
    if (label) node.setAttribute("aria-label", label);
    return node;
  }

  function number(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function nowS() {
    return Date.now() / 1000;
  }

  function sameDay(a, b) {
    return new Date(a * 1000).toDateString() === new Date(b * 1000).toDateString();
  }

  function clockText(at, withDate) {
    const date = new Date(at * 1000);
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    if (!withDate) return time;
    return date.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  // Hours and minutes (the range and the axis), with the day where it is not today.
  function shortClock(at) {
    const date = new Date(at * 1000);
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (sameDay(at, nowS())) return time;
    return date.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  function timeNode(at, withDate) {
    const node = make("time", null, clockText(at, withDate));
    node.dateTime = new Date(at * 1000).toISOString();
    return node;
  }

  // "12:01:05–12:03:40", with the date where it is not today.
  function rangeText(start, end) {
    const withDate = !sameDay(start, nowS());
    const tail = sameDay(start, end) ? clockText(end, false) : clockText(end, true);
    return clockText(start, withDate) + "–" + tail;
  }

  function rangeNodes(start, end) {
    const withDate = !sameDay(start, nowS());
    return [timeNode(start, withDate), document.createTextNode("–"),
      timeNode(end, !sameDay(start, end))];
  }

  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = !text;
    noticeIsOurs = Boolean(text);
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // GET a JSON route; an error answer becomes an ApiError with the server's message
  // (the HTTP server's JSON error body: {"error", "status", "message"}).
  async function getJson(url) {
    let response;
    try {
      response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    } catch (err) {
      throw new ApiError(0, "cannot reach the daemon (" + String(err.message || err) + ")");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const message = body && typeof body.message === "string" ? body.message : response.statusText;
      throw new ApiError(response.status, message || "HTTP " + response.status);
    }
    if (body === null || typeof body !== "object") {
      throw new ApiError(response.status, "the answer was not a JSON object");
    }
    return body;
  }

  // 404: this daemon has no history routes; 503: it has them but the history is off
  // (or busy): the server's message says which.
  function historyOff(err) {
    return err instanceof ApiError && (err.status === 404 || err.status === 503);
  }

  function historyOffText(err) {
    if (err.status === 404) return "History is off: this daemon serves no history ([history] in its configuration).";
    return "History unavailable: " + err.message;
  }

  // ------------------------------------------------------------------ history items

  // A streamcap.v1 caption or trigger frame as a timeline item; null for anything else.
  function toItem(frame) {
    if (!frame || typeof frame !== "object" || typeof frame.source_id !== "string") return null;
    const at = number(frame.captured_at);
    if (at === null) return null;
    if (frame.type === "caption" && typeof frame.text === "string") {
      const startS = number(frame.start_s);
      const endS = number(frame.end_s);
      const length = startS !== null && endS !== null && endS >= startS ? endS - startS : 0;
      const windowId = typeof frame.window_id === "string" ? frame.window_id : null;
      return {
        kind: "caption", source: frame.source_id, start: at, end: at + length, text: frame.text,
        key: windowId !== null ? "w:" + windowId : "s:" + String(frame.seq) + "@" + at,
        windowId, flagged: frame.flagged === true, abstained: frame.abstained === true,
        speech: frame.speech === true,
      };
    }
    if (frame.type === "trigger" && typeof frame.trigger === "string") {
      const eventId = typeof frame.event_id === "string" ? frame.event_id : frame.trigger + "@" + at;
      return {
        kind: "event", source: frame.source_id, start: at, end: at, trigger: frame.trigger,
        state: frame.state === "on" ? "on" : "off", key: "e:" + eventId,
        clip: typeof frame.clip === "string" && CLIP_NAME.test(frame.clip) ? frame.clip : null,
      };
    }
    return null;
  }

  // Captions in time order, runs of the same text that touch merged into one segment.
  function segments(captions) {
    const out = [];
    for (const c of captions) {
      const last = out[out.length - 1];
      if (last && last.text === c.text && c.start <= last.end + JOIN_GAP_S) {
        last.end = Math.max(last.end, c.end);
        last.keys.push(c.key);
        last.flagged = last.flagged || c.flagged;
        last.speech = last.speech || c.speech;
        continue;
      }
      out.push({ kind: "caption", start: c.start, end: c.end, text: c.text, keys: [c.key],
        flagged: c.flagged, abstained: c.abstained, speech: c.speech });
    }
    return out;
  }

  // Axis ticks on whole local minutes/hours/days, at most MAX_TICKS.
  function ticks(from, to) {
    const span = to - from;
    const step = TICK_STEPS_S.find((s) => span / s <= MAX_TICKS) || TICK_STEPS_S[TICK_STEPS_S.length - 1];
    const offset = -new Date(from * 1000).getTimezoneOffset() * 60;
    const out = [];
    for (let t = Math.ceil((from + offset) / step) * step - offset; t <= to; t += step) out.push(t);
    return { step, at: out };
  }

  // ------------------------------------------------------------------ timelines

  function bounds(tl) {
    const to = tl.until === null ? nowS() : tl.until;
    return { from: to - tl.spanS, to };
  }

  function place(node, start, end, from, to) {
    const span = to - from;
    const left = Math.max(0, (start - from) / span);
    const right = Math.min(1, (end - from) / span);
    node.style.left = (left * 100).toFixed(3) + "%";
    node.style.width = (Math.max(0, right - left) * 100).toFixed(3) + "%";
  }

  function attach(sourceId, root, before) {
    if (timelines.has(sourceId)) return;
    const box = make("div", "timeline");
    box.dataset.timeline = sourceId;
    const bar = make("div", "tl-bar");
    const earlier = button("◀ Earlier", "tl-earlier", "Show earlier history of " + sourceId);
    const later = button("Later ▶", "tl-later", "Show later history of " + sourceId);
    const now = button("Now", "tl-now", "Show the latest history of " + sourceId);
    const range = make("span", "tl-range");
    const span = make("select", "tl-span");
    span.setAttribute("aria-label", "Timeline length");
    for (const [seconds, label] of SPANS) {
      const option = make("option", null, label);
      option.value = String(seconds);
      option.selected = seconds === DEFAULT_SPAN_S;
      span.append(option);
    }
    bar.append(earlier, range, later, now, span);
    const strip = make("div", "tl-strip");
    strip.setAttribute("role", "group");
    strip.setAttribute("aria-label", "Timeline of " + sourceId + ": captions and trigger events");
    const axis = make("div", "tl-axis");
    axis.setAttribute("aria-hidden", "true");
    const detail = make("p", "tl-detail");
    detail.setAttribute("aria-live", "polite");
    const note = make("p", "tl-note");
    note.setAttribute("role", "status");
    const more = make("details", "tl-more");
    const summary = make("summary", null, "Captions and events in this range");
    const list = make("ol", "tl-list");
    list.setAttribute("aria-label", "Captions and trigger events of " + sourceId + " in this range");
    more.append(summary, list);
    box.append(bar, strip, axis, detail, note, more);
    root.insertBefore(box, before || null);

    const tl = {
      sourceId, box, range, earlier, later, now, strip, axis, detail, note, summary, list,
      spanS: DEFAULT_SPAN_S, until: null, items: new Map(), missingUntil: null,
      highlight: null, focusKey: null, ticket: 0, dirty: false,
    };
    timelines.set(sourceId, tl);

    earlier.addEventListener("click", () => moveTo(tl, bounds(tl).to - tl.spanS / 2));
    later.addEventListener("click", () => moveTo(tl, bounds(tl).to + tl.spanS / 2));
    now.addEventListener("click", () => { tl.highlight = null; moveTo(tl, null); });
    span.addEventListener("change", () => {
      tl.spanS = Number(span.value) || DEFAULT_SPAN_S;
      load(tl);
    });
    strip.addEventListener("keydown", (event) => stripKey(tl, event));
    strip.addEventListener("focusin", (event) => pick(tl, event.target));
    strip.addEventListener("mouseover", (event) => describe(tl, event.target));
    strip.addEventListener("click", (event) => pick(tl, event.target));

    addSourceOption(sourceId);
    render(tl);
    load(tl);
  }

  function moveTo(tl, until) {
    tl.until = until === null || until >= nowS() ? null : until;
    return load(tl);
  }

  // Load the timeline's range newest first, following next cursors up to MAX_PAGES.
  async function load(tl) {
    const ticket = ++tl.ticket;
    const { from, to } = bounds(tl);
    tl.box.dataset.loading = "true";
    tl.note.textContent = "Loading the history…";
    render(tl);
    const loaded = new Map();
    let cursor = null;
    let pages = 0;
    try {
      do {
        const query = new URLSearchParams({
          source: tl.sourceId, since: String(from), order: "desc", limit: String(PAGE_LIMIT) });
        if (tl.until !== null) query.set("until", String(to));
        if (cursor !== null) query.set("cursor", cursor);
        const body = await getJson("api/history?" + query.toString());
        if (ticket !== tl.ticket) return;  // the range changed meanwhile
        if (!Array.isArray(body.items)) throw new ApiError(200, "the answer has no items list");
        for (const frame of body.items) {
          const item = toItem(frame);
          if (item && item.source === tl.sourceId) loaded.set(item.key, item);
        }
        cursor = typeof body.next === "string" && body.next ? body.next : null;
        pages += 1;
      } while (cursor !== null && pages < MAX_PAGES);
    } catch (err) {
      if (ticket !== tl.ticket) return;
      tl.box.dataset.loading = "false";
      tl.box.dataset.history = historyOff(err) ? "off" : "error";
      tl.note.textContent = historyOff(err)
        ? historyOffText(err) + " The timeline shows live captions only."
        : "Cannot load the history: " + String(err.message || err);
      render(tl);
      return;
    }
    // What arrived live while loading stays when it lies in the range.
    for (const [key, item] of tl.items) {
      if (!loaded.has(key) && item.end >= from && (tl.until === null || item.start < to)) {
        loaded.set(key, item);
      }
    }
    tl.items = loaded;
    let oldest = null;
    for (const item of loaded.values()) if (oldest === null || item.start < oldest) oldest = item.start;
    tl.missingUntil = cursor !== null ? oldest : null;
    tl.box.dataset.loading = "false";
    tl.box.dataset.history = "on";
    tl.note.textContent = cursor !== null
      ? "Showing the newest " + loaded.size + " items of this range; earlier ones were not loaded."
      : "";
    render(tl);
  }

  function scheduleRender(tl) {
    if (tl.dirty) return;
    tl.dirty = true;
    window.setTimeout(() => { tl.dirty = false; render(tl); }, 100);
  }

  function keysMatch(keys, wanted) {
    for (const key of keys) if (wanted.has(key)) return true;
    return false;
  }

  function render(tl) {
    const { from, to } = bounds(tl);
    tl.range.textContent = shortClock(from) + " – " + (tl.until === null ? "now" : shortClock(to));
    tl.later.disabled = tl.until === null;
    tl.now.disabled = tl.until === null;
    tl.box.dataset.live = tl.until === null ? "true" : "false";

    const captions = [];
    const marks = [];
    for (const item of tl.items.values()) {
      // Showing "now", a caption stamped a little ahead (the daemon's clock) still shows.
      if (item.end < from || (tl.until !== null && item.start > to)) continue;
      (item.kind === "caption" ? captions : marks).push(item);
    }
    captions.sort((a, b) => a.start - b.start);
    const entries = segments(captions);
    for (const m of marks) entries.push({ kind: "event", start: m.start, end: m.start, keys: [m.key], event: m });
    entries.sort((a, b) => a.start - b.start || (a.kind === "caption" ? -1 : 1));

    const focused = tl.strip.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    const bands = [];
    if (tl.missingUntil !== null && tl.missingUntil > from) {
      const band = make("div", "tl-missing");
      band.title = "not loaded";
      place(band, from, tl.missingUntil, from, to);
      bands.push(band);
    }
    const hit = tl.highlight;
    if (hit && hit.end >= from && hit.start <= to) {
      const band = make("div", "tl-hit-band");
      place(band, hit.start, hit.end, from, to);
      bands.push(band);
    }
    const nodes = [];
    const rows = [];
    let alt = false;
    for (const entry of entries) {
      let node;
      let label;
      const row = make("li", "tl-item");
      row.append(timeNode(entry.start, !sameDay(entry.start, nowS())), document.createTextNode(" "));
      if (entry.kind === "caption") {
        node = button(null, "tl-seg");
        place(node, entry.start, entry.end, from, to);
        label = rangeText(entry.start, entry.end) + ": " + entry.text;
        if (entry.keys.length > 1) label += " (" + entry.keys.length + " windows)";
        if (entry.speech) label += " (speech)";
        node.classList.toggle("alt", alt);
        alt = !alt;
        if (entry.flagged) node.classList.add("flagged");
        if (entry.abstained) node.classList.add("abstained");
        if (entry.speech) node.classList.add("speech");
        row.classList.add("tl-caption");
        row.append(make("span", "tl-text", entry.text));
        if (entry.keys.length > 1) row.append(make("span", "tl-count", "×" + entry.keys.length));
      } else {
        const ev = entry.event;
        node = button(null, "tl-mark");
        node.dataset.state = ev.state;
        node.dataset.name = ev.trigger;
        place(node, ev.start, ev.start, from, to);
        label = clockText(ev.start, !sameDay(ev.start, nowS())) + ": trigger " + ev.trigger + " " + ev.state;
        row.classList.add("tl-event");
        row.dataset.state = ev.state;
        row.append(make("span", "tl-trigger", "trigger " + ev.trigger + " " + ev.state));
        if (ev.clip) {
          const link = make("a", "tl-clip", "clip");
          link.href = "api/clips/" + encodeURIComponent(ev.clip);
          link.setAttribute("aria-label", "Audio clip of " + ev.trigger + " " + ev.state);
          row.append(document.createTextNode(" "), link);
        }
      }
      node.dataset.key = entry.keys[0];
      node.dataset.keys = entry.keys.join(" ");
      node.dataset.label = label;
      node.title = label;
      node.setAttribute("aria-label", label);
      node.tabIndex = -1;
      if (hit && (keysMatch(entry.keys, hit.keys) || (entry.kind === "caption" && entry.start < hit.end && entry.end > hit.start))) {
        node.classList.add("hit");
        row.classList.add("hit");
      }
      nodes.push(node);
      rows.push(row);
    }
    // Roving focus: one element of the strip is in the tab order, arrows move between them.
    const want = focused || tl.focusKey;
    let current = nodes.find((n) => want && n.dataset.keys.split(" ").includes(want));
    if (!current) current = nodes.find((n) => n.classList.contains("hit")) || nodes[nodes.length - 1];
    if (current) current.tabIndex = 0;
    if (nodes.length === 0) bands.push(make("span", "tl-empty", "nothing in this range"));
    tl.strip.replaceChildren(...bands, ...nodes);
    if (focused && current && current.dataset.keys.split(" ").includes(focused)) current.focus({ preventScroll: true });

    const tickNodes = [];
    const t = ticks(from, to);
    for (const at of t.at) {
      const where = (at - from) / (to - from);
      if (where < 0.06 || where > 0.94) continue;  // a label there would stick out of the card
      const tick = make("span", "tl-tick", shortClock(at));
      tick.style.left = (where * 100).toFixed(3) + "%";
      tickNodes.push(tick);
    }
    tl.axis.replaceChildren(...tickNodes);
    tl.list.replaceChildren(...rows);
    tl.summary.textContent = "Captions and events in this range (" + rows.length + ")";
  }

  function describe(tl, target) {
    if (!(target instanceof HTMLElement) || !target.dataset.label) return;
    tl.detail.textContent = target.dataset.label;
  }

  function pick(tl, target) {
    if (!(target instanceof HTMLElement) || !target.dataset.key) return;
    for (const node of tl.strip.querySelectorAll("button")) node.tabIndex = node === target ? 0 : -1;
    tl.focusKey = target.dataset.key;
    describe(tl, target);
  }

  function stripKey(tl, event) {
    const nodes = [...tl.strip.querySelectorAll("button")];
    const index = nodes.indexOf(document.activeElement);
    if (index < 0) return;
    let next = index;
    switch (event.key) {
      case "ArrowLeft": case "ArrowUp": next = Math.max(0, index - 1); break;
      case "ArrowRight": case "ArrowDown": next = Math.min(nodes.length - 1, index + 1); break;
      case "Home": next = 0; break;
      case "End": next = nodes.length - 1; break;
      case "PageUp": tl.earlier.click(); event.preventDefault(); return;
      case "PageDown": if (!tl.later.disabled) tl.later.click(); event.preventDefault(); return;
      default: return;
    }
    event.preventDefault();
    nodes[next].focus();
  }

  function addItem(frame) {
    const item = toItem(frame);
    if (!item) return;
    const tl = timelines.get(item.source);
    if (!tl || tl.items.has(item.key)) return;
    tl.items.set(item.key, item);
    if (tl.items.size > MAX_ITEMS) {
      const oldest = [...tl.items.values()].sort((a, b) => a.start - b.start)
        .slice(0, tl.items.size - MAX_ITEMS);
      for (const old of oldest) tl.items.delete(old.key);
    }
    const { from, to } = bounds(tl);
    if (item.end >= from && (tl.until === null || item.start <= to)) scheduleRender(tl);
  }

  // ------------------------------------------------------------------ search

  function addSourceOption(sourceId) {
    for (const option of ui.source.options) if (option.value === sourceId) return;
    const option = make("option", null, sourceId);
    option.value = sourceId;
    const after = [...ui.source.options].slice(1).find((o) => o.value > sourceId);
    ui.source.insertBefore(option, after || null);
  }

  async function search() {
    const q = ui.q.value.trim();
    ui.results.hidden = false;
    if (!q) {
      ui.resultsStatus.textContent = "Type what to search for.";
      ui.hits.replaceChildren();
      return;
    }
    const query = new URLSearchParams({ q, limit: String(SEARCH_LIMIT) });
    if (ui.source.value) query.set("source", ui.source.value);
    if (ui.since.value) query.set("since", ui.since.value);
    const ticket = ++searchTicket;
    ui.results.dataset.state = "searching";
    ui.resultsStatus.textContent = "Searching…";
    ui.hits.replaceChildren();
    let body;
    try {
      body = await getJson("api/search?" + query.toString());
      if (!Array.isArray(body.hits)) throw new ApiError(200, "the answer has no hits list");
    } catch (err) {
      if (ticket !== searchTicket) return;
      ui.results.dataset.state = "error";
      let text;
      if (historyOff(err)) text = historyOffText(err);
      else if (err instanceof ApiError && err.status === 400) text = "Search refused: " + err.message;
      else text = "Search failed: " + String(err.message || err);
      ui.resultsStatus.textContent = text;
      showNotice(text);
      return;
    }
    if (ticket !== searchTicket) return;
    if (noticeIsOurs) showNotice("");
    const hits = body.hits.filter((h) => h && typeof h.source_id === "string"
      && number(h.start_at) !== null && number(h.end_at) !== null);
    ui.results.dataset.state = hits.length ? "hits" : "empty";
    const where = ui.source.value ? " in " + ui.source.value : "";
    ui.resultsStatus.textContent = hits.length
      ? hits.length + (hits.length === 1 ? " hit" : " hits") + " for “" + q + "”" + where + ", best first."
      : "Nothing found for “" + q + "”" + where + ".";
    ui.hits.replaceChildren(...hits.map(hitNode));
  }

  function hitNode(hit) {
    const item = make("li", "hit-item");
    const node = button(null, "hit");
    node.dataset.source = hit.source_id;
    const when = make("span", "hit-when");
    when.append(...rangeNodes(hit.start_at, hit.end_at));
    const score = number(hit.score);
    const facts = make("span", "hit-facts");
    facts.append(make("span", "hit-source", hit.source_id));
    if (score !== null) facts.append(make("span", "hit-score", "score " + score.toFixed(2)));
    const similarity = number(hit.similarity);
    if (similarity !== null) facts.append(make("span", "hit-similarity", "audio " + similarity.toFixed(2)));
    const textMatch = number(hit.text_match);
    if (textMatch !== null && textMatch > 0) facts.append(make("span", "hit-text-match", "text " + textMatch.toFixed(2)));
    const captions = make("span", "hit-captions");
    for (const text of Array.isArray(hit.captions) ? hit.captions : []) {
      if (typeof text === "string") captions.append(make("span", "hit-caption", text));
    }
    node.append(when, facts, captions);
    node.addEventListener("click", () => showHit(hit));
    item.append(node);
    return item;
  }

  // Move the hit's source timeline to the hit's time, mark it, and bring it into view.
  async function showHit(hit) {
    if (ensureCard) ensureCard(hit.source_id);
    const tl = timelines.get(hit.source_id);
    if (!tl) return;
    const ids = Array.isArray(hit.window_ids) ? hit.window_ids.filter((w) => typeof w === "string") : [];
    tl.highlight = { start: hit.start_at, end: hit.end_at, keys: new Set(ids.map((w) => "w:" + w)) };
    tl.focusKey = typeof hit.best_window_id === "string" ? "w:" + hit.best_window_id : null;
    tl.box.dataset.highlight = "true";
    const loading = moveTo(tl, (hit.start_at + hit.end_at) / 2 + tl.spanS / 2);
    tl.box.scrollIntoView({ block: "center" });
    await loading;
    const first = tl.strip.querySelector("button[tabindex='0']");
    const target = first && first.classList.contains("hit") ? first : tl.strip.querySelector("button.hit");
    if (target) target.focus({ preventScroll: true });
  }

  // ------------------------------------------------------------------ wiring

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  ui.resultsClose.addEventListener("click", () => {
    ui.results.hidden = true;
    ui.hits.replaceChildren();
    if (noticeIsOurs) showNotice("");
    ui.q.focus();
  });
  window.setInterval(() => {
    for (const tl of timelines.values()) if (tl.until === null) render(tl);
  }, REFRESH_S * 1000);

  window.streamcapHistory = {
    // app.js hands over its card factory, so a hit of a source without a card gets one.
    init(cardFor) { ensureCard = cardFor; },
    // A new source card: its timeline goes into root, before `before`.
    attach,
    // A caption or trigger frame from the feed.
    frame: addItem,
  };
})();
