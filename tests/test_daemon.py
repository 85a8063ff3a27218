"""The daemon's seams: extra sinks, and the live page's config read from the sinks' endpoints.

The whole daemon runs in test_pipeline.py (in-process) and test_daemon_e2e.py (subprocess).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_pipeline import runtime
from timing import scaled
from websockets.asyncio.client import connect

from streamcap.bus.inbox import Inbox
from streamcap.bus.plugin import SinkContext, SinkEndpoint
from streamcap.config import Config, parse_config
from streamcap.daemon import Daemon
from streamcap.models.runtime import InferenceRuntime
from streamcap.pipeline import WindowCaptioner

__all__ = ["runtime"]  # the fixture: one inference thread on the CPU

WAIT_S = scaled(30.0)


class Served:
    """A sink that says it serves clients, as a third-party plugin might."""

    accepts = frozenset({"caption"})

    def __init__(self, endpoint: SinkEndpoint | None) -> None:
        self.endpoint = endpoint

    async def run(self, inbox: Inbox, ctx: SinkContext) -> None:
        ctx.ready()
        async for _ in inbox:
            pass


def no_captioner() -> WindowCaptioner:
    raise AssertionError("these tests never load a model")


def config(tmp_path: Path, **sinks: dict[str, object]) -> Config:
    return parse_config({
        "daemon": {"node_id": "n1", "state_dir": str(tmp_path)},
        "sources": {"s": {"uri": "file:/dev/null", "window_s": 10, "hop_s": 5}},
        "sinks": sinks,
        "http": {"enabled": False},
    })


async def test_page_config_comes_from_the_sink_endpoint(tmp_path: Path,
                                                        runtime: InferenceRuntime) -> None:
    quiet = Served(None)  # not listening: skipped
    other = Served(SinkEndpoint(kind="sse", host="127.0.0.1", port=9000, scheme="http",
                                token_required=False))  # not a WebSocket feed: skipped
    ws = Served(SinkEndpoint(kind="websocket", host="127.0.0.1", port=8123, scheme="wss",
                             token_required=True))
    daemon = Daemon(config(tmp_path), no_captioner, runtime=runtime,
                    extra_sinks={"quiet": quiet, "other": other, "feed": ws})
    assert daemon.page_config() == {"node_id": "n1", "sink": "feed",
                                    "ws_url": "wss://127.0.0.1:8123/", "ws_port": 8123,
                                    "ws_scheme": "wss", "token_required": True}
    ws.endpoint = SinkEndpoint(kind="websocket", host="0.0.0.0", port=8123, scheme="ws",
                               token_required=False)
    wildcard = daemon.page_config()
    assert wildcard["ws_url"] is None and wildcard["ws_port"] == 8123  # the page's own host
    ws.endpoint = None
    assert daemon.page_config() == {"node_id": "n1", "ws_url": None}


async def test_page_config_points_at_the_running_websocket_sink(
        tmp_path: Path, runtime: InferenceRuntime) -> None:
    cfg = config(tmp_path, ws={"plugin": "websocket", "port": 0})
    daemon = Daemon(cfg, no_captioner, runtime=runtime)
    assert daemon.page_config()["ws_url"] is None  # not listening yet
    async with daemon.bus:
        await asyncio.wait_for(daemon.bus.wait_ready(), WAIT_S)
        page = daemon.page_config()
        assert page["sink"] == "ws" and page["token_required"] is False
        url = page["ws_url"]
        assert isinstance(url, str) and url.startswith("ws://127.0.0.1:")
        async with connect(url) as client:
            hello = json.loads(await asyncio.wait_for(client.recv(), WAIT_S))
            assert hello["type"] == "hello" and hello["node_id"] == "n1"


async def test_an_extra_sink_cannot_take_a_configured_name(tmp_path: Path,
                                                           runtime: InferenceRuntime) -> None:
    cfg = config(tmp_path, ws={"plugin": "websocket", "port": 0})
    with pytest.raises(ValueError, match=r"\[sinks.ws\] is configured already"):
        Daemon(cfg, no_captioner, runtime=runtime,
               extra_sinks={"ws": Served(None)})
