"""HTTP plumbing of the local Hub-compatible server: replies, the route table, request bodies, the handler.

A request body is read only once its route is known: API requests whole, up to
``HubServer.max_request_bytes`` (413 beyond); routes registered with ``stream=True``
(LFS uploads) read it as chunks of :data:`CHUNK_BYTES` and never hold it whole.
Whatever a route leaves unread is discarded (up to :data:`DRAIN_BYTES`) before the
answer, so that the client, which sends its whole body before it reads, gets the
answer; beyond that the connection is closed. Standard library only.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from .hub import HubServer

CHUNK_BYTES = 1024 * 1024
#: How much of a refused request's unread body is read and thrown away so the client gets the answer.
DRAIN_BYTES = 256 * 1024 * 1024


@dataclass
class RequestRecord:
    method: str
    route: str
    path: str
    status: int = 0


class Drop(Exception):
    """Close the connection without an answer."""


class Reply(Exception):
    def __init__(self, status: int, body: object = None, headers: dict | None = None, raw: bytes | None = None):
        self.status, self.body, self.headers, self.raw = status, body, headers or {}, raw


def error(status: int, message: str, code: str | None = None) -> Reply:
    # a header carries one line of ASCII; the JSON body keeps the message as it is
    header = message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
    headers = {"X-Error-Message": header}
    if code:
        headers["X-Error-Code"] = code
    return Reply(status, {"error": message}, headers)


# ----------------------------------------------------------------------------- route table
#: Path patterns shared by the routes: a repository id, the API's plural type, the optional URL type prefix.
REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
TYPE = r"(?P<type>models|datasets|spaces)"
PREFIX = r"(?P<prefix>(?:datasets/|spaces/)?)"

Route = tuple[str, str, "re.Pattern[str]", Callable, bool]
ROUTES: list[Route] = []


def route(method: str, name: str, pattern: str, *, stream: bool = False):
    """Register ``func(server, request, match)`` for ``method`` on paths matching ``pattern``; ``stream``:
    the function reads the body itself from ``request.stream`` (``request.body`` stays empty)."""

    def register(func):
        ROUTES.append((method, name, re.compile("^" + pattern + "$"), func, stream))
        return func

    return register


def json_body(req) -> dict:
    raw = req.body
    if not raw:
        return {}
    ctype = req.headers.get("Content-Type", "")
    if "application/x-www-form-urlencoded" in ctype:
        return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in parse_qs(raw.decode()).items()}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise error(400, "request body is not valid JSON") from None
    return data if isinstance(data, dict) else {"_list": data}


# ----------------------------------------------------------------------------- request bodies
class RequestBody:
    """The body of one request (``Content-Length`` or chunked), read on demand."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
        self.length: int | None = None
        if not self.chunked:
            try:
                self.length = int(headers.get("Content-Length") or 0)
            except ValueError:
                self.length = -1
        self.valid = self.length is None or self.length >= 0
        self._left = self.length if self.length and self.length > 0 else 0
        self.done = self.valid and not self.chunked and self._left == 0

    def _next(self, most: int) -> bytes:
        """Up to ``most`` bytes; ``b""`` at the end of the body."""
        if self.done:
            return b""
        if not self.valid:
            raise error(400, "invalid Content-Length")
        if self.chunked and self._left == 0:
            line = self.rfile.readline(65537)
            if not line:
                raise Drop()
            try:
                self._left = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise error(400, "malformed chunked request body") from None
            if self._left == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                self.done = True
                return b""
        piece = self.rfile.read(min(most, self._left))
        if not piece:  # the client went away mid-body
            self.done = True
            raise Drop()
        self._left -= len(piece)
        if self._left == 0:
            if self.chunked:
                self.rfile.readline()  # the CRLF after a chunk
            else:
                self.done = True
        return piece

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        while piece := self._next(size):
            yield piece

    def read(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (413 beyond, before reading when the length is declared)."""
        if self.length is not None and self.length > limit:
            raise error(413, f"request body too large: {self.length} bytes, the limit of this Hub is {limit}")
        data = bytearray()
        for piece in self.chunks():
            data += piece
            if len(data) > limit:
                raise error(413, f"request body too large: more than {limit} bytes, the limit of this Hub")
        return bytes(data)

    def drain(self, limit: int = DRAIN_BYTES) -> bool:
        """Read and discard what is left, up to ``limit`` bytes; True when the body was read to its end."""
        seen = 0
        try:
            while not self.done and seen <= limit:
                seen += len(self._next(CHUNK_BYTES))
        except (Drop, Reply, OSError):
            return False
        return self.done


# ----------------------------------------------------------------------------- handler
def make_handler(server: "HubServer", *, api: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        server_version = "erasepro-test-hub/1"

        def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
            pass

        def _handle(self, method: str) -> None:
            split = urlsplit(self.path)
            self.query = split.query
            self.body = b""
            self.stream = RequestBody(self.rfile, self.headers)
            record = RequestRecord(method, "UNKNOWN", split.path)
            server.requests.append(record)
            try:
                if not self.stream.valid:
                    raise error(400, "invalid Content-Length")
                for route_method, name, pattern, func, stream in ROUTES:
                    allowed = name == "blob" if not api else name != "blob"
                    if route_method != method or not allowed:
                        continue
                    match = pattern.match(split.path)
                    if match is None:
                        continue
                    record.route = name
                    if not stream:
                        self.body = self.stream.read(server.max_request_bytes)
                    fault = server.faults.take(name, split.path)
                    if fault == "500":
                        raise error(500, f"injected failure at {name}")
                    if fault == "drop":
                        raise Drop()
                    if fault == "slow":  # (an Event wait: tests may stub time.sleep for the client's backoff)
                        threading.Event().wait(server.faults.slow_seconds)
                    try:
                        reply = Reply(200, func(server, self, match))
                    except Reply as answer:
                        reply = answer
                    if fault == "drop-after":  # the work is done, the answer is lost
                        raise Drop()
                    if fault == "tamper" and reply.raw:
                        reply.raw = bytes([reply.raw[0] ^ 0xFF]) + reply.raw[1:]
                    raise reply
                raise error(404, f"erasepro test hub: unknown route {method} {split.path}", "RouteNotFound")
            except Drop:
                record.status = -1
                self._close()
            except Reply as reply:
                record.status = reply.status
                self._send(method, reply)
            except Exception as exc:  # a bug in the test server: answer 500 with the reason
                record.status = 500
                self._send(method, error(500, f"test hub internal error: {type(exc).__name__}: {exc}"))

        def _close(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def handle_one_request(self):  # a client that gave up (timeout) must not crash the server thread
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(self, method: str, reply: Reply) -> None:
            if not self.stream.drain():  # the rest of the body could not be read: this connection ends here
                reply.headers["Connection"] = "close"
            if reply.raw is not None:
                body = reply.raw
                content_type = "application/octet-stream"
            else:
                payload = reply.body
                if isinstance(payload, dict) and set(payload) == {"_list"}:
                    payload = payload["_list"]
                body = json.dumps(payload if payload is not None else {}).encode()
                content_type = "application/json"
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_HEAD(self):  # noqa: N802
            self._handle("HEAD")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def do_PUT(self):  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

    return Handler
