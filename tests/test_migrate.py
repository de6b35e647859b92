"""tinyfs migrate SRC DST [--merge]: real archives, the CLI as a subprocess and the core calls."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs
from mounting import tinyfs_argv

from tinyfs.core import migrate as migrate_mod
from tinyfs.core import replicas
from tinyfs.core.api import Archive
from tinyfs.core.commit import state_changes
from tinyfs.core.export import export
from tinyfs.core.layout import ArchiveRoot

pytestmark = pytest.mark.core


# -- building archives ---------------------------------------------------------------------------

def commit(root: Path, rid: str, *, add: dict[str, bytes] = {}, remove: tuple[str, ...] = (),  # noqa: B006
           message: str = "", creator: str = "", label: str | None = None, links: dict[str, Path] = {}) -> str:  # noqa: B006
    """One instance of `rid`: files added from memory, paths removed, trees added from disk (`links`)."""
    archive = Archive(root)
    txn = archive.get(rid, "t", message=message, creator=creator, label=label) if rid in archive else \
        archive.new(rid, message=message, creator=creator, label=label)
    for path in remove:
        txn.remove(path)
    for path, data in add.items():
        txn.add_bytes(path, data)
    for path, source in links.items():
        txn.add(source, path)
    return txn.commit().instance


def make_source(root: Path, tmp: Path, instances: int = 3) -> None:
    """Two resources: one with directories, a removal, hard links, a label; one with many small instances."""
    Archive.init(root)
    tree = tmp / "linked"
    tree.mkdir()
    (tree / "a").write_bytes(b"one inode\n")
    os.link(tree / "a", tree / "b")
    os.symlink("a", tree / "s")
    commit(root, "alpha", add={"doc/readme.txt": b"hello\n", "doc/old.txt": b"old\n"}, message="first",
           creator="ann", label="v1")
    commit(root, "alpha", add={"doc/new.txt": b"new\n"}, remove=("doc/old.txt",), links={"tree": tree},
           message="second", creator="bob")
    for n in range(instances):
        commit(root, "beta", add={f"n{n % 4}.txt": f"{n}\n".encode() * (n + 1)}, message=f"beta {n}")


def export_all(root: Path, dest: Path) -> None:
    """Every instance of every resource exported to dest/<rid>/<n>/ (n: its place in the chain). The times
    an export takes from the clock (its tag files, the bag and, where the state records no root, data/)
    are set to 0, so that two exports of one state are identical to rsync."""
    archive = ArchiveRoot(root)
    for rid in archive.resource_ids():
        (dest / rid).mkdir(parents=True)
        for n, iid in enumerate(archive.instance_ids(rid)):
            bag = dest / rid / str(n)
            export(archive, rid, bag, instance=iid)
            for made in [*(p for p in bag.iterdir() if p.name != "data"), bag, bag / "data"]:
                if made.name != "data" or archive.state(rid, iid).root is None:
                    os.utime(made, ns=(0, 0))
        os.utime(dest / rid, ns=(0, 0))
    os.utime(dest, ns=(0, 0))


def rsync_diff(a: Path, b: Path) -> str:
    r = subprocess.run(["rsync", "-anciHAX", "--delete", f"{a}/", f"{b}/"], capture_output=True, text=True,
                       check=True)
    return r.stdout


def snapshot(top: Path) -> dict[str, str]:
    """Every file and directory under `top` with its bytes' digest (or its kind): what "nothing written" means."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), top)] = "dir"
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = hashlib.sha256(f.read()).hexdigest()
    return out


def chains(root: Path) -> dict[str, list[str]]:
    archive = ArchiveRoot(root)
    return {rid: archive.instance_ids(rid) for rid in archive.resource_ids()}


def events(root: Path, kind: str) -> list[dict]:
    return [e for e in ArchiveRoot(root).events.read() if e["event"] == kind]


