"""Digests: one read pass computes every configured algorithm; many files hash on all cores.

hashlib releases the GIL for large buffers, so worker threads really run in
parallel (PERF-NOTES: sha512 is ~700 MiB/s a core here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence

from .durable import start_writeback

# Reads of 128 KiB, as coreutils does. Reading cached bytes in 1 MiB (or 256 or 512 KiB) requests cost
# the kernel three to four times the system time on the machines this was measured on (kernel 6.18,
# ext4): hashing a warm 1 GiB file 2.6-3.0 s -> 2.4 s (sys 0.55-0.73 -> 0.11-0.21 s), copying and hashing
# it 4.6-5.8 s -> 3.3-3.4 s. Still large enough for hashlib to release the GIL.
CHUNK = 128 << 10
WRITEBACK_CHUNK = 16 << 20   # see durable.start_writeback
_local = threading.local()


def thread_buffer() -> tuple[bytearray, memoryview]:
    """This thread's read buffer: allocating (and zeroing) one per file cost more than hashing a 4 KiB
    file."""
    try:
        return _local.buf
    except AttributeError:
        buf = bytearray(CHUNK)
        _local.buf = (buf, memoryview(buf))
        return _local.buf


class MultiHash:
    """Several hashlib objects fed together."""

    def __init__(self, algorithms: Sequence[str]):
        self._hashers = {alg: hashlib.new(alg) for alg in algorithms}

    def update(self, data) -> None:
        for h in self._hashers.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {alg: h.hexdigest() for alg, h in self._hashers.items()}


def hash_file(path: str | os.PathLike, algorithms: Sequence[str],
              progress: Callable[[int], None] | None = None) -> dict[str, str]:
    hasher = MultiHash(algorithms)
    buf, view = thread_buffer()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            if progress:
                progress(n)
    return hasher.hexdigests()


def hash_file_object(f, algorithm: str) -> str:
    """The hex digest of what is left to read of an unbuffered binary file."""
    hasher = hashlib.new(algorithm)
    buf, view = thread_buffer()
    while n := f.readinto(buf):
        hasher.update(view[:n])
    return hasher.hexdigest()


STABLE_TRIES = 3
# A file's times come from the kernel's coarse clock (one tick: 1-10 ms): a write in the same tick as the
# one before it leaves mtime and ctime as they were. A source whose last change is this recent is waited
# for until it is older, so that a write during its copy is one the fingerprint shows.
SETTLE_NS = 20_000_000


def copy_and_hash(src: str | os.PathLike, dst: str | os.PathLike, algorithms: Sequence[str],
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, str], int]:
    """Copy src to a new file dst while hashing it; returns (digests, size).

    A source another process writes while it is copied would give a torn copy (bytes that never existed
    together, with a digest that matches them). Its size and times are compared before and after the
    copy; a source that changed is copied again, and after STABLE_TRIES changed copies the copy fails."""
    for attempt in range(STABLE_TRIES):
        hasher = MultiHash(algorithms)
        size = 0
        with open(src, "rb", buffering=0) as fin, open(dst, "wb" if attempt else "xb", buffering=0) as fout:
            before = _settled_fingerprint(fin.fileno())
            buf, view = thread_buffer()
            while n := fin.readinto(buf):
                hasher.update(view[:n])
                fout.write(view[:n])
                size += n
                if size % WRITEBACK_CHUNK < n:      # crossed a chunk boundary: start that chunk's writeback
                    start_writeback(fout.fileno(), size - size % WRITEBACK_CHUNK - WRITEBACK_CHUNK, WRITEBACK_CHUNK)
                if progress:
                    progress(n)
            if _fingerprint(os.fstat(fin.fileno())) == before:
                break   # no fsync here: the commit makes every staged byte durable with one syncfs
    else:
        from .errors import Busy
        raise Busy(f"{os.fsdecode(src)}: changed while it was being copied ({STABLE_TRIES} tries); "
                   "nothing was committed", path=os.fsdecode(src))
    shutil.copymode(src, dst)
    return hasher.hexdigests(), size


def _fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _settled_fingerprint(fd: int) -> tuple[int, int, int]:
    """The fingerprint of an open source, taken once its last change (ctime: the kernel sets it on every
    write, never from a client's value) is SETTLE_NS old. Another process that rewrote the file in the
    tick of that fstat and then stopped left the same times, and a copy begun before its writes ended
    was torn yet matched (seen once in 24 trials of a writer racing ingest). Waits at most a few ticks."""
    for _ in range(3):
        st = os.fstat(fd)
        age = time.time_ns() - st.st_ctime_ns
        if not 0 <= age < SETTLE_NS:
            break
        time.sleep((SETTLE_NS - age) / 1e9)
    return _fingerprint(st)


def parallel(fn: Callable, items: list, workers: int | None = None) -> list:
    """Map fn over items on all cores (threads), in order; the first exception (by position) is raised.

    Each thread takes the next item when it is free, so there is no future or queue entry per item
    (10,000 small files: a third of the time went into the executor's bookkeeping)."""
    workers = min(workers or os.cpu_count() or 2, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    errors: list[tuple[int, BaseException]] = []
    positions = iter(range(len(items)))
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                i = next(positions, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors.append((i, e))
                stop.set()

    threads = [threading.Thread(target=work, name=f"parallel-{n}", daemon=True) for n in range(workers - 1)]
    for t in threads:
        t.start()
    try:
        work()                          # the calling thread is one of the workers
    finally:
        stop.set()      # all items are taken; or the calling thread was interrupted (Ctrl-C): end early
        for t in threads:
            t.join()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results
