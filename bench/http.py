"""`scripts/bench --http`: `tinyfs serve` against nginx and a plain WsgiDAV, with the same clients.

    scripts/bench --http [--quick] [--reps N] [--out FILE.json] [--workdir DIR] [--keep]

One archive holds a resource with one big file (1 GiB; 16 MiB with --quick) and one with 1,000 files of
4 KiB (200 with --quick), ingested untimed. `tinyfs serve` serves it on a loopback port (a users file:
every request carries Basic credentials, as in use); nginx serves the same bytes from the source
directory (a temporary config: one worker, sendfile, no access log, run with -p/-c/-g 'daemon off;');
WsgiDAV, the library `tinyfs serve` is built on, serves a plain directory (its own command, anonymous,
quiet) on a third port.

- read, big: `curl -o /dev/null` of the file (warm: every variant read once before the first timing).
- read, small: one `curl -K LIST` fetching every file over one kept-alive connection.
- deposit, curl: 10,000 files of 4 KiB in 100 directories (1,000 with --quick), one `curl -K LIST` over one
  connection: MKCOL /transactions/<rid> and each directory, a PUT of each file, then the MOVE to
  /commit/<rid> (answered once the instance is durable); against the same MKCOLs and PUTs into a new
  directory of the plain WsgiDAV + `sync -f` of it (durable too).
- deposit, rclone: the same with `rclone mkdir` of the transaction, `rclone copy` into it and `rclone
  moveto` to /commit/<rid>, against `rclone copy` to the plain WsgiDAV + `sync -f`; rclone's remotes are
  `vendor=owncloud` (X-OC-Mtime keeps the files' times in tinyfs). rclone 1.60 paces its WebDAV calls
  (10 ms apart, three a file: MKCOL of the parent, PUT, PROPFIND), so it takes ~33 ms a file whatever the
  server: --quick deposits 200 files this way, to keep it short.

Within a repetition the variants run one after the other in an order rotated by the repetition, as in
bench/harness.py. Every download is then checked against its source, and every deposit's file count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter

from bench import harness
from bench.harness import KIB, MIB, Bench, Daemon, StepFailed, count, fmt, human, median, run

sys.path.insert(0, str(harness.PROJECT / "tests"))
from seaweed import free_ports  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WSGIDAV = str(harness.BIN / "wsgidav") if (harness.BIN / "wsgidav").exists() else (shutil.which("wsgidav") or "wsgidav")
USER, PASSWORD = "bench", "bench-password"
HTTP_ROWS = [
    ("http-read-1g", "nginx", 1.5),
    ("http-read-small", "nginx", 4.0),
    ("http-deposit-curl", "wsgidav+sync", None),
    ("http-deposit-rclone", "wsgidav+sync", None),
]
START_SECONDS = 30


@dataclass
class HttpSizes:
    big: int            # bytes of the one big file
    small: int          # files read one by one
    deposit: int        # files deposited with curl
    deposit_rclone: int     # files deposited with rclone
    dirs: int           # directories of the deposited trees
    file_size: int
    reps: int

    @staticmethod
    def choose(quick: bool, reps: int | None) -> HttpSizes:
        s = HttpSizes(16 * MIB, 200, 1_000, 200, 10, 4 * KIB, 1) if quick else \
            HttpSizes(1 << 30, 1_000, 10_000, 10_000, 100, 4 * KIB, 3)
        if reps:
            s.reps = reps
        return s


class Server(Daemon):
    """A server process on a loopback port (Daemon's memory and cpu_seconds apply), up once `probe` answers."""

    def __init__(self, name: str, argv: list, url: str, log: Path, probe: str = ""):
        super().__init__(argv, Path("/nonexistent"), log)
        self.name, self.url, self.probe_url = name, url, url + probe

    def start(self, timeout: float = START_SECONDS) -> float:
        t0 = perf_counter()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StepFailed(f"{self.name} exited {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-1500:]}")
            try:
                request = urllib.request.Request(self.probe_url, method="HEAD")
                with urllib.request.urlopen(request, timeout=2):
                    return perf_counter() - t0
            except urllib.error.HTTPError:
                return perf_counter() - t0            # (a 401 answers too)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StepFailed(f"{self.name} did not answer in {timeout} s: "
                                 f"{self.log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HttpBench(Bench):
    rows = HTTP_ROWS

    def __init__(self, args, sizes: HttpSizes, run_dir: Path):
        z = sizes
        super().__init__(args, harness.Sizes(z.big, z.small, z.dirs, z.file_size, 0, z.reps, 0, 0, z.reps), run_dir)
        self.http = sizes
        self.src_deposit = self.src / "deposit"
        self.src_rclone = self.src / "deposit-rclone" if z.deposit_rclone != z.deposit else self.src_deposit
        self.plain = run_dir / "plain"              # what the plain WsgiDAV serves
        self.servers: dict[str, Server] = {}
        self.deposited: list[tuple[str, str, int]] = []     # (tinyfs rid, plain WsgiDAV directory, files)
        self.labels.update({
            "http-read-1g": f"GET {human(z.big)} file (curl), warm",
            "http-read-small": f"GET {count(z.small)} x {human(z.file_size)} (one curl, keep-alive), warm",
            "http-deposit-curl": f"deposit {count(z.deposit)} x {human(z.file_size)} (one curl: MKCOL, PUT, MOVE)",
            "http-deposit-rclone": f"deposit {count(z.deposit_rclone)} x {human(z.file_size)} "
                                   "(rclone copy, moveto commit/)",
        })

    # -- set up ----------------------------------------------------------------------------------------
    def make_sources(self) -> None:
        z = self.http
        self.say(f"sources: one {human(z.big)} file, {z.small} + {z.deposit} files of {human(z.file_size)}")
        harness.write_big(self.src_big / "file.bin", z.big)
        harness.write_tree(self.src_small, z.small, max(1, z.small // 100), z.file_size)
        harness.write_tree(self.src_deposit, z.deposit, z.dirs, z.file_size)
        if self.src_rclone != self.src_deposit:
            harness.write_tree(self.src_rclone, z.deposit_rclone, z.dirs, z.file_size)
        run(["sync", "-f", self.src])

    def start_servers(self) -> None:
        for d in (self.logs, self.plain):
            d.mkdir(parents=True, exist_ok=True)
        run([harness.TINYFS, "init", self.archive])
        self.say("ingesting the read workloads' data (untimed)")
        run([harness.TINYFS, "ingest", self.archive, "big", self.src_big / "file.bin"])
        run([harness.TINYFS, "ingest", self.archive, "small", *sorted(self.src_small.iterdir())])
        users = self.dir / "users"
        subprocess.run([harness.TINYFS, "serve-passwd", users, USER], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True)
        ports = free_ports(3)
        tiny = Server("tinyfs", [harness.TINYFS, "serve", self.archive, "--listen", f"127.0.0.1:{ports[0]}",
                                 "--users", users], f"http://127.0.0.1:{ports[0]}/", self.logs / "tinyfs.log")
        nginx = Server("nginx", [NGINX, "-p", self.dir / "nginx", "-c", self.nginx_conf(ports[1]),
                                 "-g", "daemon off;"], f"http://127.0.0.1:{ports[1]}/", self.logs / "nginx.log")
        plain = Server("wsgidav", [WSGIDAV, "--host", "127.0.0.1", "--port", ports[2], "--root", self.plain,
                                   "--auth", "anonymous", "--no-config", "-q", "-q"],
                       f"http://127.0.0.1:{ports[2]}/", self.logs / "wsgidav.log")
        for server in (tiny, nginx, plain):
            self.servers[server.name] = server
            self.say(f"{server.name} answers on {server.url} after {server.start():.2f} s")
        self.tinyfs = tiny          # Bench.compare records its CPU seconds and memory
        os.environ.update({
            "RCLONE_CONFIG": str(self.dir / "rclone.conf"),      # (empty: the remotes come from variables)
            "RCLONE_CONFIG_TINY_TYPE": "webdav", "RCLONE_CONFIG_TINY_URL": tiny.url,
            "RCLONE_CONFIG_TINY_VENDOR": "owncloud", "RCLONE_CONFIG_TINY_USER": USER,
            "RCLONE_CONFIG_TINY_PASS": obscure(PASSWORD),
            "RCLONE_CONFIG_PLAIN_TYPE": "webdav", "RCLONE_CONFIG_PLAIN_URL": plain.url,
            "RCLONE_CONFIG_PLAIN_VENDOR": "owncloud",
        })
        (self.dir / "rclone.conf").touch()

    def nginx_conf(self, port: int) -> Path:
        prefix = self.dir / "nginx"
        (prefix / "logs").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                         "uwsgi", "scgi"))
        conf.write_text(
            ("user root;\n" if os.geteuid() == 0 else "")       # (workers read the run's private folder)
            + f"worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000; {temp}\n"
            "  default_type application/octet-stream;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {self.src}; }} }}\n")
        return conf

    def stop_servers(self) -> None:
        for server in self.servers.values():
            server.stop()

    # -- workloads --------------------------------------------------------------------------------------
    def curl(self, *args) -> list:
        return ["curl", "-sS", "--fail", *args]

    def read_big(self) -> dict:
        tiny, nginx = self.servers["tinyfs"], self.servers["nginx"]
        return {
            "tinyfs": ([("get", self.curl("-u", f"{USER}:{PASSWORD}", "-o", "/dev/null",
                                          tiny.url + "resources/big/file.bin"))], None),
            "nginx": ([("get", self.curl("-o", "/dev/null", nginx.url + "big/file.bin"))], None),
        }

    def url_list(self, name: str, base: str) -> Path:
        """A curl config fetching every small file to /dev/null (one curl, one connection)."""
        path = self.dir / f"urls-{name}.txt"
        if not path.exists():
            files = sorted(p.relative_to(self.src_small) for p in self.src_small.rglob("*") if p.is_file())
            path.write_text("".join(f'url = "{base}{f}"\noutput = "/dev/null"\n' for f in files))
        return path

    def read_small(self) -> dict:
        tiny, nginx = self.servers["tinyfs"], self.servers["nginx"]
        return {
            "tinyfs": ([("get", self.curl("-u", f"{USER}:{PASSWORD}", "-K",
                                          self.url_list("tinyfs", tiny.url + "resources/small/")))], None),
            "nginx": ([("get", self.curl("-K", self.url_list("nginx", nginx.url + "small/")))], None),
        }

    def put_list(self, name: str, base: str, auth: bool) -> Path:
        """A curl config of one operation per request (`next` between them, one connection): MKCOL of each
        directory of the deposit tree under `base`, then a PUT of each file."""
        lines: list[str] = []
        user = [f'user = "{USER}:{PASSWORD}"'] if auth else []
        dirs = sorted(p for p in self.src_deposit.rglob("*") if p.is_dir())
        files = sorted(p for p in self.src_deposit.rglob("*") if p.is_file())
        for d in dirs:
            lines += ["next"] * bool(lines) + ['request = "MKCOL"', f'url = "{base}{d.relative_to(self.src_deposit)}/"']
            lines += [*user, "fail", 'output = "/dev/null"']
        for f in files:
            lines += ["next"] * bool(lines) + [f'upload-file = "{f}"', f'url = "{base}{f.relative_to(self.src_deposit)}"']
            lines += [*user, "fail", 'output = "/dev/null"']
        path = self.dir / f"puts-{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        return path

    def deposit_curl(self, rep: int) -> None:
        tiny, plain = self.servers["tinyfs"], self.servers["wsgidav"]
        rid = folder = f"curl{rep}"
        auth = ["-u", f"{USER}:{PASSWORD}"]
        txn = tiny.url + f"transactions/{rid}"
        tiny_puts = self.put_list(f"tinyfs-{rid}", txn + "/", True)
        plain_puts = self.put_list(f"wsgidav-{folder}", plain.url + f"{folder}/", False)
        self.compare("http-deposit-curl", rep, {
            "tinyfs": ([("open", self.curl(*auth, "-X", "MKCOL", "-o", "/dev/null", txn)),
                        ("copy", ["curl", "-sS", "--fail-early", "-K", tiny_puts]),
                        ("commit", self.curl(*auth, "-X", "MOVE", "-H", f"Destination: {tiny.url}commit/{rid}",
                                             "-o", "/dev/null", txn))],
                       self.warm_deposit),
            "wsgidav+sync": ([("open", self.curl("-X", "MKCOL", "-o", "/dev/null", plain.url + f"{folder}/")),
                              ("copy", ["curl", "-sS", "--fail-early", "-K", plain_puts]),
                              ("sync", ["sync", "-f", self.plain])],
                             self.warm_deposit),
        })
        self.deposited.append((rid, folder, self.http.deposit))

    def deposit_rclone(self, rep: int) -> None:
        rid = folder = f"rclone{rep}"
        self.compare("http-deposit-rclone", rep, {
            "tinyfs": ([("open", ["rclone", "mkdir", f"tiny:transactions/{rid}"]),
                        ("copy", ["rclone", "copy", self.src_rclone, f"tiny:transactions/{rid}"]),
                        ("commit", ["rclone", "moveto", f"tiny:transactions/{rid}", f"tiny:commit/{rid}"])],
                       self.warm_deposit),
            "wsgidav+sync": ([("copy", ["rclone", "copy", self.src_rclone, f"plain:{folder}"]),
                              ("sync", ["sync", "-f", self.plain])], self.warm_deposit),
        })
        self.deposited.append((rid, folder, self.http.deposit_rclone))

    def warm_deposit(self) -> None:
        """Before a deposit (as bench/harness.py does): the page cache dropped (when root), the source read."""
        self.recycle_memory()
        self.warm(self.src_deposit, self.src_rclone)

    def warm_up(self) -> None:
        """Every read variant once, untimed: the page cache holds the files, the servers have answered."""
        self.say("warming up: every read once")
        for variants in (self.read_big(), self.read_small()):
            for steps, _ in variants.values():
                for _, argv in steps:
                    run(argv)

    def repetition(self, rep: int) -> None:
        self.say(f"repetition {rep + 1} of {self.http.reps}")
        self.warm(self.src_big, self.src_small, self.archive / "resources")   # (the deposits drop the cache)
        self.compare("http-read-1g", rep, self.read_big())
        self.compare("http-read-small", rep, self.read_small())
        self.deposit_curl(rep)
        self.deposit_rclone(rep)
        self.rss_trace.append({"after": f"repetition {rep + 1}", **self.tinyfs.memory()})

    def check_content(self) -> None:
        """What was timed did the job: the bytes served equal the source, every deposit holds every file."""
        tiny, nginx = self.servers["tinyfs"], self.servers["nginx"]
        want = sha256_of(self.src_big / "file.bin")
        for name, argv in (("tinyfs", self.curl("-u", f"{USER}:{PASSWORD}", tiny.url + "resources/big/file.bin")),
                           ("nginx", self.curl(nginx.url + "big/file.bin"))):
            if sha256_of_output(argv) != want:
                self.errors.append(f"{name} served other bytes than the source's big file")
        first = sorted(p for p in self.src_small.rglob("*") if p.is_file())[0]
        rel = first.relative_to(self.src_small)
        got = subprocess.run(self.curl("-u", f"{USER}:{PASSWORD}", tiny.url + f"resources/small/{rel}"),
                             capture_output=True, check=False).stdout
        if got != first.read_bytes():
            self.errors.append(f"tinyfs served other bytes than {first}")
        for rid, folder, n in self.deposited:
            raw = subprocess.run(self.curl("-u", f"{USER}:{PASSWORD}", tiny.url + f"resources/{rid}?format=json"),
                                 capture_output=True, check=False).stdout
            files = len(json.loads(raw)["state"]) if raw else 0
            if files != n:
                self.errors.append(f"tinyfs resource {rid}: {files} files, {n} deposited")
            files = sum(1 for p in (self.plain / folder).rglob("*") if p.is_file())
            if files != n:
                self.errors.append(f"plain WsgiDAV {folder}: {files} files, {n} deposited")


def obscure(password: str) -> str:
    return subprocess.run(["rclone", "obscure", password], capture_output=True, text=True,
                          check=True).stdout.strip()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def sha256_of_output(argv: list) -> str:
    h = hashlib.sha256()
    with subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(MIB):
            h.update(chunk)
    return h.hexdigest() if proc.returncode == 0 else ""


def version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]


