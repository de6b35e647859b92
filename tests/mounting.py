"""Helpers for tests that mount a real archive: start `tinyfs mount --foreground`, poll, unmount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def tinyfs_argv() -> list[str]:
    exe = shutil.which("tinyfs", path=str(Path(sys.executable).parent)) or shutil.which("tinyfs")
    return [exe] if exe else [sys.executable, "-m", "tinyfs.cli.main"]


class Mounted:
    """A running mount of `root` on `mnt`; `crash()` kills it like a power cut of the daemon."""

    def __init__(self, root: Path, mnt: Path, log: Path, options: str | None = None, wrap: list[str] | None = None):
        """`wrap`: argv the mount command is run by (e.g. `ip netns exec NS`, tests/netns.py)."""
        self.root, self.mnt, self.log, self.options = root, mnt, log, options
        self.wrap = wrap or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mounted:
        argv = [*self.wrap, *tinyfs_argv(), "mount", "--foreground", str(self.root), str(self.mnt)]
        if self.options:
            argv += ["-o", self.options]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mount did not appear in 30 s")
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        return self.proc.returncode if self.proc else None

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)

    def tracebacks(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if "Traceback" in text else ""

    def __truediv__(self, other) -> Path:
        return self.mnt / other

    def commit(self, rid: str) -> None:
        os.rename(self.mnt / "transactions" / rid, self.mnt / "commit" / rid)


def tree(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every regular file under root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def listing(root: Path) -> dict[str, tuple]:
    """relative path -> (type, mode, mtime_ns, size or link target) for every entry under root."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = os.lstat(p)
            kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
            extra = os.readlink(p) if kind == "l" else (st.st_size if kind == "f" else None)
            out[str(p.relative_to(root))] = (kind, st.st_mode & 0o777, st.st_mtime_ns, extra)
    return out


def check_archive(root: Path) -> None:
    """Every instance bag validates with bagit-python and `tinyfs fsck` is clean."""
    import bagit

    for inst in root.glob("resources/*/*/*/instances/*"):
        bagit.Bag(str(inst)).validate()
    r = subprocess.run([*tinyfs_argv(), "fsck", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
