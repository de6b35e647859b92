"""davfs2 mounting `tinyfs serve`: a deposit made with `cp -a` and `mv`, as on a local mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving import served

pytestmark = pytest.mark.mount
USERS = {"alice": "alice-pw"}


DAVFS2_CONF = """\
# davfs2 1.6 answers EINVAL to a readdir bigger than its buffer (16 KiB by default); Linux 6.x asks 32 KiB
buf_size 64
# upload each file when it is closed: an `mv` into commit/ right after `cp` then finds nothing pending
delay_upload 0
use_locks 1
secrets {secrets}
"""


@pytest.mark.skipif(not shutil.which("mount.davfs"), reason="davfs2 missing (apt-get install davfs2)")
def test_davfs2_mounts_the_server_and_deposits_with_cp_a_and_mv(archive, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "fixtures" / "bagit-conformance", src, symlinks=False,
                    ignore=lambda d, names: [n for n in names if (Path(d) / n).is_symlink() or "%" in n])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served(archive, users=USERS) as srv:
        secrets = tmp_path / "secrets"
        secrets.write_text(f"{srv.url} alice alice-pw\n")
        secrets.chmod(0o600)
        conf = tmp_path / "davfs2.conf"
        conf.write_text(DAVFS2_CONF.format(secrets=secrets))
        subprocess.run(["mount", "-t", "davfs", srv.url, str(mnt), "-o", f"conf={conf}"], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        try:
            assert sorted(os.listdir(mnt)) == ["aip", "commit", "events.jsonl", "instances", "lost+found",
                                               "resources", "transactions"]
            (mnt / "transactions" / "dv").mkdir()
            subprocess.run(["cp", "-a", f"{src}/.", str(mnt / "transactions" / "dv")], check=True, timeout=300)
            r = subprocess.run(["mv", str(mnt / "transactions" / "dv"), str(mnt / "commit/")],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            assert "dv" in os.listdir(mnt / "resources")
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=120)
    out = tmp_path / "bag"
    subprocess.run([sys.executable, "-m", "tinyfs.cli.main", "export", str(archive.root.root), "dv", str(out)],
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["diff", "-r", str(src), str(out / "data")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
