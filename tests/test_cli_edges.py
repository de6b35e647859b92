"""Small edges of the command line: init --digest in every spelling, umount waiting for the daemon to
exit, a mount over a non-empty directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import run_tinyfs
from mounting import Mounted

needs_fuse = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")


def _digests(root) -> list[str]:
    return json.loads((root / "tinyfs.json").read_text())["digests"]


@pytest.mark.core
def test_init_digest_before_or_after_root_repeated_or_as_a_comma_list(tmp_path):
    run_tinyfs("init", "--digest", "sha256", tmp_path / "a")
    run_tinyfs("init", tmp_path / "b", "--digest", "sha512", "sha256")          # the documented form
    run_tinyfs("init", tmp_path / "c", "--digest", "sha256,sha512")
    run_tinyfs("init", "--digest", "sha256", "--digest", "sha512", tmp_path / "d")
    assert [_digests(tmp_path / n) for n in "abcd"] == [["sha256"], ["sha512", "sha256"],
                                                       ["sha256", "sha512"], ["sha256", "sha512"]]
    for argv in (["init", "--digest", "sha256"], ["init", "--digest", "sha256", "sha512"]):
        r = run_tinyfs(*argv, check=False)
        assert r.returncode == 2 and r.stderr == "tinyfs: init: the following arguments are required: ROOT (see --help)\n"


@pytest.mark.mount
@needs_fuse
def test_umount_returns_once_the_daemon_has_exited(root, tmp_path):
    """Named directly, through a symbolic link, with a space and a backslash in its name (which /proc/mounts escapes)."""
    point = tmp_path / "m n\\t"
    point.mkdir()
    link = tmp_path / "link"
    link.symlink_to(point)
    for given in (point, link):
        m = Mounted(root, point, tmp_path / "mount.log").start()
        try:
            run_tinyfs("umount", given)
            assert m.proc.poll() == 0, f"tinyfs umount {given} returned while the daemon was still running"
            assert not os.path.ismount(point)
        finally:
            m.stop()


@pytest.mark.mount
@needs_fuse
def test_a_mount_over_a_non_empty_directory_is_refused_without_nonempty(root, tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    (point / "mine.txt").write_text("hidden by a mount\n")
    try:
        _refused_then_mounted(root, point, tmp_path)
    finally:
        if os.path.ismount(point):           # (left mounted by a failure: never leave a mount behind)
            subprocess.run(["fusermount3", "-u", str(point)], check=False)
    assert (point / "mine.txt").read_text() == "hidden by a mount\n"


def _refused_then_mounted(root, point, tmp_path) -> None:
    r = run_tinyfs("mount", root, point, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is not empty" in r.stderr and "-o nonempty" in r.stderr
    assert not os.path.ismount(point)
    # the daemon refuses too (a systemd unit or fstab line runs it directly)
    log = tmp_path / "fg.log"
    with pytest.raises(RuntimeError, match="not empty"):
        Mounted(root, point, log).start()
    run_tinyfs("mount", root, point, "-o", "nonempty")
    try:
        assert sorted(os.listdir(point)) == ["aip", "commit", "events.jsonl", "history", "instances", "resources",
                                             "transactions"]
    finally:
        run_tinyfs("umount", point)
