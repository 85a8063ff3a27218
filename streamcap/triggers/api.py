"""The triggers' HTTP JSON API on the daemon's HTTP server (docs/triggers-api.md).

Routes::

    GET    /api/triggers          every trigger: definition, origin, state per source
    GET    /api/triggers/<name>   one trigger (404 when there is none)
    PUT    /api/triggers/<name>   add or change it; the body is its table as JSON
    DELETE /api/triggers/<name>   remove it (404 when there is none)

A definition that does not validate gets 400 with the config file's dotted
messages, and nothing changes::

    {"error": "bad_request", "status": 400, "message": "<the first problem>",
     "errors": ["triggers.dog.min_hits: must be <= of_windows (got 5 > 3)", ...]}

Writes (PUT, DELETE) are refused, before the body is read:

* 403 when the request carries an ``Origin`` other than the server's own (a web
  page of another site; the live page is same-origin);
* 401 when ``[http] token_env`` is set and ``Authorization: Bearer <token>`` is
  missing or wrong (compared in constant time);
* 403 when the server listens beyond loopback and no token is set: anyone on the
  network could otherwise change what the daemon listens for;
* 415 for a PUT whose ``Content-Type`` is not ``application/json`` (so that a
  browser must ask first: a cross-site page cannot send it unasked).

The server's own checks (Host, sizes, time limits) come first, as for every route.
The pure parts (:func:`trigger_view`, :func:`parse_json_body`, :func:`write_refusal`)
are plain functions; :class:`TriggerApi` wires them to :class:`~streamcap.http.HttpServer`.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping
from typing import Final

from aiohttp import web

from streamcap.errors import ConfigError
from streamcap.http import HttpServer, error_payload, json_response
from streamcap.netpolicy import is_loopback, normalise_origin
from streamcap.triggers.jsonbody import parse_json_object
from streamcap.triggers.registry import (
    SourceState,
    TriggerRegistry,
    TriggerStates,
    TriggerStoreError,
    spec_table,
)
from streamcap.triggers.spec import TriggerSpec

__all__ = ["PATH", "TriggerApi", "parse_json_body", "trigger_view", "write_refusal"]

PATH: Final = "/api/triggers"


# --------------------------------------------------------------------------- pure logic


def _state(state: SourceState | None) -> dict[str, object]:
    if state is None:
        return {"state": "unknown", "changed_at": None, "last_fired_at": None,
                "fired_id": None, "score": None}
    return {"state": state.state.value, "changed_at": state.changed_at,
            "last_fired_at": state.last_fired_at, "fired_id": state.fired_id or None,
            "score": state.score}


def trigger_view(spec: TriggerSpec, *, origin: str, sources: Collection[str],
                 states: Mapping[str, SourceState]) -> dict[str, object]:
    """One trigger as the API shows it: its table, where it comes from, and per watched
    source its newest state (``"unknown"`` before the engine said anything)."""
    watched = list(spec.sources) or sorted(sources)
    return {"name": spec.name, "origin": origin, "definition": spec_table(spec),
            "sources": watched, "states": {src: _state(states.get(src)) for src in watched}}


def parse_json_body(body: bytes) -> tuple[dict[str, object] | None, str | None]:
    """``(the JSON object, None)`` or ``(None, what is wrong)``, never quoting the body."""
    return parse_json_object(body, what="the body",
                             expected="a JSON object (the trigger's table)")


def write_refusal(*, method: str, origin: str | None, own_origin: str,
                  authorization: str | None, token: str | None, server_host: str,
                  content_type: str) -> tuple[int, str] | None:
    """Why a write is refused, as ``(status, message)``; None when it may go on.

    See the module docstring for the rules and their order.
    """
    if origin is not None and normalise_origin(origin) != normalise_origin(own_origin):
        return 403, "triggers cannot be changed from a page of another origin"
    if token is not None:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), token.encode()):
            return 401, ("changing triggers needs 'Authorization: Bearer <token>' with the "
                         "token of http.token_env")
    elif not is_loopback(server_host):
        return 403, ("changing triggers over HTTP is refused: the server listens beyond "
                     "loopback and http.token_env is not set")
    if method == "PUT" and content_type != "application/json":
        return 415, "the body must be sent as Content-Type: application/json"
    return None


# --------------------------------------------------------------------------- routes


class TriggerApi:
    """The trigger routes (see the module docstring).

    Args:
        registry: The live set, changed by PUT and DELETE.
        states: The newest state per (trigger, source), shown by GET.
        token: The bearer token writes need (``[http] token_env``); None for none.
    """

    def __init__(self, registry: TriggerRegistry, states: TriggerStates, *,
                 token: str | None = None) -> None:
        self.registry = registry
        self.states = states
        self.token = token
        self._host = "127.0.0.1"

    def install(self, server: HttpServer) -> None:
        """Add the routes to ``server`` (before it starts)."""
        self._host = server.host
        server.add_json_route("GET", PATH, self._list, label="api.triggers")
        item = PATH + "/{name}"
        server.add_json_route("GET", item, self._get, label="api.trigger")
        server.add_route("PUT", item, self._put, label="api.trigger")
        server.add_route("DELETE", item, self._delete, label="api.trigger")

    def _view(self, spec: TriggerSpec) -> dict[str, object]:
        return trigger_view(spec, origin=self.registry.origin(spec.name),
                            sources=self.registry.sources, states=self.states.of(spec.name))

    async def _list(self, _request: web.Request) -> object:
        specs = self.registry.specs()
        return {"triggers": {name: self._view(specs[name]) for name in sorted(specs)},
                "sources": sorted(self.registry.sources),
                "max_triggers": self.registry.max_triggers,
                "write_token_required": self.token is not None}

    async def _get(self, request: web.Request) -> object:
        name = request.match_info["name"]
        spec = self.registry.specs().get(name)
        if spec is None:
            raise web.HTTPNotFound()
        return self._view(spec)

    def _refusal(self, request: web.Request) -> web.Response | None:
        refused = write_refusal(
            method=request.method, origin=request.headers.get("Origin"),
            own_origin=f"{request.scheme}://{request.host}",
            authorization=request.headers.get("Authorization"), token=self.token,
            server_host=self._host, content_type=request.content_type)
        if refused is None:
            return None
        status, message = refused
        headers = {"WWW-Authenticate": 'Bearer realm="streamcap"'} if status == 401 else None
        return json_response(status, error_payload(status, message), headers)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        name = request.match_info["name"]
        table, problem = parse_json_body(await request.read())
        if table is None:
            return json_response(400, {**error_payload(400, problem or "bad body"),
                                       "errors": [problem]})
        try:
            change = self.registry.put(name, table)
        except ConfigError as exc:
            return json_response(400, {**error_payload(400, exc.problems[0]),
                                       "errors": exc.problems})
        except TriggerStoreError:
            return json_response(503, error_payload(
                503, "the trigger could not be saved; nothing changed (see the log)"))
        assert change.spec is not None
        return json_response(201 if change.action == "added" else 200,
                             {"action": change.action, "trigger": self._view(change.spec)})

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        name = request.match_info["name"]
        try:
            change = self.registry.remove(name)
        except TriggerStoreError:
            return json_response(503, error_payload(
                503, "the removal could not be saved; nothing changed (see the log)"))
        if change is None:
            raise web.HTTPNotFound()
        return json_response(200, {"action": "removed", "name": name})
