"""A real HTTP/1.1 server on 127.0.0.1 that serves a folder and injects faults on demand.

Used by the fetch tests (tests/pipeline/test_fetch.py) and by benchmarks/fetch.py. Per
path, `faults[path]` is a list of behaviours used up one per request, after which the file
is served normally:

    "500", "503", "429", "404", "403"   that status (429/503 carry `Retry-After: 0`)
    "reset"                             close the connection without answering
    "hang"                              accept and never answer (until the server stops)
    "trickle"                           send headers, then one byte every 0.2 s
    "redirect:<url or /path>"           a 302 to that location

Every request is counted in `hits[path]` (the raw request path, before any decoding) and
its headers kept in `headers[path]` (lower-case names). `latency_s` delays every response, like an object
store's first byte. Keep-alive is on, as object stores and CDNs do.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import unquote


class LoopbackServer:
    def __init__(self, folder: str | Path, latency_s: float = 0.0):
        self.folder = Path(folder)
        self.latency_s = latency_s
        self.faults: dict[str, list[str]] = {}
        self.hits: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the stdlib's name
                server._handle(self)

            def do_HEAD(self):  # noqa: N802
                server._handle(self, body=False)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # a client with hundreds of threads must not meet refusals

            def handle_error(self, request, client_address):  # a client that hangs up is not news
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def _handle(self, req: http.server.BaseHTTPRequestHandler, body: bool = True) -> None:
        path = req.path
        self.headers[path] = {k.lower(): v for k, v in req.headers.items()}
        fault = self._next_fault(path)
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault == "reset":
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            req.connection.close()
            req.close_connection = True
            return
        if fault == "hang":
            self._stopped.wait()
            req.close_connection = True
            return
        if fault and fault.startswith("redirect:"):
            return self._reply(req, 302, b"", {"Location": fault[len("redirect:"):]})
        if fault and fault.isdigit():
            extra = {"Retry-After": "0"} if fault in ("429", "503") else {}
            return self._reply(req, int(fault), f"injected {fault}".encode(), extra)
        local = (self.folder / unquote(path.split("?", 1)[0]).lstrip("/")).resolve()
        if not str(local).startswith(str(self.folder.resolve()) + os.sep) or not local.is_file():
            return self._reply(req, 404, b"not found")
        data = local.read_bytes()
        if fault == "trickle":
            req.send_response(200)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            for i in range(len(data)):
                if self._stopped.wait(0.2):
                    break
                try:
                    req.wfile.write(data[i:i + 1])
                    req.wfile.flush()
                except OSError:
                    break
            req.close_connection = True
            return
        return self._reply(req, 200, data if body else b"", {"Content-Type": "image/jpeg"}, length=len(data))

    @staticmethod
    def _reply(req, status: int, data: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> None:
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data) if length is None else length))
        req.end_headers()
        if data:
            req.wfile.write(data)


def serve_forever(folder: str, latency_s: float, port_out) -> None:
    """Run a server in this process until killed (benchmarks start it in a process of its own)."""
    with LoopbackServer(folder, latency_s) as server:
        port_out.put(server.port)
        threading.Event().wait()
