"""`scripts/bench --holdings`: what verified writes and format identification cost, measured in one run.

    scripts/bench --holdings [--quick] [--reps N] [--out FILE.json] [--workdir DIR] [--keep]

- Verified writes: `tinyfs ingest ROOT RID SRC` (the commit a user runs) of one 1 GiB file and of 10,000
  files of 4 KiB in 100 directories (256 MiB and 2,000 files with --quick), into an archive made with
  `tinyfs init` (every file of the new bag read back from the device before it is published) against one
  made with `tinyfs init --no-verify-writes`. Both archives are made with `--no-identify`, so that the
  only difference is the read-back: the CLI identifies formats before it returns (FIDO, in its process),
  which would be timed on both sides.
- Format identification: a deposit of the 10,000 files through the mount (`mkdir MNT/transactions/<rid>`,
  `cp -a SRC/. MNT/transactions/<rid>/`, `mv MNT/transactions/<rid> MNT/commit/`, durable when `mv`
  returns) into a mounted archive made with `tinyfs init` (the daemon identifies each commit in the
  background) against one made with `tinyfs init --no-identify`; target 1.30 at most. After each deposit
  into the identifying archive, `tinyfs formats ROOT RID --json` is polled until nothing is pending: the
  seconds from the `mv`'s return to then are reported as information ("identified after"), and no other
  step runs before identification has ended and the identifier's workers have been let go, so that it never
  overlaps a timed step.

As in bench/harness.py: within a repetition the two variants run one after the other in an order rotated
by the repetition, every run writes to fresh names, and before each run the page cache is dropped (when
root) and the source read again, so both variants start alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter

from bench import harness
from bench.harness import GIB, KIB, MIB, Bench, Daemon, StepFailed, count, fmt, human, median, run

IDENTIFY_TARGET = 1.3
POLL_SECONDS = 2.0      # a poll is a Python start (~0.4 s of a core): not so often that it slows the identifier
IDENTIFY_TIMEOUT = 1800
# (workload, alternative, target): the "tinyfs" variant is the one with the feature on
HOLDINGS_ROWS = [
    ("ingest-1g", "no-verify-writes", None),
    ("ingest-small", "no-verify-writes", None),
    ("mount-deposit-small", "no-identify", IDENTIFY_TARGET),
]


@dataclass
class HoldingsSizes:
    big: int            # bytes of the one big file
    small: int          # number of small files
    dirs: int           # directories they are in
    file_size: int      # bytes of each small file
    reps: int

    @staticmethod
    def choose(quick: bool, reps: int | None) -> HoldingsSizes:
        s = HoldingsSizes(256 * MIB, 2_000, 20, 4 * KIB, 1) if quick else HoldingsSizes(GIB, 10_000, 100, 4 * KIB, 3)
        if reps:
            s.reps = reps
        return s


class HoldingsBench(Bench):
    rows = HOLDINGS_ROWS

    def __init__(self, args, sizes: HoldingsSizes, run_dir: Path):
        z = sizes
        super().__init__(args, harness.Sizes(z.big, z.small, z.dirs, z.file_size, 0, z.reps, 0, 0, z.reps), run_dir)
        self.holdings = sizes
        self.archives = {   # variant -> (archive, init options)
            "ingest": {"tinyfs": (run_dir / "a-verify", ["--no-identify"]),
                       "no-verify-writes": (run_dir / "a-no-verify", ["--no-identify", "--no-verify-writes"])},
            "mount": {"tinyfs": (run_dir / "a-identify", []),
                      "no-identify": (run_dir / "a-no-identify", ["--no-identify"])},
        }
        self.mounts: dict[str, Daemon] = {}
        self.deposited: list[tuple[Path, str, Path]] = []      # (archive, rid, source)
        self.labels.update({
            "ingest-1g": f"commit (tinyfs ingest) {human(z.big)} file, verified writes",
            "ingest-small": f"commit (tinyfs ingest) {count(z.small)} x {human(z.file_size)}, verified writes",
            "mount-deposit-small": f"mount deposit {count(z.small)} x {human(z.file_size)}, identification",
        })

    # -- set up ----------------------------------------------------------------------------------------
    def make_sources(self) -> None:
        z = self.holdings
        self.say(f"sources: one {human(z.big)} file, {z.small} files of {human(z.file_size)}")
        harness.write_big(self.src_big / "file.bin", z.big)
        harness.write_tree(self.src_small, z.small, z.dirs, z.file_size)
        run(["sync", "-f", self.src])

    def start_mounts(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for archives in self.archives.values():
            for root, options in archives.values():
                run([harness.TINYFS, "init", *options, root])
        for name, (root, _) in self.archives["mount"].items():
            mnt = self.dir / f"mnt-{name}"
            mnt.mkdir()
            daemon = Daemon([harness.TINYFS, "mount", "--foreground", root, mnt], mnt,
                            self.logs / f"tinyfs-{name}.log", probe="resources")
            self.mounts[name] = daemon
            self.say(f"{root.name} mounted in {daemon.start():.3f} s")

    def stop_mounts(self) -> None:
        for daemon in self.mounts.values():
            daemon.stop()

    # -- workloads --------------------------------------------------------------------------------------
    def prepare(self, src: Path) -> None:
        self.recycle_memory()
        self.warm(src)

    def ingest(self, wl: str, src: Path, tag: str, rep: int) -> None:
        rid = f"{tag}-{rep}"
        variants = {}
        for name, (root, _) in self.archives["ingest"].items():
            variants[name] = ([("ingest", [harness.TINYFS, "ingest", root, rid, src])], lambda src=src: self.prepare(src))
        self.compare(wl, rep, variants)
        if rep == 0:
            self.deposited += [(root, rid, src) for root, _ in self.archives["ingest"].values()]

    def mount_deposit(self, rep: int) -> None:
        """Like Bench.compare, but after the identifying variant waits (timed apart, as information) until
        its commit is identified and the identifier's workers have ended, before anything else runs."""
        wl, rid, src = "mount-deposit-small", f"small-{rep}", self.src_small
        names = list(self.archives["mount"])
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            root, daemon = self.archives["mount"][name][0], self.mounts[name]
            txn = daemon.mnt / "transactions" / rid
            steps = [("open", ["mkdir", txn]), ("copy", ["cp", "-a", f"{src}/.", f"{txn}/"]),
                     ("commit", ["mv", txn, f"{daemon.mnt}/commit/"])]
            try:
                self.prepare(src)
                self.load.append(os.getloadavg()[0])
                cpu = daemon.cpu_seconds()
                phases = self.time_steps(steps)
                extra: dict = {"daemon_cpu_s": daemon.cpu_seconds() - cpu, "daemon_rss_kib": daemon.memory().get("VmRSS")}
                if name == "tinyfs":
                    extra["identified_after_s"], extra["polls"] = self.wait_identified(root, rid)
                    extra["daemon_cpu_with_identification_s"] = daemon.cpu_seconds() - cpu
                    time.sleep(workers_idle() + 1)      # the identifier's workers end after this long without work
            except (StepFailed, subprocess.TimeoutExpired, OSError) as e:
                self.errors.append(f"{wl} / {name} (rep {rep}): {e}")
                self.say(f"  FAILED {wl} / {name}: {e}")
                continue
            if rep == 0:
                self.deposited.append((root, rid, src))
            self.record(wl, name, rep, phases, **extra)
            self.say(f"  {wl:<20} {name:<22} {sum(phases.values()):8.3f} s  "
                     + " ".join(f"{k}={v:.3f}" for k, v in phases.items())
                     + (f"  identified {extra['identified_after_s']:.1f} s after the commit"
                        if "identified_after_s" in extra else ""))

    def wait_identified(self, root: Path, rid: str) -> tuple[float, int]:
        """Seconds until `tinyfs formats ROOT RID --json` shows nothing pending, and how many polls it took."""
        t0, polls = perf_counter(), 0
        while True:
            polls += 1
            r = subprocess.run([harness.TINYFS, "formats", root, rid, "--json"], capture_output=True, text=True,
                               check=False, timeout=120)
            if r.returncode != 0:
                raise StepFailed(f"tinyfs formats {root} {rid} --json exited {r.returncode}: {r.stderr.strip()[-500:]}")
            if not json.loads(r.stdout)["pending"]:
                return perf_counter() - t0, polls
            if perf_counter() - t0 > IDENTIFY_TIMEOUT:
                raise StepFailed(f"{rid} still pending in {root} after {IDENTIFY_TIMEOUT} s")
            time.sleep(POLL_SECONDS)

    def repetition(self, rep: int) -> None:
        self.say(f"repetition {rep + 1} of {self.holdings.reps}")
        self.ingest("ingest-1g", self.src_big / "file.bin", "big", rep)
        self.ingest("ingest-small", self.src_small, "small", rep)
        self.mount_deposit(rep)
        self.rss_trace.append({"after": f"repetition {rep + 1}", **self.mounts["tinyfs"].memory()})

    def check_content(self) -> None:
        """Untimed: the first repetition's commits hold their files (fsck of each), and the identifying
        archive knows the format of every file deposited into it."""
        for root, rid, _ in self.deposited:
            try:
                run([harness.TINYFS, "fsck", root, rid])
            except StepFailed as e:
                self.errors.append(f"content check: {e}")
        root = self.archives["mount"]["tinyfs"][0]
        r = subprocess.run([harness.TINYFS, "formats", root, "--json"], capture_output=True, text=True, check=False)
        report = json.loads(r.stdout) if r.returncode == 0 else {"formats": [], "pending": ["?"]}
        known = sum(f["files"] for f in report["formats"] if f.get("basis") != "pending")
        want = len(self.workloads.get("mount-deposit-small", {}).get("variants", {}).get("tinyfs", {}).get("runs", [])) \
            * self.holdings.small
        if report["pending"] or known != want:
            self.errors.append(f"{root.name}: {known} files with a format of {want} deposited, "
                               f"pending {report['pending']}")

    def table_rows(self) -> list[dict]:
        rows = super().table_rows()
        for row in rows:
            runs = self.workloads[row["workload"]]["variants"].get("tinyfs", {}).get("runs", [])
            after = [r["identified_after_s"] for r in runs if "identified_after_s" in r]
            row["identified_after_s"] = median(after) if after else None
            row["identified_after_each_s"] = after
            variants = self.workloads[row["workload"]]["variants"]
            without = {r["rep"]: r["total"] for r in variants.get(row["alternative"], {}).get("runs", [])}
            row["ratio_each"] = [r["total"] / without[r["rep"]] for r in runs if without.get(r["rep"])]
            for key, name in (("daemon_cpu_s", "tinyfs"), ("alternative_daemon_cpu_s", row["alternative"])):
                cpu = [r["daemon_cpu_s"] for r in variants.get(name, {}).get("runs", []) if "daemon_cpu_s" in r]
                row[key] = median(cpu) if cpu else None
        return rows


