"""The live page in headless Chromium, fed by a small in-test WebSocket server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chromium import chromium_path, dump_dom, screenshot
from timing import scaled
from websockets.asyncio.server import ServerConnection, serve

from streamcap.http import HealthReport, HttpServer
from streamcap.stats import Metrics
from streamcap.triggers.api import TriggerApi
from streamcap.triggers.registry import TriggerRegistry, TriggerStates
from streamcap.triggers.spec import read_trigger

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (apt-get install --no-install-recommends chromium)")

NODE = "test-node"
PAGE_TIMEOUT_S = scaled(60.0)


def caption(source_id: str, seq: int, text: str, *, window_id: str) -> dict[str, object]:
    return {"type": "caption", "v": 1, "node_id": NODE, "source_id": source_id, "seq": seq,
            "window_id": window_id, "text": text, "score": 0.734, "captured_at": time.time(),
            "start_s": 10.0 * seq, "end_s": 10.0 * seq + 10.0, "lag_s": 0.4, "flagged": False}


@dataclass
class Feed:
    """The WebSocket side: frames to send per connection, and what clients did."""

    frames_for: Callable[[int], list[dict[str, object]]]
    paths: list[str] = field(default_factory=list)
    received: list[object] = field(default_factory=list)
    close_after_send: bool = False
    hello_kinds: list[str] | None = None

    async def handler(self, ws: ServerConnection) -> None:
        self.paths.append(ws.request.path if ws.request else "")
        frames = self.frames_for(len(self.paths))
        capabilities: dict[str, object] = {"sources": ["mic-1"]}
        if self.hello_kinds is not None:
            capabilities["kinds"] = self.hello_kinds
        await ws.send(json.dumps({"type": "hello", "v": 1, "protocol": "streamcap.v1",
                                  "node_id": NODE, "capabilities": capabilities}))
        for frame in frames:
            await ws.send(json.dumps(frame))
        if self.close_after_send:
            await ws.close()
            return
        async for message in ws:
            self.received.append(json.loads(message))


@dataclass
class Site:
    page_url: str
    feed: Feed


@asynccontextmanager
async def start_site(feed: Feed, ws_host: str = "127.0.0.1",
                     triggers: TriggerRegistry | None = None) -> AsyncIterator[Site]:
    async with serve(feed.handler, "127.0.0.1", 0) as ws_server:
        ws_port = next(iter(ws_server.sockets)).getsockname()[1]

        def page_config() -> Mapping[str, object]:
            return {"ws_url": f"ws://{ws_host}:{ws_port}/", "node_id": NODE,
                    "token_required": True}

        http = HttpServer("127.0.0.1", 0, metrics=Metrics(),
                          health=lambda: HealthReport(live=True, ready=True),
                          page_config=page_config)
        if triggers is not None:
            TriggerApi(triggers, TriggerStates()).install(http)
        async with http:
            yield Site(f"http://127.0.0.1:{http.bound_port}/?token=s3cret", feed)


def card_html(dom: str, source_id: str) -> str:
    match = re.search(rf'<section[^>]*data-source="{re.escape(source_id)}"[^>]*>(.*?)</section>',
                      dom, re.DOTALL)
    assert match, f"no card for {source_id} in:\n{dom}"
    return match[1]


@pytest.fixture
async def one_shot_site() -> AsyncIterator[Site]:
    feed = Feed(lambda n: [
        {"type": "status", "v": 1, "source_id": "mic-1", "state": "running",
         "reason": "opened hw:1", "at": time.time(), "retry_in_s": None, "attempt": 0},
        caption("mic-1", 1, "a dog barks <b>twice</b> & a door slams", window_id="w-1"),
        caption("radio", 1, "music plays", window_id="w-2"),
    ])
    async with start_site(feed, ws_host="0.0.0.0") as site:
        yield site


async def test_page_shows_a_caption_in_its_source_card(one_shot_site: Site) -> None:
    dom = await asyncio.to_thread(
        dump_dom, one_shot_site.page_url, PAGE_TIMEOUT_S,
        wait_for="document.querySelectorAll('.caption').length >= 2")
    mic = card_html(dom, "mic-1")
    # the caption's text, escaped: the markup in it is shown, not interpreted
    assert "a dog barks &lt;b&gt;twice&lt;/b&gt; &amp; a door slams" in mic
    assert "<b>" not in dom
    assert "score 0.73" in mic
    assert re.search(r'class="badge" data-state="running">running<', mic)
    assert "opened hw:1" in mic
    assert 'role="log"' in mic and 'aria-live="polite"' in mic
    assert "music plays" in card_html(dom, "radio")
    assert "music plays" not in mic
    assert f'<dd id="node">{NODE}</dd>' in dom
    # the token from the page URL went onto the WebSocket URL, and the page subscribed
    assert one_shot_site.feed.paths == ["/?token=s3cret"]
    subscribe = {"type": "subscribe", "sources": "*", "kinds": ["caption", "status"]}
    # the frame was sent before the captions arrived; let the handler see it
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while subscribe not in one_shot_site.feed.received and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert subscribe in one_shot_site.feed.received


async def test_page_reconnects_and_does_not_repeat_backfill() -> None:
    def frames(connection: int) -> list[dict[str, object]]:
        out = [caption("mic-1", 1, "first caption", window_id="w-1")]  # replayed every time
        if connection >= 2:
            out.append(caption("mic-1", 2, "second caption", window_id="w-2"))
        return out

    feed = Feed(frames, close_after_send=True)
    async with start_site(feed) as site:
        dom = await asyncio.to_thread(
            dump_dom, site.page_url, PAGE_TIMEOUT_S,
            wait_for="document.body.textContent.includes('second caption')")
        # the card's caption list (its timeline shows the captions too)
        mic = card_html(dom, "mic-1").partition('<ol class="captions"')[2]
        assert len(feed.paths) >= 2
        assert mic.count("first caption") == 1
        assert mic.count("second caption") == 1
        assert mic.index("second caption") < mic.index("first caption")  # newest first


# --------------------------------------------------------------------------- triggers

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "live-page-triggers.png"
UPDATE_SCREENSHOTS_ENV = "STREAMCAP_UPDATE_SCREENSHOTS"


def trigger(name: str, source_id: str, state: str, n: int, *, at: float,
            fired_id: str | None = None) -> dict[str, object]:
    return {"type": "trigger", "v": 1, "node_id": NODE, "run_id": "r1",
            "event_id": f"r1-{name}-{source_id}-{n}", "fired_id": fired_id, "trigger": name,
            "source_id": source_id, "state": state, "score": 0.62, "threshold": 0.4,
            "start_s": 1.0, "end_s": 6.0, "captured_at": at, "model": "tiny", "caption": None}


def trigger_item(card: str, name: str) -> str:
    match = re.search(rf'<li class="trigger" data-trigger="{name}"[^>]*>(.*?)</li>', card,
                      re.DOTALL)
    assert match, f"no trigger {name} in:\n{card}"
    return match[0]


async def test_page_shows_each_sources_triggers_and_their_live_state(tmp_path: Path) -> None:
    fired_at = time.time() - 30
    feed = Feed(lambda n: [
        caption("mic-1", 1, "a dog barks", window_id="w-1"),
        trigger("dog", "mic-1", "off", 1, at=float("nan")) | {"score": None, "threshold": None,
                                                             "captured_at": None},
        trigger("dog", "mic-1", "on", 2, at=fired_at),
        trigger("glass", "radio", "on", 3, at=fired_at - 60),
        trigger("glass", "radio", "off", 4, at=fired_at - 50, fired_id="r1-glass-radio-3"),
    ], hello_kinds=["caption", "status", "trigger"])
    specs = {"dog": read_trigger("dog", {"text": ["a dog barks"], "sources": ["mic-1"]},
                                 "triggers.dog").result(),
             "glass": read_trigger("glass", {"text": ["glass breaks"]},
                                   "triggers.glass").result()}
    registry = TriggerRegistry.open(specs, ("mic-1", "radio"), tmp_path / "triggers")
    async with start_site(feed, triggers=registry) as site:
        wait = ("document.querySelectorAll('.trigger[data-state=\"on\"]').length === 1 && "
                "document.querySelectorAll('.trigger[data-state=\"off\"]').length === 1")
        dom = await asyncio.to_thread(dump_dom, site.page_url, PAGE_TIMEOUT_S, wait_for=wait)
        target = SCREENSHOT if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1" else \
            tmp_path / "page.png"
        await asyncio.to_thread(screenshot, site.page_url, target, PAGE_TIMEOUT_S,
                                wait_for=wait, width=1000, height=520)
    mic, radio = card_html(dom, "mic-1"), card_html(dom, "radio")
    dog = trigger_item(mic, "dog")
    assert 'data-state="on"' in dog and ">on<" in dog and "fired " in dog
    assert 'class="fired"' in dog
    assert 'data-trigger="dog"' not in radio  # dog watches mic-1 only
    glass_radio = trigger_item(radio, "glass")
    assert 'data-state="off"' in glass_radio and "fired " in glass_radio  # keeps its last firing
    glass_mic = trigger_item(mic, "glass")  # every source: known from /api/triggers
    assert 'data-state="unknown"' in glass_mic and "fired" not in glass_mic
    subscribe = {"type": "subscribe", "sources": "*", "kinds": ["caption", "status", "trigger"]}
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while subscribe not in feed.received and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert subscribe in feed.received
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
