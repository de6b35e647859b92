"""The commit path's small contracts (SPEC 5): a transaction is committed under its own name only, the
committing user is the creator unless user.tinyfs.creator says otherwise, and a failed commit is logged
once."""

from __future__ import annotations

import errno
import json
import os
import pwd
import subprocess

import pytest
import trio
from mounting import tinyfs_argv

from tinyfs import Archive
from tinyfs.fs.ops import Operations


class Ctx:
    def __init__(self, uid=0, gid=0, umask=0o022):
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


def events(root, kind: str, rid: str) -> list[dict]:
    lines = (json.loads(line) for line in (root / "events.jsonl").read_text().splitlines())
    return [e for e in lines if e["event"] == kind and e["resource"] == rid]


@pytest.mark.mount
def test_a_transaction_moved_into_commit_under_another_name_is_refused(mnt, root):
    """`mv transactions/x commit/y` committed x. Now EPERM (nothing but x itself can be made in commit/),
    the transaction intact and still committable, the reason in user.tinyfs.error."""
    t = mnt / "transactions" / "x"
    os.mkdir(t)
    (t / "a.txt").write_text("a")
    r = subprocess.run(["mv", str(t), str(mnt / "commit" / "y")], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    with pytest.raises(PermissionError):
        os.rename(t, mnt / "commit" / "y")
    assert (t / "a.txt").read_text() == "a"
    assert not os.path.exists(mnt / "resources" / "x") and not os.path.exists(mnt / "resources" / "y")
    assert os.getxattr(t, "user.tinyfs.state") == b"failed"
    assert b"commit/x" in os.getxattr(t, "user.tinyfs.error")
    subprocess.run(["mv", str(t), str(mnt / "commit") + "/"], check=True)
    assert (mnt / "resources" / "x" / "a.txt").read_text() == "a"


@pytest.mark.adapter
def test_the_creator_of_a_mount_commit_is_the_committing_user(tmp_path):
    """Unless user.tinyfs.creator is set, the creator is the name of the uid that renames the transaction
    into commit/ (an ordinary user's commit had an empty creator), or that uid where it has no name."""
    archive = Archive.init(tmp_path / "archive")
    ops = Operations(archive.root)
    nobody = pwd.getpwnam("nobody").pw_uid
    nameless = next(uid for uid in range(123_457, 200_000) if not _has_name(uid))

    async def commit_as(uid: int, rid: bytes, creator: bytes | None = None) -> None:
        ctx = Ctx(uid=uid, gid=uid)
        t = await ops.mkdir(ops.top["transactions"], rid, 0o755, ctx)
        info, _ = await ops.create(t.st_ino, b"f.txt", 0o644, os.O_WRONLY, ctx)
        await ops.write(info.fh, 0, rid)
        await ops.release(info.fh)
        if creator is not None:
            await ops.setxattr(t.st_ino, b"user.tinyfs.creator", creator, ctx)
        await ops.rename(ops.top["transactions"], rid, ops.top["commit"], rid, 0, ctx)

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            await commit_as(nobody, b"by-nobody")
            await commit_as(nameless, b"by-a-uid")
            await commit_as(nobody, b"said", creator=b"Ada Lovelace")
    trio.run(go)
    creators = {rid: archive.get(rid).instances[-1].creator for rid in ("by-nobody", "by-a-uid", "said")}
    assert creators == {"by-nobody": "nobody", "by-a-uid": str(nameless), "said": "Ada Lovelace"}


def _has_name(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


@pytest.mark.mount
def test_a_mount_commit_names_the_user_who_made_it(mnt, root):
    t = mnt / "transactions" / "named"
    os.mkdir(t)
    (t / "a.txt").write_text("a")
    mnt.commit("named")
    assert Archive(root).get("named").instances[-1].creator == pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.mount
def test_a_failed_commit_is_logged_once(mnt, root, tmp_path):
    """A commit failing with ESTALE was attempted, warned about and recorded (commit.failed) twice: the
    kernel retries a path-based call once when it gets ESTALE. Asked again of an unchanged transaction
    over an unchanged head, the failure is answered as it was, not attempted, warned or recorded again;
    once the transaction changes, a commit is attempted anew."""
    t = mnt / "transactions" / "shared"
    os.mkdir(t)
    (t / "a.txt").write_text("a1")
    mnt.commit("shared")
    os.mkdir(t)
    (t / "a.txt").write_text("a2 from the mount")
    f = tmp_path / "a.txt"
    f.write_text("a2 from the cli")
    subprocess.run([*tinyfs_argv(), "ingest", str(root), "shared", str(f)], check=True, capture_output=True)
    for _ in range(2):
        r = subprocess.run(["mv", str(t), str(mnt / "commit") + "/"], capture_output=True, text=True)
        assert r.returncode != 0 and "Stale file handle" in r.stderr, r.stderr
    assert len(events(root, "commit.failed", "shared")) == 1
    assert mnt.log.read_text().count("commit of shared failed") == 1
    assert os.getxattr(t, "user.tinyfs.state") == b"failed"
    assert b"changed on both sides" in os.getxattr(t, "user.tinyfs.error")
    (t / "b.txt").write_text("b")           # changed: a new attempt (and the same clash) is logged anew
    with pytest.raises(OSError) as e:
        mnt.commit("shared")
    assert e.value.errno == errno.ESTALE
    assert len(events(root, "commit.failed", "shared")) == 2
    assert mnt.log.read_text().count("commit of shared failed") == 2
