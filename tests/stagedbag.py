"""A small BagIt bag as commit stages it, for the tests of the stores (no tinyfs code makes it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def make_bag(where: Path, rid: str, iid: str, previous: str | None, files: dict[str, bytes]) -> Path:
    """A small BagIt bag as commit stages it: payload, manifest, bagit.txt, instance.json."""
    bag = where / iid
    manifest = []
    for name, data in sorted(files.items()):
        (bag / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (bag / "data" / name).write_bytes(data)
        manifest.append(f"{hashlib.sha256(data).hexdigest()}  data/{name}\n")
    (bag / "bagit.txt").write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n")
    (bag / "manifest-sha256.txt").write_text("".join(manifest))
    doc = {"id": iid, "resource": rid, "previous": previous,
           "stored": {hashlib.sha256(d).hexdigest(): f"instances/{iid}/data/{n}" for n, d in files.items()}}
    (bag / "instance.json").write_text(json.dumps(doc, sort_keys=True) + "\n")
    return bag
