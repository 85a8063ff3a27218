"""The live page's search box and per-source timelines in headless Chromium.

The page is served by the real HttpServer with the real ``HistoryApi`` (/api/search and
/api/history) over a real ``SqliteHistory`` filled with fixture records (captions without
embeddings, as a model without a retriever makes them: the search ranks them by their caption
text), and a small in-test WebSocket server is the live feed. A test middleware notes what
the page asked and which ``next`` cursor each history page answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from chromium import Tab, chromium_path, open_page
from timing import scaled
from websockets.asyncio.server import ServerConnection, serve

from streamcap.bus.wire import to_wire
from streamcap.errors import HistoryError
from streamcap.history.api import HISTORY_OFF, HistoryApi
from streamcap.history.records import HistoryPage, Span, WindowRecord
from streamcap.history.search import MAX_QUERY_CHARS, TEXT_WEIGHT
from streamcap.history.sqlite import SqliteHistory
from streamcap.history.store import HistoryStore
from streamcap.http import HealthReport, HttpServer
from streamcap.messages import Caption, TriggerEvent, TriggerState
from streamcap.stats import Metrics

needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (apt-get install --no-install-recommends chromium)")

NODE = "test-node"
PAGE_TIMEOUT_S = scaled(60.0)
STEP_TIMEOUT_S = scaled(30.0)
DOCS = Path(__file__).resolve().parents[1] / "docs"
UPDATE_SCREENSHOTS_ENV = "STREAMCAP_UPDATE_SCREENSHOTS"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
WINDOW_S = 10.0
MINUTE = 60.0

# What mic-1 heard, in minutes before now: (from, to, caption); windows of 10 s, one after
# another. Nothing from 200 to 150 (the daemon was down), and one window 7.5 h ago.
MIC_SCENES = ((300, 240, "rain falls on a roof"), (240, 200, "birds chirp"),
              (150, 120, "a dog barks"), (120, 119, HOSTILE), (119, 60, "a car passes by"),
              (60, 2, "people talk in the distance"), (450.2, 450, "an old train horn"))
RADIO_SCENES = ((60, 2, "music plays"),)


# --------------------------------------------------------------------------- fixture data


def windows(source_id: str, scenes: tuple[tuple[float, float, str], ...],
            now: float) -> list[WindowRecord]:
    out: list[WindowRecord] = []
    seq = 0
    for start_min, end_min, text in sorted(scenes, reverse=True):
        at = now - start_min * MINUTE
        while at + WINDOW_S <= now - end_min * MINUTE + 1e-6:
            caption = Caption(window_id=f"{source_id}-w{seq}", source_id=source_id, seq=seq,
                              start_s=seq * WINDOW_S, end_s=(seq + 1) * WINDOW_S, captured_at=at,
                              text=text, score=0.7, model="tiny", run_id="r1",
                              speech=text.startswith("people"))
            out.append(WindowRecord.from_caption(caption, None))
            seq += 1
            at += WINDOW_S
    return out


def dog_events(now: float) -> list[TriggerEvent]:
    def event(n: int, state: TriggerState, minutes: float, **extra: str) -> TriggerEvent:
        return TriggerEvent(event_id=f"r1-dog-mic-1-{n}", trigger="dog", source_id="mic-1",
                            state=state, score=0.6, threshold=0.4, start_s=0.0, end_s=5.0,
                            captured_at=now - minutes * MINUTE, model="tiny", run_id="r1",
                            **extra)
    return [event(1, TriggerState.ON, 148, clip="r1-dog-mic-1-1.flac"),
            event(2, TriggerState.OFF, 125, fired_id="r1-dog-mic-1-1")]




class CappedPages(SqliteHistory):
    """A reader that answers at most ``page_cap`` items a page, whatever the limit asked
    (as a backend with a smaller page size would)."""

    page_cap = 500

    def page(self, span: Span, *, cursor: str | None, limit: int,
             newest_first: bool = False) -> HistoryPage:
        return super().page(span, cursor=cursor, limit=min(limit, self.page_cap),
                            newest_first=newest_first)


@dataclass
class HistoryRoutes:
    """The real /api/search and /api/history over ``store``; what the page asked of them."""

    store: SqliteHistory
    history_on: bool = True
    page_cap: int = 500  # at most this many items a page, whatever the limit asked
    searches: list[dict[str, list[str]]] = field(default_factory=list)
    reads: list[dict[str, list[str]]] = field(default_factory=list)
    nexts: dict[int, str | None] = field(default_factory=dict)  # read's index -> its "next"

    def install(self, http: HttpServer) -> None:
        HistoryApi(self.open_reader, None, "tiny", sources=("mic-1", "radio"),
                   node_id=NODE).install(http)
        http.app.middlewares.append(self.note)

    def open_reader(self) -> HistoryStore:
        if not self.history_on:
            raise HistoryError(HISTORY_OFF)
        reader = CappedPages(self.store.path, read_only=True, check=False)
        reader.page_cap = self.page_cap
        return reader

    @web.middleware
    async def note(self, request: web.Request, handler: Any) -> web.StreamResponse:
        query = parse_qs(request.query_string)
        if request.path == "/api/search":
            self.searches.append(query)
        elif request.path == "/api/history":
            self.reads.append(query)
        read = len(self.reads) - 1  # requests overlap: note the answer by its read
        response: web.StreamResponse = await handler(request)
        if request.path == "/api/history" and isinstance(response, web.Response):
            body = response.body
            assert isinstance(body, bytes)
            self.nexts[read] = json.loads(body)["next"] if response.status == 200 else None
        return response

    def cursors(self, source: str) -> tuple[list[list[str] | None], list[list[str] | None]]:
        """The cursors the page sent for ``source``'s reads, and those it should have sent
        (none first, then the ``next`` of the read before)."""
        mine = [(r.get("cursor"), self.nexts.get(i)) for i, r in enumerate(self.reads)
                if r["source"] == [source]]
        sent = [c for c, _ in mine]
        expected: list[list[str] | None] = [None, *([n] if n else None for _, n in mine[:-1])]
        return sent, expected


# --------------------------------------------------------------------------- the site


@dataclass
class Feed:
    """The live feed: a hello, then whatever the test sends to every subscribed client."""

    clients: list[ServerConnection] = field(default_factory=list)
    subscriptions: int = 0

    async def handler(self, ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "hello", "v": 1, "protocol": "streamcap.v1",
                                  "node_id": NODE,
                                  "capabilities": {"sources": ["mic-1", "radio"],
                                                   "kinds": ["caption", "status", "trigger"]}}))
        try:
            async for message in ws:
                if json.loads(message).get("type") == "subscribe":
                    self.clients.append(ws)
                    self.subscriptions += 1
        finally:
            if ws in self.clients:
                self.clients.remove(ws)

    async def subscribed(self, count: int) -> None:
        """Wait until the page has subscribed ``count`` times in all."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while self.subscriptions < count:
            assert time.monotonic() < deadline, f"{self.subscriptions} subscriptions, not {count}"
            await asyncio.sleep(0.05)

    async def send(self, frame: Mapping[str, object]) -> None:
        for ws in list(self.clients):
            await ws.send(json.dumps(frame))


