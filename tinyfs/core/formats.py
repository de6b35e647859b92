"""Format identification: the PRONOM format (PUID), MIME type and name of every file an instance stores.

The identifier is FIDO (opf-fido, the Open Preservation Foundation's PRONOM matcher, on PyPI; siegfried,
faster, is a Go program not packaged for Debian or PyPI). FIDO matches Python regexes against a file's
first and last 64 KiB: 5-7 ms a file here, so 10,000 small files take a minute of one core, several times
what a mount deposit of them takes. Identification therefore runs after the commit has returned, on new
bytes only (the files a bag stores itself: each distinct content once per resource), in worker processes
on every core at low priority, while the files are closed and immutable. Its result is a record beside
the instance, written once and never changing the bag:

    ROOT/index/formats/XX/YY/<rid>/<iid>.json
      {"tool": "fido 1.6.1", "signatures": "PRONOM v109, container 20200121", "identified": TIME,
       "files": {DIGEST: {"puid": "fmt/353", "mime": "image/tiff", "name": "Tagged Image File Format",
                          "basis": "signature"}}}

`basis` says how FIDO decided: "signature", "container" (zip/OLE2 based formats), "extension" (no
signature matched: by the name's extension only) or "none" (unknown; an empty file is "empty"). An
instance that stores files but has no record yet is *pending*: `tinyfs formats ROOT --identify` (or the
mount and the server, in the background) identifies it. The records are derived data: `--identify`
re-makes a missing one from the bag.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

from .durable import write_new
from .layout import ArchiveRoot
from .model import InstanceDoc, utc_now

log = logging.getLogger(__name__)

BATCH = 200            # files a worker process identifies per task
IN_PROCESS = 200       # up to this many files are identified in the calling process (no workers to start)
WORKERS_IDLE = 5.0     # seconds without work after which a daemon's worker processes are ended
NICE = 10              # worker processes yield the cores to deposits and reads


@dataclass(frozen=True)
class Format:
    puid: str | None
    mime: str | None
    name: str | None
    basis: str            # signature, container, extension, none, empty

    def short(self) -> str:
        """What the user.tinyfs.format xattr shows: 'fmt/353 image/tiff' (or 'unknown')."""
        return " ".join(x for x in (self.puid, self.mime) if x) or "unknown"


# -- the records ---------------------------------------------------------------------------------------------

def records_dir(archive: ArchiveRoot, rid: str) -> Path:
    h = hashlib.sha256(rid.encode()).hexdigest()
    return archive.root / "index" / "formats" / h[:2] / h[2:4] / rid


def read_record(archive: ArchiveRoot, rid: str, iid: str) -> dict | None:
    try:
        return json.loads((records_dir(archive, rid) / f"{iid}.json").read_bytes())
    except FileNotFoundError:
        return None


RECORDS_CACHED = 64
_cache: OrderedDict[tuple[str, str, str], dict[str, Format]] = OrderedDict()
_cache_lock = threading.Lock()


def identified_formats(archive: ArchiveRoot, rid: str, iid: str) -> dict[str, Format] | None:
    """digest -> Format of the files instance `iid` stores itself; None while it is pending. A record never
    changes once written: the last ones read are kept (a listing's getfattr of every file reads one)."""
    key = (str(archive.root), rid, iid)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    record = read_record(archive, rid, iid)
    if record is None:
        return None
    formats = {digest: Format(**fields) for digest, fields in record["files"].items()}
    with _cache_lock:
        _cache[key] = formats
        while len(_cache) > RECORDS_CACHED:
            _cache.popitem(last=False)
    return formats


def format_of(archive: ArchiveRoot, rid: str, doc: InstanceDoc, path: str) -> Format | None:
    """The format of file `path` of an instance: from the record of the instance that stores its bytes;
    None while that instance is pending (or the path is not a file)."""
    entry = doc.state.files.get(path)
    if entry is None:
        return None
    stored = doc.stored.get(entry.digest, "")
    parts = stored.split("/")
    if len(parts) < 2 or parts[0] != "instances":
        return None
    formats = identified_formats(archive, rid, parts[1])
    return formats.get(entry.digest) if formats is not None else None


def wants_identification(archive: ArchiveRoot) -> bool:
    """After each commit: on a local store. On an object store it would download every new object again
    right after its upload; `tinyfs formats ROOT --identify` does it there (through the read cache)."""
    return archive.config.identify and archive.store.local


def pending(archive: ArchiveRoot, rids: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(rid, iid) of every instance that stores files and has no record yet."""
    out = []
    for rid in rids if rids is not None else archive.resource_ids():
        done = {p.stem for p in records_dir(archive, rid).glob("*.json")}
        for iid in archive.instance_ids(rid):
            if iid not in done and archive.instance(rid, iid).payload():
                out.append((rid, iid))
    return out


def identify_instance(archive: ArchiveRoot, rid: str, iid: str, workers: Workers | None = None,
                      here: int = IN_PROCESS) -> dict:
    """Identify the files instance `iid` stores and write its record (kept if one exists already); up to
    `here` files in this process, more on the worker processes when there are some."""
    existing = read_record(archive, rid, iid)
    if existing is not None:
        return existing
    doc = archive.instance(rid, iid)
    items = sorted({digest: stored for stored, (digest, _size, _path) in doc.payload().items()}.items())
    paths = [(digest, str(archive.stored_path(rid, stored))) for digest, stored in items]
    found = identify_paths(paths, workers, here)
    record = {**signature_versions(), "identified": utc_now(),
              "files": {digest: asdict(fmt) for digest, fmt in found.items()}}
    _write_record(archive, rid, iid, record)
    counts = Counter(f.basis for f in found.values())
    archive.events.append("formats.identified", rid, iid, files=len(found), tool=record["tool"],
                          signatures=record["signatures"], unknown=counts["none"])
    return record


def _write_record(archive: ArchiveRoot, rid: str, iid: str, record: dict) -> None:
    folder = records_dir(archive, rid)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{iid}.{os.getpid()}.{threading.get_ident()}.tmp"
    write_new(tmp, (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, folder / f"{iid}.json")      # whole or absent: a reader never sees half a record


# -- identifying -----------------------------------------------------------------------------------------

def identify_paths(paths: list[tuple[str, str]], workers: Workers | None = None,
                   here: int = IN_PROCESS) -> dict[str, Format]:
    """digest -> Format for each (digest, file path); up to `here` files in this process, more on `workers`."""
    if len(paths) <= here or workers is None:
        return dict(_identify_batch(paths))
    return workers.identify(paths)


class WorkersGone(RuntimeError):
    """A worker process ended (or was ended) before it answered."""


class Workers:
    """Worker processes, one a core, at low priority, that identify files: each reads batches of
    [digest, path] as JSON lines on its stdin and answers each with a JSON line.

    Plain subprocesses rather than multiprocessing: a worker whose daemon is killed, or which is ended while
    it starts, sees its stdin close and exits without a word (multiprocessing's spawned children printed
    tracebacks into the daemon's log), and nothing else is left behind (no resource tracker, no semaphores).
    Workers are not shared between threads."""

    def __init__(self, count: int | None = None):
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(count or os.cpu_count() or 2):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", "from tinyfs.core.formats import worker_main; worker_main()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True, encoding="utf-8"))
        except BaseException:
            self.terminate()
            raise

    def identify(self, paths: list[tuple[str, str]]) -> dict[str, Format]:
        """Every file's format, the batches spread over the workers (a thread drives each)."""
        batches: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(0, len(paths), BATCH):
            batches.put(paths[i:i + BATCH])
        found: dict[str, Format] = {}
        failures: list[BaseException] = []

        def drive(proc: subprocess.Popen) -> None:
            try:
                while not failures:
                    try:
                        batch = batches.get_nowait()
                    except queue.Empty:
                        return
                    found.update(self._ask(proc, batch))
            except BaseException as e:       # (to the caller, below)
                failures.append(e)

        threads = [threading.Thread(target=drive, args=(proc,), daemon=True) for proc in self.procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return found

    @staticmethod
    def _ask(proc: subprocess.Popen, batch: list[tuple[str, str]]) -> dict[str, Format]:
        try:
            proc.stdin.write(json.dumps(batch) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (OSError, ValueError) as e:
            raise WorkersGone(f"a format identification worker ended: {e}") from None
        if not line:
            raise WorkersGone(f"a format identification worker ended (exit status {proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"format identification failed: {reply['error']}")
        return {digest: Format(**fields) for digest, fields in reply["found"]}

    def terminate(self) -> None:
        """End the workers at once (a job being answered fails with WorkersGone)."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs:
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


def worker_main() -> None:
    """A worker process (Workers): batches in on stdin, answers out on what was stdout. Anything else that
    writes to stdout (a library's print) goes to stderr instead, so that it cannot garble an answer."""
    with contextlib.suppress(OSError):
        os.nice(NICE)
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            reply = {"found": [[digest, asdict(fmt)] for digest, fmt in _identify_batch(json.loads(line))]}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


_fido = threading.local()


def _identifier():
    """This thread's FIDO matcher (a Fido object keeps per-file state: one per thread), with the signature
    files its own versions.xml names (the library's defaults name files the package does not ship)."""
    matcher = getattr(_fido, "matcher", None)
    if matcher is None:
        from fido import fido as fido_module
        from fido.versions import get_local_versions

        versions = get_local_versions()
        fido_module.defaults["containersignature_file"] = versions.pronom_container_signature
        results: list = []
        matcher = fido_module.Fido(quiet=True, handle_matches=lambda _name, matches, _t, kind="": results.append(
            (matches, kind)), format_files=[versions.pronom_signature, versions.fido_extension_signature])
        matcher.results = results
        _fido.matcher = matcher
    return matcher


def _identify_batch(paths: list[tuple[str, str]]) -> list[tuple[str, Format]]:
    return [(digest, identify_file(path)) for digest, path in paths]


def identify_file(path: str) -> Format:
    """FIDO's best match for one file (its first, as FIDO orders them), or basis 'none'."""
    if os.path.getsize(path) == 0:
        return Format(None, None, None, "empty")
    matcher = _identifier()
    matcher.results.clear()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):   # FIDO prints its own warnings
        matcher.identify_file(path, extension=True)
    if not matcher.results or not matcher.results[0][0]:
        return Format(None, None, None, "none")
    matches, kind = matcher.results[0]
    elements = [element for element, _signature in matches]
    if kind == "extension" and len(elements) > 1:
        # a name's extension alone names several formats (.pdf: every PDF version and PDF/A): no PUID,
        # and the MIME type only when they agree
        mimes = {_text(e, "mime") for e in elements}
        return Format(None, mimes.pop() if len(mimes) == 1 else None, None, "extension")
    element = elements[0]
    return Format(_text(element, "puid"), _text(element, "mime"), _text(element, "name"), kind or "signature")


def _text(element, tag: str) -> str | None:
    found = element.find(tag)
    return found.text if found is not None and found.text else None


@functools.lru_cache(maxsize=1)
def signature_versions() -> dict[str, str]:
    """The identifier's version and its signature files' (FIDO's conf/versions.xml, which its
    get_local_versions reads too), without importing FIDO: its package pulls in an HTTP client, some
    8 MiB a daemon that never identifies a file itself would keep for good."""
    spec = importlib.util.find_spec("fido")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("format identification needs FIDO (the opf-fido package), which is not installed")
    conf = ElementTree.parse(Path(spec.submodule_search_locations[0]) / "conf" / "versions.xml").getroot()
    container = conf.findtext("pronomContainerSignature", "").removeprefix("container-signature-").removesuffix(".xml")
    return {"tool": f"fido {importlib.metadata.version('opf-fido')}",
            "signatures": f"PRONOM v{conf.findtext('pronomVersion')}, container {container}"}


# -- in the background -------------------------------------------------------------------------------------

class Identifier:
    """Identifies committed instances in a thread of its own, on worker processes started when there is
    work and ended when idle: the mount and the server hand it each commit (`submit`) and answer the
    client at once. `close` stops it; what was not identified stays pending.

    Every file is identified by the workers, none in the daemon: FIDO's signatures would add some 30 MiB to
    the daemon for good, and its pure-Python matching would hold the GIL from the mount's trio loop."""

    def __init__(self, archive: ArchiveRoot):
        self.archive = archive
        self.jobs: queue.Queue = queue.Queue()
        self.workers: Workers | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tinyfs-identify", daemon=True)
        self.thread.start()

    def submit(self, rid: str, iid: str) -> None:
        self.jobs.put((rid, iid))

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted instance is identified (tests, a clean stop); False on timeout."""
        done = threading.Event()
        self.jobs.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Stop at once: an instance being identified stays pending (its record is written whole or not
        at all), so that an unmount or a server stop does not wait for a long identification."""
        self.stopping = True
        workers = self.workers
        if workers is not None:
            workers.terminate()
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def _next_job(self):
        """The next job; workers left without work for WORKERS_IDLE seconds are ended meanwhile, so that an
        idle mount or server holds no processes, memory or descriptors for them."""
        if self.workers is not None:
            try:
                return self.jobs.get(timeout=WORKERS_IDLE)
            except queue.Empty:
                self._end_workers()
        return self.jobs.get()

    def _end_workers(self) -> None:
        if self.workers is not None:
            self.workers.terminate()
            self.workers = None

    def _run(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                if isinstance(job, threading.Event):
                    job.set()
                elif not self.stopping:
                    self._identify(*job)
        finally:
            self._end_workers()

    def _identify(self, rid: str, iid: str) -> None:
        try:
            if self.workers is None:
                self.workers = Workers()
                if self.stopping:              # (close() ran while they started: it did not see them)
                    return
            identify_instance(self.archive, rid, iid, self.workers, here=0)
        except Exception as e:   # never the thread's end: the instance stays pending, `formats --identify`
            if not _exists(self.archive, rid, iid):
                log.info("formats of %s %s not identified: the instance is gone (dynamic mode)", rid, iid)
            elif self.stopping:
                log.info("formats of %s %s not identified (stopping): %s", rid, iid, e)
            else:
                log.exception("identifying the formats of %s %s", rid, iid)


def _exists(archive: ArchiveRoot, rid: str, iid: str) -> bool:
    """(A dynamic-mode commit deletes the instance before; a purge the resource.)"""
    try:
        return iid in archive.instance_ids(rid)
    except Exception:
        return False


def start_identifier(archive: ArchiveRoot) -> Identifier | None:
    """The mount's or the server's background identifier (None when the archive does not identify)."""
    if wants_identification(archive):
        archive.identifier = Identifier(archive)
    return archive.identifier


def stop_identifier(archive: ArchiveRoot) -> None:
    if archive.identifier is not None:
        archive.identifier.close()
        archive.identifier = None


def after_commit(archive: ArchiveRoot, rid: str, iid: str | None) -> None:
    """What a commit's caller does once the instance is published: hand it to the process's identifier."""
    identifier = getattr(archive, "identifier", None)
    if iid is not None and identifier is not None and wants_identification(archive):
        identifier.submit(rid, iid)


def summary(archive: ArchiveRoot, rids: Iterable[str] | None = None) -> dict:
    """Files of every current state by format, and what is pending: {"formats": [(count, format)],
    "pending": [(rid, iid)]} (nothing is pending in an archive made with --no-identify)."""
    rids = list(rids) if rids is not None else archive.resource_ids()
    counts: Counter = Counter()
    for rid in rids:
        head = archive.head(rid)
        if head is None:
            continue
        doc = archive.instance(rid, head)
        for path in doc.state.files:
            fmt = format_of(archive, rid, doc, path)
            counts[fmt if fmt is not None else None] += 1
    return {"formats": counts.most_common(),
            "pending": pending(archive, rids) if archive.config.identify else []}
