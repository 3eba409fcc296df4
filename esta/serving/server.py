"""`esta serve`: an HTTP JSON server for a `Palette`, with a dynamic batcher (`esta.serving.batcher`).

    esta serve --run esta-demo [--host 127.0.0.1] [--port 8000] [--max-batch-size 32] [--max-wait-ms 2]

Endpoints (JSON in and out; every error is {"error": "<one clear message>"}):

    GET  /health    {"status": "ok" | "draining", "members": [...], "queued": n, "batches": {...}}
    GET  /palette   the served members: id, kind, path, MFLOPs, accuracy, deployed flag, latency measured
                    at start-up on this machine
    POST /predict   {"inputs": [example, ...] or one example, and exactly one of
                     "member": id | "mflops": budget | "latency_ms": budget,
                     optional "fallback": "error" (default) | "cheapest", optional "dtype": "float32"}
                    -> {"member": id, "route": {...why...}, "outputs": [[...], ...], "predictions": [...]}

Status codes: 400 malformed JSON or inputs of the wrong shape or type; 404 unknown path; 405 wrong method;
411 no Content-Length; 413 a body over --max-body-bytes (or more inputs than the max batch size); 422 an
unknown member or a budget no deployed member meets; 503 while shutting down or with a full queue; 500
only for a failure inside the model. The server keeps serving after every one of them.

Why the standard library (http.server.ThreadingHTTPServer) and not FastAPI + uvicorn: the server's work is
the batcher and the palette; HTTP parsing is a small part of a request's time at these sizes (see
docs/serving.md for the measured load test), and the standard library adds no dependency, so `esta serve`
runs wherever esta runs, including GPU hosts without network access where packages cannot be installed.
One thread per connection is the limit: put a reverse proxy in front for many thousands of idle
connections or TLS.

Graceful shutdown (SIGINT, SIGTERM or `PaletteServer.stop()`): new requests get 503, the listening socket
stops accepting, requests already read run to completion and are answered, then idle keep-alive
connections are closed and the batcher's worker ends.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import TimeoutError as FutureTimeout
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional, Tuple

import torch

from esta.config import ConfigError
from esta.serving.batcher import Batcher, QueueFull, ShuttingDown
from esta.serving.palette import BudgetError, Palette, PaletteError, UnknownMemberError

__all__ = ["PaletteServer", "serve_run", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
_PREDICT_KEYS = ("inputs", "member", "mflops", "latency_ms", "fallback", "dtype")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _flatten(obj, shape: Tuple[int, ...], out: List[float], path: str) -> None:
    """Checks that `obj` is a nested list of `shape` holding finite numbers, appending them to out."""
    if not shape:
        if type(obj) not in (int, float):
            kind = "a boolean" if isinstance(obj, bool) else "null" if obj is None else type(obj).__name__
            raise _HTTPError(400, f"inputs{path} is {kind}; inputs must hold numbers")
        value = float(obj) if abs(obj) <= 3.4e38 else math.inf
        if not math.isfinite(value):
            raise _HTTPError(400, f"inputs{path} = {obj!r} is not a finite float32 number")
        out.append(value)
        return
    if not isinstance(obj, list):
        raise _HTTPError(400, f"inputs{path} must be a list of {shape[0]} entries, got "
                              f"{'a number' if type(obj) in (int, float) else type(obj).__name__}")
    if len(obj) != shape[0]:
        raise _HTTPError(400, f"inputs{path} has {len(obj)} entries where {shape[0]} are expected")
    for i, item in enumerate(obj):
        _flatten(item, shape[1:], out, f"{path}[{i}]")


def _depth(obj) -> int:
    d = 0
    while isinstance(obj, list) and obj:
        obj, d = obj[0], d + 1
    return d


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "esta-serve/0.1"
    timeout = 30  # seconds an idle keep-alive connection (or a slow client) may hold its thread

    @property
    def app(self) -> "PaletteServer":
        return self.server.app  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        self.app._connections_add(self.connection)

    def finish(self) -> None:
        try:
            if getattr(self, "_linger", False):
                self._drain_before_close()
            super().finish()
        finally:
            self.app._connections_remove(self.connection)

    def _drain_before_close(self) -> None:
        """A lingering close: the answer went out before the request's body was read (413, 411, ...).
        Closing a socket with unread data resets the connection, and the client may lose the answer; so
        stop sending, then read and drop what the client still sends (bounded in bytes and time)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.0)
            left = 64 * self.app.max_body_bytes
            while left > 0:
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        if self.app.access_log:
            sys.stderr.write(f"esta serve: {self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------------------------ responses
    def _send(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close or self.app.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: _HTTPError) -> None:
        self._linger = e.close
        self._send(e.status, {"error": e.message}, close=e.close)

    def _dispatch(self, method: str) -> None:
        self.app._enter()
        try:
            routes = {("GET", "/health"): self._health, ("GET", "/palette"): self._palette,
                      ("POST", "/predict"): self._predict}
            path = self.path.split("?", 1)[0]
            handler = routes.get((method, path))
            try:
                if handler is None:
                    if any(p == path for _, p in routes):
                        allowed = ", ".join(m for m, p in routes if p == path)
                        raise _HTTPError(405, f"{method} is not allowed on {path} (use {allowed})",
                                         close=method != "GET")  # a body left unread ends the connection
                    raise _HTTPError(404, f"no endpoint {path} (endpoints: GET /health, GET /palette, "
                                          f"POST /predict)", close=method != "GET")
                if self.app.draining and path == "/predict":
                    raise _HTTPError(503, "the server is shutting down", close=True)
                handler()
            except _HTTPError as e:
                self._error(e)
            except Exception as e:  # a bug, not a bad request: say so, keep serving
                self._error(_HTTPError(500, f"internal error: {type(e).__name__}: {e}", close=True))
        finally:
            self.app._leave()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    # ------------------------------------------------------------------------------------ endpoints
    def _health(self) -> None:
        app = self.app
        self._send(200, {"status": "draining" if app.draining else "ok", "members": app.palette.served,
                         "queued": app.batcher.queued, "batches": app.batcher.stats.as_dict()})

    def _palette(self) -> None:
        p = self.app.palette
        self._send(200, {"members": p.describe(), "example_shape": list(p.example_shape or []),
                         "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
                         "max_batch_size": self.app.batcher.max_batch_size,
                         "resident_weight_bytes": p.resident_bytes()})

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _HTTPError(411, "chunked bodies are not accepted; send a Content-Length", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            raise _HTTPError(411, "a POST needs a Content-Length header", close=True)
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise _HTTPError(400, f"Content-Length {length!r} is not a byte count", close=True) from None
        limit = self.app.max_body_bytes
        if n > limit:
            # the body is not read: the connection closes after the answer
            raise _HTTPError(413, f"the body has {n} bytes, over the limit of {limit} bytes", close=True)
        body = self.rfile.read(n)
        if len(body) != n:
            raise _HTTPError(400, f"the body ended after {len(body)} of {n} bytes", close=True)
        try:
            value = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise _HTTPError(400, f"malformed JSON: {e}") from None
        if not isinstance(value, dict):
            raise _HTTPError(400, f"the body must be a JSON object, got {type(value).__name__}")
        return value

    def _predict(self) -> None:
        app = self.app
        palette = app.palette
        req = self._read_json()
        unknown = sorted(set(req) - set(_PREDICT_KEYS))
        if unknown:
            raise _HTTPError(400, f"unknown key {unknown[0]!r} (a request has: {', '.join(_PREDICT_KEYS)})")
        dtype = req.get("dtype", "float32")
        served_dtype = str(palette.dtype).replace("torch.", "")
        if dtype != served_dtype:
            raise _HTTPError(400, f"dtype {dtype!r} is not served: inputs are {served_dtype} numbers")
        fallback = req.get("fallback", "error")
        if fallback not in ("error", "cheapest"):
            raise _HTTPError(400, f"fallback must be 'error' or 'cheapest', got {fallback!r}")
        choice = {k: req[k] for k in ("member", "mflops", "latency_ms") if k in req}
        if len(choice) != 1:
            raise _HTTPError(400, "give exactly one of 'member', 'mflops' or 'latency_ms'" +
                             (f" (got {', '.join(choice)})" if choice else ""))
        (key, value), = choice.items()
        if key == "member" and (isinstance(value, bool) or not isinstance(value, int)):
            raise _HTTPError(400, f"member must be an integer id, got {value!r}")
        if key != "member" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _HTTPError(400, f"{key} must be a number, got {value!r}")
        try:
            route = palette.route(**{key: value}, fallback=fallback)
        except (UnknownMemberError, BudgetError) as e:
            raise _HTTPError(422, str(e)) from None
        except PaletteError as e:
            raise _HTTPError(400, str(e)) from None
        inputs = self._inputs(req)
        try:
            future = app.batcher.submit(inputs, route.member)
        except ValueError as e:
            raise _HTTPError(413, str(e)) from None
        except (QueueFull, ShuttingDown) as e:
            raise _HTTPError(503, str(e), close=isinstance(e, ShuttingDown)) from None
        try:
            outputs = future.result(timeout=app.request_timeout)
        except FutureTimeout:
            raise _HTTPError(504, f"no answer within {app.request_timeout:g} s") from None
        except Exception as e:
            raise _HTTPError(500, f"the model failed on this batch: {type(e).__name__}: {e}") from None
        body = {"member": route.member, "route": route.as_dict(), "outputs": outputs.tolist()}
        if outputs.dim() == 2:
            body["predictions"] = outputs.argmax(-1).tolist()
        self._send(200, body)

    def _inputs(self, req: dict) -> torch.Tensor:
        if "inputs" not in req:
            raise _HTTPError(400, "the request has no 'inputs'")
        raw = req["inputs"]
        shape = self.app.palette.example_shape
        if not isinstance(raw, list) or not raw:
            raise _HTTPError(400, "inputs must be a non-empty list (one example, or a list of examples)")
        if shape is None:
            raise _HTTPError(400, "this palette does not know its input shape, so it cannot read JSON inputs")
        depth = _depth(raw)
        if depth == len(shape):
            raw, batch = [raw], 1
        elif depth == len(shape) + 1:
            batch = len(raw)
        else:
            raise _HTTPError(400, f"inputs must be one example of shape {list(shape)} or a list of such "
                                  f"examples; got {depth} levels of nesting")
        limit = self.app.batcher.max_batch_size
        if batch > limit:
            raise _HTTPError(413, f"{batch} inputs in one request, over the max batch size {limit}")
        flat: List[float] = []
        _flatten(raw, (batch,) + tuple(shape), flat, "")
        return torch.tensor(flat, dtype=self.app.palette.dtype).reshape((batch,) + tuple(shape))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # connections are tracked and closed by PaletteServer.stop
    allow_reuse_address = True
    request_queue_size = 128


class PaletteServer:
    """The HTTP server of a palette; `start()` serves in background threads, `stop()` shuts down gracefully."""

    def __init__(self, palette: Palette, *, host: str = "127.0.0.1", port: int = 0, max_batch_size: int = 32,
                 max_wait_ms: float = 2.0, max_queue: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout: float = 60.0, access_log: bool = False) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"PaletteServer: max_body_bytes must be a positive int, got {max_body_bytes!r}")
        self.palette = palette
        self.batcher = Batcher(palette, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
        self.max_body_bytes = max_body_bytes
        self.request_timeout = float(request_timeout)
        self.access_log = access_log
        self.draining = False
        self._httpd = _Server((host, port), _Handler)
        self._httpd.app = self
        self._lock = threading.Condition()
        self._in_flight = 0
        self._connections = set()
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    # connection and request bookkeeping (for the graceful shutdown)
    def _connections_add(self, conn) -> None:
        with self._lock:
            self._connections.add(conn)

    def _connections_remove(self, conn) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def start(self) -> "PaletteServer":
        self.batcher.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="esta-serve-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0, log: Optional[Callable[[str], None]] = None) -> None:
        """Graceful shutdown: refuse new requests, answer the ones in flight, close the rest."""
        if self._stopped.is_set():
            return
        self.draining = True
        deadline = time.monotonic() + timeout
        if log is not None:
            log(f"shutting down: {self.in_flight} request(s) in flight")
        if self._thread is not None:
            self._httpd.shutdown()  # no new connections are accepted from here on
        with self._lock:
            while self._in_flight > 0 and time.monotonic() < deadline:
                self._lock.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            left = self._in_flight
            idle = list(self._connections)
        self.batcher.stop(timeout=max(0.0, deadline - time.monotonic()))
        for conn in idle:  # idle keep-alive connections: wake their threads, which then end
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._stopped.set()
        if log is not None:
            log("stopped" if left == 0 else f"stopped with {left} request(s) unanswered after {timeout:g} s")

    def __enter__(self) -> "PaletteServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_run(run: str, *, host: str = "127.0.0.1", port: int = 8000, members="deployed", device=None,
              max_batch_size: int = 32, max_wait_ms: float = 2.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              access_log: bool = False, log: Callable[[str], None] = print) -> int:
    """`esta serve`: builds the palette of `run`, measures its latencies, serves until SIGINT or SIGTERM."""
    t0 = time.time()
    palette = Palette.from_run(run, members, device=device, log=log)
    if palette.token_inputs:
        raise ConfigError("--run", f"{run} is a decoder run; `esta serve` serves image members over HTTP. Serve "
                                   f"decoder members' prefill in Python: esta.serving.Palette.from_run(RUN)(input_ids, "
                                   f"members, attention_mask=mask)")
    palette.measure_latency()
    try:
        server = PaletteServer(palette, host=host, port=port, max_batch_size=max_batch_size,
                               max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, access_log=access_log)
    except OSError as e:  # the port is taken, the host is not this machine's, ...
        raise ConfigError("--port", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
        members_text = ", ".join(f"#{m['id']} {m['mflops']:.3g} MFLOPs" if m["mflops"] is not None else f"#{m['id']}"
                                 for m in palette.describe())
        log(f"esta serve: {len(palette.served)} members of {run} ({members_text}); resident weights "
            f"{palette.resident_bytes() / 1e6:.2f} MB on {palette.device}; ready in {time.time() - t0:.1f} s")
        log(f"esta serve: listening on {server.url} (POST /predict, GET /palette, GET /health); max batch "
            f"{max_batch_size}, max wait {max_wait_ms:g} ms")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(log=lambda s: log(f"esta serve: {s}"))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
