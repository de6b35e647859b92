"""Walking, making and removing directory trees of any depth, without recursion.

Python 3.11's os.walk, os.makedirs and shutil.rmtree recurse once per directory level: a tree
about 1,000 directories deep (a 2,000-byte path of 1-byte names, well inside PATH_MAX) raised
RecursionError in a commit, an ingest and a cleanup. These do the same work with explicit stacks.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator

OnError = Callable[[OSError], None]


def walk(top: str | os.PathLike, topdown: bool = True, onerror: OnError | None = None
         ) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk without recursion: (dirpath, dirnames, filenames), symbolic links not followed (a link to
    a directory is listed in filenames). Top-down, a caller may prune `dirnames` in place, as with
    os.walk. An error listing a directory is raised unless `onerror` takes it (os.walk ignores it
    by default: a walk that skipped an unreadable directory would archive a tree with a hole)."""
    top = os.fspath(top)
    stack: list[tuple[str, bool, list[str], list[str]]] = [(top, False, [], [])]
    while stack:
        path, listed, dirs, files = stack.pop()
        if listed:                    # bottom-up: its subdirectories are done
            yield path, dirs, files
            continue
        try:
            dirs, files = _listing(path)
        except OSError as e:
            if onerror is None:
                raise
            onerror(e)
            continue
        if topdown:
            yield path, dirs, files
        else:
            stack.append((path, True, dirs, files))
        stack.extend((os.path.join(path, name), False, [], []) for name in reversed(dirs))


def _listing(path: str) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
    return dirs, files


def makedirs(path: str | os.PathLike, mode: int = 0o777) -> None:
    """os.makedirs(path, exist_ok=True) without recursion: the missing ancestors, top first."""
    path = os.fspath(path)
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            if not os.path.isdir(p):
                raise


def rmtree(path: str | os.PathLike, ignore_errors: bool = False, force: bool = False) -> None:
    """shutil.rmtree without recursion, by directory descriptors (so a path of any length goes).

    `force`: a directory without write (or read) permission for its owner -- a WORM bag, a 0555
    directory staged by a user -- is made accessible first, as a user would with chmod -R u+rwx.
    `ignore_errors`: remove what can be removed, quietly. A symbolic link is not followed."""
    path = os.fspath(path)
    try:
        top = _open_dir(path, None, force)
    except OSError:
        if ignore_errors:
            return
        raise
    # one frame per open directory: (its descriptor, its name in the parent, subdirectories left)
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append((top, path, _clear_files(top, force, ignore_errors)))
        while stack:
            fd, _name, subdirs = stack[-1]
            if subdirs:
                name = subdirs.pop()
                try:
                    child = _open_dir(name, fd, force)
                except OSError:
                    if ignore_errors:
                        continue
                    raise
                stack.append((child, name, []))      # (on the stack first: closed if the next line fails)
                stack[-1] = (child, name, _clear_files(child, force, ignore_errors))
                continue
            stack.pop()
            os.close(fd)
            if stack:
                _remove(os.rmdir, _name, stack[-1][0], force, ignore_errors)
        _remove(os.rmdir, path, None, force, ignore_errors)
    finally:
        for fd, _name, _subdirs in stack:
            os.close(fd)


def _open_dir(name: str, parent: int | None, force: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except PermissionError:
        if not force:
            raise
        os.chmod(name, stat.S_IRWXU, dir_fd=parent, follow_symlinks=False)
        return os.open(name, flags, dir_fd=parent)


def _clear_files(fd: int, force: bool, ignore_errors: bool) -> list[str]:
    """Unlink every non-directory in the open directory `fd`; return its subdirectories' names."""
    subdirs = []
    with os.scandir(fd) as entries:
        names = [(e.name, _is_dir(e)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
        else:
            _remove(os.unlink, name, fd, force, ignore_errors)
    return subdirs


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _remove(func: Callable, name: str, parent: int | None, force: bool, ignore_errors: bool) -> None:
    try:
        func(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except PermissionError:
        if force and parent is not None:      # (never loosen the directory the tree is in)
            try:
                os.chmod(parent, stat.S_IRWXU)
                func(name, dir_fd=parent)
                return
            except OSError:
                if not ignore_errors:
                    raise
        elif not ignore_errors:
            raise
    except OSError as e:
        if not ignore_errors and e.errno != errno.ENOENT:
            raise

