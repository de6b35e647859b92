"""An archive on a three-volume-server SeaweedFS cluster with replication 001 (tests/seaweed_cluster.py):
one volume server SIGKILLed while a deposit through a mount is being published.

- committed files stay readable (through a second host's mount, whose cache is cold: from the store);
- the commit completes (the store's retries carried it) or fails cleanly: the rename fails, the
  transaction is there unchanged, and it commits once the server is back;
- the restarted server takes new writes again (its file count, from its own /status, grows).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import run_tinyfs
from mounting import Mounted, tree
from seaweed import use_identity
from seaweed_cluster import VOLUMES, start_cluster

from tinyfs.core.layout import ArchiveRoot

pytestmark = pytest.mark.mount

VICTIM = 1
DEPOSIT_FILES = 240      # 64 KiB each: a publish of ~1-3 s here, long enough to be killed in
FILE_SIZE = 64 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture
def hosts(cluster, monkeypatch, tmp_path):
    """(writer, reader): two ROOTs on one bucket of the cluster, each mounted (the reader's cache cold)."""
    use_identity(cluster, monkeypatch, tmp_path)
    bucket = cluster.make_bucket(object_lock=False)
    started: list[Mounted] = []
    try:
        for name in ("writer", "reader"):
            (tmp_path / name / "mnt").mkdir(parents=True)
            run_tinyfs("init", tmp_path / name / "archive", "--store", f"s3://{bucket}/arch",
                       "--endpoint", cluster.endpoint)
            started.append(Mounted(tmp_path / name / "archive", tmp_path / name / "mnt",
                                   tmp_path / name / "mount.log").start())
        yield started
    finally:
        codes = [m.stop() for m in started]
    assert codes == [0, 0], [m.log.read_text()[-3000:] for m in started]
    assert not any(m.tracebacks() for m in started), [m.tracebacks()[-3000:] for m in started]


def stage(mnt: Mounted, rid: str, files: dict[str, bytes]) -> None:
    txn = mnt / "transactions" / rid
    txn.mkdir()
    for name, data in files.items():
        (txn / name).write_bytes(data)


def files_of(tag: str, n: int, size: int = FILE_SIZE) -> dict[str, bytes]:
    return {f"{tag}-{i:04d}.bin": os.urandom(size) for i in range(n)}


def seen(mnt: Mounted, rid: str, files: dict[str, bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (mnt / "resources" / rid).exists() and tree(mnt / "resources" / rid) == files:
            return True
        time.sleep(0.05)
    return False


def total_files(cluster, victims: tuple[int, ...]) -> int:
    return sum(cluster.file_count(i) for i in range(VOLUMES) if i not in victims)


def commit_while_killing(cluster, writer: Mounted, victims: tuple[int, ...], reads=None) -> OSError | None:
    """Commit transactions/new of `writer`, SIGKILL the `victims` once a quarter of its files is uploaded,
    run `reads` (while they are down), and return the commit's error (None: it completed)."""
    before = total_files(cluster, victims)
    outcome: list[OSError | None] = []

    def commit() -> None:
        try:
            writer.commit("new")
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    committer = threading.Thread(target=commit)
    committer.start()
    deadline = time.monotonic() + 30
    while total_files(cluster, victims) < before + DEPOSIT_FILES // 4:     # the publish is under way
        assert committer.is_alive() and time.monotonic() < deadline, "the upload did not start"
        time.sleep(0.02)
    for victim in victims:
        cluster.kill_volume(victim)
    killed_at = time.monotonic()
    if reads:
        reads()
    committer.join(timeout=120)
    assert not committer.is_alive()
    retries = writer.log.read_text().count("(the store failed the first)")
    print(f"\nkilled volume server(s) {victims} {DEPOSIT_FILES // 4}+ files into the deposit: the commit "
          f"{'completed' if outcome[0] is None else f'failed ({outcome[0]})'} "
          f"{time.monotonic() - killed_at:.1f} s later; {retries} request(s) needed retries")
    return outcome[0]


def assert_failed_cleanly(writer: Mounted, error: OSError, new: dict[str, bytes]) -> None:
    assert tree(writer / "transactions" / "new") == new, f"the failed commit ({error}) changed the transaction"
    assert ArchiveRoot(writer.root).head("new") is None


def test_a_volume_server_killed_during_a_deposit(cluster, hosts):
    writer, reader = hosts
    old = files_of("old", 20)
    stage(writer, "old", old)
    writer.commit("old")
    new = files_of("new", DEPOSIT_FILES)
    stage(writer, "new", new)

    def reads():
        assert seen(reader, "old", old), "committed files unreadable with a volume server down"

    error = commit_while_killing(cluster, writer, (VICTIM,), reads)
    if error is None:
        assert not (writer / "transactions" / "new").exists()
        assert seen(reader, "new", new)
    else:
        assert_failed_cleanly(writer, error, new)

    cluster.start_volume(VICTIM)
    if error is not None:
        writer.commit("new")                         # the intact transaction commits once it is back
        assert seen(reader, "new", new)
    landed = cluster.file_count(VICTIM)
    for round in range(10):      # writes go to a random writable volume: most rounds reach the victim's
        stage(writer, f"after{round}", files_of("after", 10, 4096))
        writer.commit(f"after{round}")
        if cluster.file_count(VICTIM) > landed:
            break
    assert cluster.file_count(VICTIM) > landed, "the restarted volume server takes no new writes"
    fsck = run_tinyfs("fsck", writer.root, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr     # every bag, downloaded afresh, validates
