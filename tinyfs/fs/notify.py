"""sd_notify over $NOTIFY_SOCKET: a few lines of socket code, no library."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one notification (READY=1, STOPPING=1, STATUS=...) to systemd, or to whoever set $NOTIFY_SOCKET
    (`tinyfs mount` without --foreground waits on one for READY=1); False when there is none or it is
    gone. Never raises: a listener that went away must not take the mount down."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]   # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify %r to %s: %s", message, address, e)
        return False
    return True
