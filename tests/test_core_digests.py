"""digests.parallel and the hashing helpers: order, errors, every item exactly once."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from tinyfs.core.digests import MultiHash, hash_file, parallel

pytestmark = pytest.mark.core


def test_parallel_keeps_order_and_runs_every_item_once() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def square(x: int) -> int:
        with lock:
            seen.append(x)
        return x * x

    items = list(range(1000))
    assert parallel(square, items, workers=4) == [x * x for x in items]
    assert sorted(seen) == items


def test_parallel_raises_the_first_failure_by_position() -> None:
    def fail_on_odd_above_500(x: int) -> int:
        if x > 500 and x % 2:
            raise ValueError(x)
        return x

    with pytest.raises(ValueError):
        parallel(fail_on_odd_above_500, list(range(1000)), workers=3)
    assert parallel(fail_on_odd_above_500, [], workers=3) == []
    with pytest.raises(ValueError, match="501"):
        parallel(fail_on_odd_above_500, [501], workers=3)


def test_hash_file_reuses_its_buffer_safely_across_files_and_threads(tmp_path) -> None:
    """Files of different sizes hashed on several threads: a shared buffer would mix their bytes."""
    files = []
    for i in range(40):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (i * 70_001 % 3_000_000))
        files.append(p)
    got = parallel(lambda p: hash_file(p, ["sha512", "md5"]), files, workers=4)
    for p, digests in zip(files, got, strict=True):
        data = p.read_bytes()
        assert digests == {"sha512": hashlib.sha512(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    h = MultiHash(["sha256"])
    h.update(b"abc")
    assert h.hexdigests() == {"sha256": hashlib.sha256(b"abc").hexdigest()}


def test_a_source_changed_within_a_clock_tick_is_waited_for_before_its_copy(tmp_path):
    """A write in the same tick of the kernel's coarse clock as the fingerprint taken before a copy would
    leave the times unchanged, and a torn copy undetected: the fingerprint is taken only once the
    source's last change is SETTLE_NS old."""
    from tinyfs.core.digests import SETTLE_NS, _settled_fingerprint

    src = tmp_path / "fresh.bin"
    src.write_bytes(b"x" * 1000)
    fd = os.open(src, os.O_RDONLY)
    try:
        _settled_fingerprint(fd)
        assert time.time_ns() - os.fstat(fd).st_ctime_ns >= SETTLE_NS
    finally:
        os.close(fd)
