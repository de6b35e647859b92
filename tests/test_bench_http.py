"""scripts/bench --http --quick runs to the end and reports every workload (no timing assertions)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
VARIANTS = {
    "http-read-1g": {"tinyfs", "nginx"},
    "http-read-small": {"tinyfs", "nginx"},
    "http-deposit-curl": {"tinyfs", "wsgidav+sync"},
    "http-deposit-rclone": {"tinyfs", "wsgidav+sync"},
}
PHASES = {"http-deposit-curl": {"open", "copy", "commit"}, "http-deposit-rclone": {"open", "copy", "commit"}}

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(not Path(NGINX).exists() or not shutil.which("rclone") or not shutil.which("curl"),
                       reason="needs nginx, rclone and curl (scripts/setup installs them)"),
]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_http_bench_reports_every_workload(tmp_path):
    out = tmp_path / "bench.json"
    # run by this Python: the project's (or the worktree's) tinyfs beside it is what is measured
    argv = [sys.executable, str(PROJECT / "scripts" / "bench"), "--http", "--quick", "--out", str(out),
            "--workdir", str(tmp_path / "work")]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    workloads = result["workloads"]
    assert {name: set(w["variants"]) for name, w in workloads.items()} == VARIANTS
    for name, w in workloads.items():
        for variant, v in w["variants"].items():
            assert is_number(v["median"]) and v["median"] > 0, (name, variant)
    for name, phases in PHASES.items():
        assert set(workloads[name]["variants"]["tinyfs"]["phase_medians"]) == phases
    assert [row["workload"] for row in result["table"]] == list(VARIANTS)
    assert all(is_number(row["ratio"]) for row in result["table"])
    assert all(is_number(run["daemon_cpu_s"]) for w in workloads.values() for run in w["variants"]["tinyfs"]["runs"])
    assert result["environment"]["nginx"].startswith("nginx version")
    assert is_number(result["daemons_after_workloads"]["tinyfs serve"]["VmRSS"])
    assert not any((tmp_path / "work").iterdir()), "scratch left behind"
    assert "| GET 16 MiB file (curl), warm | nginx |" in r.stdout
