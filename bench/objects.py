"""Per-object costs of tinyfs.core.objects against a SeaweedFS on loopback.

    python -m bench.objects [N]     # N requests of each kind (default 300)

Starts its own `weed server` (tests/seaweed.py), so the figures include the S3
gateway, the filer and the volume server of one machine, not a network. They are
the inputs of the paper estimate for a large archive (docs/design.md).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from seaweed import start_seaweed  # noqa: E402

from tinyfs.core.objects import ObjectStore  # noqa: E402


def timed(name: str, call: Callable[[int], object], n: int) -> None:
    took = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        took.append(time.perf_counter() - started)
    took.sort()
    print(f"| {name} | {n} | {statistics.median(took) * 1000:.1f} | {took[int(n * 0.9)] * 1000:.1f} |")


def throughput(name: str, call: Callable[[], object], size: int, reps: int = 3) -> None:
    best = min(_seconds(call) for _ in range(reps))
    print(f"| {name} | {reps} | {best * 1000:.0f} (best) | {size / best / 2**20:.0f} MiB/s |")


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-objects-") as tmp:
        store = start_seaweed(Path(tmp))
        try:
            os.environ.update(AWS_ACCESS_KEY_ID=store.access_key, AWS_SECRET_ACCESS_KEY=store.secret_key)
            print(f"SeaweedFS ready in {store.startup_seconds:.1f} s\n")
            measure(store, n)
        finally:
            store.stop()


def measure(store, n: int) -> None:
    started = time.perf_counter()
    s = ObjectStore(store.make_bucket(object_lock=False), endpoint=store.endpoint)
    print(f"client made in {(time.perf_counter() - started) * 1000:.0f} ms\n")
    locked = ObjectStore(store.make_bucket(object_lock=True), endpoint=store.endpoint)
    until = datetime.now(UTC) + timedelta(days=1)
    s.put_new("warm", b"x")
    locked.put_new("warm", b"x", retain_until=until)
    print("| request | n | median ms | p90 ms |\n| --- | --- | --- | --- |")
    timed("PUT 1 KiB, If-None-Match", lambda i: s.put_new(f"k/{i:07d}", b"x" * 1024), n)
    timed("PUT 1 KiB, key taken (412)", lambda i: _refused(s, f"k/{i:07d}"), n)
    timed("PUT 1 KiB, COMPLIANCE retention", lambda i: locked.put_new(f"k/{i:07d}", b"x" * 1024,
                                                                       retain_until=until), n)
    timed("GET 1 KiB", lambda i: s.get(f"k/{i:07d}"), n)
    timed("GET 100 B range", lambda i: s.get(f"k/{i:07d}", offset=100, length=100), n)
    timed("HEAD", lambda i: s.head(f"k/{i:07d}"), n)
    for i in range(n, 1000):
        s.put_new(f"k/{i:07d}", b"x")
    timed("LIST a page of 1,000 keys", lambda i: list(s.list("k/")), 20)
    timed("DELETE", lambda i: s.delete(f"k/{i:07d}"), n)
    big = os.urandom(64 << 20)
    print()
    throughput("PUT 64 MiB", lambda: s.put_new(f"big/{time.monotonic_ns()}", big), len(big))
    s.put_new("big/one", big)
    throughput("GET 64 MiB", lambda: s.get("big/one"), len(big))


def _refused(s: ObjectStore, key: str) -> None:
    from tinyfs.core.errors import ObjectExists

    try:
        s.put_new(key, b"again")
    except ObjectExists:
        return
    raise AssertionError(f"{key} was written twice")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
