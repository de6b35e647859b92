"""scripts/bench --holdings --quick runs to the end and reports every workload (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "ingest-1g": {"tinyfs", "no-verify-writes"},
    "ingest-small": {"tinyfs", "no-verify-writes"},
    "mount-deposit-small": {"tinyfs", "no-identify"},
}

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs FUSE and fusermount3"),
]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_holdings_bench_reports_every_workload(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(PROJECT / "scripts" / "bench"), "--holdings", "--quick", "--out", str(out),
            "--workdir", str(tmp_path / "work")]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    workloads = result["workloads"]
    assert {name: set(w["variants"]) for name, w in workloads.items()} == VARIANTS
    assert all(is_number(v["median"]) and v["median"] > 0 for w in workloads.values() for v in w["variants"].values())
    assert [row["workload"] for row in result["table"]] == list(VARIANTS)
    assert all(is_number(row["ratio"]) for row in result["table"])
    assert is_number(result["table"][-1]["identified_after_s"])
    assert set(workloads["mount-deposit-small"]["variants"]["tinyfs"]["phase_medians"]) == {"open", "copy", "commit"}
    assert not any((tmp_path / "work").iterdir()), "scratch left behind"
    assert "| workload | with s | without s | with/without | target |" in r.stdout
