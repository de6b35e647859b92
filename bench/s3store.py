"""Costs of tinyfs.core.s3store's protocol against a SeaweedFS on loopback.

    python -m bench.s3store [FILES]     # a publish of FILES 1 KiB files (default 1000)

Starts its own `weed server` (tests/seaweed.py); prints a Markdown table for docs/store.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from seaweed import start_seaweed  # noqa: E402
from test_s3store import make_bag  # noqa: E402

from tinyfs.core.ids import new_instance_id  # noqa: E402
from tinyfs.core.objects import ObjectStore  # noqa: E402
from tinyfs.core.s3store import init_store, open_store  # noqa: E402


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median_ms(call, n: int = 50) -> str:
    took = sorted(seconds(call) for _ in range(n))
    return f"{statistics.median(took) * 1000:.1f} (p90 {took[int(n * 0.9)] * 1000:.1f})"


def measure(weed, tmp: Path, files: int, mode: str) -> None:
    locked = mode == "worm"
    bucket = weed.make_bucket(object_lock=locked)
    objects = ObjectStore(bucket, prefix="a", endpoint=weed.endpoint)
    store = init_store(objects, tmp / f"{mode}-w", mode=mode, retention_days=1 if locked else None)
    payload = {f"f{i:05d}": os.urandom(1024) for i in range(files)}
    iid = new_instance_id()
    bag = make_bag(tmp / mode, "r", iid, None, payload)
    took = seconds(lambda: store.publish("r", iid, None, bag))
    print(f"| {mode}: publish {files} x 1 KiB (+3 tag objects, 1 claim) | {took:.2f} s, "
          f"{took / (files + 4) * 1000:.1f} ms an object |")
    print(f"| {mode}: head query, nothing new | {median_ms(lambda: store.head('r'))} ms |")
    for _ in range(19):
        previous = store.head("r")
        nxt = new_instance_id(after=previous)
        store.publish("r", nxt, previous, make_bag(tmp / mode, "r", nxt, previous, {"x": b"x"}))
    cold = open_store(objects, tmp / f"{mode}-cold")
    print(f"| {mode}: head of a 20-instance chain, new host | {seconds(lambda: cold.head('r')) * 1000:.0f} ms |")
    rel = f"instances/{iid}/data/f00000"
    print(f"| {mode}: stored_file 1 KiB, cold | {seconds(lambda: cold.stored_file('r', rel)) * 1000:.1f} ms |")
    print(f"| {mode}: stored_file 1 KiB, cached | {median_ms(lambda: cold.stored_file('r', rel))} ms |")


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="bench-s3store-") as tmp:
        weed = start_seaweed(Path(tmp))
        try:
            os.environ.update(AWS_ACCESS_KEY_ID=weed.access_key, AWS_SECRET_ACCESS_KEY=weed.secret_key)
            print("| what | figure |\n| --- | --- |")
            for mode in ("preservation", "worm"):
                measure(weed, Path(tmp), files, mode)
        finally:
            weed.stop()


if __name__ == "__main__":
    main()