def workers_idle() -> float:
    from tinyfs.core.formats import WORKERS_IDLE

    return WORKERS_IDLE


def render(rows: list[dict]) -> str:
    out = ["| workload | with s | without s | with/without | target |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']:.2f} " + ("ok" if r["meets_target"] else "MISSED")
        out.append(f"| {r['label']} | {fmt(r['tinyfs_s'])} | {fmt(r['alternative_s'])} | {fmt(r['ratio'], 2)} "
                   f"| {target} |")
    out.append("\nwith/without within each repetition (the two ran back to back): " + "; ".join(
        f"{r['workload']} " + ", ".join(f"{x:.2f}" for x in r["ratio_each"]) for r in rows))
    for r in rows:
        if r["daemon_cpu_s"] is not None:
            out.append(f"\n{r['label']}: the daemon's CPU seconds during the deposit (less moved by other load than "
                       f"wall time): with {fmt(r['daemon_cpu_s'], 2)}, without {fmt(r['alternative_daemon_cpu_s'], 2)}, "
                       f"ratio {fmt(harness.ratio(r['daemon_cpu_s'], r['alternative_daemon_cpu_s']), 2)}")
        if r["identified_after_s"] is not None:
            each = ", ".join(f"{x:.1f}" for x in r["identified_after_each_s"])
            out.append(f"\nbackground identification of the {r['label'].split(',')[0].removeprefix('mount deposit ')} "
                       f"finished {fmt(r['identified_after_s'], 1)} s after the commit returned (median; each: {each})")
    return "\n".join(out)


def main(args) -> int:
    for tool in ("cp", "mv", "find", "cat", "sync", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"scripts/bench --holdings: {tool} is not installed", file=sys.stderr)
            return 2
    sizes = HoldingsSizes.choose(args.quick, args.reps)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or harness.PROJECT / "bench-results" / f"bench-holdings-{stamp}.json"
    workdir = (args.workdir or Path("/var/tmp")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"tinyfs-bench-holdings-{stamp}-", dir=workdir))
    bench = HoldingsBench(args, sizes, run_dir)
    env = harness.environment()
    if env["loadavg_at_start"][0] > 0.5:
        bench.say(f"note: load average {env['loadavg_at_start'][0]:.2f} at start: the machine is not idle")
    if not bench.can_drop:
        bench.say("note: not root (or no /proc/sys/vm/drop_caches): the page cache is not dropped before a run")
    started = perf_counter()
    daemons: dict = {}
    try:
        bench.make_sources()
        bench.start_mounts()
        for rep in range(sizes.reps):
            bench.repetition(rep)
        bench.check_content()
        daemons = {f"tinyfs mount ({name})": d.memory() for name, d in bench.mounts.items()}
        for name, d in bench.mounts.items():
            if d.tracebacks():
                bench.errors.append(f"the tinyfs daemon ({name}) logged {d.tracebacks()} traceback(s): see {d.log}")
    except (StepFailed, OSError, subprocess.SubprocessError) as e:
        bench.errors.append(f"setup: {e}")
    finally:
        bench.stop_mounts()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    bench.summarize()
    rows = bench.table_rows()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": asdict(sizes),
        "environment": {**env, "tinyfs": harness.TINYFS},
        "seconds": perf_counter() - started,
        "loadavg_during": {"max": max(bench.load, default=None),
                           "median": median(bench.load) if bench.load else None,
                           "samples": [round(x, 2) for x in bench.load]},
        "daemons_after_workloads": daemons,
        "tinyfs_rss_after_each_repetition": bench.rss_trace,
        "errors": bench.errors,
        "table": rows,
        "workloads": bench.workloads,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(rows))
    print(f"\n{sizes.reps} repetition(s), medians; ratio = time with the feature / time without (lower is better). "
          f"Load average during the run: median {fmt(result['loadavg_during']['median'], 2)}, "
          f"max {fmt(result['loadavg_during']['max'], 2)}. {perf_counter() - started:.0f} s in all. JSON: {out}")
    for e in bench.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if bench.errors else 0