@dataclass
class Site:
    url: str
    routes: HistoryRoutes
    feed: Feed
    now: float
    mic: list[WindowRecord]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    now = time.time()
    mic = windows("mic-1", MIC_SCENES, now)
    store = SqliteHistory(tmp_path / "history" / "history.sqlite3")
    store.write([*mic, *windows("radio", RADIO_SCENES, now), *dog_events(now)])
    routes = HistoryRoutes(store)
    feed = Feed()
    async with serve(feed.handler, "127.0.0.1", 0) as ws_server:
        ws_port = next(iter(ws_server.sockets)).getsockname()[1]
        http = HttpServer("127.0.0.1", 0, metrics=Metrics(),
                          health=lambda: HealthReport(live=True, ready=True),
                          page_config=lambda: {"ws_url": f"ws://127.0.0.1:{ws_port}/",
                                               "node_id": NODE, "token_required": False})
        routes.install(http)
        try:
            async with http:
                yield Site(f"http://127.0.0.1:{http.bound_port}/", routes, feed, now, mic)
        finally:
            store.close()


@asynccontextmanager
async def browse(url: str, wait_for: str) -> AsyncIterator[Tab]:
    """The page open in Chromium; the browser runs in a thread so the servers keep serving."""
    page = open_page(url, PAGE_TIMEOUT_S, wait_for=wait_for)
    tab = await asyncio.to_thread(page.__enter__)
    try:
        yield tab
    finally:
        await asyncio.to_thread(page.__exit__, None, None, None)


