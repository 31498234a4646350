"""A headless Chromium driven over the DevTools protocol, for tests that open a page.

``Browser`` starts Debian's chromium with a fresh profile and a DevTools port
of its own choosing (``--remote-debugging-port=0``; the port is read from
the profile's ``DevToolsActivePort`` file), opens one page and speaks the
protocol over a WebSocket (``websocket-client``): navigate and wait for the
load, evaluate JavaScript, take a screenshot, and collect console errors
and uncaught exceptions. The browser, with every process it started, is
killed on ``close``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from helpers import kill_tree

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def install_chromium() -> str | None:
    """Install Debian's chromium where it is absent; None, or why it could not be."""
    if os.path.exists(CHROMIUM):
        return None
    if shutil.which("apt-get") is None:
        return "chromium is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "chromium is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)} failed: {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return f"{' '.join(command)} failed ({done.returncode}): {' '.join(tail)}"
    return None if os.path.exists(CHROMIUM) else "apt-get installed no /usr/bin/chromium"


class Browser:
    """One headless chromium and one page of it."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="procorch-chromium-")
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port = self._port()
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            page = next(t for t in targets if t["type"] == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        except BaseException:
            self.close()
            raise
        self._next_id = 0
        self.errors: list[str] = []  # console errors and uncaught exceptions, in words
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _port(self) -> int:
        active = Path(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            try:
                return int(active.read_text().split()[0])
            except (FileNotFoundError, IndexError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port within 60 s")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command; its result (events that arrive meanwhile are noted)."""
        self._next_id += 1
        ident = self._next_id
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._note(message)

    def _note(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            words = " ".join(str(arg.get("value", arg.get("description"))) for arg in args)
            self.errors.append(f"console.{params['type']}: {words}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')}")

    def open(self, path: Path, within: float = 60) -> float:
        """Load the file and wait for its load event; the seconds it took."""
        start = time.monotonic()
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = start + within
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("method") == "Page.loadEventFired":
                return time.monotonic() - start
            self._note(message)
        raise TimeoutError(f"{path} did not load within {within} s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a thrown error raises)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = True) -> bytes:
        """A PNG of the page (its whole height with ``full_page``), also written to ``path``."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            width, height = self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        kill_tree(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)
