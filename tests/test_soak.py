"""A shortened soak (scripts/soak; the full one runs 20 minutes): the same mix of depositors through the
mount (cp, rsync, tar, one of them unprivileged), CLI ingests into the same resources and readers that
check what they read, for about 75 s, over an archive whose resources already have 12 instances each
(what a long run builds up). The mount gets a small cache (`-o cache_mib=8`), so that its bounds are
reached within the run: the daemon must stay within them, and give back every descriptor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak"
CACHE_MIB = 8
# What the daemon may grow beyond its caches: transient memory of commits and listings, what glibc and
# Python's allocator keep of freed memory. Such a run grew it 19 MiB here; main, which has no such
# bounds, 50 MiB (its documents alone may take 50,000 entries, and it keeps a node per entry walked).
SLACK_MIB = 20


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged depositor (setpriv) and drop_caches need root")
def test_a_short_soak_stays_bounded(tmp_path):
    figures_file = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(SOAK), "--duration", "75", "--sample", "3", "--history", "12",
                        "-o", f"cache_mib={CACHE_MIB}", "--json", str(figures_file), "--max-rss", "1000"],
                       capture_output=True, text=True, timeout=900)
    assert figures_file.exists(), r.stdout + r.stderr
    figures = json.loads(figures_file.read_text())
    counts, start, last = figures["counts"], figures["start"], figures["dropped"]
    assert counts["commits"] >= 10 and counts["ingests"] >= 5 and counts["reads"] >= 500, counts
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]       # no bad read, failure or traceback
    assert last["fds"] == start["fds"]
    grown = (last["rss_kib"] - start["rss_kib"]) / 1024
    assert grown <= CACHE_MIB + SLACK_MIB, f"RSS grew {grown:.1f} MiB\n{r.stdout}"
