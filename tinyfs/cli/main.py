"""The `tinyfs` command (SPEC section 8): argument parsing and output only.

Exit codes (docs/format.md):
  0    success (fsck: clean)
  1    damage found: by fsck, or stored bytes that cat or export would hand out are damaged or missing;
       repair: something could not be repaired
  2    usage error, or the operation was refused or failed (one line on stderr)
  3    unexpected internal error (a bug: run with -v for the traceback)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .. import __version__
from ..core.errors import InvalidBag, TinyfsError

log = logging.getLogger("tinyfs")

EXIT_OK, EXIT_DAMAGE, EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """argparse found a problem with the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        where = self.prog.removeprefix("tinyfs").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see --help)")


# -- commands ------------------------------------------------------------------------

def cmd_init(args) -> int:
    from ..core.layout import init_archive

    root, digests = _root_and_digests(args.root, args.digest)
    if args.store is not None:
        return _init_on_store(root, digests, args)
    if args.endpoint is not None or args.retain is not None or args.cache is not None:
        raise UsageError("init: --endpoint, --retain and --cache go with --store s3://BUCKET/PREFIX")
    root = init_archive(root, args.mode or "preservation", digests, args.immutable, not args.no_verify_writes,
                        not args.no_identify)
    if args.immutable:
        _report_immutable(root)
    return EXIT_OK


def _init_on_store(root: str, digests: list[str] | None, args) -> int:
    """A working directory attached to an archive in an S3 bucket (a new one, or the one there)."""
    from ..core.s3archive import init_s3_archive, parse_cache_size, parse_retention

    if args.immutable:
        raise UsageError("init: --immutable is for a local archive; on a store, worm retention is the store's")
    if args.no_verify_writes or args.no_identify:
        raise UsageError("init: --no-verify-writes and --no-identify are for a local archive")
    days = parse_retention(args.retain) if args.retain is not None else None
    cache = parse_cache_size(args.cache) if args.cache is not None else None
    init_s3_archive(root, args.store, args.endpoint, mode=args.mode, digests=digests, retention_days=days,
                    cache_bytes=cache)
    return EXIT_OK


def _root_and_digests(root: str | None, given: list[str] | None) -> tuple[str, list[str] | None]:
    """`--digest` takes one or more algorithms, each word possibly a comma list, and may be repeated.
    Given before ROOT (`init --digest sha256 arc`), it takes ROOT too: the last word that names no
    algorithm is the root."""
    from ..core.layout import DIGESTS

    digests = [alg.strip() for word in (given or []) for alg in word.split(",") if alg.strip()]
    if root is None:
        if not digests or digests[-1] in DIGESTS:
            raise UsageError("init: the following arguments are required: ROOT (see --help)")
        root = digests.pop()
    return root, digests or None


def _report_immutable(root) -> None:
    from ..core.commit import set_immutable

    probe = root / "transactions" / f".immutable-probe-{os.getpid()}"
    probe.touch()
    try:
        try:
            ok = set_immutable(probe, True)
        except PermissionError:
            _say(f"{root}: not permitted to set the immutable attribute (needs CAP_LINUX_IMMUTABLE, e.g. "
                 "root); committed instances will be read-only by their modes only")
            return
        if ok:
            set_immutable(probe, False)
            _say(f"{root}: the file system supports the immutable attribute; committed instances will be "
                 "made immutable (chattr +i)")
        else:
            _say(f"{root}: the file system does not support the immutable attribute (chattr +i); committed "
                 "instances will be read-only by their modes only")
    finally:
        probe.unlink()


