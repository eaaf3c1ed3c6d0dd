#!/usr/bin/env python3
"""A small HTTP server for the remote-base tests: serves the files of one
directory with HEAD and GET, single-range requests (206 with
Content-Range), ETag, Last-Modified, Content-Length, If-Match and
If-Unmodified-Since (412 when they fail).

usage: range_server.py DIR PORT [--delay SECONDS] [--log FILE] [--fail N STATUS]
                       [--pass K] [--rate MIBS]

--delay holds every GET that long before it answers; --fail answers the
first N GETs with STATUS and no body, after the first K (--pass, default 0)
answered as usual; --rate sends each response's body at most MIBS MiB/s
(a cap per request, as object stores have per connection, for the
benchmark); --log appends one line per GET ("GET /path bytes=a-b If-Match: ETAG"). Prints "ready" once it listens.
"""
import email.utils
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

ROOT = sys.argv[1]
PORT = int(sys.argv[2])
DELAY = 0.0
LOG = None
FAIL = [0, 500]
PASS = [0]
RATE = 0.0
args = sys.argv[3:]
while args:
    if args[0] == "--delay":
        DELAY = float(args[1])
    elif args[0] == "--log":
        LOG = args[1]
    elif args[0] == "--fail":
        FAIL = [int(args[1]), int(args[2])]
        args = args[1:]
    elif args[0] == "--rate":
        RATE = float(args[1]) * (1 << 20)
    elif args[0] == "--pass":
        PASS[0] = int(args[1])
    else:
        sys.exit(f"unknown argument {args[0]}")
    args = args[2:]
LOG_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def target(self):
        rel = unquote(self.path.split("?", 1)[0]).lstrip("/")
        path = os.path.realpath(os.path.join(ROOT, rel))
        if not path.startswith(os.path.realpath(ROOT) + os.sep) or not os.path.isfile(path):
            return None
        return path

    def fail(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def answer(self, body):
        path = self.target()
        if path is None:
            return self.fail(404)
        st = os.stat(path)
        size = st.st_size
        etag = '"%x-%x-%x"' % (st.st_ino, st.st_mtime_ns, size)
        mtime = email.utils.formatdate(st.st_mtime, usegmt=True)
        im = self.headers.get("If-Match")
        if im is not None and im.strip() != "*" and etag not in [t.strip() for t in im.split(",")]:
            return self.fail(412)
        ius = self.headers.get("If-Unmodified-Since")
        if ius is not None:
            try:
                if int(st.st_mtime) > email.utils.parsedate_to_datetime(ius).timestamp():
                    return self.fail(412)
            except (TypeError, ValueError):
                pass
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng is not None and rng.startswith("bytes=") and "," not in rng:
            a, _, b = rng[6:].partition("-")
            try:
                if a == "":
                    start, end = max(0, size - int(b)), size
                else:
                    start = int(a)
                    end = min(size, int(b) + 1) if b else size
            except ValueError:
                return self.fail(400)
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        if body:
            if LOG:
                with LOG_LOCK, open(LOG, "a") as f:
                    f.write(f"GET {self.path} {rng} If-Match: {im}\n")
            if DELAY:
                time.sleep(DELAY)
            with LOG_LOCK:
                if PASS[0] > 0:
                    PASS[0] -= 1
                    failing = False
                else:
                    failing = FAIL[0] > 0
                    FAIL[0] -= 1
            if failing:
                return self.fail(FAIL[1])
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", mtime)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start
                began, sent = time.monotonic(), 0
                while left:
                    chunk = f.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    sent += len(chunk)
                    if RATE:
                        wait = began + sent / RATE - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)

    def do_HEAD(self):
        self.answer(False)

    def do_GET(self):
        self.answer(True)


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


server = Server(("127.0.0.1", PORT), Handler)
print("ready", flush=True)
server.serve_forever()
