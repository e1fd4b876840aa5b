"""Fault-injecting HTTP reverse proxy in front of moto's standalone S3 server, for the tests.

tests/s3_helpers.py starts moto, then `python tests/s3_faults.py --port P --upstream http://127.0.0.1:MOTO_PORT`,
waits for the line `ready` and points every S3 client (boto3, pyarrow's AWS C++ SDK) at http://127.0.0.1:P.
Faults are off until a test asks for them with a control request that the proxy answers itself:

    GET /__faults__?slowdown=0.1&reset=0.05&seed=1   set the shares (0..1); answers settings and counters as JSON
    GET /__faults__                                  just the settings and counters

For every other request, with probability `slowdown` the proxy answers S3's own 503 SlowDown error, else with
probability `reset` it resets the TCP connection; neither reaches moto. Tests use it to prove that the clients'
retry settings really ride through S3 throttling and a flaky network.
"""
import argparse
import http.client
import http.server
import json
import random
import signal
import socket
import struct
import sys
import threading
import urllib.parse
import uuid

CONTROL_PATH = "/__faults__"
# Hop-by-hop or re-computed here: never relayed from the upstream's response.
DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}
SLOWDOWN_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                "<Message>Please reduce your request rate.</Message><RequestId>{}</RequestId></Error>")


class Faults:
    """Fault shares and counters, shared by all handler threads."""

    # The counter each action bumps; tests read these names (tests/test_storage.py, tests/test_s3_workflow.py).
    COUNTER = {"forward": "forwarded", "slowdown": "slowdowns_503", "reset": "resets"}

    def __init__(self):
        self.lock = threading.Lock()
        self.settings = {"slowdown": 0.0, "reset": 0.0, "seed": None}
        self.counters = dict.fromkeys(self.COUNTER.values(), 0)
        self.rng = random.Random()

    def configure(self, query):
        """Apply a control query string and return the state as JSON; ValueError if bad."""
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        if set(params) - set(self.settings):
            raise ValueError(f"unknown parameters: {sorted(set(params) - set(self.settings))}")
        shares = {k: float(params[k]) for k in ("slowdown", "reset") if k in params}
        if not all(0.0 <= share <= 1.0 for share in shares.values()):
            raise ValueError("slowdown and reset must be within 0..1")
        with self.lock:
            self.settings.update(shares)
            if "seed" in params:  # same seed, same fault sequence (given the same requests)
                self.settings["seed"] = params["seed"]
                self.rng = random.Random(params["seed"])
            return json.dumps({**self.settings, **self.counters})

    def choose(self):
        """Pick 'slowdown', 'reset' or 'forward' for one request, and count it."""
        with self.lock:
            # One draw, split into [slowdown | reset | forward] bands.
            draw, slowdown, reset = self.rng.random(), self.settings["slowdown"], self.settings["reset"]
            action = "slowdown" if draw < slowdown else "reset" if draw < slowdown + reset else "forward"
            self.counters[self.COUNTER[action]] += 1
            return action


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: SDKs reuse connections
    upstream = ("127.0.0.1", 5000)  # set from the command line
    faults = Faults()

    def log_message(self, format, *args):
        pass  # keep test output quiet

    def handle_any(self):
        # Always drain the body first so the keep-alive stream stays in sync.
        body = self.read_body()
        url = urllib.parse.urlsplit(self.path)
        if self.command == "GET" and url.path == CONTROL_PATH:
            try:
                self.reply(200, "application/json", self.faults.configure(url.query).encode())
            except ValueError as exc:
                self.reply(400, "text/plain", str(exc).encode())
            return
        action = self.faults.choose()
        if action == "slowdown":
            self.reply(503, "application/xml", SLOWDOWN_XML.format(uuid.uuid4().hex[:16].upper()).encode())
        elif action == "reset":
            # Linger (on, 0s) makes close() send RST instead of FIN: a real reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the buffered reader holds a ref that would delay close()
            self.connection.close()
            self.close_connection = True
        else:
            self.forward(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = handle_any

    def read_body(self):
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Chunked: keep it verbatim (sizes, data, trailers) and forward it as-is.
        raw = bytearray()
        while True:
            line = self.rfile.readline(65537)
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)  # b"" at EOF counts as 0
            if size == 0:
                break
            raw += self.rfile.read(size + 2)  # chunk data plus its CRLF
        while line not in (b"\r\n", b"\n", b""):  # trailer lines, then an empty line
            line = self.rfile.readline(65537)
            raw += line
        return bytes(raw)

    def forward(self, body):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            # Send the client's headers untouched: Host is covered by S3 signatures.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()  # de-chunks if needed; we resend with Content-Length
        except (OSError, http.client.HTTPException) as exc:
            self.reply(502, "text/plain", f"upstream error: {exc}".encode())
            return
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in DROP_RESPONSE_HEADERS:
                self.send_header(name, value)
        # HEAD (and bodiless statuses) keep the upstream's length, not ours.
        bodiless = self.command == "HEAD" or resp.status in (204, 304)
        length = resp.getheader("Content-Length") if bodiless else str(len(data))
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if not bodiless:
            self.wfile.write(data)

    def reply(self, status, content_type, payload):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not block exit

    def handle_error(self, request, client_address):
        # Clients hanging up mid-reply is routine under injected faults; only log real bugs.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5301")
    args = parser.parse_args()
    upstream = urllib.parse.urlsplit(args.upstream)
    Handler.upstream = (upstream.hostname, upstream.port or 80)
    # SIGTERM -> SystemExit in the main thread, which leaves serve_forever cleanly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with Server(("127.0.0.1", args.port), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