def cmd_ingest(args) -> int:
    from ..core.api import Archive
    from ..core.ingest import ingest_bag, ingest_paths

    archive = Archive(args.root, copies=args.copies)
    if args.ocfl is not None:
        return _ingest_ocfl(archive, args)
    with _progress() as progress:
        if args.bag is not None:
            if args.paths:
                raise UsageError("give either PATHs or --bag BAGDIR, not both")
            result = ingest_bag(archive, args.rid, args.bag, message=args.message, creator=args.creator,
                                label=args.label, progress=progress)
        else:
            if not args.paths:
                raise UsageError("ingest: give at least one PATH, --bag BAGDIR or --ocfl SRC")
            result = ingest_paths(archive, args.rid, args.paths, message=args.message or "",
                                  creator=args.creator or "", label=args.label, progress=progress)
    if result.instance is None:
        _say(f"{args.rid}: nothing changed; no instance committed")
        return EXIT_OK
    print(result.instance)
    log.info("%s: %d added, %d changed, %d removed, %d files (%d bytes) stored", args.rid, result.added,
             result.changed, result.removed, result.files_stored, result.bytes_stored)
    return _report_behind(args.rid, result)


def _ingest_ocfl(archive, args) -> int:
    """An OCFL object as a resource: `vN<TAB>iid` on stdout for each version committed."""
    from ..core.ocflingest import ingest_ocfl

    if args.paths or args.bag is not None:
        raise UsageError("ingest: give either PATHs, --bag BAGDIR or --ocfl SRC")
    if args.message is not None or args.creator is not None or args.label is not None:
        raise UsageError("ingest --ocfl: each version brings its own message, creator (its user) and label; "
                         "--message, --creator and --label do not apply")
    with _progress() as progress:
        result = ingest_ocfl(archive, args.rid, args.ocfl, progress=progress)
    for version, iid in result.committed:
        print(f"{version}\t{iid}")
    if result.held:
        _say(f"{args.rid}: {', '.join(result.held)} committed already (by an earlier run)")
    if result.unchanged:
        _say(f"{args.rid}: {', '.join(result.unchanged)} change nothing; no instance committed for them")
    if not result.committed and not result.held:
        _say(f"{args.rid}: nothing to commit")
    return EXIT_OK


def _report_behind(rid: str, result) -> int:
    """A commit made on the primary that some replica did not take: say which (and fail when fewer
    stores than required hold it; the instance stays committed)."""
    if not result.behind:
        return EXIT_OK
    stores = ", ".join(result.behind)
    if result.short:
        _say(f"{rid}: committed {result.instance}, but fewer stores than required hold it: {stores} did not take "
             "it (see tinyfs events; tinyfs replicate copies it)")
        return EXIT_ERROR
    _say(f"{rid}: warning: store(s) {stores} are behind; tinyfs replicate copies it")
    return EXIT_OK


def cmd_ls(args) -> int:
    from ..core.layout import ArchiveRoot

    archive = ArchiveRoot(args.root)
    if args.rid is None:
        for rid in archive.resource_ids():
            print(rid)
        return EXIT_OK
    archive.require(args.rid)
    for iid in archive.instance_ids(args.rid):
        doc = archive.instance(args.rid, iid)
        print("\t".join([iid, doc.created, _one_line(doc.label or ""), _one_line(doc.message)]))
    return EXIT_OK


def cmd_log(args) -> int:
    """The history of a resource (an instance a line, with what it changed), or of one path (a version a
    line), from the history index (core/history.py)."""
    from ..core.layout import ArchiveRoot

    archive = ArchiveRoot(args.root)
    if args.path is None:
        found = archive.history.log(args.rid, changes=getattr(args, "verbose", False))
    else:
        found = archive.history.versions(args.rid, args.path)
    if args.json:
        print(json.dumps([record.to_json() for record in found], indent=1, ensure_ascii=False, sort_keys=True))
        return EXIT_OK
    for record in found:
        if args.path is None:
            _print_instance_log(record)
        else:
            _print_version(record, archive.config.primary)
    return EXIT_OK


def _print_instance_log(entry) -> None:
    """iid, created, label, paths added, changed, removed, message; then (-v) a line per path:
    an empty first field, added|changed|removed, the path's new kind, the path."""
    print("\t".join([entry.iid, entry.created, _one_line(entry.label or ""), str(entry.added), str(entry.changed),
                     str(entry.removed), _one_line(entry.message)]))
    for change in entry.changes or ():
        print("\t".join(["", change.change, change.kind, _one_line(change.path)]))