async def step(tab: Tab, expression: str) -> None:
    await asyncio.to_thread(tab.wait_for, expression, STEP_TIMEOUT_S)


async def value(tab: Tab, expression: str) -> object:
    return await asyncio.to_thread(tab.evaluate, expression)


async def submit(tab: Tab, q: str, *, source: str = "", since: str = "24h") -> None:
    await value(tab, f"""(() => {{
        document.getElementById('results').dataset.state = '';
        document.getElementById('search-q').value = {json.dumps(q)};
        document.getElementById('search-source').value = {json.dumps(source)};
        document.getElementById('search-since').value = {json.dumps(since)};
        document.getElementById('search').requestSubmit();
    }})()""")


def screenshot_target(name: str, tmp_path: Path) -> Path:
    return DOCS / name if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1" else tmp_path / name


LOADED = ("document.querySelectorAll('.timeline[data-history=\"on\"]').length === 2 && "
          "document.querySelector('[data-timeline=\"mic-1\"] .tl-seg') !== null")
MIC = "document.querySelector('[data-timeline=\"mic-1\"]')"


# --------------------------------------------------------------------------- search


async def test_history_script_is_served_under_the_page_rules(site: Site) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(site.url) as page:
            html = await page.text()
            csp = page.headers["Content-Security-Policy"]
        async with session.get(site.url + "history.js") as script:
            assert script.status == 200
            assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
            js = await script.text()
    # loaded before app.js, from this server; the policy still allows no inline script
    assert html.index('src="history.js"') < html.index('src="app.js"')
    assert "script-src 'self'" in csp and "form-action 'none'" in csp
    # server text only ever goes through textContent
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


@needs_chromium
async def test_search_lists_hits_and_a_hit_moves_its_timeline_there(site: Site,
                                                                   tmp_path: Path) -> None:
    async with browse(site.url, LOADED) as tab:
        # by caption text alone: "a dog barks" holds 2 of the 3 words, "music plays" 1
        await submit(tab, "dog barks music")
        await step(tab, "document.getElementById('results').dataset.state === 'hits'")
        hits = await value(tab, """[...document.querySelectorAll('#hits .hit')].map((h) => ({
            source: h.dataset.source, text: h.textContent,
            times: [...h.querySelectorAll('time')].map((t) => t.dateTime)}))""")
        status = await value(tab, "document.getElementById('results-status').textContent")
        assert site.routes.searches[-1] == {"q": ["dog barks music"], "limit": ["20"],
                                            "since": ["24h"]}
        assert isinstance(hits, list) and [h["source"] for h in hits] == ["mic-1", "radio"]
        dog = [w for w in site.mic if w.text == "a dog barks"]
        assert "a dog barks" in hits[0]["text"]
        assert f"score {TEXT_WEIGHT * 2 / 3:.2f}" in hits[0]["text"]
        # every window of the dog's 30 minutes is one hit, from the first start to the last end
        assert hits[0]["times"] == [time_iso(dog[0].start_at), time_iso(dog[-1].end_at)]
        assert "music plays" in hits[1]["text"]
        assert f"score {TEXT_WEIGHT * 1 / 3:.2f}" in hits[1]["text"]
        assert status == "2 hits for “dog barks music”, best first."

        # one source: the page asks for it
        await submit(tab, "train", source="mic-1", since="7d")
        await step(tab, "document.getElementById('results').dataset.state === 'hits'")
        assert site.routes.searches[-1] == {"q": ["train"], "limit": ["20"], "since": ["7d"],
                                            "source": ["mic-1"]}
        # clicking the hit moves mic-1's timeline 7.5 h back and focuses the hit there
        reads = len(site.routes.reads)
        await value(tab, "document.querySelector('#hits .hit').click()")
        await step(tab, "document.activeElement && document.activeElement.classList.contains"
                        "('hit') && document.activeElement.closest('[data-timeline=\"mic-1\"]')")
        focused = await value(tab, "document.activeElement.getAttribute('aria-label')")
        assert isinstance(focused, str) and focused.endswith(": an old train horn")
        assert await value(tab, MIC + ".dataset.live") == "false"
        moved = site.routes.reads[reads]
        train = next(w for w in site.mic if w.text == "an old train horn")
        assert moved["source"] == ["mic-1"] and moved["order"] == ["desc"]
        assert float(moved["since"][0]) < train.start_at < float(moved["until"][0])
        assert float(moved["until"][0]) < site.now - 3 * 3600  # not the live range
        assert await value(tab, MIC + ".querySelector('.tl-hit-band') !== null") is True
        target = screenshot_target("live-page-search.png", tmp_path)
        await asyncio.to_thread(tab.screenshot, target, width=1000, height=760)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
