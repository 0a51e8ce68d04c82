"""Real servers on 127.0.0.1 for the network tests: Debian's nginx (static files with keep-alive and range
requests, uploads by WebDAV PUT) and a small fault-injecting HTTP proxy in front of it."""
from __future__ import annotations

import http.client
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_CONF = """
daemon off;
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_timeout 30;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location / {{
            dav_methods PUT DELETE MOVE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
        }}
        location /moved/ {{  # a permanent redirect, as object stores and CDNs answer: /moved/X -> /X
            rewrite ^/moved/(.*)$ /$1 permanent;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class Nginx:
    """nginx serving `root/www` at http://127.0.0.1:PORT/ (GET with ranges and keep-alive, PUT, MOVE); /moved/X
    redirects (301) to /X; every request is logged in `root/access.log`."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.www = root / "www"
        for sub in ("www", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # workers must read and write the test's private folder
        (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, port=self.port, user=user))
        self.process = subprocess.Popen([NGINX, "-c", str(root / "nginx.conf"), "-p", str(root)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, self.process)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()  # nginx's master ends its workers on SIGTERM
        self.process.wait(30)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that injects faults per path, in order of requests.

    `faults[path]` is a list consumed one per request: ("cut", n) sends the headers and n body bytes, then
    drops the connection; ("status", code) answers with that status; ("stall", s) sends half the body, then
    nothing for s seconds. A request with no fault left is passed through. `requests` counts GETs per path.
    HEAD is refused with 403, as a presigned S3 URL (signed for GET) refuses it.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        """Listening on `host` (another address of this machine, such as the test cluster's bridge, lets other
        network namespaces in); nginx upstream stays on loopback."""
        self.upstream_port = upstream_port
        self.faults: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                with proxy.lock:
                    proxy.requests[self.path] += 1
                    fault = proxy.faults[self.path].pop(0) if proxy.faults[self.path] else None
                if fault and fault[0] == "status":
                    self.send_response(int(fault[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept")}
                upstream.request("GET", self.path, headers=headers)
                reply = upstream.getresponse()
                body = reply.read()
                upstream.close()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() in ("content-length", "content-type", "content-range", "accept-ranges"):
                        self.send_header(key, value)
                self.end_headers()
                if fault and fault[0] == "cut":
                    self.wfile.write(body[:int(fault[1])])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault and fault[0] == "stall":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    time.sleep(fault[1])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
