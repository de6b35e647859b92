"""The mount reads ahead 1 MiB (mount.raise_read_ahead): sequential reads reach the daemon as 1 MiB requests
instead of the 256 KiB the kernel's default 128 KiB read-ahead of a FUSE mount makes."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tinyfs.fs.mount import READ_AHEAD_KIB

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
    pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a bdi's read_ahead_kb"),
]


def read_ahead_kib(path) -> int:
    dev = os.stat(path).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        return int(f.read())


def test_the_mount_reads_ahead_one_mib(mnt):
    deadline = time.monotonic() + 10        # set once the daemon has answered its first request
    while read_ahead_kib(mnt.mnt) != READ_AHEAD_KIB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert READ_AHEAD_KIB == 1024
    assert read_ahead_kib(mnt.mnt) == 1024