def _print_version(version, algorithm: str) -> None:
    """iid, created, label, kind, size, mode (octal), mtime (RFC 3339, nanoseconds), the digest
    (<alg>:<hex>) or the link's target, message; fields a kind does not have are empty."""
    e = version.entry
    size = str(e.size) if version.kind == "file" else ""
    mode = f"{e.mode:04o}" if version.kind in ("file", "dir") else ""
    mtime = _ns_time(e.mtime_ns) if e is not None else ""
    what = f"{algorithm}:{e.digest}" if version.kind == "file" else e.target if version.kind == "link" else ""
    print("\t".join([version.iid, version.created, _one_line(version.label or ""), version.kind, size, mode, mtime,
                     _one_line(what), _one_line(version.message)]))


def _ns_time(ns: int) -> str:
    """An mtime in nanoseconds as RFC 3339 UTC, to the nanosecond."""
    from datetime import UTC, datetime

    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def cmd_cat(args) -> int:
    from ..core.fixity import FixityError, open_verified
    from ..core.layout import ArchiveRoot

    archive = ArchiveRoot(args.root)
    doc = archive.instance(args.rid, archive.resolve_instance(args.rid, args.instance))
    sys.stdout.flush()
    out = sys.stdout.fileno()
    before = _regular_file_place(out)
    try:
        with open_verified(archive, args.rid, doc, args.path, "cat") as f:
            _stream(f, out)
    except FixityError as e:
        _cut_back(out, before)
        _say(str(e))
        return EXIT_DAMAGE
    except BaseException:
        _cut_back(out, before)
        raise
    return EXIT_OK


def _stream(f, out: int) -> None:
    """Copy a verified reader to a descriptor, unbuffered (nothing is left to flush after a failure);
    the read that reaches the end raises when the bytes are damaged, so their last piece is not written."""
    from ..core.digests import CHUNK

    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        chunk = view[:n]
        while chunk:
            chunk = chunk[os.write(out, chunk):]


