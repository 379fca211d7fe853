"""A small TCP proxy on 127.0.0.1 that can take its endpoint down and bring it back (threads + sockets).

`down()` closes the listening socket (new connections are refused) and resets every open connection
(clients mid-request see a reset; the server sees the client vanish); `up()` listens again on the same
port. The client-to-server stream is read as HTTP/1.1, so each request's method, path and length are
known before it is forwarded, and `on_request(method, path, content_length)` decides:

* None: forward it;
* it called `down()` itself: the request is dropped, nothing of it reaches the server;
* `(n, action)`: forward the head and the first n bytes of the body, then call `action()` (e.g.
  `down`), so the server holds half an upload when the connection goes.

Bodies are skipped by Content-Length; a chunked body stops the parsing for the rest of that
connection (its bytes are still forwarded).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Callable


def _free_port_below_ephemeral() -> int:
    """A free loopback port below Linux's ephemeral range, so no outgoing connection takes it while down."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class _RequestReader:
    """Splits a client-to-server byte stream into requests; holds each request head until it is complete."""

    def __init__(self):
        self.head = b""
        self.body_left = 0
        self.cut_left: int | None = None       # body bytes still to forward before the cut
        self.passthrough = False

    def feed(self, data: bytes, on_head) -> tuple[bytes | None, bool]:
        """(bytes to forward now, or None to drop the connection; whether to cut it after forwarding them).

        `on_head(method, path, content_length)` returns False (drop), an int n (cut after n body
        bytes) or None (forward).
        """
        out = bytearray()
        while data:
            if self.passthrough:
                out += data
                break
            if self.body_left:
                n = min(self.body_left, len(data))
                if self.cut_left is not None and self.cut_left <= n:
                    out += data[:self.cut_left]
                    return bytes(out), True
                out += data[:n]
                data, self.body_left = data[n:], self.body_left - n
                if self.cut_left is not None:
                    self.cut_left -= n
                continue
            self.head += data
            data = b""
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:               # not HTTP as we know it: forward blindly
                    out += self.head
                    self.head, self.passthrough = b"", True
                break
            head, data, self.head = self.head[:end + 4], self.head[end + 4:], b""
            lines = head.decode("latin-1").split("\r\n")
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = 0 if chunked else int(headers.get("content-length", "0") or 0)
            decision = on_head(method, path, length)
            if decision is False:
                return None, False
            out += head
            if chunked:
                self.passthrough = True
            else:
                self.body_left = length
            if decision is not None:
                self.cut_left = min(int(decision), length)
                if self.cut_left == 0:
                    return bytes(out), True
        return bytes(out), False


class TcpProxy:
    """127.0.0.1:<port> -> upstream; `down()` / `up()` / `outage(seconds)` simulate the endpoint failing."""

    def __init__(self, upstream: tuple[str, int], *, on_request: Callable[[str, str, int], object] | None = None,
                 port: int | None = None):
        self.upstream = upstream
        self.port = port or _free_port_below_ephemeral()
        self.on_request = on_request
        self.requests: list[tuple[float, str, str]] = []     # (monotonic time, method, path) of forwarded requests
        self.dropped: list[tuple[float, str, str]] = []      # requests dropped whole by down()
        self.cut: list[tuple[float, str, str, int, int]] = []  # (time, method, path, body bytes sent, of length)
        self.events: list[tuple[float, str]] = []            # (monotonic time, "down" | "up")
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._generation = 0                                 # bumped by down(): older connections are dead

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    # ---------------------------------------------------------------------------------- control

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    listener.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        listener.close()
                        raise
                    time.sleep(0.05)
            listener.listen(64)
            self._listener = listener
            self.events.append((time.monotonic(), "up"))
        threading.Thread(target=self._accept, args=(listener,), name=f"proxy-accept-{self.port}", daemon=True).start()

    start = up

    def down(self) -> None:
        """Refuse new connections and reset the open ones (RST: SO_LINGER 0)."""
        with self._lock:
            if self._listener is None:
                return
            self._generation += 1
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self.events.append((time.monotonic(), "down"))
        try:
            listener.shutdown(socket.SHUT_RDWR)      # wakes the accept() blocked on it
        except OSError:
            pass
        listener.close()
        for s in conns:
            _reset(s)

    def outage(self, seconds: float) -> threading.Timer:
        """Down now, up again after `seconds` (on a timer thread)."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        timer.start()
        return timer

    def stop(self) -> None:
        self.down()

    def outages(self) -> list[tuple[float, float | None]]:
        """(down at, up at or None) pairs, monotonic seconds."""
        spans, start = [], None
        for t, what in self.events:
            if what == "down":
                start = t
            elif start is not None:
                spans.append((start, t))
                start = None
        if start is not None:
            spans.append((start, None))
        return spans

    # ---------------------------------------------------------------------------------- plumbing

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return                                # closed by down()
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:    # went down meanwhile
                    alive = False
                else:
                    alive = True
                    self._conns |= {client, server}
                generation = self._generation
            if not alive:
                _reset(client)
                _reset(server)
                continue
            threading.Thread(target=self._pump_requests, args=(client, server, generation), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump_requests(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        reader = _RequestReader()
        cut_action: list = []

        def on_head(method: str, path: str, length: int):
            decision = self.on_request(method, path, length) if self.on_request is not None else None
            with self._lock:
                alive = self._generation == generation          # the hook may have called down()
                (self.requests if alive else self.dropped).append((time.monotonic(), method, path))
            if not alive:
                return False
            if decision is None:
                return None
            n, action = decision
            cut_action.append(action)
            self.cut.append((time.monotonic(), method, path, min(int(n), length), length))
            return n

        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                out, cut = reader.feed(data, on_head)
                if out is None:
                    break
                if out:
                    dst.sendall(out)
                if cut:
                    time.sleep(0.05)                             # let the server read the partial body
                    cut_action.pop()()
                    break
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            self._conns -= {a, b}
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _reset(s: socket.socket) -> None:
    """Close with RST rather than FIN, as a crashed or unplugged server would look to the client."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RD)        # wakes a thread blocked in recv() on it; sends nothing
    except OSError:
        pass
    s.close()
