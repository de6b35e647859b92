"""scripts/bench --quick runs to the end and reports every workload (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent

WARM = [
    "deposit-1g",
    "deposit-small",
    "commit-1g",
    "commit-small",
    "redeposit",
    "read-1g-warm",
    "read-small-warm",
    "find-ls-warm",
    "ls-lR-warm",
    "fsck-1g-warm",
    "fsck-small-warm",
]
COLD = ["read-1g-cold", "read-small-cold", "find-ls-cold", "ls-lR-cold", "fsck-1g-cold", "fsck-small-cold"]
MOUNT = ["mount-empty", "mount-resources", "mount-files"]
VARIANTS = {
    "deposit-1g": {"tinyfs", "passthrough", "cp+make_bag+sync", "cp+sync"},
    "deposit-small": {"tinyfs", "passthrough", "cp+make_bag+sync", "cp+sync"},
    "commit-1g": {"tinyfs", "passthrough", "sync"},
    "commit-small": {"tinyfs", "passthrough", "sync"},
    "redeposit": {"tinyfs", "passthrough", "rsync+sync"},
    "fsck-1g-warm": {"tinyfs", "bagit.py --validate"},
    "fsck-small-warm": {"tinyfs", "bagit.py --validate"},
    "read-small-warm": {"tinyfs", "passthrough", "native"},
    "find-ls-warm": {"tinyfs", "passthrough", "native"},
}

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or shutil.which("rsync") is None,
        reason="needs FUSE, fusermount3 and rsync",
    ),
]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_bench_reports_every_workload(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            str(PROJECT / "scripts" / "bench"),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    root = os.geteuid() == 0
    expected = WARM + MOUNT + (COLD if root else [])
    workloads = result["workloads"]
    missing = [w for w in expected if w not in workloads]
    assert not missing, f"workloads missing from the JSON: {missing}"
    for name, w in workloads.items():
        assert w["variants"], name
        for variant, v in w["variants"].items():
            assert is_number(v["median"]), (name, variant, v.get("median"))
    for name, variants in VARIANTS.items():
        assert set(workloads[name]["variants"]) >= variants, (name, sorted(workloads[name]["variants"]))
    for name in MOUNT:
        v = workloads[name]["variants"]["tinyfs"]
        assert is_number(v["rss_kib_median"]), name
    assert result["table"] and all(is_number(row["ratio"]) for row in result["table"])
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), "scratch left behind"
    assert "| workload |" in r.stdout


@pytest.mark.slow
def test_reads_only_bench_measures_the_reads_of_the_named_tinyfs_against_a_base(tmp_path):
    """--reads times only the read workloads (the data deposited untimed); --tinyfs picks the command,
    --base mounts a second one beside it and reports the ratio of the two per repetition."""
    out = tmp_path / "bench.json"
    exe = PROJECT / ".venv" / "bin" / "tinyfs"
    if not exe.exists():
        pytest.skip("needs the project's .venv")
    argv = [str(PROJECT / "scripts" / "bench"), "--quick", "--reads", "--reps", "2", "--out", str(out),
            "--workdir", str(tmp_path / "work"), "--tinyfs", str(exe), "--base", str(exe)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    reads = ["read-1g-warm", "read-small-warm"] + (["read-1g-cold", "read-small-cold"] if os.geteuid() == 0 else [])
    assert sorted(result["workloads"]) == sorted(reads)
    for name in reads:
        assert set(result["workloads"][name]["variants"]) == {"tinyfs", "tinyfs-base", "passthrough", "native"}
    assert result["mount"] == []
    assert result["environment"]["tinyfs"] == str(exe)
    assert sorted(row["workload"] for row in result["against_base"]) == sorted(reads)
    assert all(len(row["ratios"]) == 2 and is_number(row["ratio_median"]) for row in result["against_base"])
    assert all(is_number(row["tinyfs_daemon_cpu_s"]) for row in result["against_base"])
    assert "tinyfs-base s" in r.stdout


S3_WORKLOADS = ["deposit-1g", "deposit-small", "commit-1g", "commit-small", "read-1g-cold", "read-small-cold",
                "read-1g-warm", "read-small-warm", "mount-new", "mount-again"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("rclone") is None, reason="needs rclone (scripts/setup installs it)")
def test_s3_quick_bench_reports_every_workload(tmp_path):
    """--store s3 --quick: its own SeaweedFS, every workload measured with its alternative, the content
    checked, the mount-time archive built and counted, nothing left behind (no weed, no scratch)."""
    out = tmp_path / "bench.json"
    argv = [str(PROJECT / "scripts" / "bench"), "--store", "s3", "--quick", "--out", str(out),
            "--workdir", str(tmp_path / "work")]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    workloads = result["workloads"]
    assert sorted(workloads) == sorted(S3_WORKLOADS)
    for name in ("deposit-1g", "deposit-small"):
        assert set(workloads[name]["variants"]) == {"tinyfs", "rclone+make_bag", "rclone"}
        bagged = workloads[name]["variants"]["rclone+make_bag"]["runs"][0]["phases"]
        assert set(bagged) == {"rclone", "bag"} and all(is_number(x) and x > 0 for x in bagged.values())
    for name in ("read-1g-cold", "read-small-cold"):
        assert set(workloads[name]["variants"]) == {"tinyfs", "rclone copy"}
    for name, w in workloads.items():
        for variant, v in w["variants"].items():
            assert is_number(v["median"]), (name, variant)
    assert all(is_number(row["ratio"]) for row in result["table"])
    assert [row["workload"] for row in result["mount"]] == ["mount-new", "mount-again"]
    assert all(is_number(row["rss_mib"]) and is_number(row["list_resources_s"]) for row in result["mount"])
    sizes = result["sizes"]
    assert result["setup"]["objects"] >= sizes["resources"] * (sizes["per_resource"] + 6)
    assert not any((tmp_path / "work").iterdir()), "scratch left behind"
    assert "| mount, " in r.stdout and "rclone+make_bag" in r.stdout