def one_line_refusal(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1, r.stderr
    return r.stderr


# -- migrate -----------------------------------------------------------------------------------------

def test_migrate_into_a_new_directory_is_exact_and_a_second_run_copies_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path)
    r = run_tinyfs("migrate", src, dst)
    assert "2 resource(s)" in r.stdout and "5 instance(s) copied" in r.stdout, r.stdout
    assert len(r.stdout.splitlines()) == 1
    assert chains(dst) == chains(src)
    mine, theirs = ArchiveRoot(src).config, ArchiveRoot(dst).config
    assert (theirs.mode, theirs.digests, theirs.immutable) == (mine.mode, mine.digests, mine.immutable)
    export_all(src, tmp_path / "x-src")
    export_all(dst, tmp_path / "x-dst")
    assert len(list((tmp_path / "x-dst").rglob("*"))) > 20
    assert rsync_diff(tmp_path / "x-src", tmp_path / "x-dst") == ""
    for rid, ids in chains(src).items():        # every instance.json byte for byte
        for iid in ids:
            assert ArchiveRoot(dst).instance_bytes(rid, iid) == ArchiveRoot(src).instance_bytes(rid, iid)
    check_archive_ok(dst)
    again = run_tinyfs("migrate", src, dst)
    assert "0 instance(s) copied" in again.stdout and "5 there already" in again.stdout
    assert [e["detail"]["copied"] for e in events(dst, "migrate.finished")] == [5, 0]


def test_migrate_of_chosen_resources_and_onto_a_prefix(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path)
    run_tinyfs("migrate", src, dst, "beta")
    assert list(chains(dst)) == ["beta"]
    commit(src, "beta", add={"later.txt": b"later\n"})
    r = run_tinyfs("migrate", src, dst)           # beta's chain in dst is a prefix: the rest follows
    assert "3 instance(s) copied" in r.stdout and "3 there already" in r.stdout
    assert chains(dst) == chains(src)
    check_archive_ok(dst)


def test_migrate_resumes_after_an_exception_between_instances(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path, instances=6)
    real = replicas.copy_instance
    calls = []

    def failing(*args, **kw):
        if len(calls) == 4:
            raise RuntimeError("injected between instances")
        calls.append(args[3])
        return real(*args, **kw)

    monkeypatch.setattr(replicas, "copy_instance", failing)
    with pytest.raises(RuntimeError, match="injected"):
        migrate_mod.migrate(ArchiveRoot(src), dst)
    assert sum(map(len, chains(dst).values())) == 4
    monkeypatch.setattr(replicas, "copy_instance", real)
    report = migrate_mod.migrate(ArchiveRoot(src), dst)
    assert (report.copied, report.held) == (4, 4)
    assert chains(dst) == chains(src)
    check_archive_ok(dst)


