"""A TCP forwarder on 127.0.0.1 that tests can take down and bring back: a network outage between a
client and a real server (moto's S3, vLLM) that keeps the server's state."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.vllm_server import free_port


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``down()`` refuses new connections and cuts the
    open ones, ``up()`` listens again on the same port."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.replies = 0  # HTTP responses forwarded to clients since up()
        self.down_after: int | None = None  # go down once this many responses were forwarded
        self.refuse = 0  # close this many of the next connections at once (a server restarting)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self, down_after: int | None = None) -> TcpProxy:
        """Listen; with ``down_after``, go down right after forwarding that many HTTP responses (a
        server dying mid-stage, after some requests were answered)."""
        self.replies, self.down_after = 0, down_after
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.refuse > 0:
                self.refuse -= 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if replies and self.down_after is not None:
                    self.replies += data.count(b"HTTP/1.1 ")
                    if self.replies >= self.down_after:
                        self.down_after = None
                        threading.Thread(target=self.down, daemon=True).start()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
