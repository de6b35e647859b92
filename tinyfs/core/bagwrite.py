"""Writing the tag files of a BagIt 1.0 bag (RFC 8493).

Payload files are placed by the caller; this writes bagit.txt, bag-info.txt,
one manifest and one tagmanifest per algorithm, and any extra tag files
(instance.json), so that a bag is complete once this returns. They are not
fsynced one by one: every caller makes the whole bag durable with one
`syncfs` before the rename that publishes it (commit, export).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from .bagcheck import encode_manifest_path as encode_path  # noqa: F401  (one encoder for writer and reader)
from .digests import MultiHash
from .durable import syncfs, write_new  # noqa: F401  (commit and export call bagwrite.syncfs; tests swap it)

# the tinyfs BagIt profile every bag names (core/profile.py, docs/profile/tinyfs-bagit-profile.json)
PROFILE = "https://tinyfs.invalid/bagit-profile/tinyfs-1"


def fold(name: str, value: str) -> str:
    """One bag-info element; a multi-line value is folded with indented continuation lines (§2.2.2)."""
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return f"{name}: {lines[0]}\n" + "".join(f"  {line}\n" for line in lines[1:])


def bag_info(rid: str, payload_bytes: int, payload_count: int, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    fields = [("Bagging-Date", datetime.now(UTC).strftime("%Y-%m-%d")),
              ("Payload-Oxum", f"{payload_bytes}.{payload_count}"),
              ("External-Identifier", rid),
              ("BagIt-Profile-Identifier", PROFILE),
              *[(k, v) for k, v in extra if v]]
    return "".join(fold(k, v) for k, v in fields).encode("utf-8")


def write_tag_files(bag: Path, algorithms: Sequence[str], payload: dict[str, dict[str, str]],
                    info: bytes, extra_tags: dict[str, bytes] = {}, mode: int = 0o644) -> None:  # noqa: B006
    """Write every tag file of `bag`. `payload` maps "data/..." paths (unencoded) to {alg: hex}."""
    tags: dict[str, bytes] = {
        "bagit.txt": b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n",
        "bag-info.txt": info,
    }
    for alg in algorithms:
        lines = sorted(f"{d[alg]}  {encode_path(p)}\n" for p, d in payload.items())
        tags[f"manifest-{alg}.txt"] = "".join(lines).encode("utf-8")
    tags.update(extra_tags)
    # hashing and writing both release the GIL: a 10,000-file instance.json (4 MB) is hashed on the
    # other core while it is written (3.5 of 9 ms)
    with ThreadPoolExecutor(1, thread_name_prefix="tag-digests") as pool:
        hashing = pool.submit(_hash_all, tags, algorithms)
        for name, data in tags.items():
            write_new(bag / name, data, mode, sync=False)
        digests = hashing.result()
    for alg in algorithms:
        lines = [f"{digests[name][alg]}  {encode_path(name)}\n" for name in sorted(tags)]
        write_new(bag / f"tagmanifest-{alg}.txt", "".join(lines).encode("utf-8"), mode, sync=False)


def _hash_all(tags: dict[str, bytes], algorithms: Sequence[str]) -> dict[str, dict[str, str]]:
    out = {}
    for name, data in tags.items():
        h = MultiHash(algorithms)
        h.update(data)
        out[name] = h.hexdigests()
    return out


def parse_manifest(text: str) -> dict[str, str]:
    """"data/..." path -> hex digest from the text of a manifest tinyfs wrote."""
    out = {}
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if path:
            out[path] = digest
    return out