def test_migrate_resumes_after_kill_9(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path, instances=60)
    total = sum(map(len, chains(src).values()))
    proc = subprocess.Popen([*tinyfs_argv(), "migrate", str(src), str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(dst.glob("resources/*/*/*/instances/*"))) < 10:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    copied = len(list(dst.glob("resources/*/*/*/instances/*")))
    assert 10 <= copied < total, copied       # killed mid-way
    r = run_tinyfs("migrate", src, dst)
    assert f"{total - copied} instance(s) copied" in r.stdout, r.stdout
    assert chains(dst) == chains(src)
    run_tinyfs("recover", dst)
    assert sorted(p.name for p in (dst / "transactions").iterdir()) == [".locks"]
    check_archive_ok(dst)
    export_all(src, tmp_path / "x-src")
    export_all(dst, tmp_path / "x-dst")
    assert rsync_diff(tmp_path / "x-src", tmp_path / "x-dst") == ""


def test_refusals_write_nothing(tmp_path):
    src = tmp_path / "src"
    make_source(src, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"not an archive")
    before = snapshot(tmp_path)
    assert "not a tinyfs archive" in one_line_refusal(run_tinyfs("migrate", src, other, check=False))
    assert "another archive" in one_line_refusal(run_tinyfs("migrate", src, src, check=False))
    one_line_refusal(run_tinyfs("migrate", src, src / "transactions" / "x", check=False))
    one_line_refusal(run_tinyfs("migrate", src / "resources", tmp_path / "new", check=False))   # not an archive
    assert snapshot(tmp_path) == before

    sha256 = tmp_path / "sha256"
    run_tinyfs("init", sha256, "--digest", "sha256")
    worm = tmp_path / "worm"
    run_tinyfs("init", worm, "--mode", "worm")
    before = snapshot(tmp_path)
    assert "sha256" in one_line_refusal(run_tinyfs("migrate", src, sha256, check=False))
    assert "worm" in one_line_refusal(run_tinyfs("migrate", src, worm, check=False))
    assert snapshot(tmp_path) == before

    dst = tmp_path / "dst"
    run_tinyfs("migrate", src, dst)
    commit(dst, "beta", add={"own.txt": b"dst's own\n"})
    commit(src, "beta", add={"theirs.txt": b"src's own\n"})
    before = snapshot(tmp_path)
    assert "--merge" in one_line_refusal(run_tinyfs("migrate", src, dst, check=False))
    assert snapshot(tmp_path) == before


# -- merge -------------------------------------------------------------------------------------------

def diverge(tmp_path: Path) -> tuple[Path, Path, list[str], list[str]]:
    """SRC and DST sharing alpha's first two instances, then each committing its own; returns
    (src, dst, SRC's own instance ids, DST's own)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path)
    run_tinyfs("migrate", src, dst)
    dst_own = [
        commit(dst, "alpha", remove=("doc",), add={"dst.txt": b"dst's file\n"}, message="dst drops doc/",
               label="v2"),
        commit(dst, "alpha", add={"shared.bin": b"same bytes on both sides\n" * 100}, message="dst shared"),
    ]
    src_own = [
        commit(src, "alpha", add={"doc/more/deep.txt": b"under doc/\n"}, message="src adds under doc/",
               creator="carol", label="v2"),
        commit(src, "alpha", add={"shared.bin": b"same bytes on both sides\n" * 100}, message="src shared"),
        commit(src, "alpha", add={"tree/a": b"rewritten\n"}, message="src rewrites a hard link"),
        commit(src, "alpha", remove=("doc/readme.txt",), message="src: a removal dst made already"),
    ]
    return src, dst, src_own, dst_own


def test_merge_rebases_src_instances_on_dst_head_in_order_keeping_their_origins(tmp_path):
    src, dst, src_own, dst_own = diverge(tmp_path)
    dst_before = chains(dst)["alpha"]
    r = run_tinyfs("migrate", src, dst, "--merge")
    assert "3 merged, 1 unchanged on the target" in r.stdout, r.stdout
    dst_arch, src_arch = ArchiveRoot(dst), ArchiveRoot(src)
    after = dst_arch.instance_ids("alpha")
    assert after[:len(dst_before)] == dst_before          # DST's own keep their places
    merged = after[len(dst_before):]
    assert len(merged) == 3
    docs = [dst_arch.instance("alpha", iid) for iid in merged]
    # in SRC's order, each naming its original
    assert [d.origin["instance"] for d in docs] == src_own[:3]
    assert [d.message for d in docs] == ["src adds under doc/", "src shared", "src rewrites a hard link"]
    assert docs[0].creator == "carol"
    first = docs[0].origin
    assert first["created"] == src_arch.instance("alpha", src_own[0]).created
    assert first["previous"] == src_arch.instance("alpha", src_own[0]).previous
    assert first["label"] == "v2" and first["label_dropped"] is True and docs[0].label is None
    assert [(e["event"], e["instance"], e["detail"].get("message")) for e in first["events"]] == \
        [("transaction.committed", src_own[0], "src adds under doc/"), ("formats.identified", src_own[0], None)]
    # a file added under a directory DST deleted: the directory is made again from SRC's state
    state = docs[0].state
    assert "doc/more/deep.txt" in state.files and {"doc", "doc/more"} <= set(state.dirs)
    assert "dst.txt" in state.files and "doc/readme.txt" not in state.files
    # bytes DST stores already are not stored again
    shared_commit = [e for e in events(dst, "transaction.committed") if e["instance"] == merged[1]][0]
    assert shared_commit["detail"]["files_stored"] == 0
    # a hard link rewritten on SRC: the pair leaves its group on DST too, the other stays as it was
    third = docs[2].state
    assert third.files["tree/a"].digest != third.files["tree/b"].digest and not third.hardlinks
    # the SRC instance whose change DST had already: recorded, not committed
    unchanged = [e for e in events(dst, "migrate.merged") if e["detail"]["unchanged"]]
    assert [e["detail"]["origin"] for e in unchanged] == [src_own[3]]
    # every SRC state's files are readable in DST, byte for byte
    dst_api, src_api = Archive(dst), Archive(src)
    for iid in src_arch.instance_ids("alpha"):
        changed = state_changes(src_arch.state("alpha", src_arch.instance("alpha", iid).previous)
                                if src_arch.instance("alpha", iid).previous else type(state)(),
                                src_arch.state("alpha", iid).entries())
        twin = next((m for m in after if m == iid or (dst_arch.instance("alpha", m).origin or {}).get("instance")
                     == iid), None)
        if twin is None:
            assert iid == src_own[3]
            twin = after[-1]
        for path, entry in changed.items():
            if entry is not None and path in src_arch.state("alpha", iid).files:
                assert dst_api.get("alpha").read(path, twin) == src_api.get("alpha").read(path, iid)
    check_archive_ok(dst)
    # a second run adds nothing
    snap = snapshot(dst / "resources")
    again = run_tinyfs("migrate", src, dst, "--merge")
    assert "0 merged, 0 unchanged" in again.stdout and snapshot(dst / "resources") == snap
    # SRC's new work later: only it is rebased
    commit(src, "alpha", add={"late.txt": b"late\n"}, message="late")
    late = run_tinyfs("migrate", src, dst, "--merge")
    assert "1 merged" in late.stdout
    assert ArchiveRoot(dst).instance("alpha", ArchiveRoot(dst).head("alpha")).message == "late"
    assert "dst.txt" in ArchiveRoot(dst).state("alpha").files


def test_merge_is_resumable_after_an_exception_between_commits(tmp_path, monkeypatch):
    src, dst, src_own, _dst_own = diverge(tmp_path)
    real = migrate_mod.commit
    calls = []

    def failing(*args, **kw):
        if len(calls) == 1:
            raise RuntimeError("injected between instances")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(migrate_mod, "commit", failing)
    with pytest.raises(RuntimeError, match="injected"):
        migrate_mod.migrate(ArchiveRoot(src), dst, merge=True)
    monkeypatch.setattr(migrate_mod, "commit", real)
    report = migrate_mod.migrate(ArchiveRoot(src), dst, merge=True)
    assert (report.merged, report.unchanged) == (2, 1)
    origins = [ArchiveRoot(dst).instance("alpha", iid).origin for iid in ArchiveRoot(dst).instance_ids("alpha")]
    assert [o["instance"] for o in origins if o] == src_own[:3]
    assert not list((dst / "transactions").glob(".api-migrate-*"))
    check_archive_ok(dst)


def test_merge_resumes_after_kill_9_with_nothing_lost_or_duplicated(tmp_path):
    src, dst, src_own, _dst_own = diverge(tmp_path)
    for n in range(40):
        src_own.append(commit(src, "alpha", add={f"many/{n % 7}.txt": f"{n}\n".encode()}, message=f"m{n}"))
    mergeable = [iid for iid in src_own if iid != src_own[3]]     # src_own[3] changes nothing on DST
    start = len(ArchiveRoot(dst).instance_ids("alpha"))
    proc = subprocess.Popen([*tinyfs_argv(), "migrate", str(src), str(dst), "--merge"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(dst.glob("resources/*/*/alpha/instances/*"))) < start + 5:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(ArchiveRoot(dst).instance_ids("alpha")) - start
    assert 5 <= done < len(mergeable), done
    r = run_tinyfs("migrate", src, dst, "--merge")
    assert f"{len(mergeable) - done} merged" in r.stdout, r.stdout
    dst_arch = ArchiveRoot(dst)
    origins = [dst_arch.instance("alpha", iid).origin for iid in dst_arch.instance_ids("alpha")]
    assert [o["instance"] for o in origins if o] == mergeable        # each once, in SRC's order
    assert [u["instance"] for o in origins if o for u in o.get("unchanged", ())] == [src_own[3]]
    assert dst_arch.state("alpha").files["many/6.txt"] == ArchiveRoot(src).state("alpha").files["many/6.txt"]
    run_tinyfs("recover", dst)
    assert not list((dst / "transactions").glob(".commit-*"))
    check_archive_ok(dst)


def test_merge_in_worm_mode_and_migrate_of_a_dynamic_archive(tmp_path):
    for mode in ("worm", "dynamic"):
        src, dst = tmp_path / mode / "src", tmp_path / mode / "dst"
        Archive.init(src, mode=mode)
        commit(src, "r", add={"a/x": b"x\n", "b": b"b\n"})
        commit(src, "r", add={"a/y": b"y\n"})
        first = migrate_mod.migrate(ArchiveRoot(src), dst)
        commit(dst, "r", add={"d": b"d\n"})
        iid = commit(src, "r", add={"e": b"e" * 10_000}, remove=("b",))
        report = migrate_mod.migrate(ArchiveRoot(src), dst, merge=True)
        head = ArchiveRoot(dst).instance("r", ArchiveRoot(dst).head("r"))
        assert head.origin["instance"] == iid and report.merged == 1
        assert Archive(dst).get("r").read("e") == b"e" * 10_000
        if mode == "worm":      # copied with their ids, then SRC's change on DST's head (DST's own file kept)
            assert first.copied == 2 and set(head.state.files) == {"a/x", "a/y", "d", "e"}
        else:                   # only the head is left, its predecessor gone: its state is committed on DST
            assert (first.copied, first.merged) == (0, 1) and set(head.state.files) == {"a/x", "a/y", "e"}
        assert migrate_mod.migrate(ArchiveRoot(src), dst, merge=True).merged == 0
        assert [p.name for p in (dst / "transactions").iterdir()] == [".locks"]
        check_archive_ok(dst)


def test_merge_refuses_a_shared_instance_id_with_different_content(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path)
    shutil.copytree(src, dst, symlinks=True)
    commit(src, "alpha", add={"src.txt": b"src\n"})
    iid = ArchiveRoot(dst).instance_ids("beta")[1]
    doc = ArchiveRoot(dst).instance_dir("beta", iid) / "instance.json"
    text = json.loads(doc.read_text())
    text["message"] = "rewritten"
    doc.chmod(0o644)
    doc.write_text(json.dumps(text, indent=1, sort_keys=True) + "\n")
    before = snapshot(dst)
    err = one_line_refusal(run_tinyfs("migrate", src, dst, "--merge", check=False))
    assert "'beta'" in err and iid in err
    assert snapshot(dst) == before


# -- a target in an S3 bucket ----------------------------------------------------------------------------

def test_migrate_and_merge_into_an_archive_in_seaweedfs(s3_env, bucket, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src, tmp_path)
    run_tinyfs("init", dst, "--store", f"s3://{bucket}/arch", "--endpoint", s3_env.endpoint)
    r = run_tinyfs("migrate", src, dst)
    assert "5 instance(s) copied" in r.stdout
    assert chains(dst) == chains(src)
    export_all(src, tmp_path / "x-src")
    export_all(dst, tmp_path / "x-dst")
    assert rsync_diff(tmp_path / "x-src", tmp_path / "x-dst") == ""
    # a second working directory of the same store sees it all, and fsck (every byte, from the store) is clean
    other = tmp_path / "other"
    run_tinyfs("init", other, "--store", f"s3://{bucket}/arch", "--endpoint", s3_env.endpoint)
    assert chains(other) == chains(src)
    run_tinyfs("fsck", other)
    # diverged: SRC's new instance is committed on the store's head, its new bytes brought checked
    commit(dst, "alpha", add={"dst.txt": b"dst\n"})
    iid = commit(src, "alpha", add={"src.bin": os.urandom(300_000)}, message="src's")
    assert "1 merged" in run_tinyfs("migrate", src, dst, "--merge").stdout
    head = ArchiveRoot(other).instance("alpha", ArchiveRoot(other).head("alpha"))
    assert head.origin["instance"] == iid and {"dst.txt", "src.bin"} <= set(head.state.files)
    assert Archive(other).get("alpha").read("src.bin") == Archive(src).get("alpha").read("src.bin")
    assert "0 merged" in run_tinyfs("migrate", src, dst, "--merge").stdout
    run_tinyfs("fsck", other)
    # the same store through another working directory is the same archive: refused
    assert "same store" in one_line_refusal(run_tinyfs("migrate", dst, other, check=False))
    # and back out of the store, into a new local archive
    back = tmp_path / "back"
    run_tinyfs("migrate", other, back)
    assert chains(back) == chains(other)
    assert ArchiveRoot(back).instance("alpha", head.id).origin["instance"] == iid
    check_archive_ok(back)


def test_rebased_state_makes_a_valid_tree_and_names_what_it_dropped():
    from tinyfs.core.model import DirEntry, FileEntry, State

    def f(d: str) -> FileEntry:
        return FileEntry(d * 8, 1, 0o644, 1)

    d = DirEntry(0o755, 1)
    base = State({"p/a": f("a"), "k/x": f("x"), "k/y": f("x")}, {}, {"p": d, "k": d}, hardlinks=(("k/x", "k/y"),))
    # DST: added p/q, deleted k/ and made l/
    head = State({"p/a": f("a"), "p/q": f("b"), "l/z": f("z")}, {}, {"p": d, "l": d})
    # SRC: p became a file, a file added under k/ (which DST deleted), the pair k/x, k/y rewritten
    after = State({"p": f("c"), "k/x": f("e"), "k/y": f("e"), "k/deep/n": f("n")}, {},
                  {"k": DirEntry(0o700, 5), "k/deep": d}, hardlinks=(("k/x", "k/y"),))
    state, dropped = migrate_mod.rebased_state(base, after, head)
    assert dropped == ["p/q"]                                   # under a path that is no longer a directory
    assert set(state.files) == {"p", "k/x", "k/y", "k/deep/n", "l/z"}
    assert state.dirs["k"] == DirEntry(0o700, 5) and "p" not in state.dirs and "l" in state.dirs
    assert state.hardlinks == (("k/x", "k/y"),)


def test_merging_both_ways_settles(tmp_path):
    """A into B, then B into A, then again: instances that came from the other side are not sent back
    (found by a newcomer's trial: each round added 5 instances per direction, flipping the content)."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_tinyfs("init", a)
    commit(a, "doc", add={"common.txt": b"common\n"})
    run_tinyfs("migrate", a, b)
    commit(a, "doc", add={"both.txt": b"A\n"})
    commit(b, "doc", add={"both.txt": b"N\n"})
    commit(b, "doc", add={"b-only.txt": b"b\n"})
    run_tinyfs("migrate", a, b, "--merge")
    run_tinyfs("migrate", b, a, "--merge")
    settled = chains(a), chains(b)
    for _ in range(2):
        assert " 0 merged" in run_tinyfs("migrate", a, b, "--merge").stdout
        assert " 0 merged" in run_tinyfs("migrate", b, a, "--merge").stdout
    assert (chains(a), chains(b)) == settled
    for root in (a, b):
        state = ArchiveRoot(root).state("doc")
        assert set(state.files) == {"common.txt", "both.txt", "b-only.txt"}
        check_archive_ok(root)


def test_migrate_takes_a_file_srcs_primary_lost_from_srcs_replica(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    run_tinyfs("init", src)
    run_tinyfs("store", "add", src, tmp_path / "src-replica")
    commit(src, "doc", add={"f.txt": b"the bytes\n" * 100})
    (path,) = src.glob("resources/*/*/doc/instances/*/data/f.txt")
    os.chmod(path, 0o644)
    path.write_bytes(b"rotten\n")
    run_tinyfs("migrate", src, dst)
    assert Archive(dst).get("doc").read("f.txt") == b"the bytes\n" * 100
    check_archive_ok(dst)
