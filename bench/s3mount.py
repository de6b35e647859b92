"""`scripts/bench --store s3`: the mount on an archive kept in SeaweedFS, against rclone + bagit.

    scripts/bench --store s3 [--quick] [--reps N] [--out FILE.json] [--workdir DIR] [--keep]

Starts its own `weed server` on loopback (tests/seaweed.py) with its data under the
run's scratch folder, and one bucket in it. The archive is a ROOT attached to the
prefix `archive/` of that bucket; rclone writes the same trees under `rclone/`.

- deposit: `mkdir transactions/r`, `cp -a`, `mv` to `commit/` (which returns once the
  instance is published in the store) against `rclone copy` of the same tree into
  the bucket plus `bagit.make_bag` (sha512) of a local copy of it: the issue's
  "rclone + make_bag", the sum of the two (the copy for make_bag is untimed).
- read, cold: the daemon remounted with its cache's files removed and the page
  cache dropped, so every byte comes from the store; against `rclone copy` of
  rclone's copy back to local disk. Warm: read twice first; against `cat` of the
  local source.
- mount: a bucket prefix holding RESOURCES x FILES objects (built by parallel
  builder processes through the Python API, each a host of its own; timed apart),
  mounted by a new host (a fresh ROOT: empty cache), then again by that host.
  Time until `resources/` answers, the daemon's RSS, `ls -l resources/`.
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
from bench.harness import KIB, MIB, PY, Bench, Daemon, StepFailed, count, fmt, human, median, run

sys.path.insert(0, str(harness.PROJECT / "tests"))
from seaweed import start_seaweed  # noqa: E402

S3_ROWS = [
    ("deposit-1g", "rclone+make_bag", 1.3),
    ("deposit-1g", "rclone", None),
    ("deposit-small", "rclone+make_bag", 2.0),
    ("deposit-small", "rclone", None),
    ("commit-1g", "rclone", None),
    ("commit-small", "rclone", None),
    ("read-1g-cold", "rclone copy", None),
    ("read-small-cold", "rclone copy", None),
    ("read-1g-warm", "native", None),
    ("read-small-warm", "native", None),
]
MOUNT_TIME_TARGET, RSS_TARGET_MIB = 2.0, 200
BUILDERS = 4  # processes committing the resources of the mount-time archive
REMOTE = "bench"  # the rclone remote, configured by RCLONE_CONFIG_BENCH_* variables


@dataclass
class S3Sizes:
    big: int
    small: int
    small_dirs: int
    file_size: int
    resources: int  # of the mount-time archive
    per_resource: int  # files in each of them (1 KiB each)
    reps: int
    mount_reps: int

    @staticmethod
    def choose(quick: bool, reps: int | None) -> S3Sizes:
        if quick:
            s = S3Sizes(16 * MIB, 200, 10, 4 * KIB, 8, 100, 1, 1)
        else:
            s = S3Sizes(1 << 30, 10_000, 100, 4 * KIB, 100, 1000, 1, 3)
        if reps:
            s.reps = s.mount_reps = reps
        return s

    @property
    def objects(self) -> int:
        """Objects of the mount-time archive: each instance adds 3 tag files, instance.json,
        resource.json and its claim to its payload."""
        return self.resources * (self.per_resource + 6)


class S3Bench(Bench):
    rows = S3_ROWS

    def __init__(self, args, sizes: S3Sizes, run_dir: Path):
        z = sizes
        super().__init__(args, harness.Sizes(z.big, z.small, z.small_dirs, z.file_size, 0, z.reps, 0, 0,
                                             z.mount_reps), run_dir)
        self.s3 = sizes
        self.weed = None
        self.weed_link: Path | None = None
        self.bucket = ""
        self.downloads = run_dir / "downloads"
        self.setup: dict[str, float] = {}
        self.labels.update({
            "read-1g-cold": f"read {human(z.big)}, cold (from the store)",
            "read-small-cold": f"read {count(z.small)} files, cold (from the store)",
            "read-1g-warm": f"read {human(z.big)}, warm (cache)",
            "read-small-warm": f"read {count(z.small)} files, warm (cache)",
            "commit-1g": f"commit alone (mv) vs upload alone, {human(z.big)}",
            "commit-small": f"commit alone (mv) vs upload alone, {count(z.small)} files",
            "mount-new": f"mount, {z.resources} x {count(z.per_resource)} files ({z.objects:,} objects), new host",
            "mount-again": f"mount, {z.resources} x {count(z.per_resource)} files, same host again",
        })

    # -- the store ----------------------------------------------------------------------------------
    def start_store(self) -> None:
        # weed binds unix sockets in the folder it is given, and a socket's path has room for 107 bytes:
        # a long --workdir (pytest's tmp_path) makes it fail, so it is given a short link to its folder
        self.weed_link = Path(tempfile.mkdtemp(prefix="tinyfs-weed-"))
        (self.dir / "weed").mkdir()
        (self.weed_link / "w").symlink_to(self.dir / "weed")
        self.weed = start_seaweed(self.weed_link / "w")
        self.bucket = self.weed.make_bucket(object_lock=False)
        os.environ.update(AWS_ACCESS_KEY_ID=self.weed.access_key, AWS_SECRET_ACCESS_KEY=self.weed.secret_key,
                          AWS_EC2_METADATA_DISABLED="true")
        # the store is plain http on loopback; rclone refuses to start when AWS_CA_BUNDLE names a bundle
        # ("unsupported transport"), so neither it nor boto3 gets one
        os.environ.pop("AWS_CA_BUNDLE", None)
        remote = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        os.environ.update({remote + "TYPE": "s3", remote + "PROVIDER": "SeaweedFS",
                           remote + "ENDPOINT": self.weed.endpoint, remote + "ACCESS_KEY_ID": self.weed.access_key,
                           remote + "SECRET_ACCESS_KEY": self.weed.secret_key})
        self.say(f"SeaweedFS ready in {self.weed.startup_seconds:.1f} s at {self.weed.endpoint}, bucket {self.bucket}")

    def stop_store(self) -> None:
        if self.weed is not None:
            self.weed.stop()
        if self.weed_link is not None:
            shutil.rmtree(self.weed_link)   # the link only

    def init_root(self, root: Path, prefix: str) -> None:
        run([harness.TINYFS, "init", root, "--store", f"s3://{self.bucket}/{prefix}",
             "--endpoint", self.weed.endpoint])

    def remote(self, path: str) -> str:
        return f"{REMOTE}:{self.bucket}/{path}"

    def start_mounts(self) -> None:
        for d in (self.mnt, self.native, self.logs, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self.init_root(self.archive, "archive")
        self.tinyfs = self.daemon(self.archive, self.mnt, "tinyfs")
        self.say(f"tinyfs mounted in {self.tinyfs.start():.3f} s")

    def daemon(self, root: Path, mnt: Path, log: str) -> Daemon:
        return Daemon([harness.TINYFS, "mount", "--foreground", root, mnt], mnt, self.logs / f"{log}.log",
                      probe="resources")

    def remount_cold(self) -> None:
        """The daemon restarted with no file in its read cache: every payload byte comes from the store."""
        self.tinyfs.stop()
        shutil.rmtree(self.archive / "cache" / "files", ignore_errors=True)
        self.tinyfs.start()

    # -- workloads --------------------------------------------------------------------------------
    def deposit(self, wl: str, src: Path, tag: str, rep: int) -> None:
        name = f"{tag}-{rep}"
        txn, bag = self.mnt / "transactions" / name, self.native / f"{tag}-bag-{rep}"

        def warm() -> None:
            self.recycle_memory()
            self.warm(src)

        def copy_then_warm() -> None:
            run(["cp", "-a", src, bag])  # make_bag turns a directory into a bag in place
            warm()

        self.compare(wl, rep, {
            "tinyfs": ([("open", ["mkdir", txn]), ("copy", ["cp", "-a", f"{src}/.", f"{txn}/"]),
                        ("commit", ["mv", txn, f"{self.mnt}/commit/"])], warm),
            "rclone+make_bag": ([("rclone", ["rclone", "copy", src, self.remote(f"rclone/{name}")]),
                                 ("bag", [PY, "-c", harness.MAKE_BAG, bag])], copy_then_warm),
        })

    def reading(self, wl: str, tag: str, rep: int, cold: bool) -> None:
        name = f"{tag}-{rep}"
        mine = harness.cat_all(self.mnt / "resources" / name)
        if cold:
            dl = self.downloads / name
            prepare = self.drop_caches if self.can_drop else None
            self.compare(wl, rep, {
                "tinyfs": ([("run", mine)], prepare),
                "rclone copy": ([("run", ["rclone", "copy", self.remote(f"rclone/{name}"), dl])], prepare),
            })
            return
        native = harness.cat_all(self.src_big if tag == "big" else self.src_small)
        self.compare(wl, rep, {
            "tinyfs": ([("run", mine)], lambda: (run(mine), run(mine))),
            "native": ([("run", native)], lambda: (run(native), run(native))),
        })

    def repetition(self, rep: int) -> None:
        self.say(f"repetition {rep + 1} of {self.s3.reps}")
        self.deposit("deposit-1g", self.src_big, "big", rep)
        self.deposit("deposit-small", self.src_small, "small", rep)
        self.remount_cold()
        for cold in (True, False):
            t = "cold" if cold else "warm"
            self.reading(f"read-1g-{t}", "big", rep, cold)
            self.reading(f"read-small-{t}", "small", rep, cold)
        self.rss_trace.append({"after": f"repetition {rep + 1}", **self.tinyfs.memory()})

    def check_content(self) -> None:
        """Untimed: what was measured really arrived, through the mount and through rclone."""
        try:
            run(["cmp", self.src_big / "file.bin", self.mnt / "resources" / "big-0" / "file.bin"])
            run(["diff", "-r", "-q", self.src_small, self.mnt / "resources" / "small-0"])
            run(["cmp", self.src_big / "file.bin", self.downloads / "big-0" / "file.bin"])
            run(["diff", "-r", "-q", self.src_small, self.downloads / "small-0"])
        except StepFailed as e:
            self.errors.append(f"content check: {e}")

    def derive(self) -> None:
        """commit-*: the mv phase against rclone's upload alone; rclone: the upload phase alone."""
        for src, dst in (("deposit-1g", "commit-1g"), ("deposit-small", "commit-small")):
            variants = self.workloads.get(src, {}).get("variants", {})
            for r in variants.get("tinyfs", {}).get("runs", []):
                self.record(dst, "tinyfs", r["rep"], {"commit": r["phases"]["commit"]})
            for r in variants.get("rclone+make_bag", {}).get("runs", []):
                for wl in (src, dst):
                    self.record(wl, "rclone", r["rep"], {"rclone": r["phases"]["rclone"]})

    # -- mount time and memory with many objects ---------------------------------------------------
    def build_objects(self) -> None:
        """RESOURCES resources of FILES files each under the prefix `many/`, by BUILDERS processes."""
        z = self.s3
        src = self.src / "per-resource"
        harness.write_tree(src, z.per_resource, max(1, z.per_resource // 1000), KIB)
        roots = [self.dir / f"builder-{i}" for i in range(BUILDERS)]
        for root in roots:
            self.init_root(root, "many")
        share = -(-z.resources // BUILDERS)
        t0 = perf_counter()
        procs = [subprocess.Popen([PY, "-m", "bench.s3mount", "build", str(root), str(src), str(i * share),
                                   str(min(share, z.resources - i * share))], cwd=harness.PROJECT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i, root in enumerate(roots) if i * share < z.resources]
        for p in procs:
            _, err = p.communicate(timeout=harness.STEP_TIMEOUT)
            if p.returncode:
                raise StepFailed(f"builder exited {p.returncode}: {err.decode(errors='replace')[-1500:]}")
        self.setup["build_s"] = perf_counter() - t0
        t0 = perf_counter()
        found = self.count_objects("many/")
        self.setup["list_s"] = perf_counter() - t0
        self.setup["objects"] = found
        self.say(f"  built {z.resources} resources x {z.per_resource} files in {self.setup['build_s']:.1f} s; "
                 f"{found} objects listed in {self.setup['list_s']:.1f} s")
        if found < z.objects:
            self.errors.append(f"mount archive: {found} objects in the bucket, {z.objects} expected")

    def count_objects(self, prefix: str) -> int:
        pages = self.weed.raw().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sum(page.get("KeyCount", 0) for page in pages)

    def mount_objects(self) -> None:
        try:
            self.build_objects()
        except (StepFailed, subprocess.SubprocessError, OSError) as e:
            self.errors.append(f"building the mount archive: {e}")
            return
        mnt = self.dir / "mnt-many"
        mnt.mkdir()
        for rep in range(self.s3.mount_reps):
            root = self.dir / f"host-{rep}"
            self.init_root(root, "many")
            for wl in ("mount-new", "mount-again"):
                self.mount_once(wl, root, mnt, rep)

    def mount_once(self, wl: str, root: Path, mnt: Path, rep: int) -> None:
        if self.can_drop:
            self.drop_caches()
        d = self.daemon(root, mnt, f"{wl}-{rep}")
        probe = f"resources/o000000/per-resource/d000/f{0:06d}"
        try:
            self.load.append(os.getloadavg()[0])
            mount_s = d.start()
            mem = d.memory()
            extra = {"rss_kib": mem.get("VmRSS"), "hwm_kib": mem.get("VmHWM")}
            t0 = perf_counter()
            run(["ls", "-l", mnt / "resources"])
            extra["list_resources_s"] = perf_counter() - t0
            t0 = perf_counter()
            run(["stat", mnt / probe])
            extra["first_stat_s"] = perf_counter() - t0
            extra["rss_after_list_kib"] = d.memory().get("VmRSS")
            self.record(wl, "tinyfs", rep, {"mount": mount_s}, **extra)
            self.say(f"  {wl:<12} mount {mount_s:.3f} s, RSS {extra['rss_kib'] / 1024:.1f} MiB; ls -l resources/ "
                     f"{extra['list_resources_s']:.3f} s, then a file's stat {extra['first_stat_s']:.3f} s, "
                     f"RSS {extra['rss_after_list_kib'] / 1024:.1f} MiB")
        except (StepFailed, subprocess.SubprocessError, OSError) as e:
            self.errors.append(f"{wl} (rep {rep}): {e}")
            self.say(f"  FAILED {wl}: {e}")
        finally:
            d.stop()

    def mount_rows(self) -> list[dict]:
        rows = []
        for wl in ("mount-new", "mount-again"):
            v = self.workloads.get(wl, {}).get("variants", {}).get("tinyfs")
            if not v:
                continue
            rss = v.get("rss_kib_median")
            after = v.get("rss_after_list_kib_median")
            rows.append({
                "workload": wl, "label": self.labels[wl], "mount_s": v["median"],
                "rss_mib": rss / 1024 if rss else None,
                "rss_after_list_mib": after / 1024 if after else None,
                "list_resources_s": v.get("list_resources_s_median"), "first_stat_s": v.get("first_stat_s_median"),
                "meets_target": v["median"] < MOUNT_TIME_TARGET and rss is not None
                and max(rss, after or 0) / 1024 < RSS_TARGET_MIB,
            })
        return rows


def render_mounts(rows: list[dict], setup: dict) -> str:
    out = ["", f"| mount | time s (target < {MOUNT_TIME_TARGET:g}) | RSS MiB (target < {RSS_TARGET_MIB}) "
           "| ls -l resources/ s | RSS after MiB | a file's stat, then s | target |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        out.append(f"| {r['label']} | {fmt(r['mount_s'])} | {fmt(r['rss_mib'], 1)} | {fmt(r['list_resources_s'])} "
                   f"| {fmt(r['rss_after_list_mib'], 1)} | {fmt(r['first_stat_s'])} "
                   f"| {'ok' if r['meets_target'] else 'MISSED'} |")
    if setup.get("objects"):
        out.append(f"\nsetup: {setup['objects']} objects made by {BUILDERS} builder processes in "
                   f"{setup['build_s']:.1f} s ({setup['objects'] / setup['build_s']:.0f} objects/s); listing them "
                   f"(1,000 a page, one client) took {setup['list_s']:.1f} s")
    return "\n".join(out)


def environment(bench: S3Bench) -> dict:
    env = harness.environment()
    rclone = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False).stdout
    weed = subprocess.run([str(Path(sys.executable).parent / "weed"), "version"], capture_output=True, text=True,
                          check=False).stdout
    return {**env, "rclone": (rclone.splitlines() or ["?"])[0], "weed": (weed.splitlines() or ["?"])[0]}


def main(args) -> int:
    for tool in ("cp", "mv", "find", "cat", "rclone", "fusermount3", "cmp", "diff", "stat", "ls"):
        if shutil.which(tool) is None:
            print(f"scripts/bench: {tool} is not installed (scripts/setup installs rclone)", file=sys.stderr)
            return 2
    sizes = S3Sizes.choose(args.quick, args.reps)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or harness.PROJECT / "bench-results" / f"bench-s3-{stamp}.json"
    workdir = (args.workdir or Path("/var/tmp")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / f"tinyfs-bench-s3-{stamp}-{os.getpid()}"
    run_dir.mkdir()
    bench = S3Bench(args, sizes, run_dir)
    started = perf_counter()
    env: dict = {}
    daemons: dict = {}
    try:
        bench.start_store()
        env = environment(bench)
        if env["loadavg_at_start"][0] > 0.5:
            bench.say(f"note: load average {env['loadavg_at_start'][0]:.2f} at start: the machine is not idle")
        if not bench.can_drop:
            bench.say("note: not root: the page cache is not dropped before cold reads (the read cache is emptied)")
        bench.make_sources()
        bench.start_mounts()
        for rep in range(sizes.reps):
            bench.repetition(rep)
        bench.check_content()
        daemons = {"tinyfs": bench.tinyfs.memory()}
        if bench.tinyfs.tracebacks():
            bench.errors.append(f"the tinyfs daemon logged {bench.tinyfs.tracebacks()} traceback(s)")
        bench.stop_mounts()
        bench.say("mount time and memory")
        bench.mount_objects()
    finally:
        bench.stop_mounts()
        bench.stop_store()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    bench.derive()
    bench.summarize()
    rows, mrows = bench.table_rows(), bench.mount_rows()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": asdict(sizes),
        "environment": env,
        "seconds": perf_counter() - started,
        "loadavg_during": {"max": max(bench.load, default=None),
                           "median": median(bench.load) if bench.load else None,
                           "samples": [round(x, 2) for x in bench.load]},
        "daemons_after_workloads": daemons,
        "setup": bench.setup,
        "errors": bench.errors,
        "table": rows,
        "mount": mrows,
        "workloads": bench.workloads,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(harness.render(rows, [], daemons, bench.rss_trace))
    print(render_mounts(mrows, bench.setup))
    print(f"\n{sizes.reps} repetition(s), medians; ratio = time / time of the alternative (lower is better). "
          f"SeaweedFS {env.get('weed', '?')}, {env.get('rclone', '?')}, on loopback. Load average during the run: "
          f"median {fmt(result['loadavg_during']['median'], 2)}, max {fmt(result['loadavg_during']['max'], 2)}. "
          f"{perf_counter() - started:.0f} s in all. JSON: {out}")
    for e in bench.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if bench.errors else 0


def build(root: str, source: str, start: int, n: int) -> None:
    """A builder: resources o<start>.. o<start+n-1>, each holding the tree `source`, through the API."""
    from bench.build import _no_fsync
    from tinyfs import Archive

    _no_fsync()  # the local staging's durability is not what is measured (bench/build.py)
    archive = Archive(root)
    for i in range(start, start + n):
        with archive.new(f"o{i:06d}", message="bench") as txn:
            txn.add(source)


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"]:
        root, source, start, n = sys.argv[2:]
        build(root, source, int(start), int(n))
    else:
        raise SystemExit("usage: python -m bench.s3mount build ROOT SOURCE START COUNT (scripts/bench --store s3)")
