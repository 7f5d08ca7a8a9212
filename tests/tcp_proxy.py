"""A loopback TCP proxy whose connections die the way they do when a Redis container is replaced.

On one machine a restarted redis-server closes its sockets and the client sees the close before it
reuses a pooled connection (redis-py checks for it at checkout). When Redis comes back as a new
container, the close never reaches the client: its pooled connections look alive, and a command on
one is answered by nothing until the client's socket timeout. This proxy keeps the client's side
open when Redis closes its side, and from then on swallows what the client sends on it.
"""

from __future__ import annotations

import selectors
import socket
import threading

from testkit.server_process import free_port


class DeadOnUseProxy:
    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket | None] = {}  # None: Redis gone, client not told
        self._clients: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DeadOnUseProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)
        for sock in list(self._peers):
            sock.close()
        self._listener.close()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._pump(sock)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self._target, timeout=2)
        except OSError:
            client.close()  # Redis is down: refused, as a real client would see it
            return
        self._clients.add(client)
        for sock, other in ((client, upstream), (upstream, client)):
            self._peers[sock] = other
            self._selector.register(sock, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        other = self._peers.get(sock)
        if data:
            if other is not None:
                other.sendall(data)
            return  # a command on a connection whose Redis is gone: no answer, ever
        was_client = sock in self._clients
        self._forget(sock)
        if other is None:
            return
        if was_client:
            self._forget(other)
        else:
            self._peers[other] = None  # Redis closed: the client is not told

    def _forget(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        self._peers.pop(sock, None)
        self._clients.discard(sock)
        sock.close()
