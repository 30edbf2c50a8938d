"""Inbound clear-traffic filter: RFC 4301 §5.2 (inbound processing: an unprotected packet is
checked against the SPD, and one that the SPD says must be protected, or discarded, is dropped)
and §4.4.1 (ordered SPD, first match), enforced with nftables for the packets the worker never
sees.

The worker only receives ESP/AH (raw sockets, UDP 4500) and what the kernel routes into its
TUN; a clear packet *from* a remote site prefix (a ``--route`` prefix) to a local host is
forwarded by the kernel without passing the worker. This module turns the worker's enforced
SPD (the merged keymgr + policy layers, :mod:`services.core.engine`) into one nftables ruleset
(:func:`ruleset`, a pure function) that the worker loads with ``nft -f -`` (one transaction per
change, :class:`NftRunner`).

The table ``inet ipsec_<worker id>`` has a base chain on ``prerouting`` (priority raw, before
connection tracking) that

1. accepts packets arriving on the worker's TUN (already checked against their SA by the
   engine) and on ``lo``;
2. accepts packets whose source is not in a routed prefix (not the worker's business);
3. accepts ESP (50), AH (51) and UDP to ports 500 / 4500 addressed to the worker's local
   addresses (any local address of the host when none are configured), and IPv6 neighbour
   discovery (ICMPv6 133-136, RFC 4861; without it the peer's outer IPv6 address could not be
   resolved when it lies in a routed prefix) — counter ``exempt``;
4. jumps to chain ``spd``: one rule per SPD entry, in SPD order. Entries of the *keymgr
   layer* are outbound entries (local → remote, RFC 4301 SPD-O), so they are *mirrored*: the
   packet's source is matched against the entry's destination, its destination against the
   entry's source, its source port against the entry's destination ports and the other way
   round (ICMP type / code are not swapped). Entries of the *policy layer* are already in
   packet terms for both directions (policyd compiles a mirrored filter into the filter and
   its mirror, and a filter with ``mirrored: false`` must not admit the reverse traffic;
   docs/policyd.md, "Compilation"), so they are matched as they are:

   ============================= ========= =========
   entry                          verdict   counter
   ============================= ========= =========
   BYPASS (permit)                accept    bypass
   DISCARD (block)                drop      discard
   PROTECT + accept_clear         accept    request
   PROTECT (require security)     drop      require
   no entry matches               drop      nomatch
   ============================= ========= =========

Cost: the ``spd`` chain is linear, one rule per entry (two for an any-protocol entry with
port ranges), evaluated only for clear packets from routed prefixes; first-match order with
overlapping prefixes and port ranges does not map onto one nftables verdict map without
splitting the entries, so a large SPD costs the kernel a scan of up to that many rules per
such packet (ESP/AH and everything from non-routed sources leave before the scan). The
counters are named objects that survive a reload of the rules (the chains are flushed and
refilled in the same transaction).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.core.engine import POLICY_ID_BASE
from services.core.selectors import Prefix
from services.core.spd import Action, SpdEntry

log = logging.getLogger("services.dataplane.nftfilter")

DECISIONS = ("bypass", "discard", "request", "require", "nomatch", "exempt")
PORT_PROTOS = (6, 17, 132)  # the protocols whose ports the SPD matches (flow_key)
ICMP_PROTOS = (1, 58)  # type / code stand in for the ports
NFT = "nft"
NFT_TIMEOUT = 30.0
_NAME_RE = re.compile(r"[^A-Za-z0-9_]")


def table_name(worker_id: str) -> str:
    """``ipsec_<worker id>`` with characters nft does not take in a name replaced by ``_``;
    a short digest of the id is added when anything was replaced or cut, so two ids never
    share a table."""
    clean = _NAME_RE.sub("_", worker_id)
    if clean != worker_id or len(clean) > 48:
        clean = f"{clean[:48]}_{hashlib.sha256(worker_id.encode()).hexdigest()[:8]}"
    return f"ipsec_{clean}"


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """What the ruleset needs besides the SPD."""

    table: str
    tun: str
    routes: tuple[str, ...]  # CIDR prefixes whose traffic the worker protects
    local_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.table or _NAME_RE.search(self.table):
            raise ValueError(f"nft table name {self.table!r} must be letters, digits and _")
        if not self.tun or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", self.tun):
            raise ValueError(f"interface name {self.tun!r} is not a valid interface name")
        for r in self.routes:
            ipaddress.ip_network(r, strict=False)
        for a in self.local_addresses:
            ipaddress.ip_address(a)


def _family(version: int) -> tuple[str, str]:
    """(nft address keyword, nfproto) of an IP version."""
    return ("ip", "ipv4") if version == 4 else ("ip6", "ipv6")


def _prefix(p: Prefix) -> str:
    return str(p) if p.length else ""


def _range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _full(lo: int, hi: int, top: int = 0xFFFF) -> bool:
    return lo <= 0 and hi >= top


def _verdict(e: SpdEntry) -> str:
    if e.action is Action.BYPASS:
        return 'counter name "bypass" accept'
    if e.action is Action.DISCARD:
        return 'counter name "discard" drop'
    if e.accept_clear:
        return 'counter name "request" accept'
    return 'counter name "require" drop'


def entry_rules(e: SpdEntry, *, mirror: bool = True) -> list[str]:
    """The nft rules of one SPD entry for inbound packets, mirrored or as it is (see the
    module docstring); empty for an entry that can never match a packet."""
    sel = e.selector
    if sel.src.version != sel.dst.version or sel.src.version not in (4, 6):
        return []
    kw, nfproto = _family(sel.src.version)
    base = [f"meta nfproto {nfproto}"]
    # mirrored: the inbound packet comes from the entry's destination to its source, from
    # the entry's destination ports to its source ports
    src_p, dst_p = (sel.dst, sel.src) if mirror else (sel.src, sel.dst)
    sports = (sel.dport_lo, sel.dport_hi) if mirror else (sel.sport_lo, sel.sport_hi)
    dports = (sel.sport_lo, sel.sport_hi) if mirror else (sel.dport_lo, sel.dport_hi)
    if src := _prefix(src_p):
        base.append(f"{kw} saddr {src}")
    if dst := _prefix(dst_p):
        base.append(f"{kw} daddr {dst}")
    verdict = _verdict(e)
    ports_full = _full(*sports) and _full(*dports)
    port_match = []
    if not _full(*sports):
        port_match.append(f"th sport {_range(*sports)}")
    if not _full(*dports):
        port_match.append(f"th dport {_range(*dports)}")
    proto = sel.proto
    if proto:
        rule = [*base, f"meta l4proto {proto}"]
        if proto in PORT_PROTOS:
            rule += port_match
        elif proto in ICMP_PROTOS:
            # type / code: not direction-dependent, so not swapped
            if not _full(sel.sport_lo, sel.sport_hi, 0xFF):
                rule.append(f"@th,0,8 {_range(sel.sport_lo, min(sel.sport_hi, 0xFF))}")
            if not _full(sel.dport_lo, sel.dport_hi, 0xFF):
                rule.append(f"@th,8,8 {_range(sel.dport_lo, min(sel.dport_hi, 0xFF))}")
            if sel.sport_lo > 0xFF or sel.dport_lo > 0xFF:
                return []
        elif not (sel.sport_lo == 0 == sel.dport_lo):
            return []  # the SPD sees ports 0 for these protocols
        return [" ".join([*rule, verdict])]
    if ports_full:
        return [" ".join([*base, verdict])]
    # any protocol with port ranges: TCP/UDP/SCTP by port; other protocols have ports 0
    # (ICMP's type / code are not matched here: such entries are rare and not mirrored)
    rules = [" ".join([*base, "meta l4proto { 6, 17, 132 }", *port_match, verdict])]
    if sel.sport_lo == 0 == sel.dport_lo:
        rules.append(" ".join([*base, "meta l4proto != { 1, 6, 17, 58, 132 }", verdict]))
    return rules


def _exemptions(cfg: FilterConfig) -> list[str]:
    rules: list[str] = []
    locals_by_version: dict[int, list[str]] = {4: [], 6: []}
    for a in cfg.local_addresses:
        ip = ipaddress.ip_address(a)
        locals_by_version[ip.version].append(str(ip))
    if cfg.local_addresses:
        targets = [
            f"{_family(v)[0]} daddr {{ {', '.join(addrs)} }}"
            for v, addrs in locals_by_version.items()
            if addrs
        ]
    else:
        targets = ["fib daddr type local"]
    for t in targets:
        rules.append(f'{t} meta l4proto {{ 50, 51 }} counter name "exempt" accept')
        rules.append(f'{t} udp dport {{ 500, 4500 }} counter name "exempt" accept')
    rules.append('icmpv6 type { 133, 134, 135, 136 } counter name "exempt" accept')
    return rules


def ruleset(entries: Iterable[SpdEntry], cfg: FilterConfig) -> str:
    """The nft script (for ``nft -f -``) that installs or replaces the filter for ``entries``
    (the enforced SPD in order: keymgr layer entries mirrored, policy layer entries, whose
    ``policy_id`` is at least ``POLICY_ID_BASE``, as they are) in one transaction."""
    routes: dict[int, list[str]] = {4: [], 6: []}
    for r in cfg.routes:
        net = ipaddress.ip_network(r, strict=False)
        routes[net.version].append(str(net))
    t = cfg.table
    lines = [
        f"table inet {t} {{",
        *(f"\tcounter {d} {{ }}" for d in DECISIONS),
        "\tchain inbound { type filter hook prerouting priority raw; policy accept; }",
        "\tchain spd { }",
        "}",
        f"flush chain inet {t} inbound",
        f"flush chain inet {t} spd",
        f"table inet {t} {{",
        "\tchain inbound {",
        f'\t\tiifname {{ "{cfg.tun}", "lo" }} accept',
    ]
    for v in (4, 6):
        kw, nfproto = _family(v)
        if routes[v]:
            lines.append(
                f"\t\tmeta nfproto {nfproto} {kw} saddr != {{ {', '.join(routes[v])} }} accept"
            )
        else:
            lines.append(f"\t\tmeta nfproto {nfproto} accept")
    lines += [f"\t\t{r}" for r in _exemptions(cfg)]
    lines += ["\t\tjump spd", "\t}", "\tchain spd {"]
    for e in entries:
        lines += [f"\t\t{r}" for r in entry_rules(e, mirror=e.policy_id < POLICY_ID_BASE)]
    lines += ['\t\tcounter name "nomatch" drop', "\t}", "}"]
    return "\n".join(lines) + "\n"


def delete_script(table: str) -> str:
    """Remove the table whether or not it exists (one transaction)."""
    return f"table inet {table}\ndelete table inet {table}\n"


def parse_counters(text: str) -> dict[str, int]:
    """Packet counts by decision from ``nft -j list counters table inet T`` (hostile input:
    anything unexpected is skipped)."""
    out: dict[str, int] = {}
    try:
        doc = json.loads(text)
    except ValueError:
        return out
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return out
    for item in items:
        c = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(c, dict):
            continue
        name, packets = c.get("name"), c.get("packets")
        if name in DECISIONS and isinstance(packets, int) and packets >= 0:
            out[name] = packets
    return out


class NftError(RuntimeError):
    """nft refused a script or could not be run (the message holds nft's answer: rules and
    addresses, never secrets)."""

    log_safe = True


class NftRunner:
    """The shell around :func:`ruleset`: runs ``nft`` (needs CAP_NET_ADMIN)."""

    def __init__(self, table: str, nft: str = NFT) -> None:
        self.table = table
        self.nft = nft

    def _run(self, args: Sequence[str], script: str | None = None) -> str:
        try:
            p = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [self.nft, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftError(f"cannot run {self.nft}: {e}; is nftables installed?") from None
        if p.returncode != 0:
            raise NftError(f"nft {' '.join(args)} failed: {p.stderr.strip()[:500]}")
        return p.stdout

    def apply(self, script: str) -> None:
        self._run(["-f", "-"], script)

    def remove(self) -> None:
        self._run(["-f", "-"], delete_script(self.table))

    def counters(self) -> dict[str, int]:
        return parse_counters(self._run(["-j", "list", "counters", "table", "inet", self.table]))


class Runner(Protocol):
    def apply(self, script: str) -> None: ...

    def remove(self) -> None: ...

    def counters(self) -> dict[str, int]: ...


class FilterSync:
    """Keeps the nftables filter equal to the enforced SPD: :meth:`sync` regenerates and loads
    the ruleset when the SPD tuple changed (the engine makes a new one on every replace), and
    publishes the counters. A background thread calls it every ``interval`` seconds, so bursts
    of SPD changes cost one reload per interval (debounce). A failed load is logged and
    retried on the next turn; until then the previous ruleset stays in force."""

    def __init__(
        self,
        runner: Runner,
        cfg: FilterConfig,
        entries: Callable[[], tuple[SpdEntry, ...]],
        publish: Callable[[dict[str, int]], None],
        *,
        interval: float = 0.25,
        counter_every: int = 4,
    ) -> None:
        self.runner = runner
        self.cfg = cfg
        self._entries = entries
        self._publish = publish
        self.interval = interval
        self._counter_every = counter_every
        self._applied: tuple[SpdEntry, ...] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn = 0
        self.reloads = 0
        self.errors = 0
        self._lock = threading.Lock()  # sync() runs on the follower thread and the watcher's

    def start(self) -> None:
        """Remove a stale table, load the filter for the current SPD (raises NftError when
        that fails: the worker must not run unfiltered), then follow changes."""
        self.runner.remove()
        self.sync(force=True)
        self._thread = threading.Thread(target=self._run, name="nft-filter", daemon=True)
        self._thread.start()

    def sync(self, *, force: bool = False) -> bool:
        """Reload when the SPD changed; True when a reload happened."""
        with self._lock:
            entries = self._entries()
            if not force and entries is self._applied:
                return False
            self.runner.apply(ruleset(entries, self.cfg))
            self._applied = entries
            self.reloads += 1
        log.info("inbound filter loaded", extra={"table": self.cfg.table, "entries": len(entries)})
        return True

    def read_counters(self) -> None:
        self._publish(self.runner.counters())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._turn += 1
            try:
                self.sync()
                if self._turn % self._counter_every == 0:
                    self.read_counters()
            except Exception as e:
                self.errors += 1
                log.warning(
                    "inbound filter not updated",
                    extra={"table": self.cfg.table, "error": str(e)[:300]},
                )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following and remove the table."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.runner.remove()
        log.info("inbound filter removed", extra={"table": self.cfg.table})


__all__ = [
    "DECISIONS",
    "FilterConfig",
    "FilterSync",
    "NftError",
    "NftRunner",
    "delete_script",
    "entry_rules",
    "parse_counters",
    "ruleset",
    "table_name",
]
