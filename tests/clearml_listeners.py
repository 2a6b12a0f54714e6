"""Local stand-ins for ClearML servers that misbehave, on 127.0.0.1 (no real server exists on these machines).

- `silent_server`: accepts connections and never answers (a hung API server, a black-holing firewall);
- `http_server(BadGateway)`: answers HTTP 502 to everything (a reverse proxy whose API server is down);
- `http_server(StallingApi)`: answers debug.ping and auth.login like a ClearML API server, then never answers
  another request (so the probe passes and Task.init itself must be bounded).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def silent_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.answer(self.path.split("?")[0].rsplit("/", 1)[-1])

    do_POST = do_PUT = do_GET


class BadGateway(_Handler):
    def answer(self, endpoint: str) -> None:
        body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StallingApi(_Handler):
    def answer(self, endpoint: str) -> None:
        meta = {"result_code": 200, "result_subcode": 0, "result_msg": "OK", "endpoint": {"name": endpoint}}
        if endpoint == "debug.ping":
            return self.send_json(200, {"meta": meta, "data": {"msg": "ClearML server"}})
        if endpoint == "auth.login":
            import jwt

            claims = {"api_version": "2.31", "server_version": "2.0.0", "env": "test", "identity": {},
                      "exp": int(time.time()) + 3600}
            token = jwt.encode(claims, "vocseg-test-signing-key-of-32-bytes!", algorithm="HS256")
            return self.send_json(200, {"meta": meta, "data": {"token": token}})
        self.server.stop.wait(120)  # never answers any other call (until the test is over)


@contextmanager
def http_server(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


def point_clearml_at(monkeypatch, url: str) -> None:
    """Configure the SDK for the server at `url`, as clearml-init would (host + credentials)."""
    for name in ("CLEARML_API_HOST", "CLEARML_WEB_HOST", "CLEARML_FILES_HOST"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "test")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "test")


def forget_clearml_offline_state() -> None:
    """Task.set_offline(True) by an earlier run in this process is class state; the SDK's own way back online
    (set_offline(False)) reconnects every earlier session, which may be one of these hanging listeners."""
    from clearml.backend_api import Session
    from clearml.backend_interface.base import InterfaceBase

    InterfaceBase._offline_mode = False
    Session._offline_mode = False
    InterfaceBase._default_session = None
