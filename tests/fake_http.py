"""The part every fake API server of the tests shares: a threaded HTTP server on a free loopback port that records
each request and answers it with JSON (or lets the subclass stream the answer itself)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlparse


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, method: str, path: str, query: dict, body: bytes,
                stream: Any) -> tuple[int, dict] | None:
        """(status, JSON body), or None after writing a streamed answer with `stream(status)`."""
        raise NotImplementedError

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append({"method": self.command, "path": url.path, "query": query, "body": body})
                answer = fake.respond(self.command, url.path, query, body, self._stream)
                if answer is not None:
                    self._json(*answer)

            def _stream(self, status: int) -> BinaryIO:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                return self.wfile

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):
                pass

        return Handler
