"""sd_notify over $NOTIFY_SOCKET: a few lines of socket code, no library."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send one notification to systemd (READY=1, STOPPING=1, STATUS=...); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]   # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
