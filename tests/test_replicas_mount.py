"""A commit through the mount on an archive with a replica: `mv` returns once the replica holds it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import check_archive_ok, mounted, run_tinyfs

from tinyfs.core.layout import ArchiveRoot

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]


def test_mv_to_commit_returns_with_the_instance_on_the_replica(tmp_path, root):
    replica = tmp_path / "replica"
    run_tinyfs("store", "add", root, replica)
    with mounted(root, tmp_path) as mnt:
        commit_through(mnt, tmp_path, root, replica)
    check_archive_ok(root)


def commit_through(mnt, tmp_path, root, replica) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"hello\n")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    os.mkdir(mnt / "transactions" / "doc")
    subprocess.run(["rsync", "-a", f"{src}/", f"{mnt.mnt}/transactions/doc/"], check=True)
    os.rename(mnt / "transactions" / "doc", mnt / "commit" / "doc")
    head = ArchiveRoot(root).head("doc")
    assert ArchiveRoot(replica).instance_ids("doc") == [head]      # copied before the rename returned
    r = subprocess.run(["rsync", "-anciHAX", "--delete", f"{src}/", f"{mnt.mnt}/resources/doc/"],
                       capture_output=True, text=True, check=True)
    assert r.stdout == ""
    check_archive_ok(replica)
    assert run_tinyfs("status", root).returncode == 0
