"""A transaction through a real mount against a simple in-memory model (hypothesis state machine).

Random create / write(offset) / truncate / rename / unlink / mkdir / rmdir / symlink / commit /
rollback / remount / crash (kill -9). The transaction must always show the model; after every commit
`resources/<rid>` (and the recorded state) equals the model -- names, bytes, types, link targets --
and `tinyfs fsck` is clean. TINYFS_SM_EXAMPLES / TINYFS_SM_STEPS make the run longer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mounting import Mounted

from tinyfs.core.layout import ArchiveRoot

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]

EXAMPLES = int(os.environ.get("TINYFS_SM_EXAMPLES", "12"))
STEPS = int(os.environ.get("TINYFS_SM_STEPS", "30"))
NAMES = st.sampled_from(["a", "b", "c.txt", "dir", "ü-é", ".hidden", "x y", "n" * 255])
TARGETS = st.sampled_from(["a", "../a", "/etc/passwd", "dir/c.txt", "nowhere", "x y", "ü-é"])
PICK = st.integers(0, 10**6)
DATA = st.one_of(st.binary(max_size=300),
                 st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 300_000), st.integers(0, 255)))

# path -> ("f", bytes) | ("d",) | ("l", target)
Model = dict[str, tuple]


def read_tree(top: Path) -> Model:
    out: Model = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d",)
            else:
                out[rel] = ("f", p.read_bytes())
    return out


def recorded(root: Path, rid: str) -> Model | None:
    """The head's state as instance.json records it, bytes read from where `stored` says."""
    archive = ArchiveRoot(root)
    head = archive.head(rid)
    if head is None:
        return None
    doc = archive.instance(rid, head)
    out: Model = {p: ("d",) for p in doc.state.dirs}
    out.update({p: ("l", e.target) for p, e in doc.state.links.items()})
    for p, f in doc.state.files.items():
        data = archive.stored_path(rid, doc.stored[f.digest]).read_bytes()
        assert hashlib.new(doc.digest, data).hexdigest() == f.digest, p
        out[p] = ("f", data)
    return out


