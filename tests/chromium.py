"""Load a page in headless Chromium and read its DOM: a helper for browser tests.

Chromium (Debian's ``chromium`` package) is started headless, sandbox and GPU
off, with background networking, component updates and sync disabled, on a
throwaway profile. It is driven over the DevTools protocol (with the
``websockets`` client the project already depends on) instead of
``--dump-dom``, because ``--dump-dom`` returns once the page has loaded and
virtual time has run out, which says nothing about WebSocket frames that arrive
later. Here the caller names a JavaScript condition and the DOM is read as soon
as it holds, so the test waits exactly as long as the page needs.

Usage::

    from chromium import chromium_path, dump_dom
    dom = dump_dom(url, timeout_s=30, wait_for="document.querySelector('.caption')")
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from timing import scaled
from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
)


def chromium_path() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DevTools:
    """A minimal DevTools protocol client: commands by id, events skipped."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout_s: float = scaled(10.0)) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"DevTools {method} got no answer within {timeout_s} s")
            reply = json.loads(self.ws.recv(timeout=remaining))
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result


@contextlib.contextmanager
def _browser(start_timeout_s: float) -> Iterator[_DevTools]:
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian package: chromium)")
    with tempfile.TemporaryDirectory(prefix="streamcap-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "about:blank"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + start_timeout_s
            lines: list[str] = []
            while len(lines) < 2:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"chromium did not open DevTools within {start_timeout_s} s")
                if port_file.exists():
                    lines = port_file.read_text().split()
                time.sleep(0.05)
            with connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_size=None,
                         open_timeout=start_timeout_s) as ws:
                tools = _DevTools(ws)
                yield tools
                with contextlib.suppress(Exception):
                    tools.call("Browser.close", timeout_s=scaled(2.0))
        finally:
            try:
                proc.wait(timeout=scaled(5))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def _evaluate(tools: _DevTools, session: str, expression: str) -> Any:
    result = tools.call("Runtime.evaluate",
                        {"expression": expression, "returnByValue": True}, session=session)
    return result.get("result", {}).get("value")


@contextlib.contextmanager
def _page(url: str, timeout_s: float, wait_for: str | None) -> Iterator[tuple[_DevTools, str]]:
    """Open ``url`` in a fresh tab and wait until it has loaded and ``wait_for`` is truthy
    (or ``timeout_s`` passes; the caller then sees whatever the page shows)."""
    started = time.monotonic()
    with _browser(start_timeout_s=timeout_s) as tools:
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget",
                             {"targetId": target, "flatten": True})["sessionId"]
        tools.call("Page.navigate", {"url": url}, session=session)
        condition = "document.readyState === 'complete'"
        if wait_for:
            condition += f" && Boolean({wait_for})"
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # a navigation may reset the context
                if _evaluate(tools, session, condition) is True:
                    break
            time.sleep(0.1)
        yield tools, session


def dump_dom(url: str, timeout_s: float = scaled(30.0), *, wait_for: str | None = None) -> str:
    """The serialized DOM of ``url`` once loaded and ``wait_for`` holds.

    Args:
        url: The page to open.
        timeout_s: Upper bound for the browser start, the load and the wait.
        wait_for: A JavaScript expression; the DOM is read as soon as it is
            truthy, or at ``timeout_s`` whatever the page shows then.

    Returns:
        ``document.documentElement.outerHTML``.

    Raises:
        FileNotFoundError: Chromium is not installed.
    """
    with _page(url, timeout_s, wait_for) as (tools, session):
        html = _evaluate(tools, session, "document.documentElement.outerHTML")
    return str(html)


def screenshot(url: str, path: Path, timeout_s: float = scaled(30.0), *, wait_for: str | None = None,
               width: int = 1200, height: int = 800) -> Path:
    """Save a PNG of ``url`` (same waiting rules as :func:`dump_dom`) to ``path``."""
    with _page(url, timeout_s, wait_for) as (tools, session):
        tools.call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                   session=session)
        data = tools.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    path.write_bytes(base64.b64decode(data))
    return path


_KEY_CODES = {"Enter": 13, "Tab": 9, "Escape": 27, "Home": 36, "End": 35, "PageUp": 33,
              "PageDown": 34, "ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}


class Tab:
    """One page open in headless Chromium, for a test that acts on it step by step
    (see :func:`open_page`). Every call blocks; run it with ``asyncio.to_thread`` when the
    server under test shares the test's event loop."""

    def __init__(self, tools: _DevTools, session: str) -> None:
        self._tools = tools
        self._session = session

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        return _evaluate(self._tools, self._session, expression)

    def wait_for(self, expression: str, timeout_s: float = scaled(30.0)) -> None:
        """Wait until ``expression`` is truthy.

        Raises:
            TimeoutError: It was not within ``timeout_s`` (the message holds the page's text).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # a navigation may reset the context
                if self.evaluate(f"Boolean({expression})") is True:
                    return
            time.sleep(0.1)
        text = self.evaluate("document.body ? document.body.innerText : ''")
        raise TimeoutError(f"not true within {timeout_s} s: {expression}\npage text:\n"
                           f"{str(text)[-3000:]}")

    def dom(self) -> str:
        """``document.documentElement.outerHTML``."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def press(self, key: str) -> None:
        """Press and release a key (a name of ``_KEY_CODES``) where the focus is."""
        code = _KEY_CODES[key]
        down: dict[str, Any] = {"type": "keyDown", "key": key, "code": key,
                                "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        if key == "Enter":
            down["text"] = "\r"
        self._tools.call("Input.dispatchKeyEvent", down, session=self._session)
        self._tools.call("Input.dispatchKeyEvent",
                         {"type": "keyUp", "key": key, "code": key,
                          "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code},
                         session=self._session)

    def screenshot(self, path: Path, *, width: int = 1200, height: int = 800) -> Path:
        """Save a PNG of the page as it is now, in a ``width`` x ``height`` viewport."""
        self._tools.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1,
                          "mobile": False}, session=self._session)
        data = self._tools.call("Page.captureScreenshot", {"format": "png"},
                                session=self._session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def open_page(url: str, timeout_s: float = scaled(30.0), *,
              wait_for: str | None = None) -> Iterator[Tab]:
    """``url`` open in a fresh headless Chromium (same waiting rules as :func:`dump_dom`),
    as a :class:`Tab` to act on until the block ends."""
    with _page(url, timeout_s, wait_for) as (tools, session):
        yield Tab(tools, session)
