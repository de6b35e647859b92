"""A TCP proxy in front of a test's store: a network that loses connections or stops for a while."""

from __future__ import annotations

import socket
import threading


class Proxy:
    """Forwards every connection to `endpoint` both ways, except:

    - the first `drop` connections are closed once a request has arrived on them, unanswered (a
      connection lost mid-request: a gateway restarting, a volume server gone behind it);
    - while `flowing` is clear, nothing is forwarded (a store that has stopped answering); `set()` it
      and the held traffic goes on."""

    def __init__(self, endpoint: str, drop: int = 0):
        self.target = endpoint.removeprefix("http://").split(":")
        self.drop = drop
        self.flowing = threading.Event()
        self.flowing.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:      # closed
                return
            if self.drop > 0:
                self.drop -= 1
                conn.recv(65536)
                conn.close()
                continue
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.flowing.set()
        self.server.close()
