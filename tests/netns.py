"""Hosts for the tests as network namespaces on one bridge (iproute2's `ip`; root only).

`Network.create(n)` makes a bridge with an address in the root namespace (where a store such as
tests/seaweed.py's may listen) and n namespaces ("hosts"), each joined to the bridge by a veth pair and
given its own address on the bridge's /24, and its own loopback: a host reaches the store only over its
veth, never by 127.0.0.1. `Host.run(...)` and `Host.wrap()` run a command in a host with `ip netns exec`.

`ip netns exec` also gives the command a mount namespace of its own (so that /sys is the namespace's);
a `tinyfs mount` started there would be visible to that process alone. `Host.wrap(mounts_visible=True)`
puts the command back into the test process's mount namespace (nsenter) after joining the network
namespace: the FUSE mount is then seen (and unmounted with fusermount3) at its path, while every request
the daemon makes to the store leaves through the host's veth.

`close()` deletes the veth pairs, the namespaces and the bridge, and checks that none is left; it runs even when creating failed halfway, and is idempotent. Names carry a random tag, so
concurrent runs do not meet.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not shutil.which("ip") or not shutil.which("nsenter"):
        return "iproute2's `ip` or util-linux's `nsenter` is missing"
    probe = f"tfs-probe-{secrets.token_hex(4)}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.240.0.0/12 that no interface of the root namespace is on."""
    used = [ipaddress.ip_interface(word).network for line in ip("-4", "-o", "addr").stdout.splitlines()
            for word in line.split()[3:4]]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(240, 254)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.240.0.0/12 subnet for the test bridge")


@dataclass
class Host:
    name: str     # the network namespace
    address: str

    def wrap(self, mounts_visible: bool = False) -> list[str]:
        """argv prefix that runs a command in this host (and, with mounts_visible, in our mount namespace)."""
        argv = ["ip", "netns", "exec", self.name]
        if mounts_visible:
            argv += ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--"]
        return argv

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        return subprocess.run([*self.wrap(mounts_visible=True), *argv], check=False, **kw)


@dataclass
class Network:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    hosts: list[Host] = field(default_factory=list)
    bridge_up: bool = False

    @property
    def bridge(self) -> str:
        return f"tfs{self.tag}b"        # interface names: at most 15 characters

    def veth(self, i: int) -> str:
        """The root namespace's end of host i's veth pair (the other end is eth0 in the host)."""
        return f"tfs{self.tag}v{i}"

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace: where a store for the hosts listens."""
        return str(self.subnet.network_address + 1)

    @classmethod
    def create(cls, n: int) -> Network:
        net = cls()
        try:
            net.subnet = free_subnet()
            ip("link", "add", net.bridge, "type", "bridge")
            net.bridge_up = True
            ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
            ip("link", "set", net.bridge, "up")
            for i in range(n):
                net.add_host(i)
        except BaseException:
            net.close()
            raise
        return net

    def add_host(self, i: int) -> Host:
        host = Host(f"tfs-{self.tag}-{i}", str(self.subnet.network_address + 2 + i))
        outside = self.veth(i)
        ip("netns", "add", host.name)
        self.hosts.append(host)
        ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Delete every namespace (and so its veth pair) and the bridge; check nothing of ours is left."""
        for i, host in enumerate(self.hosts):
            # the pair first: a namespace's devices go with it only later, in the kernel's own time
            ip("link", "del", self.veth(i), check=False)
            ip("netns", "del", host.name, check=False)
        self.hosts = []
        if self.bridge_up:
            ip("link", "del", self.bridge, check=False)
            self.bridge_up = False
        left = [line for line in ip("-o", "link").stdout.splitlines() if f"tfs{self.tag}" in line]
        left += [name for name in ip("netns", "list").stdout.split() if name.startswith(f"tfs-{self.tag}-")]
        assert not left, f"left after teardown: {left}"

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
