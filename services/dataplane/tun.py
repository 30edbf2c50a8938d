"""TUN device (Linux IFF_TUN | IFF_NO_PI) and wg-quick style policy routing with pyroute2.

Routing, for fwmark M and table T (defaults 0x1 and 100):

* every ``--route`` prefix goes into table T via the TUN, with ``src`` set to the first
  ``--local-address`` of the same family (so transport-mode packets carry the outer address);
* rules ``not fwmark M lookup T`` (priority 1000) for IPv4 and IPv6;
* every socket the worker sends from carries SO_MARK = M, so the worker's own ESP/AH/UDP skips
  table T and leaves through the main table — even when the protected destination is the
  directly connected peer (transport mode).

rp_filter is disabled on the TUN (decrypted packets arrive on it from remote sources). Note
that the kernel uses max(conf/all, conf/<tun>) for rp_filter, so a strict ``all`` setting still
applies; with the rules above strict mode passes for sources covered by ``--route``.

Teardown removes the rules and routes and closes the TUN (a non-persistent TUN disappears with
its last fd). It is idempotent: missing objects are ignored; setup first removes rules left
behind by a crashed run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.dataplane.settings import Settings

log = logging.getLogger("services.dataplane.tun")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
FIB_RULE_INVERT = 0x2
MAX_PACKET = 65535

_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}


class TunDevice:
    """An open TUN fd (non-blocking). Closing the fd deletes a non-persistent device."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name

    @classmethod
    def open(cls, name: str) -> TunDevice:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        real = res[:16].rstrip(b"\0").decode()
        log.info("tun opened", extra={"tun": real})
        return cls(fd, real)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes | None:
        try:
            return os.read(self._fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, pkt: bytes) -> None:
        os.write(self._fd, pkt)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            log.info("tun closed", extra={"tun": self.name})


@dataclass
class RoutingPlan:
    tun: str
    mtu: int
    addresses: list[str] = field(default_factory=list)  # CIDR, on the TUN
    routes: list[str] = field(default_factory=list)  # CIDR, into table via the TUN
    local_addresses: list[str] = field(default_factory=list)
    fwmark: int = 1
    table: int = 100
    priority: int = 1000

    @classmethod
    def from_settings(cls, s: Settings, tun_name: str) -> RoutingPlan:
        return cls(
            tun_name,
            s.tun_mtu,
            list(s.tun_address),
            list(s.route),
            list(s.local_address),
            s.fwmark,
            s.table,
            s.rule_priority,
        )

    def prefsrc(self, version: int) -> str | None:
        for a in self.local_addresses:
            if ipaddress.ip_address(a).version == version:
                return a
        return None


class Routing:
    """Apply a RoutingPlan with pyroute2 and undo it."""

    def __init__(self, plan: RoutingPlan) -> None:
        self.plan = plan
        self._routes: list[dict[str, object]] = []

    def _rule_args(self, family: int) -> dict[str, object]:
        p = self.plan
        return {
            "family": family,
            "table": p.table,
            "priority": p.priority,
            "fwmark": p.fwmark,
            "fwmask": 0xFFFFFFFF,
            "flags": FIB_RULE_INVERT,
        }

    def setup(self) -> None:
        p = self.plan
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=p.tun)
            if not links:
                raise RuntimeError(f"interface {p.tun} not found")
            idx = links[0]
            ipr.link("set", index=idx, mtu=p.mtu)
            for cidr in p.addresses:
                iface = ipaddress.ip_interface(cidr)
                try:
                    ipr.addr(
                        "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
                    )
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            _quiet_ipv6(p.tun)
            ipr.link("set", index=idx, state="up")
            _disable_rp_filter(p.tun)
            for cidr in p.routes:
                net = ipaddress.ip_network(cidr, strict=False)
                args: dict[str, object] = {
                    "dst": str(net),
                    "oif": idx,
                    "table": p.table,
                    "family": _family(net.version),
                }
                src = p.prefsrc(net.version)
                if src is not None:
                    args["prefsrc"] = src
                try:
                    ipr.route("replace", **args)
                except NetlinkError as e:
                    log.error(
                        "route failed",
                        extra={"route": str(net), "src": src, "table": p.table, "errno": e.code},
                    )
                    raise
                self._routes.append(args)
            for fam in (socket.AF_INET, socket.AF_INET6):
                self._delete_rules(ipr, fam)
                try:
                    ipr.rule("add", **self._rule_args(fam))
                except NetlinkError as e:
                    if fam == socket.AF_INET6 and e.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                        log.warning("IPv6 policy routing unavailable")
                        continue
                    raise
        log.info(
            "routing set up",
            extra={"tun": p.tun, "table": p.table, "fwmark": p.fwmark, "routes": p.routes},
        )

    def _delete_rules(self, ipr: IPRoute, family: int) -> int:
        n = 0
        for _ in range(64):  # leftovers from crashed runs; bounded
            try:
                ipr.rule("del", **self._rule_args(family))
            except NetlinkError as e:
                if e.code in _GONE or e.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                    break
                raise
            n += 1
        return n

    def teardown(self) -> None:
        """Remove rules and routes; safe to call more than once and after partial setup."""
        p = self.plan
        with IPRoute() as ipr:
            for fam in (socket.AF_INET, socket.AF_INET6):
                try:
                    self._delete_rules(ipr, fam)
                except NetlinkError as e:
                    log.warning("rule removal failed", extra={"errno": e.code})
            for args in self._routes:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", **args)
            self._routes.clear()
        log.info("routing removed", extra={"tun": p.tun, "table": p.table})


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _quiet_ipv6(ifname: str) -> None:
    """The TUN is not a link: no automatic link-local address, router solicitations or router
    advertisements, so the host does not send its own IPv6 control traffic into the worker."""
    for name, value in (("addr_gen_mode", "1"), ("router_solicitations", "0"), ("accept_ra", "0")):
        path = f"/proc/sys/net/ipv6/conf/{ifname}/{name}"
        try:
            with open(path, "w") as f:
                f.write(value + "\n")
        except OSError as e:
            log.warning(
                "cannot set ipv6 sysctl", extra={"tun": ifname, "name": name, "errno": e.errno}
            )


def _disable_rp_filter(ifname: str) -> None:
    path = f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter"
    try:
        with open(path, "w") as f:
            f.write("0\n")
    except OSError as e:
        log.warning("cannot disable rp_filter", extra={"tun": ifname, "errno": e.errno})