def environment() -> dict:
    from importlib.metadata import version as package

    return {**harness.environment(), "nginx": version([NGINX, "-v"]), "curl": version(["curl", "--version"]),
            "rclone": version(["rclone", "version"]), "wsgidav": package("wsgidav"), "cheroot": package("cheroot")}


def main(args) -> int:
    for tool in ("curl", "rclone", "sync", "find", "cat"):
        if shutil.which(tool) is None:
            print(f"scripts/bench --http: {tool} is not installed", file=sys.stderr)
            return 2
    if not Path(NGINX).exists():
        print("scripts/bench --http: nginx is not installed (apt-get install nginx-light)", file=sys.stderr)
        return 2
    sizes = HttpSizes.choose(args.quick, args.reps)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or harness.PROJECT / "bench-results" / f"bench-http-{stamp}.json"
    workdir = (args.workdir or Path("/var/tmp")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"tinyfs-bench-http-{stamp}-", dir=workdir))
    bench = HttpBench(args, sizes, run_dir)
    env = environment()
    if env["loadavg_at_start"][0] > 0.5:
        bench.say(f"note: load average {env['loadavg_at_start'][0]:.2f} at start: the machine is not idle")
    started = perf_counter()
    daemons: dict = {}
    try:
        bench.make_sources()
        bench.start_servers()
        bench.warm_up()
        for rep in range(sizes.reps):
            bench.repetition(rep)
        bench.check_content()
        daemons = {"tinyfs serve": bench.tinyfs.memory()}
        log = bench.tinyfs.log.read_text(errors="replace")
        if "Traceback" in log:
            bench.errors.append(f"tinyfs serve logged a traceback: see {bench.tinyfs.log}")
    except (StepFailed, OSError, subprocess.SubprocessError) as e:
        bench.errors.append(f"setup: {e}")
    finally:
        bench.stop_servers()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    bench.summarize()
    rows = bench.table_rows()
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
        "tinyfs_rss_after_each_repetition": bench.rss_trace,
        "errors": bench.errors,
        "table": rows,
        "workloads": bench.workloads,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(rows, bench.workloads))
    print(f"\n{sizes.reps} repetition(s), medians; ratio = time / time of the alternative (lower is better). "
          f"{env['nginx']}, {env['rclone']}, WsgiDAV {env['wsgidav']} on cheroot {env['cheroot']}, all on loopback. "
          f"Load average during the run: median {fmt(result['loadavg_during']['median'], 2)}, "
          f"max {fmt(result['loadavg_during']['max'], 2)}. {perf_counter() - started:.0f} s in all. JSON: {out}")
    for name, mem in daemons.items():
        if mem:
            print(f"{name} after all workloads: VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB, "
                  f"VmHWM (peak) {mem.get('VmHWM', 0) / 1024:.1f} MiB")
    for e in bench.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if bench.errors else 0


def render(rows: list[dict], workloads: dict) -> str:
    out = ["| workload | alternative | tinyfs s | alt. s | tinyfs/alt | target | tinyfs phases (s) | server CPU s |",
           "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']} " + ("ok" if r["meets_target"] else "MISSED")
        v = workloads[r["workload"]]["variants"].get("tinyfs", {})
        phases = ", ".join(f"{k} {x:.2f}" for k, x in v.get("phase_medians", {}).items())
        cpu = [x["daemon_cpu_s"] for x in v.get("runs", []) if "daemon_cpu_s" in x]
        out.append(f"| {r['label']} | {r['alternative']} | {fmt(r['tinyfs_s'])} | {fmt(r['alternative_s'])} | "
                   f"{fmt(r['ratio'], 2)} | {target} | {phases} | {fmt(median(cpu) if cpu else None, 2)} |")
    return "\n".join(out)