async def test_search_messages_history_off_and_the_timelines_page_bound(site: Site) -> None:
    notice = "document.getElementById('notice')"
    site.routes.page_cap = 200  # mic-1's last 6 h take 8 pages: more than the page follows
    async with browse(site.url, LOADED) as tab:
        sent, expected = site.routes.cursors("mic-1")
        assert len(sent) == 6 and sent == expected  # each page's next, six pages in all
        assert await value(tab, MIC + ".querySelector('.tl-note').textContent") == \
            "Showing the newest 1200 items of this range; earlier ones were not loaded."
        assert await value(tab, MIC + ".querySelector('.tl-missing') !== null") is True

        await submit(tab, "zebra")
        await step(tab, "document.getElementById('results').dataset.state === 'empty'")
        assert await value(tab, "document.getElementById('results-status').textContent") == \
            "Nothing found for “zebra”."
        assert await value(tab, notice + ".hidden") is True

        await submit(tab, "x" * (MAX_QUERY_CHARS + 1))  # longer than the API takes
        await step(tab, "document.getElementById('results').dataset.state === 'error'")
        assert await value(tab, notice + ".hidden") is False
        assert await value(tab, notice + ".textContent") == \
            f"Search refused: q: expected at most {MAX_QUERY_CHARS} characters " \
            f"(got {MAX_QUERY_CHARS + 1})"

        await submit(tab, "dog")  # a good search again clears the search's notice
        await step(tab, "document.getElementById('results').dataset.state === 'hits'")
        assert await value(tab, notice + ".hidden") is True

        site.routes.history_on = False
        await submit(tab, "dog")
        await step(tab, "document.getElementById('results').dataset.state === 'error'")
        assert await value(tab, notice + ".textContent") == "History unavailable: " + HISTORY_OFF

        # reloaded while the history is off: the timelines say so and still show live captions
        await value(tab, "location.reload()")
        await step(tab, MIC + " && " + MIC + ".dataset.history === 'off'")
        note = await value(tab, MIC + ".querySelector('.tl-note').textContent")
        assert note == "History unavailable: " + HISTORY_OFF + \
            " The timeline shows live captions only."
        await site.feed.subscribed(2)
        await send_live(site, "a kettle whistles", time.time() - WINDOW_S, seq=1)
        await step(tab, MIC + ".querySelector('.tl-seg[aria-label$=\": a kettle whistles\"]')")


def time_iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


async def send_live(site: Site, text: str, at: float, *, seq: int) -> None:
    """A caption of mic-1 over the feed, recorded in the history too (as the daemon does)."""
    caption = Caption(window_id=f"live-{seq}", source_id="mic-1", seq=10_000 + seq,
                      start_s=0.0, end_s=WINDOW_S, captured_at=at, text=text, score=0.7,
                      model="tiny", run_id="r2")
    site.routes.store.write([WindowRecord.from_caption(caption, None)])
    await site.feed.send(to_wire(caption, node_id=NODE))


# --------------------------------------------------------------------------- timeline


