"""``GET /api/clips/<event_id>.flac``: a trigger event clip (docs/privacy.md).

Answers the clip as ``audio/flac`` (ranges too, for a page's audio player), or 404
when there is none (never saved, not yet written, held speech, removed by the
history's retention). The name must be an event id followed by ``.flac``
(:data:`streamcap.triggers.clips.EVENT_ID_RE`), so no request can reach a file
outside the clips folder; another name is 404 as well. Read access is that of the
other GET routes: the server's own checks (Host, sizes, time limits), no token.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from aiohttp import web

from streamcap.http import HttpServer
from streamcap.triggers.clips import clip_path

__all__ = ["PATH", "ClipsApi"]

PATH: Final = "/api/clips"
CONTENT_TYPE: Final = "audio/flac"


class ClipsApi:
    """The clip route; ``clips_dir`` is ``<state_dir>/clips``."""

    def __init__(self, clips_dir: Path) -> None:
        self.clips_dir = clips_dir

    def install(self, server: HttpServer) -> None:
        """Add the route to ``server`` (before it starts)."""
        server.add_route("GET", PATH + "/{name}", self._get, label="api.clip")

    def find(self, name: str) -> Path | None:
        """The clip file ``name`` names, when it is a valid name of a regular file that exists."""
        path = clip_path(self.clips_dir, name)
        if path is None:
            return None
        try:
            mode = os.stat(path, follow_symlinks=False).st_mode
        except (OSError, ValueError):
            return None
        return path if stat.S_ISREG(mode) else None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        path = self.find(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPE,
                                               "Cache-Control": "no-store"})