class Transaction(RuleBasedStateMachine):
    mount: Mounted = None          # set by the test
    counter = 0

    @initialize()
    def open(self):
        Transaction.counter += 1
        self.rid = f"sm{Transaction.counter}"
        self.model: Model = {}
        self.committed: Model = {}
        self.exists = False
        self.commits = 0
        os.mkdir(self.t)

    @property
    def t(self) -> Path:
        return self.mount.mnt / "transactions" / self.rid

    # -- picking ------------------------------------------------------------------
    def dirs(self) -> list[str]:
        return [""] + sorted(p for p, v in self.model.items() if v[0] == "d")

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, v in self.model.items() if v[0] in kinds)

    @staticmethod
    def join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    def expect(self, code: int, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            assert e.errno == code, f"{fn.__name__}{args}: {errno.errorcode.get(e.errno)}, expected " \
                                    f"{errno.errorcode.get(code)}"
            return
        assert code == 0, f"{fn.__name__}{args} succeeded, expected {errno.errorcode.get(code)}"

    # -- rules ----------------------------------------------------------------------
    @rule(pick=PICK, name=NAMES, data=DATA)
    def create(self, pick, name, data):
        dirs = self.dirs()
        path = self.join(dirs[pick % len(dirs)], name)
        if path in self.model:
            self.expect(errno.EEXIST, os.open, self.t / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            return
        with open(self.t / path, "xb") as f:
            f.write(data)
        self.model[path] = ("f", data)

    @precondition(lambda self: self.of_kind("f"))
    @rule(pick=PICK, offset=st.integers(0, 400_000), data=DATA)
    def write(self, pick, offset, data):
        files = self.of_kind("f")
        path = files[pick % len(files)]
        with open(self.t / path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        old = self.model[path][1]
        if data:
            grown = old + b"\0" * max(0, offset - len(old))
            old = grown[:offset] + data + grown[offset + len(data):]
        self.model[path] = ("f", old)

    @precondition(lambda self: self.of_kind("f"))
    @rule(pick=PICK, size=st.one_of(st.integers(0, 400), st.integers(0, 400_000)))
    def truncate(self, pick, size):
        files = self.of_kind("f")
        path = files[pick % len(files)]
        os.truncate(self.t / path, size)
        old = self.model[path][1]
        self.model[path] = ("f", old[:size] + b"\0" * max(0, size - len(old)))

    @precondition(lambda self: self.model)
    @rule(pick=PICK, to=PICK, name=NAMES)
    def rename(self, pick, to, name):
        entries = sorted(self.model)
        src = entries[pick % len(entries)]
        dirs = self.dirs()
        dst = self.join(dirs[to % len(dirs)], name)
        if dst == src:
            return
        kind = self.model[src][0]
        target = self.model.get(dst)
        if kind == "d" and (dst + "/").startswith(src + "/"):
            self.expect(errno.EINVAL, os.rename, self.t / src, self.t / dst)
            return
        if src.startswith(dst + "/"):        # onto an ancestor: the kernel says ENOTEMPTY, as on ext4
            self.expect(errno.ENOTEMPTY, os.rename, self.t / src, self.t / dst)
            return
        if target is not None:
            if kind == "d" and target[0] != "d":
                self.expect(errno.ENOTDIR, os.rename, self.t / src, self.t / dst)
                return
            if kind != "d" and target[0] == "d":
                self.expect(errno.EISDIR, os.rename, self.t / src, self.t / dst)
                return
            if target[0] == "d" and any(p.startswith(dst + "/") for p in self.model):
                self.expect(errno.ENOTEMPTY, os.rename, self.t / src, self.t / dst)
                return
        os.rename(self.t / src, self.t / dst)
        if target is not None:
            del self.model[dst]
        moved = {p: v for p, v in self.model.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.model[p]
        for p, v in moved.items():
            self.model[dst + p[len(src):]] = v

    @precondition(lambda self: self.of_kind("f", "l"))
    @rule(pick=PICK)
    def unlink(self, pick):
        victims = self.of_kind("f", "l")
        path = victims[pick % len(victims)]
        os.unlink(self.t / path)
        del self.model[path]

    @rule(pick=PICK, name=NAMES)
    def mkdir(self, pick, name):
        dirs = self.dirs()
        path = self.join(dirs[pick % len(dirs)], name)
        if path in self.model:
            self.expect(errno.EEXIST, os.mkdir, self.t / path)
            return
        os.mkdir(self.t / path)
        self.model[path] = ("d",)

    @precondition(lambda self: self.of_kind("d"))
    @rule(pick=PICK)
    def rmdir(self, pick):
        dirs = self.of_kind("d")
        path = dirs[pick % len(dirs)]
        if any(p.startswith(path + "/") for p in self.model):
            self.expect(errno.ENOTEMPTY, os.rmdir, self.t / path)
            return
        os.rmdir(self.t / path)
        del self.model[path]

    @rule(pick=PICK, name=NAMES, points_to=TARGETS)
    def symlink(self, pick, name, points_to):
        dirs = self.dirs()
        path = self.join(dirs[pick % len(dirs)], name)
        if path in self.model:
            self.expect(errno.EEXIST, os.symlink, points_to, self.t / path)
            return
        os.symlink(points_to, self.t / path)
        self.model[path] = ("l", points_to)

    @rule()
    def commit(self):
        self.mount.commit(self.rid)
        assert not self.t.exists()
        view = self.mount.mnt / "resources" / self.rid
        if not self.model and not self.exists:
            assert not view.exists()                  # nothing to commit: no resource
        else:
            self.exists = True
            assert read_tree(view) == self.model      # visible when the rename returns
            assert recorded(self.mount.root, self.rid) == self.model
        r = run_tinyfs("fsck", self.mount.root, *([self.rid] if self.exists else []), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        self.committed = dict(self.model)
        self.commits += 1
        os.mkdir(self.t)                              # the next transaction starts from the new state

    @rule()
    def rollback(self):
        shutil.rmtree(self.t)
        assert not self.t.exists()
        self.model = dict(self.committed)
        os.mkdir(self.t)

    @rule()
    def remount(self):
        assert self.mount.stop() == 0
        self.mount.start()

    @rule()
    def crash(self):
        """kill -9 of the daemon: every operation that returned survives (SPEC 5), whatever the overlay
        had copied up or whited out, and the restarted daemon shows the same transaction."""
        self.mount.crash()
        self.mount.start()

    @invariant()
    def shows_the_model(self):
        if getattr(self, "model", None) is not None:
            assert read_tree(self.t) == self.model


@pytest.mark.slow
def test_transactions_follow_the_model(tmp_path):
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "mount.log").start()
    Transaction.mount = m
    try:
        run_state_machine_as_test(Transaction, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        status = m.stop()
    assert status == 0
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(root)
    assert subprocess.run(["fusermount3", "-u", str(point)], capture_output=True).returncode != 0
