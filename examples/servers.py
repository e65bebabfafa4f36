"""Small local servers the example notebooks start on 127.0.0.1 (free ports) and stop at the end.

Each runs on its own thread with its own Tornado IOLoop, so the notebook's kernel stays free.
"""

from __future__ import annotations

import asyncio
import io
import json
import pathlib
import random
import threading
import time
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

DATA = pathlib.Path(__file__).parent / "data"


class LocalServer:
    """A Tornado application on a background thread; ``url`` once started, ``stop()`` to end it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="example-server", daemon=True)
        self._loop: IOLoop | None = None

    def start(self) -> LocalServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the example server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self._loop = IOLoop.current()
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(self.app)
        server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.start()
        server.stop()
        self._loop.close(all_fds=True)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.add_callback(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------- SSE replay


def recorded_events(limit: int | None = None) -> list[dict[str, Any]]:
    """Sample events shaped like Wikimedia's recent-changes stream (synthetic, recorded in data/)."""
    lines = (DATA / "recentchange.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


def sse_bytes(events: list[dict[str, Any]], seed: int = 1) -> bytes:
    """The event stream as the server sends it, with comments and some multi-line data."""
    rng = random.Random(seed)
    parts = [b": replaying recorded recent changes\n\n"]
    for event in events:
        if rng.random() < 0.2:
            # Multi-line data: indented JSON, one data line per line; the parser joins them with \n.
            body = json.dumps(event, ensure_ascii=False, indent=1)
        else:
            body = json.dumps(event, ensure_ascii=False)
        data = "".join(f"data: {line}\n" for line in body.split("\n"))
        if rng.random() < 0.1:
            parts.append(b": keep-alive\n")
        parts.append(f"event: message\nid: {event['meta']['id']}\n{data}\n".encode())
    return b"".join(parts)


class ReplayHandler(web.RequestHandler):
    """Sends the recorded stream in chunks cut at random byte boundaries, paced by ``speed``."""

    async def get(self) -> None:
        events = self.application.settings["events"]
        speed = self.application.settings["speed"]
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        rng = random.Random(7)
        stream = sse_bytes(events)
        pace = self.application.settings["duration"] / max(1, len(stream))
        position = 0
        while position < len(stream):
            size = rng.randint(1, 400)
            chunk = stream[position:position + size]
            position += size
            self.write(chunk)
            await self.flush()
            await asyncio.sleep(pace * size / speed if speed else 0)
        self.application.settings["sent"].extend(e["meta"]["id"] for e in events)


def replay_server(events: list[dict[str, Any]], *, duration: float = 5.0, speed: float = 1.0) -> LocalServer:
    """A replay of ``events`` at ``/stream`` lasting about ``duration / speed`` seconds."""
    app = web.Application([(r"/stream", ReplayHandler)], events=events, speed=speed, duration=duration, sent=[])
    return LocalServer(app)


# ----------------------------------------------------------------------------- images


def image_server(count: int = 12, broken: int = 5) -> LocalServer:
    """PNG images at /img/N.png (one of them missing) and their list at /images.csv."""
    from PIL import Image, ImageDraw

    images: dict[int, bytes] = {}
    for n in range(count):
        if n == broken:
            continue
        img = Image.new("RGB", (1200, 800), (40 + 15 * n, 90, 200 - 10 * n))
        ImageDraw.Draw(img).ellipse((200, 100, 1000, 700), fill=(250, 200 - 10 * n, 60))
        buffer = io.BytesIO()
        img.save(buffer, "PNG")
        images[n] = buffer.getvalue()

    class Image_(web.RequestHandler):
        async def get(self, n: str) -> None:
            await asyncio.sleep(random.uniform(0.05, 0.4))  # a network that takes its time
            if int(n) not in images:
                raise web.HTTPError(404)
            self.set_header("Content-Type", "image/png")
            self.write(images[int(n)])

    class Listing(web.RequestHandler):
        def get(self) -> None:
            base = f"{self.request.protocol}://{self.request.host}"
            self.set_header("Content-Type", "text/csv")
            self.write("name,url\n" + "".join(f"picture-{n},{base}/img/{n}.png\n" for n in range(count)))

    return LocalServer(web.Application([(r"/img/(\d+)\.png", Image_), (r"/images.csv", Listing)]))


# ----------------------------------------------------------------------------- a site to crawl


class SiteStats:
    """What the crawled server saw: how many requests at once, and when each started."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.starts: list[float] = []
        self.lock = threading.Lock()

    def max_rate(self, window: float = 1.0) -> int:
        """The most requests that started within any ``window`` seconds."""
        starts = sorted(self.starts)
        best, first = 0, 0
        for last, t in enumerate(starts):
            while t - starts[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best


def site_server(pages: int = 60, seed: int = 3) -> tuple[LocalServer, SiteStats]:
    """A site of ``pages`` HTML pages linking to each other; every request takes 50-150 ms."""
    rng = random.Random(seed)
    links = {n: sorted(rng.sample(range(pages), 4)) for n in range(pages)}
    stats = SiteStats()

    class Page(web.RequestHandler):
        async def get(self, n: str) -> None:
            with stats.lock:
                stats.current += 1
                stats.peak = max(stats.peak, stats.current)
                stats.starts.append(time.monotonic())
            try:
                await asyncio.sleep(rng.uniform(0.05, 0.15))
                body = "".join(f'<a href="/page/{m}">page {m}</a> ' for m in links[int(n)])
                self.write(f"<html><body><h1>Page {n}</h1>{body}</body></html>")
            finally:
                with stats.lock:
                    stats.current -= 1

    return LocalServer(web.Application([(r"/page/(\d+)", Page)])), stats
