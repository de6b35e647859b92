"""The tinyfs BagIt profile (BagIt Profiles Specification 1.4.0): what every bag tinyfs writes carries.

Every instance bag and every export names it in bag-info.txt (`BagIt-Profile-Identifier`). The document
below is the profile; docs/profile/tinyfs-bagit-profile.json is its published copy (a test keeps the two
equal), so that any profile validator can check a tinyfs bag. The checks here apply the same document
to a bag that bagcheck has read: `ingest --bag` refuses a bag that names the profile and breaks it
(a tinyfs export missing its instance.json would otherwise lose its symbolic links and modes quietly),
and fsck reports an instance whose bag-info.txt breaks it.

The identifier lies under the reserved .invalid domain: it names the profile, and does not resolve.
Bags written before the profile was published already carry it, so it stays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from .bagcheck import Problem
from .bagwrite import PROFILE as IDENTIFIER  # (bagwrite writes it into every bag-info.txt)
from .layout import DIGESTS

CODE = "profile-violation"

_ONCE = {"required": False, "repeatable": False}

PROFILE: dict = {
    "BagIt-Profile-Info": {
        "BagIt-Profile-Identifier": IDENTIFIER,
        "BagIt-Profile-Version": "1.4.0",
        "Source-Organization": "tinyfs",
        "External-Description": (
            "The bags of a tinyfs archive: each instance of a resource (one immutable version, holding the "
            "bytes first stored by that version and, in instance.json, the resource's full state) and each "
            "export of a state (a standalone bag of the whole state, as a directory or a tar or zip file). "
            "Every bag has one payload manifest and one tag manifest per digest the archive was created "
            "with; the first of those is sha512 (the default) or sha256, so no single algorithm is "
            "required here. Instance bags are always directories; exports may be serialized."),
        "Version": "1",
    },
    "Bag-Info": {
        "Bagging-Date": {"required": True, "repeatable": False,
                         "description": "UTC date (YYYY-MM-DD) the bag was made: the commit, or the export"},
        "Payload-Oxum": {"required": True, "repeatable": False,
                         "description": "bytes.files of this bag's payload"},
        "External-Identifier": {"required": True, "repeatable": False, "description": "the resource id"},
        "Tinyfs-Instance": {"required": True, "repeatable": False,
                            "description": "the id (UUIDv7) of the instance whose state the bag holds"},
        "Tinyfs-Previous": {**_ONCE, "description": "the id of the instance before it; absent for the first"},
        "Tinyfs-Label": {**_ONCE, "description": "the instance's label (e.g. v1.2.0), when it has one"},
        "Internal-Sender-Description": {**_ONCE, "description": "the instance's message, when it has one"},
        "Contact-Name": {**_ONCE, "description": "the instance's creator, when it has one"},
        "Tinyfs-Created": {**_ONCE, "description": "exports: when the exported instance was committed "
                                                   "(RFC 3339 UTC)"},
        "Bag-Software-Agent": {**_ONCE, "description": "exports: the tinyfs version that wrote the bag"},
    },
    "Manifests-Required": [],
    "Manifests-Allowed": list(DIGESTS),
    "Tag-Manifests-Required": [],
    "Tag-Manifests-Allowed": list(DIGESTS),
    "Tag-Files-Required": ["instance.json"],
    "Tag-Files-Allowed": ["bagit.txt", "bag-info.txt", "manifest-*.txt", "tagmanifest-*.txt", "instance.json"],
    "Allow-Fetch.txt": False,
    "Data-Empty": False,
    "Serialization": "optional",
    "Accept-Serialization": ["application/x-tar", "application/zip", "application/gzip", "application/x-bzip2",
                             "application/x-xz"],
    "Accept-BagIt-Version": ["1.0"],
}


def names_profile(info: Sequence[tuple[str, str]]) -> bool:
    """Whether bag-info.txt (label, value pairs) names this profile."""
    return any(label == "BagIt-Profile-Identifier" and value == IDENTIFIER for label, value in info)


def info_problems(info: Sequence[tuple[str, str]]) -> list[Problem]:
    """What bag-info.txt lacks or repeats against the profile, and a missing profile identifier."""
    counts: dict[str, int] = {}
    for label, _value in info:
        counts[label] = counts.get(label, 0) + 1
    problems = []
    if not names_profile(info):
        problems.append(_problem("bag-info.txt", f"does not name the profile ({IDENTIFIER})"))
    for label, rule in PROFILE["Bag-Info"].items():
        if rule["required"] and label not in counts:
            problems.append(_problem("bag-info.txt", f"lacks {label}, which the profile requires"))
        if not rule["repeatable"] and counts.get(label, 0) > 1:
            problems.append(_problem("bag-info.txt", f"has {label} {counts[label]} times; the profile allows one"))
    return problems


def bag_problems(bag: Path, info: Sequence[tuple[str, str]], version: tuple[int, int] | None) -> list[Problem]:
    """Every way the directory bag at `bag` (its bag-info pairs and BagIt version as bagcheck read them)
    breaks the profile: bag-info, BagIt version, fetch.txt, manifest algorithms, tag files."""
    problems = info_problems(info)
    if version is not None and f"{version[0]}.{version[1]}" not in PROFILE["Accept-BagIt-Version"]:
        problems.append(_problem("bagit.txt", f"BagIt {version[0]}.{version[1]}; the profile accepts "
                                 f"{', '.join(PROFILE['Accept-BagIt-Version'])}"))
    top = _top_level(bag)
    if "fetch.txt" in top and not PROFILE["Allow-Fetch.txt"]:
        problems.append(_problem("fetch.txt", "the profile allows no fetch.txt"))
    problems += _manifest_problems(top)
    problems += _tag_file_problems(bag, top)
    return problems


def _manifest_problems(top: list[str]) -> list[Problem]:
    problems = []
    for prefix, allowed in (("manifest-", "Manifests-Allowed"), ("tagmanifest-", "Tag-Manifests-Allowed")):
        for name in top:
            if name.startswith(prefix) and name.endswith(".txt"):
                alg = name[len(prefix):-len(".txt")]
                if alg not in PROFILE[allowed]:
                    problems.append(_problem(name, f"{alg} is not among the profile's {allowed}"))
    return problems


def _tag_file_problems(bag: Path, top: list[str]) -> list[Problem]:
    problems = [_problem(name, "missing: the profile requires this tag file")
                for name in PROFILE["Tag-Files-Required"] if not os.path.isfile(bag / name)]
    for rel in _tag_files(bag, top):
        if not any(fnmatchcase(rel, pattern) for pattern in PROFILE["Tag-Files-Allowed"]):
            problems.append(_problem(rel, "a tag file the profile does not allow"))
    return problems


def _tag_files(bag: Path, top: list[str]) -> list[str]:
    """Every file outside data/ and fetch.txt (checked on its own), relative to the bag."""
    found = []
    for name in top:
        if name in ("data", "fetch.txt"):
            continue
        path = bag / name
        if path.is_dir() and not path.is_symlink():
            for dirpath, _dirs, files in os.walk(path):
                found += [os.path.relpath(os.path.join(dirpath, f), bag) for f in files]
        else:
            found.append(name)
    return sorted(found)


def _top_level(bag: Path) -> list[str]:
    try:
        return sorted(os.listdir(bag))
    except OSError:
        return []       # bagcheck has reported it


def _problem(path: str, message: str) -> Problem:
    return Problem(CODE, path, f"tinyfs BagIt profile: {message}")
