"""Resource ids, labels, instance ids (UUIDv7) and logical paths (SPEC sections 1 and 4)."""

from __future__ import annotations

import os
import re
import time
import uuid

from .errors import BadEncoding, InvalidName, NameTooLong

RID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
NAME_MAX = 255
PATH_MAX = 4095


def check_rid(rid: str) -> str:
    if not isinstance(rid, str) or not RID_RE.match(rid):
        raise InvalidName(f"invalid resource id {rid!r}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,199}}")
    return rid


def is_rid(rid: str) -> bool:
    return bool(RID_RE.match(rid))


def check_label(label: str) -> str:
    if not isinstance(label, str) or not RID_RE.match(label) or UUID_RE.match(label):
        raise InvalidName(f"invalid label {label!r}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,199}} "
                          "and not look like a UUID")
    return label


def is_instance_id(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name and uuid.UUID(name).version == 7
    except ValueError:
        return False


def new_instance_id(after: str | None = None) -> str:
    """A UUIDv7 that sorts after `after` even if the clock stepped back.

    Layout (RFC 9562): 48-bit Unix milliseconds, version 7, 12 bits of
    sub-millisecond time (rand_a used as a counter), variant, 62 random bits.
    Python 3.11 has no uuid.uuid7 and the libraries give no "after X" rule,
    hence these few lines.
    """
    ns = time.time_ns()
    ms, sub = divmod(ns, 1_000_000)
    rand_a = sub * 4096 // 1_000_000            # sub-millisecond fraction, monotonic within a ms
    value = _pack(ms, rand_a, int.from_bytes(os.urandom(8), "big"))
    if after is not None:
        prev = uuid.UUID(after).int
        if value <= prev:
            p_ms, p_a = prev >> 80, (prev >> 64) & 0xFFF
            p_a += 1
            if p_a > 0xFFF:
                p_ms, p_a = p_ms + 1, 0
            value = _pack(p_ms, p_a, int.from_bytes(os.urandom(8), "big"))
    return str(uuid.UUID(int=value))


def _pack(ms: int, rand_a: int, rand_b: int) -> int:
    return ((ms & (2**48 - 1)) << 80) | (0x7 << 76) | ((rand_a & 0xFFF) << 64) | (0b10 << 62) | (rand_b & (2**62 - 1))


def decode_name(raw: bytes) -> str:
    """A file name from the kernel, as str; EILSEQ if it is not UTF-8, ENAMETOOLONG past 255 bytes."""
    if len(raw) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEncoding(f"name is not valid UTF-8: {raw!r}") from None


def check_name(name: str) -> str:
    """One path component: not empty, not . or .., no / or NUL, UTF-8, at most 255 bytes."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidName(f"invalid name {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadEncoding(f"name is not valid UTF-8: {name!r}") from None
    if len(encoded) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes: {name[:40]!r}...")
    return name


def check_logical_path(path: str) -> str:
    """A relative /-separated logical path with valid components, at most 4,095 bytes."""
    if not path or path.startswith("/"):
        raise InvalidName(f"invalid logical path {path!r}")
    for part in path.split("/"):
        check_name(part)
    if len(path.encode("utf-8")) > PATH_MAX:
        raise NameTooLong(f"path longer than {PATH_MAX} bytes")
    return path


def parent_of(path: str) -> str:
    """The logical parent ("" for a top-level entry)."""
    return path.rpartition("/")[0]
