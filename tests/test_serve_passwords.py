"""Password checks of `tinyfs serve` under concurrency: argon2 holds 64 MiB per check, so the checks that run
at once are bounded (tinyfs.web.auth.ARGON2_AT_ONCE) and requests with the same credentials share one."""

from __future__ import annotations

import threading

import pytest

from tinyfs.web.auth import ARGON2_AT_ONCE, Users, set_password

pytestmark = pytest.mark.core


class Watched:
    """The real argon2 hasher, counting its checks and how many ran at once."""

    def __init__(self, hasher):
        self.hasher, self.calls, self.running, self.most = hasher, 0, 0, 0
        self.lock = threading.Lock()

    def _run(self, fn, *args):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.running -= 1

    def verify(self, hashed, password):
        return self._run(self.hasher.verify, hashed, password)

    def hash(self, password):
        return self._run(self.hasher.hash, password)


def at_once(n: int, check) -> list:
    """`check(i)` in n threads released together; their answers."""
    start = threading.Barrier(n)
    answers = [None] * n

    def run(i):
        start.wait()
        answers[i] = check(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def watched_users(tmp_path, names) -> tuple[Users, Watched]:
    for name in names:
        set_password(tmp_path / "users", name, f"{name}-pw")
    users = Users(tmp_path / "users")
    users._hasher = watched = Watched(users._hasher)
    return users, watched


def test_requests_with_the_same_credentials_share_one_check(tmp_path):
    users, watched = watched_users(tmp_path, ["alice"])
    assert at_once(8, lambda i: users.verify("alice", "wrong")) == [False] * 8
    assert watched.calls == 1
    assert at_once(8, lambda i: users.verify("alice", "alice-pw")) == [True] * 8
    assert watched.calls == 2
    assert users.verify("alice", "alice-pw") and watched.calls == 2        # remembered


def test_only_a_few_checks_run_at_once(tmp_path):
    names = [f"user{i}" for i in range(8)]
    users, watched = watched_users(tmp_path, names)
    assert at_once(8, lambda i: users.verify(names[i], f"{names[i]}-pw")) == [True] * 8
    assert at_once(8, lambda i: users.verify(f"nobody{i}", "pw")) == [False] * 8     # unknown names hash too
    assert watched.calls == 16
    assert watched.most == ARGON2_AT_ONCE
