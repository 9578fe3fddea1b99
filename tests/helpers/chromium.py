"""Open a local HTML file in headless Chromium over the DevTools protocol (``--remote-debugging-pipe``, stdlib only):
screenshot the whole page and report console errors, uncaught exceptions, network requests and how images decoded."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for beyond itself and data: URLs
    images: list[dict] = field(default_factory=list)  # per <img>: complete, naturalWidth, naturalHeight
    title: str = ""
    height: int = 0


class _Pipe:
    """NUL-delimited JSON messages to and from Chromium's DevTools pipe (fds 3 and 4 in the browser)."""

    def __init__(self, binary: str, profile: str):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def wire() -> None:  # runs in the child before exec: the browser reads fd 3 and writes fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        message = {
            "id": self._next_id,
            "method": method,
            "params": params,
            **({"sessionId": session} if session else {}),
        }
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, wanted, timeout: float = 60) -> dict:
        """The next message ``wanted`` accepts; every other message is kept in ``events``."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


def render(html: Path, screenshot: Path, width: int = 1280) -> PageReport:
    """Load ``html`` (a file), wait for its load event, screenshot the full page to ``screenshot`` (PNG)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(binary, profile)
        try:
            page = next(t for t in pipe.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            session = pipe.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session)
            pipe.call("Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1,
                      mobile=False)  # fmt: skip
            pipe.call("Page.navigate", session, url=url)
            pipe.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
            probe = "JSON.stringify({title: document.title, height: document.documentElement.scrollHeight, images: " \
                "Array.from(document.images, i => ({complete: i.complete, naturalWidth: i.naturalWidth, " \
                "naturalHeight: i.naturalHeight}))})"  # fmt: skip
            found = json.loads(
                pipe.call("Runtime.evaluate", session, expression=probe, returnByValue=True)["result"]["value"]
            )
            size = pipe.call("Page.getLayoutMetrics", session)["cssContentSize"]
            shot = pipe.call(
                "Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )  # fmt: skip
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            pipe.close()
    report = PageReport(images=found["images"], title=found["title"], height=found["height"])
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            report.errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            report.errors.append(params["entry"]["text"])
        elif method == "Network.loadingFailed":
            report.errors.append(f"failed to load: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("data:", url)):
            report.requests.append(params["request"]["url"])
    return report