def _regular_file_place(fd: int) -> tuple[int, int] | None:
    """(size, offset) of a descriptor that is a regular file (`tinyfs cat ... > f`), else None."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size, os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        pass
    return None


def _cut_back(fd: int, before: tuple[int, int] | None) -> None:
    """After a failed cat, give a regular file back the size and offset it had (no partial output);
    a pipe or a terminal has already had the bytes, and only the exit status can tell."""
    if before is None:
        return
    try:
        os.ftruncate(fd, before[0])
        os.lseek(fd, before[1], os.SEEK_SET)
    except OSError as e:
        log.warning("could not remove the partial output: %s", e.strerror or e)


def cmd_events(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.model import parse_time

    archive = ArchiveRoot(args.root)
    if args.since is not None:
        try:
            parse_time(args.since)
        except ValueError:
            raise UsageError(f"--since {args.since!r} is not an RFC 3339 time "
                             "(e.g. 2026-01-01T00:00:00Z)") from None
    if args.premis:
        from ..core.premis import write_premis

        sys.stdout.flush()
        write_premis(archive, sys.stdout.buffer, args.since)
        sys.stdout.buffer.flush()
        return EXIT_OK
    for event in archive.events.read(args.since):
        print(json.dumps(event, sort_keys=True, ensure_ascii=False))
    return EXIT_OK


def cmd_fsck(args) -> int:
    from ..core.fsck import fsck
    from ..core.layout import ArchiveRoot
    from ..core.replicas import replicas_of

    archive = ArchiveRoot(args.root)
    if replicas_of(archive) or args.store:
        return _fsck_stores(archive, args)
    with _progress() as progress:
        report = fsck(archive, args.rids or None, fast=args.fast, progress=progress)
    leftovers = _interrupted_commits(archive)
    if args.json:
        print(json.dumps({**report.to_json(), "interrupted_commits": len(leftovers)}, indent=1,
                         ensure_ascii=False, sort_keys=True))
    else:
        for line in report.lines():
            print(_one_line(line))
        print(report.summary())
    return EXIT_OK if report.clean else EXIT_DAMAGE


def _fsck_stores(archive, args) -> int:
    """fsck of the primary and every replica (or the --store ones), each finding prefixed with its store."""
    from ..core.repair import fsck_stores

    with _progress() as progress:
        checks = fsck_stores(archive, args.rids or None, args.store, fast=args.fast, progress=progress)
    leftovers = _interrupted_commits(archive)
    clean = all(c.clean for c in checks)
    if args.json:
        print(json.dumps({"clean": clean, "stores": {c.name: c.to_json() for c in checks},
                          "interrupted_commits": len(leftovers)}, indent=1, ensure_ascii=False, sort_keys=True))
    else:
        for check in checks:
            for line in check.lines():
                print(_one_line(line))
    return EXIT_OK if clean else EXIT_DAMAGE


def _interrupted_commits(archive) -> list[str]:
    leftovers = [n for n in _listdir(archive.transactions) if n.startswith(".commit-")]
    if leftovers:
        _say(f"note: {len(leftovers)} interrupted commit(s) in {archive.transactions}; "
             "`tinyfs recover` removes them")
    return leftovers


def cmd_repair(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.repair import repair

    with _progress() as progress:
        report = repair(ArchiveRoot(args.root), args.rids or None, args.store, progress=progress)
    for done in report.repaired:
        print(_one_line(done.line()))
    for line in report.notes:
        print(_one_line(line))
    for line in report.failed:
        _say(line)
    what = f"{len(report.repaired)} stored file(s) repaired"
    _say(f"repair: {what}" + ("" if report.healed else f"; {len(report.failed)} problem(s) left (see above)"))
    return EXIT_OK if report.healed else EXIT_DAMAGE


def cmd_export(args) -> int:
    from ..core.export import export
    from ..core.fixity import FixityError
    from ..core.layout import ArchiveRoot

    if args.ocfl and (args.tar or args.instance is not None):
        raise UsageError("export --ocfl writes every instance as one OCFL object; --tar and --instance "
                         "do not apply")
    try:
        with _progress() as progress:
            if args.ocfl:
                return _export_ocfl(ArchiveRoot(args.root), args, progress)
            result = export(ArchiveRoot(args.root), args.rid, args.dest, instance=args.instance, tar=args.tar,
                            progress=progress)
    except FixityError as e:        # nothing was left at DEST
        _say(str(e))
        return EXIT_DAMAGE
    log.info("exported %s instance %s: %d files, %d bytes -> %s", args.rid, result.instance, result.files,
             result.bytes, result.dest)
    return EXIT_OK


def _export_ocfl(archive, args, progress) -> int:
    from ..core.ocflexport import export_ocfl

    result = export_ocfl(archive, args.rid, args.dest, progress=progress)
    log.info("exported %s as an OCFL object: %d versions, %d content files, %d bytes -> %s", args.rid,
             result.versions, result.files, result.bytes, result.dest)
    return EXIT_OK


def cmd_recover(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.recover import recover

    actions = recover(ArchiveRoot(args.root))
    for line in actions:
        print(line)
    if not actions:
        _say("nothing to recover")
    return EXIT_OK


def cmd_store(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.replicas import add_replica, replicas_of

    archive = ArchiveRoot(args.root)
    if args.action == "add":
        if args.url is None:
            raise UsageError("store add: give the store, a /path or s3://BUCKET/PREFIX")
        r = add_replica(archive, args.url, endpoint=args.endpoint, name=args.name, copies=args.copies)
        _say(f"added store {r.name}: {r.spec.url}; tinyfs replicate {args.root} copies what it lacks")
        return EXIT_OK
    if args.url is not None or args.name or args.endpoint or args.copies is not None:
        raise UsageError("store list: takes ROOT only")
    found = replicas_of(archive)
    print(f"primary\t{archive.root}")
    for r in found.replicas:
        print(f"{r.name}\t{r.spec.url}" + (f"\t{r.spec.endpoint}" if r.spec.endpoint else ""))
    return EXIT_OK


def cmd_replicate(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.replicas import replicate

    report = replicate(ArchiveRoot(args.root), args.rids or None, args.store or None)
    for name, count in report.copied.items():
        print(f"{name}\t{count} instance{'s' if count != 1 else ''} copied")
    for name, lines in report.failed.items():
        for line in lines:
            _say(f"store {name}: {line}")
    return EXIT_ERROR if report.failed else EXIT_OK


def cmd_migrate(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.migrate import migrate, plan

    src = ArchiveRoot(args.src)
    found = plan(src, args.dst, args.rids or None, args.merge)     # every refusal, before anything is written
    with _progress(items=True) as progress:
        advance = progress("instances", found.instances(src)) if progress else None
        report = migrate(src, args.dst, merge=args.merge, planned=found,
                         progress=(lambda _rid, _iid: advance(1)) if advance else None)
    print(f"{report.resources} resource(s) from {src.root} to {found.dst_path}: {report.copied} instance(s) "
          f"copied, {report.merged} merged, {report.unchanged} unchanged on the target (recorded), "
          f"{report.held} there already")
    return EXIT_OK


def cmd_status(args) -> int:
    from ..core.layout import ArchiveRoot
    from ..core.replicas import status

    rows = status(ArchiveRoot(args.root))
    if args.json:
        print(json.dumps({"stores": rows}, indent=1, sort_keys=True))
    else:
        for row in rows:
            print(_status_line(row))
    return EXIT_OK if all(r["reachable"] and not r["behind"] and not r["diverged"] for r in rows) else EXIT_DAMAGE


def _status_line(row: dict) -> str:
    if not row["reachable"]:
        state = f"UNREACHABLE: {row['error']}"
    elif row["diverged"]:
        state = f"DIVERGED in {len(row['diverged'])} resource(s): {', '.join(row['diverged'][:5])}"
    elif row["behind"]:
        state = f"behind by {row['behind']} instance(s) in {row['behind_resources']} resource(s)"
    else:
        state = "up to date"
    check = row["last_fsck"]
    checked = ("never checked" if check is None else
               f"last full fsck {check['time']}: " + ("clean" if not check["problems"] else f"{check['problems']} problem(s)"))
    held = f"{row['instances']} instances" if row["reachable"] else "? instances"
    return f"{row['name']}\t{row['url']}\t{held}\t{state}\t{checked}"


def cmd_formats(args) -> int:
    """What formats the archive holds (files of every current state), and which instances are pending."""
    from ..core import formats
    from ..core.errors import NotFound
    from ..core.layout import ArchiveRoot

    archive = ArchiveRoot(args.root)
    rids = args.rids or None
    for rid in args.rids:
        if not archive.exists(rid):
            raise NotFound(f"no resource {rid!r} in {archive.root}")
    if args.identify:
        todo = formats.pending(archive, rids)
        if todo:
            with formats.Workers() as workers:
                for rid, iid in todo:
                    formats.identify_instance(archive, rid, iid, workers)
    report = formats.summary(archive, rids)
    if args.json:
        print(json.dumps({"formats": [{"files": n, **(vars(f) if f else {"basis": "pending"})}
                                      for f, n in report["formats"]],
                          "pending": [{"resource": r, "instance": i} for r, i in report["pending"]]},
                         indent=1, sort_keys=True, ensure_ascii=False))
        return EXIT_OK
    for fmt, n in report["formats"]:
        if fmt is None:
            print(f"{n}\tpending")
        else:
            print(f"{n}\t{fmt.puid or '-'}\t{fmt.mime or '-'}\t{fmt.name or '-'}\t{fmt.basis}")
    if report["pending"]:
        _say(f"{len(report['pending'])} instance(s) not identified yet: tinyfs formats {args.root} --identify")
    return EXIT_OK


def cmd_purge(args) -> int:
    from ..core.api import Archive

    Archive(args.root).purge(args.rid)
    return EXIT_OK


def cmd_mount(args) -> int:
    from .mountcmd import mount_command

    return mount_command(root=args.root, mountpoint=args.mountpoint, options=args.options,
                         foreground=args.foreground)


def cmd_serve(args) -> int:
    from ..web.server import serve

    return serve(args.root, args.listen, users=args.users, anonymous=args.anonymous,
                 proxy_header=args.proxy_header, cert=args.cert, key=args.key, threads=args.threads,
                 timeout=args.timeout)


def cmd_serve_passwd(args) -> int:
    from ..web.auth import set_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("serve-passwd: the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    set_password(args.file, args.user, password)
    return EXIT_OK


def cmd_umount(args) -> int:
    from .mountcmd import umount_command

    return umount_command(mountpoint=args.mountpoint)


# -- the parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what happens (INFO) on stderr")
    parser = _Parser(prog="tinyfs", parents=[common],
                     description="A small OAIS-style archive whose everyday client is the file system.",
                     epilog="Exit codes: 0 ok, 1 damage found (fsck, cat, export), 2 error (one line on stderr), "
                            "3 internal error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"tinyfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    _add_setup_commands(command)
    _add_reading_commands(command)
    _add_repair_commands(command)
    return parser


# command(name, handler, help) -> the subcommand's parser, in the order of `tinyfs --help`
Command = Callable[[str, Callable, str], argparse.ArgumentParser]


def _add_setup_commands(command: Command) -> None:
    """Making an archive, mounting it, committing without a mount."""
    p = command("init", cmd_init, "create an archive")
    p.usage = ("tinyfs init ROOT [--mode MODE] [--digest ALG[,ALG...] ...] [--immutable] [--no-verify-writes] [--no-identify] "
               "[--store s3://BUCKET/PREFIX [--endpoint URL] [--retain 10y] [--cache 1G]]")
    p.add_argument("root", metavar="ROOT", nargs="?")     # (may come after --digest: see _root_and_digests)
    p.add_argument("--mode", choices=("preservation", "worm", "dynamic"),
                   help="preservation (default), worm or dynamic; attaching to a store: as the store has it")
    p.add_argument("--digest", action="extend", nargs="+", metavar="ALG",
                   help="digest algorithms, the first sha512 (default) or sha256; repeat the option or "
                        "give a comma list (--digest sha256,sha512)")
    p.add_argument("--immutable", action="store_true", help="worm mode: also chattr +i committed instances")
    p.add_argument("--no-verify-writes", action="store_true",
                   help="do not read each new bag back from the disk before a commit publishes it")
    p.add_argument("--no-identify", action="store_true", help="do not identify the formats of new files")
    p.add_argument("--store", metavar="s3://BUCKET/PREFIX",
                   help="keep the archive in an S3 bucket (ROOT is this host's working directory); an archive "
                        "already there is attached to. Credentials: the AWS variables or files only")
    p.add_argument("--endpoint", metavar="URL", help="the S3 endpoint (default: AWS)")
    p.add_argument("--retain", metavar="DAYS|Ny", help="worm on a store: each object's Object Lock retention")
    p.add_argument("--cache", metavar="SIZE", help="on a store: the bound of this host's read cache (default 1G)")

    p = command("mount", cmd_mount, "mount an archive")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground (systemd, debugging)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS", help="mount options, e.g. allow_other")

    p = command("serve", cmd_serve, "serve an archive over WebDAV and HTTP")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080)")
    p.add_argument("--users", metavar="FILE", help="users and argon2 password hashes (tinyfs serve-passwd)")
    p.add_argument("--anonymous", choices=("none", "read", "write"), default="none",
                   help="what a request without credentials may do (default none; write: tests and "
                        "trusted networks only)")
    p.add_argument("--proxy-header", metavar="NAME", help="trust this request header (set by a reverse "
                   "proxy that authenticates, e.g. X-Remote-User) as the user; listen on loopback then")
    p.add_argument("--cert", metavar="FILE", help="TLS certificate (PEM); with --key")
    p.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument("--threads", type=int, default=32, metavar="N", help="requests served at once (default 32)")
    p.add_argument("--timeout", type=int, default=60, metavar="SECONDS",
                   help="for a request's line and headers to arrive, and of silence inside its body (default 60)")

    p = command("serve-passwd", cmd_serve_passwd, "add a user of `tinyfs serve`, or change their password")
    p.add_argument("file", metavar="FILE")
    p.add_argument("user", metavar="USER")

    p = command("umount", cmd_umount, "unmount a mounted archive")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = command("ingest", cmd_ingest, "commit files, directories, a bag's payload or an OCFL object without a mount")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID")
    p.add_argument("paths", metavar="PATH", nargs="*")
    p.add_argument("--bag", metavar="BAGDIR", help="validate a BagIt bag and ingest its payload")
    p.add_argument("--ocfl", metavar="SRC", help="validate an OCFL object (ocfl-py) and import it, one "
                   "instance per version, as the new resource RID")
    p.add_argument("--message", "-m")
    p.add_argument("--label", "-l")
    p.add_argument("--creator", "-c")
    p.add_argument("--copies", type=int, metavar="N", help="with replicas: the stores (this one counted) that "
                   "must take the instance before the command returns (default: replicas.json's, else all)")

    p = command("store", cmd_store, "add a replica store (another archive kept identical), or list the stores")
    p.usage = "tinyfs store add ROOT /PATH|s3://BUCKET/PREFIX [--endpoint URL] [--name NAME] [--copies N]\n" \
              "       tinyfs store list ROOT"
    p.add_argument("action", choices=("add", "list"))
    p.add_argument("root", metavar="ROOT")
    p.add_argument("url", metavar="STORE", nargs="?")
    p.add_argument("--endpoint", metavar="URL", help="the S3 endpoint of an s3:// store")
    p.add_argument("--name", help="the store's name (default r1, r2, ...)")
    p.add_argument("--copies", type=int, metavar="N", help="from now on, commits return once N stores (the "
                   "primary counted) hold the instance; the rest are caught up by tinyfs replicate")

    p = command("replicate", cmd_replicate, "copy to every replica the instances it lacks (resumable)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rids", metavar="RID", nargs="*")
    p.add_argument("--store", action="append", metavar="NAME", help="only this replica (repeatable)")

    p = command("migrate", cmd_migrate, "copy every resource with every instance to another archive, checked "
                "(resumable); --merge rebases diverged chains on the target's")
    p.usage = "tinyfs migrate SRC DST [RID...] [--merge]"
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="an archive (local, or an S3 working directory) with SRC's mode "
                   "and digests, or an absent or empty directory (a new local archive)")
    p.add_argument("rids", metavar="RID", nargs="*", help="only these resources")
    p.add_argument("--merge", action="store_true", help="where a resource's chains diverged, commit SRC's "
                   "instances on top of DST's, oldest first, each keeping its original in `origins`")

    p = command("status", cmd_status, "per store: reachable, instances behind, last full fsck (exit 1: not all "
                "stores up to date)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--json", action="store_true")


def _add_reading_commands(command: Command) -> None:
    """Listing, reading, checking and exporting what the archive holds."""
    p = command("ls", cmd_ls, "list resources, or a resource's instances (iid, created, label, message)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID", nargs="?")

    p = command("log", cmd_log, "a resource's history: each instance with the paths it added, changed and "
                "removed (-v: which); or each version of one PATH")
    p.usage = "tinyfs log ROOT RID [PATH] [--json] [-v]"
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID")
    p.add_argument("path", metavar="PATH", nargs="?")
    p.add_argument("--json", action="store_true", help="print one JSON list of records instead of lines")

    p = command("cat", cmd_cat, "write a file of a resource to stdout")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--instance", "-i", metavar="IID|LABEL")

    p = command("events", cmd_events, "print the event log as JSON lines, or as one PREMIS 3 XML document")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--since", metavar="RFC3339", help="only events at or after this time (inclusive)")
    p.add_argument("--premis", action="store_true", help="write PREMIS 3 XML: the events, the resources and "
                   "instances they name (objects), tinyfs and the people they name (agents)")

    p = command("fsck", cmd_fsck, "check bags, instance.json and stored files, in every store (exit 1 on damage)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rids", metavar="RID", nargs="*")
    p.add_argument("--fast", action="store_true", help="structure and sizes only; hash nothing")
    p.add_argument("--json", action="store_true", help="print one JSON document (findings, damaged stored "
                   "files with every path using them) instead of text; with replicas, one per store")
    p.add_argument("--store", action="append", metavar="NAME", help="with replicas: only this store "
                   "(\"primary\" or a replica's name; repeatable); default: every store")

    p = command("export", cmd_export, "write one complete, standalone bag of a state (--ocfl: the resource "
                "as an OCFL object)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--instance", "-i", metavar="IID|LABEL")
    p.add_argument("--tar", action="store_true", help="write DEST as a tar file (.tar, .tar.gz, .tar.xz ...)")
    p.add_argument("--ocfl", action="store_true", help="write the resource, every instance, as one OCFL 1.1 "
                   "object (one version per instance)")


def _add_repair_commands(command: Command) -> None:
    """Cleaning up after crashes; deleting (dynamic mode)."""
    p = command("recover", cmd_recover, "finish or undo interrupted commits")
    p.add_argument("root", metavar="ROOT")

    p = command("repair", cmd_repair, "fsck every store, then restore each damaged or missing stored file "
                "from a store holding it intact (exit 1: something could not be repaired)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rids", metavar="RID", nargs="*")
    p.add_argument("--store", action="append", metavar="NAME", help="repair only this store (\"primary\" or "
                   "a replica's name; repeatable); every store is still checked, to find good copies")

    p = command("formats", cmd_formats, "files of the current states by format (PRONOM PUID, MIME type, name; "
                "identified by FIDO after each commit), and the instances not identified yet")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rids", metavar="RID", nargs="*")
    p.add_argument("--identify", action="store_true", help="identify the instances still pending first")
    p.add_argument("--json", action="store_true", help="one JSON document")

    p = command("purge", cmd_purge, "delete a resource (dynamic mode only)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("rid", metavar="RID")


def _fstab_parser() -> argparse.ArgumentParser:
    """`tinyfs SOURCE MOUNTPOINT -o OPTIONS`, as mount.fuse3 runs it for a fuse.tinyfs fstab line."""
    p = _Parser(prog="tinyfs", description="mount (the form mount.fuse3 uses)")
    p.add_argument("root", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS")
    p.set_defaults(handler=cmd_mount, foreground=False)
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    if len(argv) >= 2 and argv[0] not in _command_names(parser) and not argv[0].startswith("-") \
            and not argv[1].startswith("-"):
        return _fstab_parser().parse_args(argv)
    return parser.parse_args(argv)


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every subcommand: a first word that is none of them is the SOURCE of the fstab form."""
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


