"""`scripts/bench --replicas`: what a local replica costs a commit.

    scripts/bench --replicas [--quick] [--reps N] [--workdir DIR] [--keep]

For a 1 GiB file and for 10,000 files of 4 KiB: `tinyfs ingest` into an archive with one local replica
(the commit returns once the replica holds the instance, every file checked on the way), against the
native way to get the same two copies: `tinyfs ingest` into an archive without one, then `cp -a` of the
new instance's bag to another directory and `sync` (which checks nothing). Both on the same disk, both
ending with every byte on disk; the page cache is dropped before each run when we are root. Prints the
medians and the ratio; the target is 1.3 at most.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness import KIB, MIB, TINYFS, median

TARGET = 1.3


def drop_caches() -> None:
    if os.geteuid() == 0:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def tinyfs(*args) -> str:
    r = subprocess.run([TINYFS, *map(str, args)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"tinyfs {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r.stdout.strip()


def make_sources(base: Path, quick: bool) -> dict[str, Path]:
    big, small = base / "big", base / "small"
    big.mkdir(parents=True)
    with open(big / "one.bin", "wb") as f:
        for _ in range(64 if quick else 1024):
            f.write(os.urandom(MIB))
    for k in range(1000 if quick else 10_000):
        d = small / f"d{k // 500:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{k:05d}.txt").write_bytes(os.urandom(4 * KIB))
    return {"1g": big, "small": small}


def one_run(base: Path, src: Path, replicated: bool, n: int) -> float:
    root = base / f"a{n}-{'r' if replicated else 'n'}"
    tinyfs("init", root)
    if replicated:
        tinyfs("store", "add", root, base / f"a{n}-replica")
    drop_caches()
    start = time.perf_counter()
    iid = tinyfs("ingest", root, "r", src)
    if not replicated:
        bag = next(root.glob(f"resources/*/*/r/instances/{iid}"))
        subprocess.run(["cp", "-a", str(bag), str(base / f"a{n}-copy")], check=True)
        subprocess.run(["sync"], check=True)
    took = time.perf_counter() - start
    shutil.rmtree(root)
    shutil.rmtree(base / f"a{n}-replica", ignore_errors=True)
    shutil.rmtree(base / f"a{n}-copy", ignore_errors=True)
    return took


def main(args) -> int:
    reps = args.reps or (1 if args.quick else 3)
    base = (args.workdir or Path("/var/tmp")).absolute() / f"tinyfs-bench-replicas-{os.getpid()}"
    base.mkdir(parents=True)
    print(f"bench --replicas: {reps} repetition(s), scratch {base}, load {os.getloadavg()[0]:.1f}", flush=True)
    try:
        sources = make_sources(base / "src", args.quick)
        n = 0
        for name, src in sources.items():
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(reps):
                for replicated in (False, True):       # alternated: drift in the machine's load hits both
                    n += 1
                    times[replicated].append(one_run(base, src, replicated, n))
            with_replica, native = median(times[True]), median(times[False])
            ratio = with_replica / native
            print(f"{name:6} ingest with a replica {with_replica:7.2f} s   ingest + cp -a + sync {native:7.2f} s   "
                  f"ratio {ratio:.2f} (target <= {TARGET})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0

