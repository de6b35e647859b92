"""Who may do what over HTTP: users with argon2 password hashes in a file, a trusted reverse proxy's
header, or nobody (anonymous access, when switched on).

The users file has a line per user, `name:$argon2id$...` (`tinyfs serve-passwd FILE NAME` writes it);
`#` starts a comment. It is read again when it changes, so users are added without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..core.errors import InvalidName

ANONYMOUS = ("none", "read", "write")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND"})
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
# argon2 costs ~50 ms a check by design: a password once verified is remembered (as an HMAC under a key of
# this process, never the password itself) for this long, so a client's 10,000 PUTs cost one check
REMEMBER_SECONDS = 300
# Each argon2 check holds 64 MiB (the hashes' memory cost) for its ~50-100 ms. Unbounded, the 32 request
# threads could run 32 at once: a client's parallel transfers all arriving with a password whose memory had
# just expired (rclone's four, every 5 minutes) took the server from 115 to 370 MiB, and 8 at once reach
# 400 MiB. So concurrent checks of the same credentials wait for one (and take its answer), and at most
# this many checks run at once (they are CPU-bound: more at once would not finish sooner on a small host).
ARGON2_AT_ONCE = 2


class Users:
    """The users file, re-read when its mtime or size changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, str] = {}
        self._key = secrets.token_bytes(32)
        self._remembered: dict[bytes, float] = {}
        self._checking: dict[bytes, _Check] = {}      # token -> the check under way
        self._slots = threading.BoundedSemaphore(ARGON2_AT_ONCE)
        self._load()

    def _load(self) -> None:
        st = os.stat(self.path)      # a missing users file is an error at start, not "nobody may log in"
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        hashes = {}
        for line in self.path.read_text("utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.partition(":")
            if sep and hashed.startswith("$argon2"):
                hashes[name] = hashed
        self._hashes, self._stamp, self._remembered = hashes, stamp, {}

    def verify(self, name: str, password: str) -> bool:
        with self._lock:
            try:
                self._load()
            except OSError:
                return False
            hashed = self._hashes.get(name)
            token = hmac.new(self._key, f"{name}\0{password}\0{hashed}".encode(), hashlib.sha256).digest()
            until = self._remembered.get(token)
            if until is not None and until > time.monotonic():
                return True
            check = self._checking.get(token)
            mine = check is None
            if mine:
                check = self._checking[token] = _Check()
        if not mine:
            check.done.wait()
            return check.ok
        try:
            with self._slots:
                check.ok = self._argon2(hashed, password)
        finally:
            with self._lock:
                if check.ok:
                    self._remembered[token] = time.monotonic() + REMEMBER_SECONDS
                del self._checking[token]
            check.done.set()
        return check.ok

    def _argon2(self, hashed: str | None, password: str) -> bool:
        if hashed is None:
            self._hasher.hash(password)      # the same cost for an unknown name: no timing oracle of names
            return False
        try:
            self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False
        return True


class _Check:
    """An argon2 check under way; requests with the same credentials wait for its answer."""

    def __init__(self):
        self.done = threading.Event()
        self.ok = False


def set_password(path: str | os.PathLike, name: str, password: str) -> None:
    """Add or change a user in the users file (made 0600 if new), atomically."""
    check_user_name(name)
    if not password:
        raise InvalidName("the password is empty")
    path = Path(path)
    lines = path.read_text("utf-8").splitlines() if path.exists() else []
    hashed = PasswordHasher().hash(password)
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    text = "\n".join([*kept, f"{name}:{hashed}"]) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".users-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            st = os.stat(path)
            os.chmod(tmp, st.st_mode & 0o777)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_user_name(name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
        raise InvalidName(f"invalid user name {name!r} (1-64 of letters, digits, . _ - @)")


@dataclass
class Decision:
    user: str | None          # who asks (None: anonymous)
    status: int = 0           # 0: go on; else the HTTP status to answer with
    reason: str = ""


class Access:
    """The policy of one server: how a request's user is known, and what anonymous requests may do."""

    def __init__(self, users: Users | None = None, anonymous: str = "none", proxy_header: str | None = None):
        if anonymous not in ANONYMOUS:
            raise InvalidName(f"--anonymous must be one of {', '.join(ANONYMOUS)}")
        self.users, self.anonymous = users, anonymous
        # "X-Remote-User" -> the WSGI key HTTP_X_REMOTE_USER
        self.proxy_key = "HTTP_" + proxy_header.upper().replace("-", "_") if proxy_header else None

    def decide(self, environ: dict) -> Decision:
        user = self._user(environ)
        if isinstance(user, Decision):
            return user
        if user is None and self.anonymous != "write":
            if self.anonymous == "none" or environ["REQUEST_METHOD"] not in READ_METHODS:
                return Decision(None, 401, "log in to do this")
        return Decision(user or ("anonymous" if self.anonymous == "write" else None))

    def _user(self, environ: dict) -> str | None | Decision:
        if self.proxy_key is not None:
            name = environ.get(self.proxy_key)
            if name:
                return name
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or self.users is None:
            return Decision(None, 401, "unsupported authorization (use Basic over TLS)")
        try:
            name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return Decision(None, 400, "malformed Authorization header")
        if not sep:
            return Decision(None, 400, "malformed Authorization header (Basic base64 of user:password)")
        if not self.users.verify(name, password):
            return Decision(None, 401, "wrong user name or password")
        return name
