"""The benchmark behind `scripts/bench`: tinyfs against what a user would do instead.

Every workload runs `reps` times; within a repetition the variants (tinyfs, the
pyfuse3 passthrough of bench/passthrough.py, and the native alternatives) run
one after the other, in an order rotated by the repetition number, so that a
slow spell of a shared disk does not always hit the same variant. Each variant
writes to fresh names (new resource ids, new directories); nothing is deleted
until the end, because ext4 slows down right after mass deletes. A "warm" step
is warmed right before it is timed, a "cold" one starts from dropped caches;
before each deposit the page cache is dropped and the source warmed again
(see `recycle_memory`).
Times are `time.perf_counter()` around each subprocess; a variant's time is the
sum of its phases (e.g. mkdir + cp + mv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY = sys.executable
TINYFS = str(BIN / "tinyfs") if (BIN / "tinyfs").exists() else (shutil.which("tinyfs") or "tinyfs")
BAGIT = str(BIN / "bagit.py") if (BIN / "bagit.py").exists() else (shutil.which("bagit.py") or "bagit.py")
MAKE_BAG = "import sys, bagit; bagit.make_bag(sys.argv[1], checksums=['sha512'])"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
STEP_TIMEOUT = 3600

Steps = list[tuple[str, list]]


@dataclass
class Sizes:
    big: int  # bytes of the one big file
    small: int  # number of small files
    small_dirs: int
    file_size: int  # bytes of each small file
    large: int  # number of files of the --large tree (0: none)
    reps: int
    many: int  # resources of the mount-time archive
    wide: int  # files of the one-resource mount-time archive
    mount_reps: int

    @staticmethod
    def choose(quick: bool, large: bool, reps: int | None) -> Sizes:
        if quick:
            s = Sizes(16 * MIB, 500, 10, 4 * KIB, 5_000 if large else 0, 1, 1_000, 10_000, 1)
        else:
            s = Sizes(
                GIB, 10_000, 100, 4 * KIB, 100_000 if large else 0, 3, 10_000, 100_000 if large else 10_000, 3
            )
        if reps:
            s.reps = s.mount_reps = reps
        return s


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_tree(dest: Path, n: int, ndirs: int, size: int) -> None:
    per = -(-n // ndirs)
    for i in range(n):
        d = dest / f"d{i // per:03d}"
        if i % per == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}").write_bytes(os.urandom(size))


def write_big(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 16 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


class StepFailed(Exception):
    pass


def run(argv: list, timeout: float = STEP_TIMEOUT) -> None:
    r = subprocess.run(
        [str(a) for a in argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise StepFailed(f"{' '.join(map(str, argv))} exited {r.returncode}: {' | '.join(err[-3:])}")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class Daemon:
    """A FUSE daemon run in the foreground as a subprocess, stopped with `fusermount3 -u`."""

    def __init__(self, argv: list, mnt: Path, log: Path, probe: str = ""):
        self.argv, self.mnt, self.log, self.probe = [str(a) for a in argv], mnt, log, probe
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> float:
        """Start; returns the seconds until the mount answers (a stat of mnt/probe succeeds)."""
        t0 = perf_counter()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StepFailed(
                    f"{self.argv[0]} exited {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-1500:]}"
                )
            if os.path.ismount(self.mnt):
                try:
                    os.stat(self.mnt / self.probe)
                    return perf_counter() - t0
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise StepFailed(f"mount on {self.mnt} did not answer in {timeout} s")
            time.sleep(0.002)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False, capture_output=True)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)

    def memory(self) -> dict[str, int]:
        return rss_kib(self.proc.pid) if self.proc and self.proc.poll() is None else {}

    def cpu_seconds(self) -> float | None:
        """User + system CPU the daemon has used: unlike wall time, barely moved by other load."""
        if not self.proc or self.proc.poll() is not None:
            return None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback") if self.log.exists() else 0


# -- what is compared --------------------------------------------------------------------
# (workload, alternative, target ratio tinyfs/alternative or None); labels are filled in with the sizes.
ROWS = [
    ("deposit-1g", "cp+make_bag+sync", 1.0),
    ("deposit-1g", "cp+sync", 2.0),
    ("deposit-small", "cp+make_bag+sync", 1.5),
    ("deposit-small", "cp+sync", None),
    ("deposit-large", "cp+make_bag+sync", None),
    ("deposit-large", "cp+sync", None),
    ("commit-1g", "sync", None),
    ("commit-small", "sync", None),
    ("redeposit", "rsync+sync", 3.0),
    ("read-1g-cold", "native", None),
    ("read-1g-warm", "native", 1.5),
    ("read-small-cold", "native", None),
    ("read-small-warm", "native", 3.0),
    ("find-ls-cold", "native", None),
    ("find-ls-warm", "native", 3.0),
    ("ls-lR-cold", "native", None),
    ("ls-lR-warm", "native", None),
    ("find-ls-large-warm", "native", None),
    ("fsck-1g-warm", "bagit.py --validate", 0.7),
    ("fsck-1g-cold", "bagit.py --validate", None),
    ("fsck-small-warm", "bagit.py --validate", 0.7),
    ("fsck-small-cold", "bagit.py --validate", None),
]
MOUNT_TIME_TARGET, RSS_TARGET_MIB = 1.0, 150


def cat_all(d: Path) -> list:
    return ["find", d, "-type", "f", "-exec", "cat", "{}", "+"]


def find_ls(d: Path) -> list:
    return ["find", d, "-ls"]


def ls_lr(d: Path) -> list:
    return ["ls", "-lR", d]


class Bench:
    rows = ROWS  # the table printed: (workload, alternative, target)

    def __init__(self, args, sizes: Sizes, run_dir: Path):
        self.args, self.sizes, self.dir = args, sizes, run_dir
        self.can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
        self.src = run_dir / "src"
        self.src_big, self.src_small = self.src / "big", self.src / "small"
        self.src_mod, self.src_large = self.src / "small-mod", self.src / "large"
        self.archive, self.mnt = run_dir / "archive", run_dir / "mnt"
        self.ptback, self.ptmnt = run_dir / "pt-backing", run_dir / "pt-mnt"
        self.native = run_dir / "native"
        self.logs = run_dir / "logs"
        self.tinyfs: Daemon | None = None
        self.pt: Daemon | None = None
        self.base: Daemon | None = None  # --base: another tinyfs, variant "tinyfs-base" of the read workloads
        self.base_archive, self.base_mnt = run_dir / "archive-base", run_dir / "mnt-base"
        self.workloads: dict[str, dict] = {}
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.load: list[float] = []
        self.rss_trace: list[dict] = []  # the tinyfs daemon's memory after each repetition
        z = sizes
        self.labels = {
            "deposit-1g": f"deposit {human(z.big)} file",
            "deposit-small": f"deposit {count(z.small)} x {human(z.file_size)}",
            "deposit-large": f"deposit {count(z.large)} x {human(z.file_size)}",
            "commit-1g": f"commit alone (mv), {human(z.big)}",
            "commit-small": f"commit alone (mv), {count(z.small)} files",
            "redeposit": f"rsync re-deposit, 1% of {count(z.small)} changed",
            "read-1g-cold": f"read {human(z.big)}, cold",
            "read-1g-warm": f"read {human(z.big)}, warm",
            "read-small-cold": f"read {count(z.small)} files, cold",
            "read-small-warm": f"read {count(z.small)} files, warm",
            "find-ls-cold": f"find -ls {count(z.small)}, cold",
            "find-ls-warm": f"find -ls {count(z.small)}, warm",
            "ls-lR-cold": f"ls -lR {count(z.small)}, cold",
            "ls-lR-warm": f"ls -lR {count(z.small)}, warm",
            "find-ls-large-warm": f"find -ls {count(z.large)}, warm",
            "fsck-1g-warm": f"fsck {human(z.big)}, warm",
            "fsck-1g-cold": f"fsck {human(z.big)}, cold",
            "fsck-small-warm": f"fsck {count(z.small)} files, warm",
            "fsck-small-cold": f"fsck {count(z.small)} files, cold",
            "mount-empty": "mount, empty archive",
            "mount-resources": f"mount, {count(z.many)} resources",
            "mount-files": f"mount, 1 resource x {count(z.wide)} files",
        }

    # -- output -----------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def record(self, wl: str, variant: str, rep: int, phases: dict[str, float], **extra) -> None:
        w = self.workloads.setdefault(wl, {"label": self.labels.get(wl, wl), "variants": {}})
        runs = w["variants"].setdefault(variant, {"runs": []})["runs"]
        runs.append({"rep": rep, "total": sum(phases.values()), "phases": phases, **extra})

    # -- primitives ---------------------------------------------------------------------------
    def drop_caches(self) -> None:
        run(["sync"])
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    def recycle_memory(self) -> None:
        """Before a deposit: write back and drop the page cache, so that every variant writes into
        memory the machine has used before. On this kind of VM a never-touched page costs ~10 us on
        first use; without this, whichever variant came first on fresh memory paid up to 4x (native
        `cp -a` of 1 GiB took 0.3-2.6 s in one run)."""
        if self.can_drop:
            self.drop_caches()

    def warm(self, *dirs: Path) -> None:
        """Read every file (and so every inode) under dirs, untimed."""
        for d in dirs:
            run(["find", d, "-type", "f", "-exec", "cat", "{}", "+"])

    def time_steps(self, steps: Steps) -> dict[str, float]:
        phases: dict[str, float] = {}
        for name, argv in steps:
            t0 = perf_counter()
            run(argv)
            phases[name] = phases.get(name, 0.0) + perf_counter() - t0
        return phases

    def compare(
        self, wl: str, rep: int, variants: dict[str, tuple[Steps, Callable[[], None] | None]]
    ) -> None:
        """Run each variant once, in an order rotated by the repetition number."""
        names = list(variants)
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            steps, prepare = variants[name]
            daemon = {"tinyfs": self.tinyfs, "tinyfs-base": self.base}.get(name)
            try:
                if prepare:
                    prepare()
                self.load.append(os.getloadavg()[0])
                cpu = daemon.cpu_seconds() if daemon else None
                phases = self.time_steps(steps)
            except (StepFailed, subprocess.TimeoutExpired, OSError) as e:
                self.errors.append(f"{wl} / {name} (rep {rep}): {e}")
                self.say(f"  FAILED {wl} / {name}: {e}")
                continue
            extra = {}
            if cpu is not None and daemon.cpu_seconds() is not None:
                extra["daemon_cpu_s"] = daemon.cpu_seconds() - cpu
            if name == "tinyfs" and self.tinyfs is not None and self.tinyfs.proc is not None:
                extra["daemon_rss_kib"] = self.tinyfs.memory().get("VmRSS")
            self.record(wl, name, rep, phases, **extra)
            self.say(
                f"  {wl:<20} {name:<22} {sum(phases.values()):8.3f} s  "
                + " ".join(f"{k}={v:.3f}" for k, v in phases.items())
            )

    # -- sources and mounts ---------------------------------------------------------------------
    def make_sources(self) -> None:
        z = self.sizes
        self.say(
            f"sources: one {human(z.big)} file, {z.small} files of {human(z.file_size)}"
            + (f", {z.large} files" if z.large else "")
        )
        write_big(self.src_big / "file.bin", z.big)
        write_tree(self.src_small, z.small, z.small_dirs, z.file_size)
        run(["cp", "-a", self.src_small, self.src_mod])
        files = sorted(p for p in self.src_mod.rglob("*") if p.is_file())
        for p in files[::100]:  # 1% of the files get new bytes and a new mtime
            st = p.stat()
            p.write_bytes(os.urandom(st.st_size))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))
        if z.large:
            write_tree(self.src_large, z.large, 100, z.file_size)
        run(["sync", "-f", self.src])

    def start_mounts(self) -> None:
        for d in (self.mnt, self.ptback, self.ptmnt, self.native, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        run([TINYFS, "init", self.archive])
        self.tinyfs = Daemon(
            [TINYFS, "mount", "--foreground", self.archive, self.mnt],
            self.mnt,
            self.logs / "tinyfs.log",
            probe="resources",
        )
        self.pt = Daemon(
            [PY, PROJECT / "bench" / "passthrough.py", self.ptback, self.ptmnt],
            self.ptmnt,
            self.logs / "passthrough.log",
        )
        self.say(f"tinyfs mounted in {self.tinyfs.start():.3f} s; passthrough in {self.pt.start():.3f} s")
        if self.args.base:
            base = str(self.args.base.absolute())
            self.base_mnt.mkdir()
            run([base, "init", self.base_archive])
            self.base = Daemon([base, "mount", "--foreground", self.base_archive, self.base_mnt], self.base_mnt,
                               self.logs / "tinyfs-base.log", probe="resources")
            self.say(f"{base} (tinyfs-base) mounted in {self.base.start():.3f} s")

    def stop_mounts(self) -> None:
        for d in (self.tinyfs, self.pt, self.base):
            if d is not None:
                d.stop()

    # -- workloads --------------------------------------------------------------------------------
    def deposit(self, wl: str, src: Path, tag: str, rep: int) -> None:
        name = f"{tag}-{rep}"
        txn, pt = self.mnt / "transactions" / name, self.ptmnt / name
        bag, plain = self.native / f"{tag}-bag-{rep}", self.native / f"{tag}-plain-{rep}"

        def cp(dest: Path) -> list:
            return ["cp", "-a", f"{src}/.", f"{dest}/"]

        def warm() -> None:
            self.recycle_memory()
            self.warm(src)

        self.compare(
            wl,
            rep,
            {
                "tinyfs": (
                    [
                        ("open", ["mkdir", txn]),
                        ("copy", cp(txn)),
                        ("commit", ["mv", txn, f"{self.mnt}/commit/"]),
                    ],
                    warm,
                ),
                "passthrough": (
                    [
                        ("open", ["mkdir", pt]),
                        ("copy", cp(pt)),
                        ("sync", ["sync", "-f", pt]),
                        ("sync", ["sync", "-f", self.ptback]),
                    ],
                    warm,
                ),
                "cp+make_bag+sync": (
                    [
                        ("open", ["mkdir", bag]),
                        ("copy", cp(bag)),
                        ("bag", [PY, "-c", MAKE_BAG, bag]),
                        ("sync", ["sync", "-f", bag]),
                    ],
                    warm,
                ),
                "cp+sync": (
                    [("open", ["mkdir", plain]), ("copy", cp(plain)), ("sync", ["sync", "-f", plain])],
                    warm,
                ),
            },
        )

    def redeposit(self, rep: int) -> None:
        name = f"small-{rep}"
        txn, pt, plain = (
            self.mnt / "transactions" / name,
            self.ptmnt / name,
            self.native / f"small-plain-{rep}",
        )

        def rsync(dest: Path) -> list:
            return ["rsync", "-a", "--delete", f"{self.src_mod}/", f"{dest}/"]

        def warm(target: Path) -> Callable[[], None]:
            return lambda: (self.warm(self.src_mod), run(["find", target, "-ls"]))

        self.compare(
            "redeposit",
            rep,
            {
                "tinyfs": (
                    [
                        ("open", ["mkdir", txn]),
                        ("rsync", rsync(txn)),
                        ("commit", ["mv", txn, f"{self.mnt}/commit/"]),
                    ],
                    warm(self.mnt / "resources" / name),
                ),
                "passthrough": (
                    [
                        ("rsync", rsync(pt)),
                        ("sync", ["sync", "-f", pt]),
                        ("sync", ["sync", "-f", self.ptback]),
                    ],
                    warm(pt),
                ),
                "rsync+sync": ([("rsync", rsync(plain)), ("sync", ["sync", "-f", plain])], warm(plain)),
            },
        )

    def reading(
        self, wl: str, tag: str, rep: int, command: Callable[[Path], list], cold: bool, data_rep: int | None = None
    ) -> None:
        """Time `command` over the data deposited in repetition `data_rep` (default: this one)."""
        if cold and not self.can_drop:
            if wl not in self.skipped:
                self.skipped.append(wl)
            return
        data_rep = rep if data_rep is None else data_rep
        name = f"{tag}-{data_rep}"
        targets = {
            "tinyfs": self.mnt / "resources" / name,
            "passthrough": self.ptmnt / name,
            "native": self.native / f"{tag}-plain-{data_rep}",
        }
        if self.base is not None:
            targets["tinyfs-base"] = self.base_mnt / "resources" / name

        def prepare(target: Path) -> Callable[[], None]:
            # warm = steady state. Through FUSE, the read after the one that filled the page cache is still
            # slow although no request reaches the daemon (kernel-side page-cache work: 1 GiB took 0.11 s, then
            # 0.06 s on every later read; native 0.04 s from the second read on), so every variant is read
            # twice before it is timed
            return self.drop_caches if cold else (lambda: (run(command(target)), run(command(target))))

        self.compare(wl, rep, {v: ([("run", command(t))], prepare(t)) for v, t in targets.items()})

    def resource_dir(self, rid: str) -> Path:
        found = glob.glob(str(self.archive / "resources" / "*" / "*" / rid))
        if not found:
            raise StepFailed(f"resource {rid} not found in {self.archive}")
        return Path(found[0])

    def fsck(self, wl: str, tag: str, rep: int, cold: bool) -> None:
        if cold and not self.can_drop:
            if wl not in self.skipped:
                self.skipped.append(wl)
            return
        rid, bag = f"{tag}-{rep}", self.native / f"{tag}-bag-{rep}"
        try:
            rdir = self.resource_dir(rid)
        except StepFailed as e:
            self.errors.append(f"{wl} (rep {rep}): {e}")
            return

        def prepare(d: Path) -> Callable[[], None]:
            return self.drop_caches if cold else (lambda: self.warm(d))

        self.compare(
            wl,
            rep,
            {
                "tinyfs": ([("fsck", [TINYFS, "fsck", self.archive, rid])], prepare(rdir)),
                "bagit.py --validate": ([("validate", [BAGIT, "--validate", bag])], prepare(bag)),
            },
        )

    def repetition(self, rep: int) -> None:
        z = self.sizes
        self.say(f"repetition {rep + 1} of {z.reps}")
        self.deposit("deposit-1g", self.src_big, "big", rep)
        self.deposit("deposit-small", self.src_small, "small", rep)
        if z.large:
            self.deposit("deposit-large", self.src_large, "large", rep)
        for cold in (False, True):
            t = "cold" if cold else "warm"
            self.fsck(f"fsck-1g-{t}", "big", rep, cold)
            self.fsck(f"fsck-small-{t}", "small", rep, cold)
        self.redeposit(rep)
        for cold in (True, False):
            t = "cold" if cold else "warm"
            self.reading(f"read-1g-{t}", "big", rep, cat_all, cold)
            self.reading(f"read-small-{t}", "small", rep, cat_all, cold)
            self.reading(f"find-ls-{t}", "small", rep, find_ls, cold)
            self.reading(f"ls-lR-{t}", "small", rep, ls_lr, cold)
        if z.large:
            self.reading("find-ls-large-warm", "large", rep, find_ls, False)
        self.rss_trace.append({"after": f"repetition {rep + 1}", **self.tinyfs.memory()})

    def reads_only(self, rep: int) -> None:
        """--reads: the read workloads alone, over copies deposited once, untimed, the way the deposits
        make them (every repetition reads the same data; cold steps drop the caches first)."""
        self.say(f"repetition {rep + 1} of {self.sizes.reps} (reads only)")
        if rep == 0:
            for tag, src in (("big", self.src_big), ("small", self.src_small)):
                txns = [m / "transactions" / f"{tag}-0" for m in (self.mnt, self.base_mnt) if m.exists()]
                for dest in (*txns, self.ptmnt / f"{tag}-0", self.native / f"{tag}-plain-0"):
                    run(["mkdir", dest])
                    run(["cp", "-a", f"{src}/.", f"{dest}/"])
                for txn in txns:
                    run(["mv", txn, f"{txn.parent.parent}/commit/"])
            run(["sync"])
        for cold in (True, False):
            t = "cold" if cold else "warm"
            self.reading(f"read-1g-{t}", "big", rep, cat_all, cold, data_rep=0)
            self.reading(f"read-small-{t}", "small", rep, cat_all, cold, data_rep=0)
        self.rss_trace.append({"after": f"repetition {rep + 1}", **self.tinyfs.memory()})

    def check_content(self) -> None:
        """Untimed: what was measured really arrived (rep 0's resources against the sources)."""
        try:
            run(["cmp", self.src_big / "file.bin", self.mnt / "resources" / "big-0" / "file.bin"])
            small = self.src_small if self.args.reads else self.src_mod   # (the re-deposit changed small-0)
            run(["diff", "-r", "-q", small, self.mnt / "resources" / "small-0"])
            run(["diff", "-r", "-q", small, self.ptmnt / "small-0"])
            if self.base is not None:
                run(["cmp", self.src_big / "file.bin", self.base_mnt / "resources" / "big-0" / "file.bin"])
        except StepFailed as e:
            self.errors.append(f"content check: {e}")

    # -- mount time and memory ---------------------------------------------------------------------
    def mount_archives(self) -> None:
        z = self.sizes
        base = self.dir / "mount-archives"
        base.mkdir(exist_ok=True)
        mnt = self.dir / "mnt2"
        mnt.mkdir(exist_ok=True)
        wide_src = self.src_small if z.wide == z.small else self.src_large if z.wide == z.large else None
        if wide_src is None:
            wide_src = self.src / f"wide-{z.wide}"
            write_tree(wide_src, z.wide, max(1, z.wide // 1000), z.file_size)
        first = min(p for p in wide_src.rglob("*") if p.is_file())
        archives = {
            "mount-empty": (["init"], None),
            "mount-resources": (["many", z.many], "resources/r000000/f.txt"),
            "mount-files": (
                ["wide", wide_src],
                f"resources/wide/{wide_src.name}/{first.relative_to(wide_src)}",
            ),
        }
        for wl, (how, probe) in archives.items():
            root = base / wl
            t0 = perf_counter()
            try:
                if how[0] == "init":
                    run([TINYFS, "init", root])
                else:
                    subprocess.run(
                        [PY, "-m", "bench.build", how[0], str(root), str(how[1])],
                        cwd=PROJECT,
                        check=True,
                        timeout=STEP_TIMEOUT,
                        stdout=subprocess.DEVNULL,
                    )
            except (StepFailed, subprocess.SubprocessError) as e:
                self.errors.append(f"{wl}: building the archive: {e}")
                continue
            self.say(f"  built {wl} in {perf_counter() - t0:.1f} s")
            for rep in range(z.mount_reps):
                self.mount_once(wl, root, mnt, probe, rep)

    def mount_once(self, wl: str, root: Path, mnt: Path, probe: str | None, rep: int) -> None:
        if self.can_drop:
            self.drop_caches()
        d = Daemon(
            [TINYFS, "mount", "--foreground", root, mnt], mnt, self.logs / f"{wl}.log", probe="resources"
        )
        try:
            self.load.append(os.getloadavg()[0])
            mount_s = d.start()
            extra: dict = {"cold": self.can_drop}
            if probe:
                t0 = perf_counter()
                run(["stat", mnt / probe])
                extra["first_stat_s"] = perf_counter() - t0
            mem = d.memory()
            extra["rss_kib"], extra["hwm_kib"] = mem.get("VmRSS"), mem.get("VmHWM")
            t0 = perf_counter()
            run(["ls", "-l", mnt / "resources"])
            extra["list_resources_s"] = perf_counter() - t0
            extra["rss_after_list_kib"] = d.memory().get("VmRSS")
            self.record(wl, "tinyfs", rep, {"mount": mount_s}, **extra)
            self.say(
                f"  {wl:<20} mount {mount_s:.3f} s, first stat {extra.get('first_stat_s', 0):.3f} s, "
                f"RSS {extra['rss_kib'] / 1024:.1f} MiB (after listing resources/: "
                f"{extra['rss_after_list_kib'] / 1024:.1f} MiB)"
            )
        except (StepFailed, subprocess.SubprocessError, OSError) as e:
            self.errors.append(f"{wl} (rep {rep}): {e}")
            self.say(f"  FAILED {wl}: {e}")
        finally:
            d.stop()

    # -- results ------------------------------------------------------------------------------------
    def derive(self) -> None:
        """commit-* : the mv phase of tinyfs's deposit against the sync phase of the native cp+sync."""
        for src, dst in (("deposit-1g", "commit-1g"), ("deposit-small", "commit-small")):
            variants = self.workloads.get(src, {}).get("variants", {})
            for name, phase, as_name in (
                ("tinyfs", "commit", "tinyfs"),
                ("passthrough", "sync", "passthrough"),
                ("cp+sync", "sync", "sync"),
            ):
                for r in variants.get(name, {}).get("runs", []):
                    self.record(dst, as_name, r["rep"], {phase: r["phases"][phase]})

    def summarize(self) -> None:
        for w in self.workloads.values():
            for v in w["variants"].values():
                v["median"] = median([r["total"] for r in v["runs"]])
                phases = {k for r in v["runs"] for k in r["phases"]}
                v["phase_medians"] = {
                    k: median([r["phases"][k] for r in v["runs"] if k in r["phases"]]) for k in sorted(phases)
                }
                for key in ("rss_kib", "rss_after_list_kib", "first_stat_s", "list_resources_s"):
                    xs = [r[key] for r in v["runs"] if r.get(key) is not None]
                    if xs:
                        v[key + "_median"] = median(xs)

    def table_rows(self) -> list[dict]:
        rows = []
        for wl, alt, target in self.rows:
            w = self.workloads.get(wl)
            if w is None:
                continue
            v = w["variants"]
            t = v.get("tinyfs", {}).get("median")
            a = v.get(alt, {}).get("median")
            p = v.get("passthrough", {}).get("median")
            r = ratio(t, a)
            rows.append(
                {
                    "workload": wl,
                    "label": w["label"],
                    "alternative": alt,
                    "tinyfs_s": t,
                    "alternative_s": a,
                    "ratio": r,
                    "target": target,
                    "meets_target": None if target is None or r is None else r <= target,
                    "passthrough_s": p,
                    "passthrough_ratio": ratio(p, a),
                    "tinyfs_vs_passthrough": ratio(t, p),
                }
            )
        return rows

    def base_rows(self) -> list[dict]:
        """--base: tinyfs against tinyfs-base per workload, as the median and range of the ratios of the
        two within each repetition (they ran back to back, so a slow spell of the machine hits both)."""
        rows = []
        for wl, w in self.workloads.items():
            v = w["variants"]
            if "tinyfs-base" not in v or "tinyfs" not in v:
                continue
            base = {r["rep"]: r["total"] for r in v["tinyfs-base"]["runs"]}
            paired = [r["total"] / base[r["rep"]] for r in v["tinyfs"]["runs"] if base.get(r["rep"])]
            cpu = {
                k: median([r["daemon_cpu_s"] for r in v[k]["runs"] if "daemon_cpu_s" in r]) for k in ("tinyfs", "tinyfs-base")
            }
            rows.append(
                {
                    "workload": wl,
                    "label": w["label"],
                    "tinyfs_s": v["tinyfs"].get("median"),
                    "base_s": v["tinyfs-base"].get("median"),
                    "tinyfs_daemon_cpu_s": cpu["tinyfs"],
                    "base_daemon_cpu_s": cpu["tinyfs-base"],
                    "ratios": paired,
                    "ratio_median": median(paired) if paired else None,
                }
            )
        return rows

    def mount_rows(self) -> list[dict]:
        rows = []
        for wl in ("mount-empty", "mount-resources", "mount-files"):
            v = self.workloads.get(wl, {}).get("variants", {}).get("tinyfs")
            if not v:
                continue
            rss = v.get("rss_kib_median")
            rows.append(
                {
                    "workload": wl,
                    "label": self.labels[wl],
                    "mount_s": v["median"],
                    "first_stat_s": v.get("first_stat_s_median"),
                    "rss_mib": rss / 1024 if rss else None,
                    "rss_after_list_mib": (v.get("rss_after_list_kib_median") or 0) / 1024 or None,
                    "list_resources_s": v.get("list_resources_s_median"),
                    "meets_target": v["median"] < MOUNT_TIME_TARGET
                    and rss is not None
                    and rss / 1024 < RSS_TARGET_MIB,
                }
            )
        return rows


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def render_base(rows: list[dict]) -> str:
    out = [
        "",
        "| workload | tinyfs s | tinyfs-base s | tinyfs / base, per repetition | median | daemon CPU s (base) |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        each = ", ".join(f"{x:.2f}" for x in r["ratios"])
        out.append(
            f"| {r['label']} | {fmt(r['tinyfs_s'])} | {fmt(r['base_s'])} | {each} | {fmt(r['ratio_median'], 2)} "
            f"| {fmt(r['tinyfs_daemon_cpu_s'], 2)} ({fmt(r['base_daemon_cpu_s'], 2)}) |"
        )
    return "\n".join(out)


def render(rows: list[dict], mount_rows: list[dict], daemons: dict, rss_trace: list[dict]) -> str:
    out = [
        "| workload | alternative | tinyfs s | alt. s | tinyfs/alt | target "
        "| passthrough s | pt/alt | tinyfs/pt |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        target = (
            "" if r["target"] is None else f"≤ {r['target']} " + ("ok" if r["meets_target"] else "MISSED")
        )
        out.append(
            f"| {r['label']} | {r['alternative']} | {fmt(r['tinyfs_s'])} | {fmt(r['alternative_s'])} | "
            f"{fmt(r['ratio'], 2)} | {target} | {fmt(r['passthrough_s'])} | "
            f"{fmt(r['passthrough_ratio'], 2)} | "
            f"{fmt(r['tinyfs_vs_passthrough'], 2)} |"
        )
    if mount_rows:
        out += [
            "",
            (
                "| mount | time s (target < 1) | first stat s | RSS MiB (target < 150) "
                "| RSS after ls resources/ MiB | ls -l resources/ s | target |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
    for r in mount_rows:
        out.append(
            f"| {r['label']} | {fmt(r['mount_s'])} | {fmt(r['first_stat_s'])} | {fmt(r['rss_mib'], 1)} | "
            f"{fmt(r['rss_after_list_mib'], 1)} | {fmt(r['list_resources_s'])} | "
            f"{'ok' if r['meets_target'] else 'MISSED'} |"
        )
    if rss_trace:
        out.append(
            "\ntinyfs daemon of the workloads, VmRSS: "
            + ", ".join(f"{m.get('VmRSS', 0) / 1024:.1f} MiB after {m['after']}" for m in rss_trace)
        )
    for name, mem in daemons.items():
        if mem:
            out.append(
                f"{name} daemon after all workloads: VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB, "
                f"VmHWM (peak) {mem.get('VmHWM', 0) / 1024:.1f} MiB"
            )
    return "\n".join(out)


def environment() -> dict:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(
                argv, check=False, capture_output=True, text=True, timeout=10
            ).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    import pyfuse3

    git = subprocess.run(
        ["git", "-C", str(PROJECT), "describe", "--always", "--dirty"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "git": git,
        "cp": version(["cp", "--version"]),
        "rsync": version(["rsync", "--version"]),
        "fuse": version(["fusermount3", "--version"]),
        "root": os.geteuid() == 0,
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark tinyfs against cp/rsync/bagit "
        "and a minimal pyfuse3 passthrough; prints medians and ratios, writes JSON.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (a smoke test, < 1 min)")
    p.add_argument("--large", action="store_true", help="also 100,000 files (deposit, find, mount)")
    p.add_argument("--reps", type=int, help="repetitions of every workload (default 3; --quick 1)")
    p.add_argument("--out", type=Path, help="JSON file (default bench-results/bench-<date>.json)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where scratch goes, on the disk to measure (default /var/tmp); "
        "a fresh run-* folder is made in it and removed at the end",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--reads", action="store_true",
                   help="only the read workloads (read the big file and the small files, cold and warm); "
                   "the data is deposited untimed")
    p.add_argument("--base", type=Path,
                   help="with --reads: another tinyfs command (e.g. main's .venv/bin/tinyfs) mounted beside, "
                   "measured as variant tinyfs-base in the same repetitions")
    p.add_argument("--store", choices=("local", "s3"), default="local",
                   help="s3: the archive in a SeaweedFS started for the run, against rclone + bagit "
                   "(bench/s3mount.py)")
    p.add_argument("--replicas", action="store_true",
                   help="only what a local replica costs a commit, against ingest + cp -a + sync (bench/replicas.py)")
    p.add_argument("--http", action="store_true",
                   help="only `tinyfs serve`: GET of the big file and of the small files against nginx, a deposit "
                   "with rclone against a plain WsgiDAV (bench/http.py)")
    p.add_argument("--holdings", action="store_true",
                   help="only what verified writes cost an ingest (against --no-verify-writes) and what format "
                   "identification costs a mount deposit (against --no-identify) (bench/holdings.py)")
    p.add_argument("--tinyfs", type=Path,
                   help="the tinyfs command to measure (default: the one beside this Python), e.g. another "
                   "checkout's .venv/bin/tinyfs, to compare two versions on one machine")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    if args.base and not args.reads:
        p.error("--base needs --reads")
    if args.store == "s3" and (args.reads or args.base or args.large):
        p.error("--store s3 runs its own workloads: no --reads, --base or --large")
    if args.http and (args.reads or args.base or args.large or args.replicas or args.store != "local"):
        p.error("--http runs its own workloads: no --reads, --base, --large, --replicas or --store")
    if args.holdings and (args.reads or args.base or args.large or args.replicas or args.http
                          or args.store != "local"):
        p.error("--holdings runs its own workloads: no --reads, --base, --large, --replicas, --http or --store")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tinyfs:
        global TINYFS
        TINYFS = str(args.tinyfs.absolute())
    if args.store == "s3":
        from bench.s3mount import main as s3_main

        return s3_main(args)
    if args.replicas:
        from bench.replicas import main as replicas_main

        return replicas_main(args)
    if args.http:
        from bench.http import main as http_main

        return http_main(args)
    if args.holdings:
        from bench.holdings import main as holdings_main

        return holdings_main(args)
    for tool in ("cp", "mv", "rsync", "find", "ls", "sync", "fusermount3", "cmp", "diff", "stat"):
        if shutil.which(tool) is None:
            print(f"scripts/bench: {tool} is not installed", file=sys.stderr)
            return 2
    sizes = Sizes.choose(args.quick, args.large, args.reps)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or PROJECT / "bench-results" / f"bench-{stamp}.json"
    workdir = (args.workdir or Path("/var/tmp")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / f"tinyfs-bench-{stamp}-{os.getpid()}"
    run_dir.mkdir()
    bench = Bench(args, sizes, run_dir)
    env = environment()
    if env["loadavg_at_start"][0] > 0.5:
        bench.say(f"note: load average {env['loadavg_at_start'][0]:.2f} at start: the machine is not idle")
    if not bench.can_drop:
        bench.say("note: not root (or no /proc/sys/vm/drop_caches): cold-cache steps are skipped")
    started = perf_counter()
    daemons: dict[str, dict] = {}
    try:
        bench.make_sources()
        bench.start_mounts()
        for rep in range(sizes.reps):
            if args.reads:
                bench.reads_only(rep)
            else:
                bench.repetition(rep)
        bench.check_content()
        daemons = {"tinyfs": bench.tinyfs.memory(), "passthrough": bench.pt.memory()}
        if bench.base is not None:
            daemons["tinyfs-base"] = bench.base.memory()
        tracebacks = bench.tinyfs.tracebacks()
        if tracebacks:
            bench.errors.append(f"the tinyfs daemon logged {tracebacks} traceback(s): see {bench.tinyfs.log}")
        bench.stop_mounts()
        if not args.reads:
            bench.say("mount time and memory")
            bench.mount_archives()
    finally:
        bench.stop_mounts()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    bench.derive()
    bench.summarize()
    rows, mrows, brows = bench.table_rows(), bench.mount_rows(), bench.base_rows()
    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": asdict(sizes),
        "environment": {**env, "tinyfs": TINYFS, "base": str(args.base) if args.base else None},
        "seconds": perf_counter() - started,
        "loadavg_during": {
            "max": max(bench.load, default=None),
            "median": median(bench.load) if bench.load else None,
            "samples": [round(x, 2) for x in bench.load],
        },
        "daemons_after_workloads": daemons,
        "tinyfs_rss_after_each_repetition": bench.rss_trace,
        "skipped": bench.skipped,
        "errors": bench.errors,
        "table": rows,
        "mount": mrows,
        "against_base": brows,
        "workloads": bench.workloads,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    print(render(rows, mrows, daemons, bench.rss_trace))
    if brows:
        print(render_base(brows))
    print(
        f"\n{sizes.reps} repetition(s), medians; ratio = time / time of the alternative "
        "(lower is better). Load average during the run: "
        f"median {fmt(result['loadavg_during']['median'], 2)}, "
        f"max {fmt(result['loadavg_during']['max'], 2)}. {perf_counter() - started:.0f} s in all. JSON: {out}"
    )
    if bench.skipped:
        print("skipped (not root): " + ", ".join(bench.skipped))
    for e in bench.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if bench.errors else 0
