"""/api/search and /api/history: a real HttpServer on a free port, a real aiohttp client,
the fake store of history_fakes and a fake text embedder (a fixed table of vectors)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jsonschema
import numpy as np
import pytest
from daemon_process import WAIT_S, DaemonProcess, http_get, metric_samples, tiny_model_toml
from history_fakes import MODEL, FakeHistory, event, window
from timing import scaled

from streamcap.errors import HistoryError
from streamcap.history.api import HISTORY_OFF, HistoryApi
from streamcap.history.store import HistoryStore
from streamcap.http import HealthReport, HttpServer
from streamcap.messages import Float32Array
from streamcap.stats import Metrics

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_750_000_000.0
SOURCES = ("porch", "kitchen")
TIMEOUT = aiohttp.ClientTimeout(total=scaled(30))
VECTORS = {"dog": [1.0, 0.0, 0.0], "rain": [0.0, 1.0, 0.0]}
SCHEMA = json.loads((ROOT / "docs" / "streamcap.v1.schema.json").read_text())


async def fake_embed(text: str) -> Float32Array:
    await asyncio.sleep(0)
    vector = next((v for k, v in VECTORS.items() if k in text), [0.0, 0.0, 1.0])
    return np.asarray(vector, np.float32)


def history() -> FakeHistory:
    store = FakeHistory()
    store.write([
        window("porch", NOW - 3600, "a dog barks", vector=VECTORS["dog"]),
        window("porch", NOW - 3590, "a dog barks loudly", vector=[0.9, 0.1, 0.0]),
        window("porch", NOW - 600, "rain falls", vector=VECTORS["rain"]),
        window("kitchen", NOW - 1800, "a kettle whistles", vector=[0.0, 0.0, 1.0]),
        window("kitchen", NOW - 30 * 86400, "a dog barks", vector=VECTORS["dog"]),
        event("porch", NOW - 3595, "dog"),
        event("porch", NOW - 3000, "dog", state="off"),
    ])
    return store


@dataclass
class Api:
    base: str
    store: FakeHistory
    session: aiohttp.ClientSession
    server: HttpServer
    api: HistoryApi

    async def get(self, path: str, params: Mapping[str, Any] | list[tuple[str, str]] | None = None
                  ) -> tuple[int, Any]:
        query = "" if params is None else "?" + urlencode(params)
        async with self.session.get(self.base + path + query) as resp:
            assert resp.content_type == "application/json"
            return resp.status, await resp.json()


@pytest.fixture
async def make_api() -> AsyncIterator[Any]:
    made: list[Api] = []

    async def make(*, store: FakeHistory | None = None, off: bool = False,
                   embed: bool = True, max_concurrent: int = 4,
                   reader: Any = None) -> Api:
        backing = store or history()

        def open_reader() -> HistoryStore:
            if off:
                raise HistoryError(HISTORY_OFF)
            return reader() if reader is not None else backing.reader()

        server = HttpServer("127.0.0.1", 0, metrics=Metrics(),
                            health=lambda: HealthReport(live=True, ready=True),
                            page_config=dict)
        api = HistoryApi(open_reader, fake_embed if embed else None, MODEL, sources=SOURCES,
                         node_id="node-1", clock=lambda: NOW, max_concurrent=max_concurrent)
        api.install(server)
        await server.start()
        session = aiohttp.ClientSession(timeout=TIMEOUT)
        made.append(Api(f"http://127.0.0.1:{server.bound_port}", backing, session, server, api))
        return made[-1]

    yield make
    for api in made:
        await api.session.close()
        await api.server.close()


# --------------------------------------------------------------------------- /api/search


async def test_search_answers_the_agreed_json(make_api: Any) -> None:
    api = await make_api()
    status, body = await api.get("/api/search", {"q": "dog barking", "since": "2h"})
    assert status == 200
    assert set(body) == {"query", "since", "until", "sources", "hits", "model"}
    assert body["query"] == "dog barking" and body["since"] == NOW - 7200
    assert body["until"] is None and body["sources"] == [] and body["model"] == MODEL
    first = body["hits"][0]
    assert set(first) == {"source_id", "start_at", "end_at", "score", "similarity",
                          "text_match", "best_window_id", "window_ids", "captions", "model"}
    assert first["source_id"] == "porch"
    assert (first["start_at"], first["end_at"]) == (NOW - 3600, NOW - 3580)
    assert first["similarity"] == pytest.approx(1.0) and first["text_match"] == 0.5
    assert first["captions"] == ["a dog barks", "a dog barks loudly"]
    assert len(first["window_ids"]) == 2 and first["best_window_id"] in first["window_ids"]
    # since 2h: the month-old kitchen dog is not there
    assert all(h["start_at"] >= NOW - 7200 for h in body["hits"])
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert api.store.readers and all(r.closed for r in api.store.readers)


async def test_search_filters_sources_times_and_limits(make_api: Any) -> None:
    api = await make_api()
    _, body = await api.get("/api/search", [("q", "dog"), ("source", "kitchen")])
    assert {h["source_id"] for h in body["hits"]} == {"kitchen"} and body["sources"] == ["kitchen"]
    assert len(body["hits"]) == 2
    _, body = await api.get("/api/search", [("q", "dog"), ("source", "kitchen"),
                                            ("source", "porch"), ("limit", "1")])
    assert len(body["hits"]) == 1 and body["sources"] == ["kitchen", "porch"]
    _, body = await api.get("/api/search", {"q": "dog", "since": str(NOW - 40 * 86400),
                                            "until": "2025-06-15T00:00:00Z"})
    assert body["until"] == 1749945600.0
    assert [h["start_at"] for h in body["hits"]] == [NOW - 30 * 86400]


async def test_search_without_a_retriever_matches_caption_words(make_api: Any) -> None:
    api = await make_api(embed=False)
    status, body = await api.get("/api/search", {"q": "kettle"})
    assert status == 200
    assert [h["captions"] for h in body["hits"]] == [["a kettle whistles"]]
    assert body["hits"][0]["similarity"] is None


@pytest.mark.parametrize(("params", "message"), [
    ({}, "q: expected the words to search for"),
    ({"q": ""}, "q: expected the words to search for"),
    ({"q": "\x00\x01 "}, "q: expected the words to search for"),
    ({"q": "x" * 501}, "q: expected at most 500 characters"),
    ({"q": "dog", "limit": "0"}, "limit: expected an integer from 1 to 100"),
    ({"q": "dog", "limit": "101"}, "limit: expected an integer from 1 to 100"),
    ({"q": "dog", "limit": "ten"}, "limit: expected an integer from 1 to 100"),
    ({"q": "dog", "since": "yesterday"}, "since: expected a time ago"),
    ({"q": "dog", "since": "2024-05-01T10:00"}, "since: has no time zone"),
    ({"q": "dog", "until": "soon"}, "until: expected a time ago"),
    ({"q": "dog", "since": "1h", "until": "2h"}, "until: must be later than since"),
    ({"q": "dog", "source": "garage"}, "source: unknown source 'garage' (known: kitchen, porch)"),
])
async def test_search_refuses_bad_parameters_naming_them(make_api: Any, params: dict[str, str],
                                                         message: str) -> None:
    api = await make_api()
    status, body = await api.get("/api/search", params)
    assert status == 400, body
    assert body["error"] == "bad_request" and body["message"].startswith(message), body


@pytest.mark.parametrize("q", ['"', "'", 'dog" OR "x', "NEAR(a b)", "*", "-", "dog\x00x", "^",
                               "a:b", "dog AND NOT cat", "' OR 1=1 --"])
async def test_search_takes_query_syntax_as_plain_words(make_api: Any, q: str) -> None:
    api = await make_api(embed=False)
    status, body = await api.get("/api/search", {"q": q})
    assert status == 200, body
    if not q.strip('"\'*-^'):  # no word in it: nothing to match without an embedder
        assert body["hits"] == []
        return
    if "dog" in q:  # the word is found whatever surrounds it
        assert any("a dog barks" in h["captions"] for h in body["hits"]), body
    for hit in body["hits"]:  # only windows holding one of the words
        words = {w for c in hit["captions"] for w in c.split()}
        assert words & {"dog", "x", "near", "a", "b", "cat"}, hit


async def test_no_history_is_503_with_a_clear_message(make_api: Any) -> None:
    api = await make_api(off=True)
    for path, params in (("/api/search", {"q": "dog"}), ("/api/history", {})):
        status, body = await api.get(path, params)
        assert status == 503 and body["message"] == HISTORY_OFF


async def test_a_failing_store_is_503_without_its_details(make_api: Any) -> None:
    class Broken(FakeHistory):
        def text_search(self, *args: Any, **kwargs: Any) -> list[str]:
            raise HistoryError("/secret/place/history.sqlite3: disk I/O error")

    api = await make_api(embed=False, reader=Broken)
    status, body = await api.get("/api/search", {"q": "dog"})
    assert status == 503 and "cannot be read" in body["message"]
    assert "/secret" not in body["message"]


async def test_more_searches_at_once_than_allowed_get_503(make_api: Any) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    class Slow(FakeHistory):
        def text_search(self, *args: Any, **kwargs: Any) -> list[str]:
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(scaled(30))
            return []

    api = await make_api(embed=False, max_concurrent=1, reader=Slow)
    first = asyncio.create_task(api.get("/api/search", {"q": "dog"}))
    await asyncio.wait_for(started.wait(), scaled(30))
    status, body = await api.get("/api/search", {"q": "dog"})
    assert status == 503 and "too many history requests at once" in body["message"]
    release.set()
    assert (await first)[0] == 200
    assert (await api.get("/api/search", {"q": "dog"}))[0] == 200  # the slot is free again
    # a client that goes away frees the slot only once the store work is over
    started.clear()
    release.clear()
    gone = asyncio.create_task(api.get("/api/search", {"q": "dog"}))
    await asyncio.wait_for(started.wait(), scaled(30))
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    status, body = await api.get("/api/search", {"q": "dog"})
    assert status == 503 and "too many" in body["message"]
    release.set()
    for _ in range(100):  # until the thread has ended (a bounded wait, not a timing claim)
        await asyncio.sleep(scaled(0.05))
        status, body = await api.get("/api/search", {"q": "dog"})
        if status == 200:
            break
    assert status == 200
    async with api.session.get(api.base + "/metrics") as resp:
        samples = metric_samples(await resp.text(), "streamcap_http_requests_total")
    assert samples['{route="api.search",code="503"}'] >= 2


# --------------------------------------------------------------------------- /api/history


async def test_history_pages_frames_in_time_order_both_ways(make_api: Any) -> None:
    api = await make_api()
    seen: list[dict[str, Any]] = []
    params: dict[str, str] = {"limit": "2"}
    for _ in range(10):
        status, body = await api.get("/api/history", params)
        assert status == 200 and set(body) == {"items", "next"}
        assert len(body["items"]) <= 2
        seen += body["items"]
        if body["next"] is None:
            break
        params = {"limit": "2", "cursor": body["next"]}
    assert len(seen) == 7
    times = [f["captured_at"] for f in seen]
    assert times == sorted(times)
    assert {f["type"] for f in seen} == {"caption", "trigger"}
    for frame in seen:
        jsonschema.validate(frame, SCHEMA)
        assert frame["node_id"] == "node-1"
    newest: list[dict[str, Any]] = []
    params = {"limit": "3", "order": "desc"}
    while True:
        _, body = await api.get("/api/history", params)
        newest += body["items"]
        if body["next"] is None:
            break
        params = {"limit": "3", "order": "desc", "cursor": body["next"]}
    assert newest == seen[::-1]


async def test_history_filters_by_source_and_time(make_api: Any) -> None:
    api = await make_api()
    _, body = await api.get("/api/history", {"source": "porch", "since": "1h", "until": "now"})
    assert [(f["type"], f["source_id"]) for f in body["items"]] == [
        ("caption", "porch"), ("trigger", "porch"), ("caption", "porch"), ("trigger", "porch"),
        ("caption", "porch")]
    assert body["items"][0]["text"] == "a dog barks"


@pytest.mark.parametrize(("params", "message"), [
    ({"limit": "501"}, "limit: expected an integer from 1 to 500"),
    ({"limit": "0"}, "limit: expected an integer from 1 to 500"),
    ({"order": "sideways"}, "order: expected 'asc' or 'desc'"),
    ({"cursor": "not-a-cursor"}, "cursor: expected the 'next' of a previous page"),
    ({"cursor": ""}, "cursor: expected the 'next' of a previous page"),
    ({"cursor": "x" * 2000}, "cursor: expected the 'next' of a previous page"),
    ({"since": "-1h"}, "since: expected a time ago"),
    ({"source": "attic"}, "source: unknown source 'attic'"),
])
async def test_history_refuses_bad_parameters_naming_them(make_api: Any, params: dict[str, str],
                                                          message: str) -> None:
    api = await make_api()
    status, body = await api.get("/api/history", params)
    assert status == 400 and body["message"].startswith(message), body


async def test_a_cursor_of_the_other_order_is_refused(make_api: Any) -> None:
    api = await make_api()
    _, body = await api.get("/api/history", {"limit": "1"})
    status, body = await api.get("/api/history", {"limit": "1", "order": "desc",
                                                  "cursor": body["next"]})
    assert status == 400 and body["message"].startswith("cursor:")


async def test_a_forged_cursor_is_a_400_from_the_sqlite_store(make_api: Any,
                                                               tmp_path: Path) -> None:
    from streamcap.history.sqlite import SqliteHistory

    path = tmp_path / "h.sqlite3"
    SqliteHistory(path).close()
    api = await make_api(reader=lambda: SqliteHistory(path, read_only=True))
    raw = json.dumps([1.0, 0, 10 ** 20, "a"]).encode()  # a row beyond any rowid
    forged = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    status, body = await api.get("/api/history", {"cursor": forged})
    assert status == 400 and body["message"].startswith("cursor:"), body


class Unreadable:
    """A reader whose pages fail as a store that cannot be read does."""

    location = "memory:unreadable"

    def page(self, *args: object, **kwargs: object) -> object:
        raise HistoryError(f"history store {self.location}: cannot read history (disk I/O)")

    def close(self) -> None:
        pass


async def test_a_store_error_on_a_request_with_a_cursor_is_not_a_bad_cursor(
        make_api: Any) -> None:
    api = await make_api()
    _, body = await api.get("/api/history", {"limit": "1"})
    failing = await make_api(reader=Unreadable)
    status, text = await failing.get("/api/history", {"limit": "1", "cursor": body["next"]})
    assert status == 503 and "cursor" not in str(text), text


# --------------------------------------------------------------------------- in the daemon


@pytest.mark.slow
def test_the_daemon_serves_the_routes_for_its_sources(tmp_path: Path,
                                                      free_tcp_port: int) -> None:
    port = free_tcp_port
    example = ROOT / "streamcap" / "data" / "example.ogg"
    config = tmp_path / "streamcap.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n'
                      f'{tiny_model_toml(n_candidates=2, max_new_tokens=4)}\n'
                      f'[sources.porch]\nuri = "file:{example}?loop=true"\n\n'
                      f'[sinks.archive]\nplugin = "jsonl"\npath = "{tmp_path / "a.jsonl"}"\n\n'
                      f'[http]\nport = {port}\n')
    daemon = DaemonProcess.start(config, env={}, log=tmp_path / "daemon.log",
                                 jsonl=tmp_path / "a.jsonl", http_port=port)
    try:
        def routes_up() -> tuple[tuple[int, str, str] | None, bool]:
            try:
                answer = http_get(daemon.http("/api/search?q=dog&source=attic"))
            except OSError:
                return None, False
            return answer, answer[0] != 404

        status, _, body = daemon.poll(routes_up, lambda a: f"no /api/search: {a}",
                                      timeout_s=WAIT_S)
        assert status == 400
        assert json.loads(body)["message"] == "source: unknown source 'attic' (known: porch)"
        status, _, body = http_get(daemon.http("/api/history?since=yesterday"))
        assert status == 400 and json.loads(body)["message"].startswith("since: expected")
        status, _, body = http_get(daemon.http("/api/search?q=dog&source=porch"))
        answer = json.loads(body)
        if status == 503:  # no store in this daemon (yet)
            assert answer["message"] == HISTORY_OFF
        else:
            assert status == 200 and answer["sources"] == ["porch"]
            assert answer["model"].startswith("streamcap-tiny-")
    finally:
        assert daemon.stop() == 0
