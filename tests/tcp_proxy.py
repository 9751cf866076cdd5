"""A TCP forwarder on 127.0.0.1 that a test switches between passing, slowing and cutting traffic.

Put in front of a broker listener whose advertised address is the proxy's port (see
``LocalBroker(proxy_port=...)``), it controls every connection a client makes to that broker:

- ``heal()``: bytes pass as they come (the initial mode);
- ``slow(delay_s)``: each chunk read from either side is held ``delay_s`` before it is passed on
  (in order, per direction);
- ``cut()``: every open connection is dropped and new ones are closed as soon as accepted, as a
  network partition between the client and the broker looks to the client.
"""

from __future__ import annotations

import socket
import threading
import time

_CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (a free port, bound at once) to 127.0.0.1:``target``."""

    def __init__(self, target: int | None = None):
        self.target = target  # may be set later, before the first connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._delay_s = 0.0
        self._closed = False
        self.connections = 0  # accepted while not cut: the client did come through the proxy
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def heal(self) -> None:
        with self._lock:
            self._cut, self._delay_s = False, 0.0

    def slow(self, delay_s: float) -> None:
        with self._lock:
            self._cut, self._delay_s = False, delay_s

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            dropped, self._open = self._open, set()
        for sock in dropped:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut or self.target is None
            if refused:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._cut:
                    _close(client)
                    _close(upstream)
                    continue
                self._open.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                delay = self._delay_s
                if delay:
                    time.sleep(delay)
                if self._cut:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
