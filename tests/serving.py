"""`tinyfs serve` as the tests run it: a real server process on a free loopback port.

    with served(root, "--anonymous", "write") as srv:
        requests.get(srv.url + "resources/")
    with served(root, users={"alice": "pw"}) as srv:      # writes a users file with these passwords
        srv.auth("alice")  -> ("alice", "pw")
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mounting import tinyfs_argv
from seaweed import free_ports

START_SECONDS = 30


@dataclass
class Served:
    url: str                      # http://127.0.0.1:PORT/
    port: int
    process: subprocess.Popen
    log: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def auth(self, user: str) -> tuple[str, str]:
        return user, self.passwords[user]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    killed: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """kill -9, as a crash would (the test expects it dead afterwards)."""
        self.killed = True
        self.process.kill()
        self.process.wait()


def write_users(path: Path, users: dict[str, str]) -> None:
    from tinyfs.web.auth import set_password

    for name, password in users.items():
        set_password(path, name, password)


@contextmanager
def served(root, *args: str, users: dict[str, str] | None = None, scheme: str = "http",
           env: dict | None = None):
    """Start `tinyfs serve ROOT --listen 127.0.0.1:PORT ARGS...`; stop it (SIGTERM) after. Fails with the
    server's output when it does not come up, or when it died meanwhile (a crash under test)."""
    if hasattr(root, "root"):               # an Archive
        root = root.root.root
    port = free_ports(1)[0]
    work = Path(tempfile.mkdtemp(prefix="tinyfs-serve-"))
    extra = list(args)
    if users is not None:
        write_users(work / "users", users)
        extra += ["--users", str(work / "users")]
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*tinyfs_argv(), "serve", str(root), "--listen", f"127.0.0.1:{port}", *extra],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    srv = Served(f"{scheme}://127.0.0.1:{port}/", port, proc, log, dict(users or {}))
    try:
        _wait_serving(srv)
        yield srv
        assert srv.alive() or srv.killed, f"the server died during the test:\n{srv.output()}"
    finally:
        stop(srv)


def _wait_serving(srv: Served) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if "serving " in srv.output():
            return
        if not srv.alive():
            raise AssertionError(f"tinyfs serve exited {srv.process.returncode}:\n{srv.output()}")
        time.sleep(0.05)
    raise AssertionError(f"tinyfs serve did not come up in {START_SECONDS} s:\n{srv.output()}")


def stop(srv: Served) -> None:
    if srv.alive():
        srv.process.send_signal(signal.SIGTERM)
        try:
            srv.process.wait(20)
        except subprocess.TimeoutExpired:
            srv.process.kill()
            srv.process.wait()
