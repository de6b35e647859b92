"""The sizes tinyfs accepts for what people write about a deposit, enforced here for every way in
(the mount's extended attributes, the CLI, the Python API, `ingest --bag`), so that no input of any
size ends up copied whole into instance.json, bag-info.txt and the event log (docs/format.md).

  message    65,536 bytes of UTF-8: what one extended attribute can hold on Linux (XATTR_SIZE_MAX),
             so the mount and the CLI take the same messages
  creator     1,024 bytes: a name, an e-mail address, a uid
  label      the label pattern (tinyfs.core.ids.check_label): at most 200 characters
  bag-info.txt of a bag given to `ingest --bag`: 1 MiB; an element taken from it as the message or
             the creator is held to their limits
Event log values are cut at EVENT_TEXT_MAX characters (the whole value stays where it belongs:
the message in instance.json).
"""

from __future__ import annotations

from .errors import TooLarge
from .ids import check_label

MESSAGE_MAX = 64 * 1024
CREATOR_MAX = 1024
BAG_INFO_MAX = 1 << 20
EVENT_TEXT_MAX = 8192     # a 4,095-byte path and a sentence about it
LIMITS = {"message": MESSAGE_MAX, "creator": CREATOR_MAX}


def check_text(what: str, text: str, where: str = "") -> str:
    """`text` as the instance's `what` ("message" or "creator"); TooLarge (E2BIG) past its limit."""
    size = len(text.encode("utf-8", "surrogateescape"))
    limit = LIMITS[what]
    if size > limit:
        raise TooLarge(f"{where}{what} of {size:,} bytes is too long: tinyfs takes at most {limit:,} bytes")
    return text


def check_metadata(message: str | None = None, creator: str | None = None, label: str | None = None) -> None:
    """Every limit at once (the API, the CLI and a commit call this; so does the mount, one by one)."""
    if message:
        check_text("message", message)
    if creator:
        check_text("creator", creator)
    if label is not None:
        check_label(label)


def check_bag_info_size(size: int, name: str = "bag-info.txt") -> None:
    if size > BAG_INFO_MAX:
        raise TooLarge(f"{name} of {size:,} bytes is too large: tinyfs takes at most {BAG_INFO_MAX:,} bytes "
                       "(nothing was committed)")


def bounded(value, limit: int = EVENT_TEXT_MAX):
    """A copy of an event's detail value with every string cut to `limit` characters (lists and
    dicts of the detail are followed: they are the log's own few levels, not user-made depth)."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}… ({len(value):,} characters in all)"
    if isinstance(value, dict):
        return {k: bounded(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [bounded(v, limit) for v in value]
    return value
