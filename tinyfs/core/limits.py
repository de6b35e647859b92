"""Limits of what tinyfs accepts (docs/format.md)."""

EVENT_TEXT_MAX = 8192     # a 4,095-byte path and a sentence about it
