"""The history's HTTP JSON API on the daemon's HTTP server (docs/search.md).

Routes::

    GET /api/search?q=TEXT&source=S&since=T&until=T&limit=N
        -> {"query", "since", "until", "sources", "hits": [...], "model"}
    GET /api/history?source=S&since=T&until=T&limit=N&cursor=C&order=asc|desc
        -> {"items": [streamcap.v1 frames], "next": cursor or null}

``source`` may repeat; ``since``/``until`` take ``2h``/``30m``/``7d``/``90s``
(ago), ``now``, ISO 8601 with a zone, or UNIX seconds. Every bad parameter is a
400 whose message names it (``since: expected ...``); no history (``[history]
enabled = false``, or the store could not be opened) is a 503, and so is a
search beyond :data:`MAX_CONCURRENT` at once (they take a store connection and
a worker thread each). Refusals show in ``streamcap_http_requests_total`` by
route and code.

The store is read on worker threads (:func:`asyncio.to_thread`), one reader
handle per request; the query's text embedding runs on the inference runtime's
side thread (the ``embed_text`` callable the daemon passes in), never on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any, Final, TypeVar

from aiohttp import web

from streamcap.bus.wire import to_wire
from streamcap.errors import ConfigError, HistoryCursorError, HistoryError, ModelError
from streamcap.history.records import HistoryPage, SearchHit, Span, to_message
from streamcap.history.search import (
    check_limit,
    check_query,
    parse_when,
    run_search,
)
from streamcap.history.store import HistoryStore
from streamcap.http import HttpServer
from streamcap.logs import get_logger
from streamcap.messages import Float32Array

__all__ = ["HISTORY_PATH", "MAX_CONCURRENT", "SEARCH_PATH", "HistoryApi", "hit_view",
           "page_view", "read_span"]

_log = get_logger(__name__)

SEARCH_PATH: Final = "/api/search"
HISTORY_PATH: Final = "/api/history"
MAX_CONCURRENT: Final = 4
"""Searches and history pages served at once; more get 503."""
HISTORY_DEFAULT_LIMIT: Final = 100
HISTORY_MAX_LIMIT: Final = 500
MAX_CURSOR_CHARS: Final = 1000
HISTORY_OFF: Final = ("history is off: [history] enabled = false, or the store could not be "
                      "opened (see the daemon's log)")

T = TypeVar("T")
OpenReader = Callable[[], HistoryStore]
"""A new reader handle on the store (closed by the caller); raises HistoryError when
there is no history."""
EmbedText = Callable[[str], Awaitable[Float32Array]]
"""The query's text embedding by the loaded model's retriever (off the event loop)."""


# --------------------------------------------------------------------------- pure logic


def read_span(query: Mapping[str, str], sources: Collection[str], now: float,
              all_sources: list[str]) -> Span:
    """The ``source``/``since``/``until`` parameters as a :class:`Span`.

    ``all_sources`` are every ``source`` value given (it may repeat).

    Raises:
        ConfigError: a parameter is bad; the message names it.
    """
    for source in all_sources:
        if source not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise ConfigError(f"source: unknown source {source[:100]!r} (known: {known})")
    since = None if query.get("since") is None else parse_when(query["since"], now,
                                                                name="since")
    until = None if query.get("until") is None else parse_when(query["until"], now,
                                                                name="until")
    if since is not None and until is not None and until <= since:
        raise ConfigError(f"until: must be later than since (got since {since:.3f}, "
                          f"until {until:.3f} UNIX seconds)")
    return Span(sources=tuple(dict.fromkeys(all_sources)), since=since, until=until)


def hit_view(hit: SearchHit) -> dict[str, object]:
    """One hit as ``/api/search`` shows it."""
    return {"source_id": hit.source_id, "start_at": hit.start_at, "end_at": hit.end_at,
            "score": hit.score, "similarity": hit.similarity, "text_match": hit.text_match,
            "best_window_id": hit.best_window_id, "window_ids": list(hit.window_ids),
            "captions": list(hit.captions), "model": hit.model}


def page_view(page: HistoryPage, *, node_id: str) -> dict[str, object]:
    """A page of history as ``/api/history`` shows it: ``streamcap.v1`` frames."""
    items = [to_wire(to_message(item), node_id=node_id) for item in page.items]
    return {"items": items, "next": page.next_cursor}


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


# --------------------------------------------------------------------------- routes


class HistoryApi:
    """``/api/search`` and ``/api/history`` (see the module docstring).

    Args:
        open_reader: A new reader handle per request (closed after it); it raises
            HistoryError when there is no history (503).
        embed_text: The query's text embedding, or None when the model has no
            retriever (search then ranks by the caption text match alone).
        model: The loaded model's id: only its windows have comparable embeddings.
        sources: The configured sources (a ``source`` outside them is a 400).
        node_id: The daemon's node id, in the frames of ``/api/history``.
        clock: Wall-clock UNIX seconds (``2h`` means two hours before it).
    """

    def __init__(self, open_reader: OpenReader, embed_text: EmbedText | None, model: str, *,
                 sources: Collection[str], node_id: str,
                 clock: Callable[[], float] = time.time,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self.open_reader = open_reader
        self.embed_text = embed_text
        self.model = model
        self.sources = frozenset(sources)
        self.node_id = node_id
        self.clock = clock
        self.max_concurrent = max_concurrent
        self._busy = 0

    def install(self, server: HttpServer) -> None:
        """Add the routes to ``server`` (before it starts)."""
        server.add_json_route("GET", SEARCH_PATH, self._search, label="api.search")
        server.add_json_route("GET", HISTORY_PATH, self._history, label="api.history")

    @contextlib.contextmanager
    def _slot(self) -> Iterator[list[asyncio.Future[Any]]]:
        """One of the :attr:`max_concurrent` requests served at once; 503 beyond.

        The slot is held until the request's thread work (:meth:`_offload`) is over too:
        a client that goes away cancels the handler, not the thread.
        """
        if self._busy >= self.max_concurrent:
            raise web.HTTPServiceUnavailable(
                text=f"too many history requests at once (at most {self.max_concurrent}); "
                     "try again shortly")
        self._busy += 1
        running: list[asyncio.Future[Any]] = []
        try:
            yield running
        finally:
            left = [f for f in running if not f.done()]
            if left:
                left[-1].add_done_callback(self._release)
            else:
                self._busy -= 1

    def _release(self, _done: object = None) -> None:
        self._busy -= 1

    async def _offload(self, running: list[asyncio.Future[Any]], work: Awaitable[T]) -> T:
        """Await ``work`` (a thread's), noted in the request's slot; cancelling the request
        leaves it running, and holding the slot, until it ends."""
        future = asyncio.ensure_future(work)
        running.append(future)
        return await asyncio.shield(future)

    async def _with_reader(self, running: list[asyncio.Future[Any]],
                           work: Callable[[HistoryStore], T]) -> T:
        """``work(reader)`` on a worker thread with a reader of its own; 503 without history."""
        try:
            return await self._offload(running, asyncio.to_thread(self._in_thread, work))
        except HistoryError as exc:
            if str(exc) == HISTORY_OFF:
                raise web.HTTPServiceUnavailable(text=HISTORY_OFF) from None
            _log.warning("history request failed", error=str(exc))
            raise web.HTTPServiceUnavailable(
                text="the history cannot be read now (see the daemon's log)") from None

    def _in_thread(self, work: Callable[[HistoryStore], T]) -> T:
        reader = self.open_reader()
        try:
            return work(reader)
        finally:
            reader.close()

    def _span(self, request: web.Request) -> Span:
        try:
            return read_span(request.query, self.sources, self.clock(),
                             request.query.getall("source", []))
        except ConfigError as exc:
            raise _bad(exc.problems[0]) from None

    async def _search(self, request: web.Request) -> object:
        query = request.query
        try:
            text = check_query(query.get("q"))
            limit = check_limit(query.get("limit"))
        except ConfigError as exc:
            raise _bad(exc.problems[0]) from None
        span = self._span(request)
        with self._slot() as running:
            return await self._run_search(running, text, span, limit)

    async def _run_search(self, running: list[asyncio.Future[Any]], text: str, span: Span,
                          limit: int) -> object:
        vector: Float32Array | None = None
        if self.embed_text is not None:
            try:
                vector = await self._offload(running, self.embed_text(text))
            except ModelError as exc:
                raise web.HTTPServiceUnavailable(text=f"the query cannot be embedded: "
                                                      f"{exc}") from None
        embedded = vector

        def search(store: HistoryStore) -> list[SearchHit]:
            embed = None if embedded is None else (lambda _text: embedded)
            return run_search(store, embed, self.model, text, span, limit)

        hits = await self._with_reader(running, search)
        return {"query": text, "since": span.since, "until": span.until,
                "sources": list(span.sources), "hits": [hit_view(h) for h in hits],
                "model": self.model}

    async def _history(self, request: web.Request) -> object:
        query = request.query
        try:
            limit = check_limit(query.get("limit"), default=HISTORY_DEFAULT_LIMIT,
                                most=HISTORY_MAX_LIMIT)
        except ConfigError as exc:
            raise _bad(exc.problems[0]) from None
        order = query.get("order", "asc")
        if order not in ("asc", "desc"):
            raise _bad(f"order: expected 'asc' or 'desc' (got {order[:20]!r})")
        cursor = query.get("cursor")
        if cursor is not None and (not cursor or len(cursor) > MAX_CURSOR_CHARS
                                   or not cursor.isascii() or not cursor.isprintable()):
            raise _bad("cursor: expected the 'next' of a previous page")
        span = self._span(request)

        def page(store: HistoryStore) -> HistoryPage | str:
            try:
                return store.page(span, cursor=cursor, limit=limit,
                                  newest_first=order == "desc")
            except HistoryCursorError as exc:
                return str(exc)  # the store did not make this cursor

        with self._slot() as running:
            result = await self._with_reader(running, page)
        if isinstance(result, str):
            _log.debug("history page refused: bad cursor", error=result)
            raise _bad("cursor: expected the 'next' of a previous page")
        return page_view(result, node_id=self.node_id)