# -- running --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    try:
        args = parse(argv)
        if args.handler not in (cmd_mount, cmd_umount):   # a mount daemon must not die with a log pipe
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tinyfs cat ... | head` ends quietly, like cat
        verbose = getattr(args, "verbose", False)
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                            format="tinyfs: %(levelname)s %(name)s: %(message)s" if verbose else "tinyfs: %(message)s")
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UsageError as e:
        _say(str(e))
        return EXIT_ERROR
    except InvalidBag as e:
        _say(str(e))
        for problem in e.problems:
            print(f"  {_one_line(str(problem))} [{problem.code}]", file=sys.stderr)
        return EXIT_ERROR
    except (TinyfsError, OSError, ValueError, ImportError) as e:
        _say(_message(e))
        if verbose:
            log.info("traceback:", exc_info=True)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line (the traceback with -v)
        _say(f"internal error: {type(e).__name__}: {e}" + ("" if verbose else " (run with -v for details)"))
        if verbose:
            log.exception("traceback:")
        return EXIT_BUG


def _message(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"this command is not available here: {e}"
    if isinstance(e, OSError) and not isinstance(e, TinyfsError) and e.strerror:
        where = e.filename
        if isinstance(where, bytes):
            where = where.decode("utf-8", "backslashreplace")
        return f"{where}: {e.strerror}" if where is not None else e.strerror
    return _one_line(str(e)) or type(e).__name__


def _say(message: str) -> None:
    print(f"tinyfs: {_one_line(message)}", file=sys.stderr)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _listdir(path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@contextmanager
def _progress(items: bool = False) -> Iterator[Callable | None]:
    """A progress factory (description, total) -> advance(n) drawing on stderr, when it is a terminal;
    counting bytes, or with `items` things (n of N)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (MofNCompleteColumn(),) if items else (DownloadColumn(), TransferSpeedColumn())
    with Progress(TextColumn("{task.description}"), BarColumn(), *counts,
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        def start(description: str, total: int | None) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield start


if __name__ == "__main__":
    sys.exit(main())
