"""`latentr3 serve`: recommendations over HTTP, with concurrent requests batched together.

    POST /recommend   {"history": ["Title A", "Title B"], "k": 10}
                   -> {"recommendations": [{"item_id": 7, "title": "...", "score": -1.2}, ...],
                       "truncated": false}
    GET  /healthz  -> {"status": "ok", "mode": ..., "catalog_items": ..., "requests": ...}

Each HTTP connection is served by its own thread; the threads hand their validated request
to one `Batcher`, which gathers what arrives within `max_wait_ms` of the first request (up
to the model's eval batch size) and runs it as one `Recommender` call, so 32 concurrent
clients cost a few device calls rather than 32. Bad requests (not JSON, not an object,
unknown fields, an empty history, k out of range) get 400 with a one-line message and
never reach the model. SIGTERM or SIGINT stops accepting, lets the requests in flight
finish, and returns.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from latentr3_jax.errors import InputError
from latentr3_jax.recommend import Ranked, Recommender

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20          # bytes of one request body
REQUEST_TIMEOUT_S = 300.0   # a request waiting longer than this for the model gets 503
FIELDS = ("history", "k")


class Batcher:
    """One thread that runs queued requests through the recommender in batches."""

    def __init__(self, recommender: Recommender, *, max_batch: Optional[int] = None,
                 max_wait_ms: float = 5.0):
        self.rec = recommender
        self.max_batch = int(max_batch or recommender.batch_size)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.requests = 0
        self.batches = 0
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="latentr3-batcher", daemon=True)
        self._thread.start()

    def submit(self, history: list, k: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((history, k, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _take(self) -> tuple:
        """(requests of the next batch, whether to stop after it)."""
        first = self._q.get()
        if first is None:
            return [], True
        items = [first]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:
                nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return items, True
            items.append(nxt)
        return items, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            items, stop = self._take()
            if not items:
                continue
            try:
                got = self.rec.recommend_with_info([h for h, _, _ in items],
                                                   k=max(k for _, k, _ in items))
            except Exception as e:   # the requests fail, the server stays up
                log.exception("recommend failed for a batch of %d", len(items))
                for _, _, fut in items:
                    fut.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(items)
            for (_, k, fut), r in zip(items, got):
                fut.set_result(Ranked(r.items[:k], r.truncated, r.generated))


def parse_request(body: bytes, rec: Recommender) -> tuple:
    """(history, k) of a POST /recommend body; InputError with the reason otherwise."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"body must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected "
                         f"{', '.join(map(repr, FIELDS))}")
    if "history" not in obj:
        raise InputError("field 'history' is required (a list of item titles)")
    history = obj["history"]
    if not isinstance(history, list):
        raise InputError(f"field 'history' must be a list of titles, got {type(history).__name__}")
    try:
        rec._check([history])
    except InputError as e:
        raise InputError(f"field 'history': {str(e).replace('history 0', 'history')}") from None
    k = obj.get("k", min(10, rec.max_k))
    try:
        k = rec._check_k(k)
    except InputError as e:
        raise InputError(f"field 'k': {e}") from None
    return history, k


def response(r: Ranked) -> dict:
    out = {"recommendations": [{"item_id": x.item_id, "title": x.title, "score": x.score}
                               for x in r.items],
           "truncated": bool(r.truncated)}
    if r.generated is not None:
        out["generated"] = r.generated
    return out


def make_server(rec: Recommender, host: str = "127.0.0.1", port: int = 8080, *,
                max_wait_ms: float = 5.0) -> ThreadingHTTPServer:
    """A started batcher behind a (not yet serving) HTTP server; `server.batcher` is it.
    `server.server_address` has the bound port (pass port 0 for a free one)."""
    batcher = Batcher(rec, max_wait_ms=max_wait_ms)
    info = rec.describe()
    inflight = _Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "latentr3"

        def log_message(self, fmt, *args):   # access log at debug level, not on stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, obj: dict) -> None:
            data = (json.dumps(obj) + "\n").encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.split("?")[0] == "/healthz":
                self._send(200, {"status": "ok", **info, "requests": batcher.requests,
                                 "batches": batcher.batches})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use POST /recommend "
                                          "or GET /healthz"})

        def do_POST(self):
            if self.path.split("?")[0] != "/recommend":
                self._send(404, {"error": f"no such path {self.path!r}; use POST /recommend"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._send(411, {"error": "Content-Length header required"})
                self.close_connection = True
                return
            if int(length) > MAX_BODY:
                self._send(413, {"error": f"body of {length} bytes is over {MAX_BODY}"})
                self.close_connection = True
                return
            with inflight:
                body = self.rfile.read(int(length))
                try:
                    history, k = parse_request(body, rec)
                except InputError as e:
                    self._send(400, {"error": str(e)})
                    return
                try:
                    result = batcher.submit(history, k).result(timeout=REQUEST_TIMEOUT_S)
                except concurrent.futures.TimeoutError:
                    self._send(503, {"error": "timed out waiting for the model"})
                    return
                except Exception as e:   # reported to the client; the server keeps running
                    self._send(500, {"error": f"{type(e).__name__}: {e}"})
                    return
                self._send(200, response(result))

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        # socketserver's default listen backlog is 5: with more clients connecting at once
        # the kernel dropped their handshakes, which came back after a 1 s retransmit or
        # as a reset connection
        request_queue_size = 128

        def server_close(self):
            super().server_close()
            batcher.close()

    server = Server((host, port), Handler)
    server.batcher = batcher
    server.inflight = inflight
    return server


class _Counter:
    """Requests being answered (entered as a context); `wait_idle` waits for none."""

    def __init__(self):
        self._n = 0
        self._cv = threading.Condition()

    def __enter__(self):
        with self._cv:
            self._n += 1

    def __exit__(self, *exc):
        with self._cv:
            self._n -= 1
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._n == 0, timeout)


def serve(rec: Recommender, host: str = "127.0.0.1", port: int = 8080, *,
          max_wait_ms: float = 5.0, announce=print) -> None:
    """Serve until SIGTERM / SIGINT (then stop accepting, finish, return)."""
    rec.warm_up()
    server = make_server(rec, host, port, max_wait_ms=max_wait_ms)
    stopping = threading.Event()

    def stop(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.info("latentr3 serve: %s, shutting down", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        h, p = server.server_address[:2]
        announce(f"serving {rec.describe()['run']} on http://{h}:{p} "
                 f"(POST /recommend, GET /healthz)")
        server.serve_forever(poll_interval=0.2)
        server.inflight.wait_idle(REQUEST_TIMEOUT_S)   # answers already being computed go out
    finally:
        server.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
