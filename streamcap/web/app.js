// streamcap live page: one card per source, captions newest first, fed by the
// daemon's WebSocket feed (protocol streamcap.v1). Plain DOM, no framework.
// Every piece of text from the feed goes through textContent, never parsed as markup.
"use strict";

(function () {
  const MAX_CAPTIONS = 50;          // per source card; older entries are removed
  const BACKOFF_MIN_S = 0.5;        // first reconnect delay
  const BACKOFF_MAX_S = 30;         // cap of the exponential backoff
  const PING_EVERY_S = 20;          // application-level keepalive ({"type":"ping"})
  const SILENCE_LIMIT_S = 65;       // no frame at all for this long: reconnect
  const UNSPECIFIED_HOSTS = new Set(["0.0.0.0", "[::]", "::", ""]);

  // history.js (loaded first): search and the per-source timelines; absent, the page still works.
  const pageHistory = window.streamcapHistory || null;

  const params = new URLSearchParams(window.location.search);
  const token = params.get("token");

  const ui = {
    node: document.getElementById("node"),
    conn: document.getElementById("conn"),
    notice: document.getElementById("notice"),
    empty: document.getElementById("empty"),
    sources: document.getElementById("sources"),
  };

  const cards = new Map();          // source_id -> {root, badge, reason, triggers, list, seen: Set}
  // Trigger definitions from /api/triggers: name -> {sources: [...] (empty: every source)};
  // states: "trigger\u0000source" -> {state, lastFiredAt}, from the API and then trigger frames.
  let triggerDefs = new Map();
  const triggerStates = new Map();
  let socket = null;
  let attempt = 0;
  let reconnectTimer = null;
  let lastFrameAt = 0;
  let config = null;

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setConn(state, text) {
    ui.conn.dataset.state = state;
    ui.conn.textContent = text;
  }

  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = !text;
  }

  // ------------------------------------------------------------------ cards

  function card(sourceId) {
    let entry = cards.get(sourceId);
    if (entry) return entry;
    const root = make("section", "card");
    root.dataset.source = sourceId;
    const head = make("div", "card-head");
    const title = make("h2", null, sourceId);
    title.id = "source-" + cards.size;
    root.setAttribute("aria-labelledby", title.id);
    const badge = make("span", "badge", "unknown");
    badge.dataset.state = "unknown";
    head.append(title, badge);
    const reason = make("p", "reason");
    const triggers = make("ul", "triggers");
    triggers.setAttribute("aria-label", "Triggers on " + sourceId);
    const list = make("ol", "captions");
    list.setAttribute("role", "log");
    list.setAttribute("aria-live", "polite");
    list.setAttribute("aria-relevant", "additions");
    list.setAttribute("aria-label", "Captions from " + sourceId);
    root.append(head, reason, triggers, list);
    ui.sources.append(root);
    ui.empty.hidden = true;
    entry = { root, badge, reason, triggers, list, seen: new Set() };
    cards.set(sourceId, entry);
    if (pageHistory) pageHistory.attach(sourceId, root, list);
    renderTriggers(sourceId);
    return entry;
  }

  // ------------------------------------------------------------------ triggers

  function watches(def, sourceId) {
    return !def || def.sources.length === 0 || def.sources.includes(sourceId);
  }

  function clock(seconds) {
    const date = new Date(seconds * 1000);
    const node = make("time", "fired", "fired " + date.toLocaleTimeString());
    node.dateTime = date.toISOString();
    return node;
  }

  function renderTriggers(sourceId) {
    const entry = cards.get(sourceId);
    if (!entry) return;
    const names = new Set();
    for (const [name, def] of triggerDefs) if (watches(def, sourceId)) names.add(name);
    for (const key of triggerStates.keys()) {
      const [name, source] = key.split("\u0000");
      if (source === sourceId && (triggerDefs.size === 0 || triggerDefs.has(name))) names.add(name);
    }
    const items = [];
    for (const name of [...names].sort()) {
      const st = triggerStates.get(name + "\u0000" + sourceId) || { state: "unknown", lastFiredAt: null };
      const item = make("li", "trigger");
      item.dataset.trigger = name;
      item.dataset.state = st.state;
      item.append(make("span", "trigger-name", name), make("span", "trigger-state", st.state));
      if (st.lastFiredAt !== null) item.append(clock(st.lastFiredAt));
      items.push(item);
    }
    entry.triggers.replaceChildren(...items);
  }

  function setTriggerState(trigger, sourceId, state, lastFiredAt) {
    const key = trigger + "\u0000" + sourceId;
    const old = triggerStates.get(key);
    triggerStates.set(key, { state, lastFiredAt: lastFiredAt ?? (old ? old.lastFiredAt : null) });
  }

  function onTrigger(frame) {
    if (typeof frame.source_id !== "string" || typeof frame.trigger !== "string") return;
    const state = frame.state === "on" ? "on" : "off";
    const at = number(frame.captured_at);
    setTriggerState(frame.trigger, frame.source_id, state, state === "on" ? at : null);
    card(frame.source_id);
    renderTriggers(frame.source_id);
    if (pageHistory) pageHistory.frame(frame);
  }

  async function loadTriggers() {
    let body;
    try {
      const response = await fetch("api/triggers", { cache: "no-store" });
      if (!response.ok) return;  // an older daemon, or none configured: frames still count
      body = await response.json();
    } catch (err) {
      return;
    }
    if (!body || typeof body.triggers !== "object" || body.triggers === null) return;
    const defs = new Map();
    for (const [name, t] of Object.entries(body.triggers)) {
      const def = t && t.definition && Array.isArray(t.definition.sources) ? t.definition.sources : [];
      defs.set(name, { sources: def.filter((s) => typeof s === "string") });
      const states = t && typeof t.states === "object" && t.states !== null ? t.states : {};
      for (const [source, st] of Object.entries(states)) {
        if (!st || (st.state !== "on" && st.state !== "off")) continue;
        const key = name + "\u0000" + source;
        if (!triggerStates.has(key)) setTriggerState(name, source, st.state, number(st.last_fired_at));
      }
    }
    triggerDefs = defs;
    if (Array.isArray(body.sources)) for (const id of body.sources) if (typeof id === "string") card(id);
    for (const id of cards.keys()) renderTriggers(id);
  }

  function number(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function captionKey(frame) {
    if (frame.window_id !== undefined && frame.window_id !== null) return "w:" + frame.window_id;
    return "s:" + frame.seq + "@" + frame.captured_at;
  }

  function addCaption(frame) {
    if (typeof frame.source_id !== "string" || typeof frame.text !== "string") return;
    const entry = card(frame.source_id);
    if (pageHistory) pageHistory.frame(frame);  // the timeline drops repeats itself
    const key = captionKey(frame);
    if (entry.seen.has(key)) return;  // backfill after a reconnect repeats captions
    entry.seen.add(key);

    const capturedAt = number(frame.captured_at);
    const item = make("li", "caption");
    item.dataset.key = key;
    item.dataset.capturedAt = String(capturedAt ?? 0);
    if (frame.seq !== undefined) item.dataset.seq = String(frame.seq);
    if (frame.flagged === true) item.classList.add("flagged");

    const text = make("p", "text", frame.text);
    const facts = make("div", "facts");
    const when = make("time", "when");
    if (capturedAt !== null) {
      const date = new Date(capturedAt * 1000);
      when.dateTime = date.toISOString();
      when.textContent = date.toLocaleTimeString();
    } else {
      when.textContent = "–";
    }
    facts.append(when);
    const score = number(frame.score);
    if (score !== null) facts.append(make("span", "score", "score " + score.toFixed(2)));
    const start = number(frame.start_s);
    const end = number(frame.end_s);
    if (start !== null && end !== null) {
      facts.append(make("span", "span", start.toFixed(1) + "–" + end.toFixed(1) + " s"));
    }
    const lag = number(frame.lag_s);
    if (lag !== null) facts.append(make("span", "lag", "lag " + lag.toFixed(1) + " s"));
    if (frame.flagged === true) facts.append(make("span", "flag", "flagged"));
    item.append(text, facts);

    // Newest first by capture time; a backfilled older caption goes below newer ones.
    const at = capturedAt ?? Number.POSITIVE_INFINITY;
    let before = null;
    for (const other of entry.list.children) {
      if (Number(other.dataset.capturedAt) <= at) { before = other; break; }
    }
    entry.list.insertBefore(item, before);
    while (entry.list.children.length > MAX_CAPTIONS) {
      const last = entry.list.lastElementChild;
      entry.seen.delete(last.dataset.key);
      last.remove();
    }
  }

  function setStatus(frame) {
    if (typeof frame.source_id !== "string") return;
    const entry = card(frame.source_id);
    const state = typeof frame.state === "string" ? frame.state : "unknown";
    entry.badge.dataset.state = state;
    let label = state;
    const retry = number(frame.retry_in_s);
    if (state === "retrying" && retry !== null) label += " in " + retry.toFixed(0) + " s";
    entry.badge.textContent = label;
    entry.reason.textContent = typeof frame.reason === "string" ? frame.reason : "";
  }

  function onHello(frame) {
    if (typeof frame.node_id === "string") ui.node.textContent = frame.node_id;
    const caps = frame.capabilities;
    if (caps && Array.isArray(caps.sources)) {
      for (const id of caps.sources) if (typeof id === "string") card(id);
    }
    // Subscribe once the server said what it offers: trigger frames only where offered.
    const kinds = ["caption", "status"];
    if (caps && Array.isArray(caps.kinds) && caps.kinds.includes("trigger")) kinds.push("trigger");
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "subscribe", sources: "*", kinds }));
    }
  }

  function onFrame(frame) {
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "hello": onHello(frame); break;
      case "caption": addCaption(frame); break;
      case "status": setStatus(frame); break;
      case "trigger": onTrigger(frame); break;
      case "error":
        showNotice("Feed error " + String(frame.code) + ": " + String(frame.message));
        break;
      default: break;  // pong, subscribed and future frame types
    }
  }

  // ------------------------------------------------------------------ connection

  function feedUrl() {
    const url = new URL(String(config.ws_url), window.location.href);
    if (UNSPECIFIED_HOSTS.has(url.hostname)) url.hostname = window.location.hostname;
    if (token) url.searchParams.set("token", token);
    return url;
  }

  function scheduleReconnect(why) {
    if (reconnectTimer !== null) return;
    const base = Math.min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt);
    const delay = base / 2 + Math.random() * base / 2;  // jitter: [base/2, base)
    attempt += 1;
    setConn("waiting", why + "; reconnecting in " + delay.toFixed(1) + " s");
    reconnectTimer = window.setTimeout(() => { reconnectTimer = null; connect(); }, delay * 1000);
  }

  function connect() {
    let url;
    try {
      url = feedUrl();
    } catch (err) {
      setConn("error", "bad feed address in config.json");
      return;
    }
    setConn("connecting", "connecting to " + url.host);
    let ws;
    try {
      ws = new WebSocket(url.href);
    } catch (err) {
      scheduleReconnect("cannot open the feed");
      return;
    }
    socket = ws;
    ws.onopen = () => {
      lastFrameAt = Date.now();
      setConn("open", "connected");
    };
    ws.onmessage = (event) => {
      lastFrameAt = Date.now();
      attempt = 0;  // the feed works: the next outage starts the backoff afresh
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      onFrame(frame);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      const why = event.code === 1000 ? "feed closed" : "feed lost (code " + event.code + ")";
      scheduleReconnect(why);
    };
  }

  function keepalive() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastFrameAt > SILENCE_LIMIT_S * 1000) {
      socket.close(4000, "silent feed");
      return;
    }
    socket.send(JSON.stringify({ type: "ping" }));
  }

  async function start() {
    try {
      const response = await fetch("config.json", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      config = await response.json();
    } catch (err) {
      setConn("error", "cannot load config.json");
      showNotice("Cannot load the page configuration (" + String(err.message || err) + "). Reload to retry.");
      return;
    }
    if (typeof config.node_id === "string") ui.node.textContent = config.node_id;
    if (!config.ws_url) {
      setConn("error", "no feed");
      showNotice("The daemon has no WebSocket feed enabled; captions cannot be shown.");
      return;
    }
    if (config.token_required === true && !token) {
      showNotice("This feed needs a token: open this page as ?token=YOUR_TOKEN.");
    }
    window.setInterval(keepalive, PING_EVERY_S * 1000);
    await loadTriggers();
    connect();
  }

  if (pageHistory) pageHistory.init((sourceId) => { card(sourceId); });
  start();
})();
