"""A SeaweedFS cluster for the tests: one master (replication 001), three volume servers in one rack,
a filer and an S3 gateway, each its own `weed` process (and process group) on loopback ports.

Replication `001` keeps every volume on two servers of the same rack, so with three servers the
cluster survives one of them: `kill_volume(i)` SIGKILLs one (as a power cut would), `start_volume(i)`
brings it back on its old directory and ports. `volume_status(i)` is that server's own /status (its
volumes and their file counts); `master_topology()` the master's /dir/status.

Every process is started with PR_SET_PDEATHSIG (a test process killed outright takes the cluster with
it) and `stop()` SIGKILLs every group that is left (the data is scratch) and removes the gRPC unix
sockets `weed` puts into /tmp by port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from seaweed import READY_TIMEOUT, Seaweed, die_with_parent, free_ports, weed_binary

VOLUMES = 3
RACK = "rack1"


def http_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


@dataclass
class Cluster(Seaweed):
    """`ports`: master, master gRPC, 3 × (volume, volume gRPC), filer, filer gRPC, s3, s3 gRPC.
    The S3 identity, `raw()`, `make_bucket()` and `wait_ready()` are Seaweed's."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[10]}"

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.ports[0]}.{self.ports[1]}"   # host:port.grpcPort, as weed writes it

    def volume_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[2 + 2 * i]}"

    def commands(self) -> dict[str, list[str]]:
        """name -> argv of every process of the cluster."""
        p, base, weed = self.ports, self.base, weed_binary()
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        cmds = {"master": [weed, f"-logdir={base / 'logs'}", "master", *common, f"-port={p[0]}",
                           f"-port.grpc={p[1]}", f"-mdir={base / 'master'}", "-defaultReplication=001",
                           "-volumeSizeLimitMB=32", "-telemetry=false"]}
        for i in range(VOLUMES):
            cmds[f"volume{i}"] = [weed, f"-logdir={base / 'logs'}", "volume", *common,
                                  f"-port={p[2 + 2 * i]}", f"-port.grpc={p[3 + 2 * i]}",
                                  f"-dir={base / f'volume{i}'}", "-max=500", f"-master={self.master}",
                                  f"-rack={RACK}", "-dataCenter=dc1", "-preStopSeconds=0"]
        cmds["filer"] = [weed, f"-logdir={base / 'logs'}", "filer", *common, f"-port={p[8]}",
                         f"-port.grpc={p[9]}", f"-master={self.master}",
                         f"-defaultStoreDir={base / 'filer'}", f"-localSocket={base / 'filer.sock'}"]
        cmds["s3"] = [weed, f"-logdir={base / 'logs'}", "s3", "-ip.bind=127.0.0.1", f"-port={p[10]}",
                      f"-port.grpc={p[11]}", f"-filer=127.0.0.1:{p[8]}.{p[9]}", f"-config={base / 's3.json'}",
                      f"-localSocket={base / 's3.sock'}", "-port.iceberg=0", "-port.lance=0",
                      "-autoCreateBucket=false"]
        return cmds

    def start(self, *extra: str) -> Cluster:
        for d in ("logs", "master", "filer", *(f"volume{i}" for i in range(VOLUMES))):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.write_identity()
        started = time.monotonic()
        try:
            for name in self.commands():
                self.launch(name)
            self.wait_ready()
            self.wait_volumes(VOLUMES)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def write_identity(self) -> None:
        identity = {"name": "tinyfs-test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        (self.base / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def launch(self, name: str) -> None:
        with open(self.base / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.commands()[name], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)
        self.proc = self.procs["master"]       # what Seaweed.wait_ready watches

    def wait_volumes(self, n: int) -> None:
        """Until the master knows n volume servers."""
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.data_nodes()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the master knows {len(self.data_nodes())} volume servers, not {n}")
            time.sleep(0.1)

    # -- the volume servers ---------------------------------------------------------------------------
    def kill_volume(self, i: int) -> None:
        proc = self.procs[f"volume{i}"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def start_volume(self, i: int) -> None:
        self.launch(f"volume{i}")
        deadline = time.monotonic() + READY_TIMEOUT
        while self.volume_url(i).removeprefix("http://") not in self.data_nodes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"volume{i} did not join the master again")
            time.sleep(0.1)

    def volume_status(self, i: int) -> dict:
        """The volume server's /status: {"Volumes": [{"Id", "FileCount", "Size", ...}, ...], ...}."""
        return http_json(f"{self.volume_url(i)}/status")

    def file_count(self, i: int) -> int:
        """Files written to volume server i, over all its volumes (replicas included)."""
        return sum(v.get("FileCount", 0) for v in self.volume_status(i).get("Volumes") or [])

    def master_topology(self) -> dict:
        return http_json(f"http://127.0.0.1:{self.ports[0]}/dir/status")

    def data_nodes(self) -> list[str]:
        """host:port of every volume server the master counts as alive."""
        try:
            topo = self.master_topology()["Topology"]
        except OSError:
            return []
        return [node["Url"] for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []
                for node in rack.get("DataNodes") or []]

    # -- stop ------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return any(proc.poll() is None for proc in self.procs.values())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        assert not self.alive(), "a weed process of the cluster is still running after stop"


def start_cluster(base: Path, tries: int = 3) -> Cluster:
    """A started cluster; new ports on a retry, in case another process took one in between."""
    for attempt in range(1, tries + 1):
        cluster = Cluster(base / f"try{attempt}", free_ports(12))
        try:
            return cluster.start()
        except RuntimeError:
            cluster.stop()
            if attempt == tries:
                raise
    raise AssertionError("unreachable")
