"""How fast the history of one file is on a long chain (docs/format.md, "The history index").

    python -m bench.history ROOT [--instances 1000] [--files 10000] [--mount MOUNTPOINT]

Builds ROOT, unless it is already an archive, with one resource "long": a first instance of FILES small
files in 100 directories, then INSTANCES - 1 instances that each rewrite three files, add one and
remove one; the file TRACKED is rewritten by every tenth (so it has INSTANCES / 10 versions) and every
200th instance gets a label. It is built through the Python API, as a user's script would, with
fsync and syncfs skipped while building (bench/build.py: durability of the build is not measured);
the history index is written by each commit, as always.

Then it prints, in seconds (warm: each timed step ran once before; the median of REPS runs):
  history         Resource.history(TRACKED): the versions of one file
  log             Resource.log(): every instance with its counts
  children        the names ever seen in one directory
  cli             `tinyfs log ROOT long TRACKED` as a command (a Python start included)
  rebuild         the whole index built again from the instance documents (what `tinyfs recover` does
                  when ROOT/index is missing), once
  mount-ls        with --mount: `ls -l MOUNTPOINT/history/long/TRACKED/` through a mount started here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.build import _no_fsync, _syncfs
from tinyfs import Archive
from tinyfs.core.layout import ArchiveRoot

RID = "long"
TRACKED = "d00/f00000.txt"
REPS = 20


def build(root: Path, instances: int, files: int) -> float:
    """The archive described above; the seconds it took."""
    start = time.perf_counter()
    archive = Archive.init(root)
    with archive.new(RID, message="first") as txn:
        for i in range(files):
            txn.add_bytes(_name(i), b"file %d\n" % i)
    for n in range(1, instances):
        label = f"v{n // 200}" if n % 200 == 0 else None
        with archive.get(RID, "a", message=f"step {n}", label=label) as txn:
            for k in range(3):
                txn.add_bytes(_name((n * 7 + k * 1009) % files + 1 if files > 1 else 0), b"step %d.%d\n" % (n, k))
            if n % 10 == 0:
                txn.add_bytes(TRACKED, b"tracked %d\n" % n)
            txn.add_bytes(f"new/n{n:06d}.txt", b"new %d\n" % n)
            if n > 1:
                txn.remove(f"new/n{n - 1:06d}.txt")
    _syncfs(str(root))
    return time.perf_counter() - start


def _name(i: int) -> str:
    return f"d{i % 100:02d}/f{i:05d}.txt"


def timed(fn, reps: int = REPS) -> float:
    fn()                                          # warm
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, mountpoint: Path | None) -> dict[str, float]:
    resource = Archive(root).get(RID)
    out = {
        "versions": len(resource.history(TRACKED)),
        "history": timed(lambda: resource.history(TRACKED)),
        "log": timed(lambda: resource.log(), reps=5),
        "children": timed(lambda: ArchiveRoot(root).history.children(RID, "d00")),
        "cli": timed(lambda: subprocess.run([sys.executable, "-m", "tinyfs.cli.main", "log", str(root), RID,
                                             TRACKED], check=True, capture_output=True), reps=5),
    }
    shutil.rmtree(root / "index")
    start = time.perf_counter()
    ArchiveRoot(root).history.catch_up_all()
    out["rebuild"] = time.perf_counter() - start
    if mountpoint is not None:
        out["mount-ls"] = _mount_ls(root, mountpoint)
    return out


def _mount_ls(root: Path, mountpoint: Path) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "tinyfs.cli.main", "mount", "--foreground", str(root),
                             str(mountpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the mount did not come up")
            time.sleep(0.05)
        where = mountpoint / "history" / RID / TRACKED
        return timed(lambda: subprocess.run(["ls", "-l", str(where)], check=True, capture_output=True), reps=5)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--mount", type=Path, metavar="MOUNTPOINT")
    args = p.parse_args(argv)
    result: dict[str, float | int] = {}
    if not (args.root / "tinyfs.json").exists():
        _no_fsync()
        result["build"] = build(args.root, args.instances, args.files)
    archive = ArchiveRoot(args.root)
    result["instances"] = len(archive.instance_ids(RID))
    result["files"] = len(archive.state(RID).files)
    result.update(measure(args.root, args.mount))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
