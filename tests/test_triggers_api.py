"""The triggers' HTTP API: a real HttpServer on a free port, a real aiohttp client, real files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_process import metric_samples
from timing import scaled

from streamcap.config import parse_config
from streamcap.errors import ConfigError
from streamcap.http import HealthReport, HttpServer
from streamcap.messages import TriggerEvent, TriggerState
from streamcap.stats import Metrics
from streamcap.triggers.api import TriggerApi, parse_json_body, write_refusal
from streamcap.triggers.registry import FILE_NAME, TriggerRegistry, TriggerStates
from streamcap.triggers.spec import TriggerSpec, read_trigger

SOURCES = ("porch", "kitchen")
TOKEN = "api-test-token-7d1e"
TIMEOUT = aiohttp.ClientTimeout(total=scaled(30))


@dataclass
class Api:
    base: str
    registry: TriggerRegistry
    states: TriggerStates
    server: HttpServer
    session: aiohttp.ClientSession
    heard: list[Mapping[str, TriggerSpec]]

    async def call(self, method: str, path: str, *, body: object = None, raw: bytes | None = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        all_headers.update(headers or {})
        async with self.session.request(method, self.base + path, data=data,
                                        headers=all_headers) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def make_api(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[HttpServer, aiohttp.ClientSession]] = []

    async def make(*, host: str = "127.0.0.1", token: str | None = None) -> Api:
        cfg = {"dog": read_trigger("dog", {"text": ["a dog barks"], "sources": ["porch"]},
                                   "triggers.dog").result()}
        registry = TriggerRegistry.open(cfg, SOURCES, tmp_path / "triggers")
        heard: list[Mapping[str, TriggerSpec]] = []
        registry.subscribe(heard.append)
        states = TriggerStates()
        server = HttpServer(host, 0, metrics=Metrics(),
                            health=lambda: HealthReport(live=True, ready=True),
                            page_config=dict)
        TriggerApi(registry, states, token=token).install(server)
        await server.start()
        session = aiohttp.ClientSession(timeout=TIMEOUT)
        made.append((server, session))
        return Api(f"http://127.0.0.1:{server.bound_port}", registry, states, server, session,
                   heard)

    yield make
    for server, session in made:
        await session.close()
        await server.close()


GLASS = {"text": ["glass breaks"], "negative": ["a glass clinks"], "threshold": 0.35,
         "min_hits": 1, "of_windows": 2, "cooldown_s": 30, "off_after_s": 5}


async def test_list_shows_definitions_origin_and_state_per_watched_source(make_api: Any) -> None:
    api: Api = await make_api()
    status, body = await api.call("GET", "/api/triggers")
    assert status == 200
    assert body["sources"] == ["kitchen", "porch"] and body["write_token_required"] is False
    dog = body["triggers"]["dog"]
    assert dog["origin"] == "config" and dog["sources"] == ["porch"]
    assert dog["definition"]["text"] == ["a dog barks"] and dog["definition"]["threshold"] == "auto"
    assert dog["states"] == {"porch": {"state": "unknown", "changed_at": None,
                                       "last_fired_at": None, "fired_id": None, "score": None}}
    api.states.observe(TriggerEvent(
        event_id="r1-dog-porch-1", trigger="dog", source_id="porch", state=TriggerState.ON,
        score=0.61, threshold=0.4, start_s=3.0, end_s=8.0, captured_at=1700000000.5, run_id="r1"))
    status, one = await api.call("GET", "/api/triggers/dog")
    assert status == 200
    assert one["states"]["porch"] == {"state": "on", "changed_at": 1700000000.5,
                                      "last_fired_at": 1700000000.5, "fired_id": "r1-dog-porch-1",
                                      "score": 0.61}


async def test_put_adds_then_changes_and_it_is_saved(make_api: Any, tmp_path: Path) -> None:
    api: Api = await make_api()
    status, body = await api.call("PUT", "/api/triggers/glass", body=GLASS)
    assert status == 201 and body["action"] == "added"
    assert body["trigger"]["definition"] == {**GLASS, "examples": [], "sources": []}
    assert body["trigger"]["origin"] == "runtime"
    assert body["trigger"]["sources"] == ["kitchen", "porch"]  # empty = every source
    assert set(api.heard[-1]) == {"dog", "glass"}
    status, body = await api.call("PUT", "/api/triggers/glass", body={**GLASS, "min_hits": 2})
    assert status == 200 and body["action"] == "changed"
    saved = json.loads((tmp_path / "triggers" / FILE_NAME).read_text(encoding="utf-8"))
    assert saved["triggers"]["glass"]["min_hits"] == 2
    status, body = await api.call("GET", "/api/triggers")
    assert set(body["triggers"]) == {"dog", "glass"}


async def test_a_bad_definition_gets_the_config_files_messages_and_changes_nothing(
        make_api: Any, tmp_path: Path) -> None:
    api: Api = await make_api()
    table = {"text": ["glass breaks"], "min_hits": 5, "of_windows": 3, "sources": ["garage"],
             "cooldown_s": -1}
    status, body = await api.call("PUT", "/api/triggers/glass", body=table)
    assert status == 400
    with pytest.raises(ConfigError) as from_file:
        parse_config({"sources": {s: {"uri": "file:/x.wav"} for s in SOURCES},
                      "triggers": {"glass": table}})
    assert body["errors"] == from_file.value.problems
    assert body["error"] == "bad_request" and body["message"] == body["errors"][0]
    assert any(e.startswith("triggers.glass.cooldown_s:") for e in body["errors"])
    assert api.heard == [] and not (tmp_path / "triggers" / FILE_NAME).exists()
    status, _ = await api.call("GET", "/api/triggers/glass")
    assert status == 404


@pytest.mark.parametrize(("raw", "expected"), [
    (b"{\"text\": [\"a secret phrase\"", "the body is not valid JSON"),
    (b'{"text": ["x"], "threshold": NaN}', "the body holds NaN is not a JSON number"),
    (b'["a dog barks"]', "the body must be a JSON object (the trigger's table)"),
    (b"\xff\xfe", "the body is not UTF-8"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "the body nests deeper than 32 levels"),
])
async def test_a_body_that_is_not_a_json_table_is_refused_without_quoting_it(
        make_api: Any, raw: bytes, expected: str) -> None:
    api: Api = await make_api()
    status, body = await api.call("PUT", "/api/triggers/glass", raw=raw)
    assert status == 400 and body["errors"] == [expected]
    assert "secret phrase" not in json.dumps(body)
    assert parse_json_body(raw) == (None, expected)


async def test_a_huge_integer_threshold_is_a_400_naming_the_key(make_api: Any) -> None:
    api: Api = await make_api()
    raw = b'{"text": ["a cat"], "threshold": ' + str(10 ** 400).encode() + b"}"
    status, body = await api.call("PUT", "/api/triggers/cat", raw=raw)
    assert status == 400, body
    assert body["errors"][0].startswith("triggers.cat.threshold: must be between -1 and 1")
    assert api.heard == [] and "cat" not in api.registry.specs()


async def test_delete_removes_and_unknown_names_are_404(make_api: Any) -> None:
    api: Api = await make_api()
    status, body = await api.call("DELETE", "/api/triggers/dog")
    assert (status, body) == (200, {"action": "removed", "name": "dog"})
    assert api.heard[-1] == {}
    for method in ("DELETE", "GET"):
        status, body = await api.call(method, "/api/triggers/dog")
        assert status == 404 and body["error"] == "not_found"


async def test_writes_from_another_origin_or_not_json_are_refused(make_api: Any) -> None:
    api: Api = await make_api()
    status, body = await api.call("PUT", "/api/triggers/glass", body=GLASS,
                                  headers={"Origin": "http://evil.example"})
    assert status == 403 and "another origin" in body["message"]
    status, _ = await api.call("DELETE", "/api/triggers/dog",
                               headers={"Origin": "http://evil.example"})
    assert status == 403
    status, body = await api.call("PUT", "/api/triggers/glass", raw=json.dumps(GLASS).encode(),
                                  headers={"Content-Type": "text/plain"})
    assert status == 415
    assert set(api.registry.specs()) == {"dog"} and api.heard == []
    status, _ = await api.call("PUT", "/api/triggers/glass", body=GLASS,
                               headers={"Origin": api.base})  # the page's own origin
    assert status == 201


async def test_with_a_token_writes_need_it_and_reads_do_not(make_api: Any) -> None:
    api: Api = await make_api(token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, body = await api.call("PUT", "/api/triggers/glass", body=GLASS, headers=headers)
        assert status == 401 and TOKEN not in json.dumps(body)
    status, _ = await api.call("GET", "/api/triggers")
    assert status == 200
    status, _ = await api.call("PUT", "/api/triggers/glass", body=GLASS,
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 201


async def test_beyond_loopback_without_a_token_writes_are_refused(make_api: Any) -> None:
    api: Api = await make_api(host="0.0.0.0")
    status, body = await api.call("PUT", "/api/triggers/glass", body=GLASS)
    assert status == 403 and "http.token_env" in body["message"]
    status, _ = await api.call("GET", "/api/triggers")
    assert status == 200
    assert set(api.registry.specs()) == {"dog"}
    text = api.server.metrics.render()
    assert metric_samples(text, "streamcap_http_requests_total")[
        '{code="403",route="api.trigger"}'] == 1


async def test_a_body_over_the_server_limit_gets_413(make_api: Any) -> None:
    api: Api = await make_api()
    status, body = await api.call("PUT", "/api/triggers/glass",
                                  raw=b'{"text": ["' + b"a" * 70_000 + b'"]}')
    assert status == 413 and body["status"] == 413


def refusal(**changes: str | None) -> int | None:
    """The status :func:`write_refusal` gives a loopback PUT of JSON with ``changes``."""
    args: dict[str, str | None] = {
        "method": "PUT", "origin": None, "own_origin": "http://127.0.0.1:8080",
        "authorization": None, "token": None, "server_host": "127.0.0.1",
        "content_type": "application/json", **changes}
    got = write_refusal(**args)  # type: ignore[arg-type]
    return None if got is None else got[0]


def test_write_refusal_rules() -> None:
    assert refusal() is None
    assert refusal(origin="http://127.0.0.1:8080") is None
    assert refusal(origin="null") == 403
    assert refusal(origin="http://127.0.0.1:8081") == 403
    assert refusal(server_host="::1") is None
    assert refusal(server_host="localhost") is None
    assert refusal(server_host="192.168.1.5") == 403
    assert refusal(server_host="192.168.1.5", token="t", authorization="Bearer t") is None
    assert refusal(token="t", authorization="Bearer t ") is None
    assert refusal(token="t", authorization="bearer x") == 401
    assert refusal(method="DELETE", content_type="") is None
    assert refusal(content_type="text/plain") == 415
