"""The mount identifies what a commit stored in the background and shows it as user.tinyfs.format."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import time

import pytest
from trees import errno_of

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]

IDENTIFIED_WITHIN = 60      # seconds: identification runs after the commit, at low priority


def test_a_commit_through_the_mount_gets_its_formats_in_the_background(mnt):
    t = mnt / "transactions" / "fm"
    t.mkdir()
    (t / "log.gz").write_bytes(gzip.compress(b"a log"))
    (t / "page.html").write_bytes(b"<!DOCTYPE html><html><head></head><body>p</body></html>")
    mnt.commit("fm")
    view = mnt / "resources" / "fm" / "log.gz"
    deadline = time.monotonic() + IDENTIFIED_WITHIN
    while errno_of(os.getxattr, view, "user.tinyfs.format") == errno.ENODATA:    # absent while pending
        assert time.monotonic() < deadline, "not identified in time"
        time.sleep(0.2)
    assert os.getxattr(view, "user.tinyfs.format") == b"x-fmt/266 application/gzip"
    assert os.getxattr(mnt / "resources" / "fm" / "page.html", "user.tinyfs.format") == b"fmt/471 text/html"
    [iid] = os.listdir(mnt / "instances" / "fm")
    assert os.getxattr(mnt / "instances" / "fm" / iid / "log.gz", "user.tinyfs.format").startswith(b"x-fmt/266")
    assert "user.tinyfs.format" not in os.listxattr(view)      # virtual: read by name, never listed