@needs_chromium
async def test_timeline_shows_history_events_and_live_captions(site: Site,
                                                               tmp_path: Path) -> None:
    async with browse(site.url, LOADED) as tab:
        # newest first, following next cursors until the range is read
        reads = [r for r in site.routes.reads if r["source"] == ["mic-1"]]
        sent, expected = site.routes.cursors("mic-1")
        assert len(sent) == 3 and sent == expected
        assert all(r["order"] == ["desc"] and r["limit"] == ["500"] and "until" not in r
                   for r in reads)
        assert abs(float(reads[0]["since"][0]) - (site.now - 6 * 3600)) < scaled(60.0)

        segments = await value(tab, f"[...{MIC}.querySelectorAll('.tl-seg')]"
                                    ".map((s) => s.getAttribute('aria-label'))")
        assert isinstance(segments, list)
        # runs of one caption are one segment each (the train horn is 7.5 h old: not here)
        assert [s.split(": ", 1)[1] for s in segments] == [
            "rain falls on a roof (360 windows)", "birds chirp (240 windows)",
            "a dog barks (180 windows)", HOSTILE + " (6 windows)",
            "a car passes by (354 windows)",
            "people talk in the distance (348 windows) (speech)"]
        marks = await value(tab, f"[...{MIC}.querySelectorAll('.tl-mark')]"
                                 ".map((m) => [m.dataset.name, m.dataset.state])")
        assert marks == [["dog", "on"], ["dog", "off"]]
        listed = await value(tab, f"[...{MIC}.querySelectorAll('.tl-list li')]"
                                  ".map((li) => li.textContent)")
        assert isinstance(listed, list) and len(listed) == 8
        assert any(t.endswith("trigger dog on clip")
                   for t in listed)
        assert any(t.endswith(HOSTILE + "×6") for t in listed)  # text, then its count
        clip = await value(tab, MIC + ".querySelector('.tl-clip')?.getAttribute('href')")
        assert clip == "api/clips/r1-dog-mic-1-1.flac"
        # the hostile caption is text: no element made from it, no script run
        assert await value(tab, "document.querySelectorAll('img').length") == 0
        assert await value(tab, "window.__pwned === undefined") is True
        assert "&lt;img src=x onerror=" in await asyncio.to_thread(tab.dom)

        # keyboard: one strip element in the tab order, arrows move along the strip
        await value(tab, MIC + ".querySelector('.tl-strip button[tabindex=\"0\"]').focus()")
        await asyncio.to_thread(tab.press, "Home")
        await asyncio.to_thread(tab.press, "ArrowRight")
        detail = await value(tab, MIC + ".querySelector('.tl-detail').textContent")
        assert isinstance(detail, str) and detail.endswith(": birds chirp (240 windows)")
        assert await value(tab, "document.activeElement.getAttribute('aria-label')") == detail
        assert await value(tab, MIC + ".querySelectorAll('.tl-strip [tabindex=\"0\"]').length") \
            == 1

        # a caption from the feed extends the strip, without a reload
        reads_before = len(site.routes.reads)
        await site.feed.subscribed(1)
        await send_live(site, HOSTILE + " now", time.time() - 2 * WINDOW_S, seq=1)
        await send_live(site, "a siren wails", time.time() - WINDOW_S, seq=2)
        await step(tab, MIC + ".querySelector('.tl-seg[aria-label$=\": a siren wails\"]')")
        assert len(site.routes.reads) == reads_before
        assert await value(tab, "document.querySelectorAll('img').length") == 0
        await value(tab, MIC + ".querySelector('details.tl-more').open = true")
        target = screenshot_target("live-page-timeline.png", tmp_path)
        await asyncio.to_thread(tab.screenshot, target, width=1000, height=760)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # earlier: the range moves half a span back and the old window shows; now: back live
        await value(tab, MIC + ".querySelector('.tl-earlier').click()")
        await step(tab, MIC + ".querySelector('.tl-seg[aria-label$=\": an old train horn\"]')")
        assert await value(tab, MIC + ".dataset.live") == "false"
        back = site.routes.reads[-1]
        assert abs(float(back["until"][0]) - (site.now - 3 * 3600)) < scaled(120.0)
        await value(tab, MIC + ".querySelector('.tl-now').click()")
        await step(tab, MIC + ".dataset.live === 'true' && "
                        + MIC + ".querySelector('.tl-seg[aria-label$=\": a siren wails\"]')")
