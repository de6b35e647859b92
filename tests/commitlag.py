"""Rounds of real deposits through a mount, each checked the instant its `mv` into commit/ returns.

Shared by tests/test_commit_lag.py (30 rounds in CI) and scripts/commit-lag (300 rounds by hand).
SPEC 5: when the rename returns, transactions/<rid> is gone from every listing and resources/<rid> is
in the listing of resources/ and resolves, showing the new state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

# Real material nobody on this project wrote, small files first taken from these trees in this order.
MATERIAL = ("/usr/share/doc", "/usr/share/zoneinfo", "/usr/include", "/usr/share/man")
SMALL = 64 * 1024
SETTLE = 30.0           # how long a failed round waits for the views to come right, to measure the lag


def make_source(dest: Path, files: int) -> Path:
    """A tree of `files` real files of at most SMALL bytes (and the symbolic links among them), copied
    with their modes and times from MATERIAL into dest/<tree name>/..."""
    count = 0
    for top in MATERIAL:
        if not os.path.isdir(top):
            continue
        for dirpath, dirs, names in os.walk(top):
            dirs.sort()
            for name in sorted(names):
                if count >= files:
                    return dest
                src = os.path.join(dirpath, name)
                out = dest / os.path.basename(top) / os.path.relpath(src, top)
                st = os.lstat(src)
                if os.path.islink(src):
                    out.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(src), out)
                elif os.path.isfile(src) and st.st_size <= SMALL and os.access(src, os.R_OK):
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)
                    count += 1
    if count < files:
        raise RuntimeError(f"only {count} small files found under {', '.join(MATERIAL)}")
    return dest


class Depositor:
    """Deposits `src` through the mount at `mnt`, as a user would (mkdir, cp -a, mv), and checks the views
    the instant each commit returns. `run` runs a command (argv) as the depositing user."""

    def __init__(self, mnt: Path, src: Path, run=None):
        self.mnt, self.src = Path(mnt), Path(src)
        self.run = run or (lambda argv: subprocess.run(argv, check=True, capture_output=True, text=True))
        self.committed: list[str] = []
        self.rounds = 0
        self.last_rid = ""
        self.last_files = 0
        self.markers: dict[str, str] = {}      # rid -> the file its latest commit added
        self.moving: str | None = None         # the resource whose mv runs (or has just returned)

    def round(self, later: bool) -> tuple[list[str], float]:
        """One deposit and commit; (problems found right after the commit, seconds until none were left)."""
        self.rounds += 1
        n = self.rounds
        if later:
            rid = self.committed[(n // 2) % len(self.committed)]
        else:
            rid = f"lag-{n:04d}"
        txn = self.mnt / "transactions" / rid
        self.run(["mkdir", str(txn)])
        if later:
            self._change(txn, rid, n)
            self.last_files = 4
        else:
            self.run(["cp", "-a", f"{self.src}/.", f"{txn}/"])
            self.last_files = sum(len(f) for _, _, f in os.walk(self.src))
        marker = f"round-{n:04d}.txt"
        self._write(txn / marker, f"round {n}\n")
        gone = self.markers.get(rid)
        self.moving = rid
        self.run(["mv", str(txn), str(self.mnt / "commit") + "/"])
        problems = self.problems(rid, marker, gone)     # at once: nothing between the mv and the look
        self.markers[rid] = marker                      # (a Lister expects it from now on)
        self.moving = None
        lag = 0.0
        if problems:
            t0 = time.monotonic()
            while self.problems(rid, marker, gone) and time.monotonic() - t0 < SETTLE:
                time.sleep(0.05)
            lag = time.monotonic() - t0
        if rid not in self.committed:
            self.committed.append(rid)
        self.last_rid = rid
        return problems, lag

    def _change(self, txn: Path, rid: str, n: int) -> None:
        """A later commit: the previous round's marker removed, a few files rewritten."""
        old = self.markers.get(rid)
        if old:
            self.run(["rm", str(txn / old)])
        for i, path in enumerate(sorted(self.src.rglob("*.gz"))[:3]):
            rel = path.relative_to(self.src)
            self._write(txn / rel, f"changed in round {n} ({i})\n")

    def _write(self, path: Path, text: str) -> None:
        self.run(["sh", "-c", 'printf %s "$1" > "$2"', "sh", text, str(path)])

    def problems(self, rid: str, marker: str, gone: str | None) -> list[str]:
        """What the views get wrong about the commit of `rid` that added `marker` (and removed `gone`)."""
        out = []
        if rid in os.listdir(self.mnt / "transactions"):
            out.append(f"transactions/ lists {rid}")
        if os.path.lexists(self.mnt / "transactions" / rid):
            out.append(f"transactions/{rid} resolves")
        if os.path.lexists(self.mnt / "commit" / rid):
            out.append(f"commit/{rid} resolves")
        if rid not in os.listdir(self.mnt / "resources"):
            out.append(f"resources/ does not list {rid}")
        try:
            os.stat(self.mnt / "resources" / rid)
        except OSError as e:
            out.append(f"resources/{rid}: {e.strerror}")
        else:
            if not os.path.exists(self.mnt / "resources" / rid / marker):
                out.append(f"resources/{rid}/{marker} is missing")
            if gone and os.path.lexists(self.mnt / "resources" / rid / gone):
                out.append(f"resources/{rid}/{gone} is still there")
        return out


class Lister:
    """Another process's view while the rounds run (a file manager, `watch ls`, another user): lists
    transactions/ and resources/ again and again in a thread, and stats the newest file of a committed
    resource. A listing or stat that started after a commit returned must show that commit, and every
    listing of transactions/ must show `keep_open`, a transaction that stays open all along."""

    PAUSE = 0.02

    def __init__(self, mnt: Path, depositor: Depositor, keep_open: str):
        self.mnt, self.dep, self.keep_open = Path(mnt), depositor, keep_open
        self.problems: list[str] = []
        self.listings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Lister:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            committed = dict(self.dep.markers)     # commits that returned before this look
            try:
                txns = os.listdir(self.mnt / "transactions")
                resources = set(os.listdir(self.mnt / "resources"))
                if self.keep_open not in txns:
                    self.problems.append(f"a listing of transactions/ without {self.keep_open}: {sorted(txns)}")
                missing = sorted(set(committed) - resources)
                if missing:
                    self.problems.append(f"a listing of resources/ without {', '.join(missing)}")
            except OSError as e:
                self.problems.append(f"{e.filename}: {e.strerror}")
            if committed:
                rid = sorted(committed)[n % len(committed)]
                try:
                    os.stat(self.mnt / "resources" / rid / committed[rid])
                except OSError as e:
                    if rid != self.dep.moving and self.dep.markers.get(rid) == committed[rid]:
                        # (else a later commit removed it)
                        self.problems.append(f"{e.filename}: {e.strerror}")
            self.listings += 1
            n += 1
            self._stop.wait(self.PAUSE)
