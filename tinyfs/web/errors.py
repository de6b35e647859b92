"""Core errors as HTTP statuses: every refusal answers with the status that fits and one line saying why."""

from __future__ import annotations

import errno

from wsgidav.dav_error import DAVError

# errno of a core error (core/errors.py) -> HTTP status
STATUS_OF_ERRNO = {
    errno.ENOENT: 404,
    errno.EEXIST: 405,          # MKCOL on an existing name (RFC 4918 9.3.1); PUT replaces instead
    errno.ESTALE: 409,          # the head moved and a path changed on both sides
    errno.ENOTEMPTY: 409,
    errno.ENOTDIR: 409,
    errno.EISDIR: 409,
    errno.EBUSY: 423,           # committing, or another request holds it
    errno.ENOSPC: 507,
    errno.EDQUOT: 507,
    errno.EFBIG: 413,
    errno.EROFS: 403,
    errno.EPERM: 403,           # WORM, another user's transaction, a refused kind of file
    errno.EACCES: 403,
    errno.EINVAL: 400,
    errno.EILSEQ: 400,
    errno.ENAMETOOLONG: 414,
    errno.EHOSTUNREACH: 503,    # a store (a replica, the bucket) cannot be reached
    errno.ECONNREFUSED: 503,
    errno.ETIMEDOUT: 503,
}


class BadBody(DAVError):
    """A request body that cannot be read: malformed (400) or its client silent for the timeout (408)."""

    def __init__(self, status: int, text: str):
        super().__init__(status, context_info=text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def status_of(error: BaseException) -> int:
    """The HTTP status of a core error or OSError; 500 for anything else (EIO included: damaged bytes)."""
    return STATUS_OF_ERRNO.get(getattr(error, "errno", None), 500)


def etag_of(algorithm: str, hex_digest: str) -> str:
    """A file's ETag: its digest in the Subresource Integrity form, `sha512-<base64>` (95 characters for
    SHA-512, where `sha512:<hex>` takes 135). neon, the library of litmus, cadaver and davfs2, cuts an If
    header after 199 bytes, and a lock token with a hex SHA-512 does not fit in that."""
    import base64

    return f"{algorithm}-{base64.b64encode(bytes.fromhex(hex_digest)).decode('ascii')}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000]
