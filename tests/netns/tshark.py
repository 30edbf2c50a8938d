"""Run tshark on a pcap, optionally with our SA keys in its ESP decryption table, and return
parsed per-frame fields.

Wireshark 4.0 (Debian 12) keeps ESP SAs in the ``esp_sa`` UAT. One ``-o uat:esp_sa:<record>``
option adds one record; a record is eight quoted, comma-separated fields, in this order::

    "IPv4"|"IPv6", "<src ip>", "<dst ip>", "0x<spi, 8 hex digits>",
    "<encryption algorithm>", "0x<key hex>", "<authentication algorithm>", "0x<key hex>"|""

Algorithm names are Wireshark's display strings (checked against libwireshark 4.0.17), e.g.
"AES-GCM with 16 octet ICV [RFC4106]" (key = AES key || 4-byte salt, RFC 4106 §8.1),
"AES-CBC [RFC3602]", "NULL"; "HMAC-SHA-256-128 [RFC4868]". Decryption also needs
``-o esp.enable_encryption_decode:TRUE``; ``esp.enable_authentication_check`` makes tshark
verify the ICV (``esp.icv_good`` / ``esp.icv_bad``). tshark 4.0 knows neither ChaCha20-
Poly1305 nor AES-GMAC, so captures meant for decryption use AES-GCM or AES-CBC + HMAC.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core.iana import Encr, Integ, IpProto
from services.core.sa import SaConfig
from services.dataplane.lab import TCP_PORTS

TSHARK_ENCR: dict[int, str] = {
    Encr.AES_GCM_16: "AES-GCM with 16 octet ICV [RFC4106]",
    Encr.AES_GCM_12: "AES-GCM with 12 octet ICV [RFC4106]",
    Encr.AES_GCM_8: "AES-GCM with 8 octet ICV [RFC4106]",
    Encr.AES_CBC: "AES-CBC [RFC3602]",
    Encr.AES_CTR: "AES-CTR [RFC3686]",
    Encr.TRIPLE_DES: "TripleDES-CBC [RFC2451]",
    Encr.NULL: "NULL",
}
TSHARK_INTEG: dict[int, str] = {
    Integ.NONE: "NULL",
    Integ.HMAC_SHA1_96: "HMAC-SHA-1-96 [RFC2404]",
    Integ.HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
    Integ.HMAC_SHA2_384_192: "HMAC-SHA-384-192 [RFC4868]",
    Integ.HMAC_SHA2_512_256: "HMAC-SHA-512-256 [RFC4868]",
}
SEVERITY_ERROR = 0x00800000  # PI_ERROR in epan/proto.h
INNER_L4 = frozenset({"tcp", "icmp", "icmpv6", "udp"})
# ICMPv6 that belongs to the link itself (ND, MLD), not to traffic the tunnel carries
LINK_ICMPV6_TYPES = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})
STD_FIELDS = (
    "frame.number",
    "frame.protocols",
    "_ws.expert.severity",
    "_ws.expert.message",
    "esp.spi",
    "esp.sequence",
    "esp.icv_good",
    "esp.icv_bad",
    "ah.spi",
    "ah.sequence",
    "icmp.type",
    "icmpv6.type",
    "tcp.len",
    "udp.dstport",
)


class TsharkError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which("tshark") is not None


@dataclass(frozen=True, slots=True)
class EspSaRecord:
    """One row of tshark's esp_sa table."""

    src: str
    dst: str
    spi: int
    encr: str
    encr_key: bytes
    auth: str
    auth_key: bytes

    def uat(self) -> str:
        fam = "IPv6" if ipaddress.ip_address(self.src).version == 6 else "IPv4"
        ek = f"0x{self.encr_key.hex()}" if self.encr_key else ""
        ak = f"0x{self.auth_key.hex()}" if self.auth_key else ""
        fields = (fam, self.src, self.dst, f"0x{self.spi:08x}", self.encr, ek, self.auth, ak)
        return ",".join(f'"{f}"' for f in fields)


def esp_records(sas: Iterable[SaConfig]) -> list[EspSaRecord]:
    """tshark records for the ESP SAs among ``sas`` (AH needs no keys to be dissected)."""
    out: list[EspSaRecord] = []
    seen: set[tuple[int, bytes]] = set()
    for c in sas:
        if c.protocol != IpProto.ESP or (c.spi, c.dst) in seen:
            continue
        seen.add((c.spi, c.dst))
        if c.encr_id not in TSHARK_ENCR or c.integ_id not in TSHARK_INTEG:
            raise TsharkError(f"tshark 4.0 cannot decrypt encr {c.encr_id} / integ {c.integ_id}")
        out.append(
            EspSaRecord(
                str(ipaddress.ip_address(c.src)),
                str(ipaddress.ip_address(c.dst)),
                c.spi,
                TSHARK_ENCR[c.encr_id],
                c.encr_key,
                TSHARK_INTEG[c.integ_id],
                c.integ_key,
            )
        )
    return out


def decryption_args(records: Sequence[EspSaRecord]) -> list[str]:
    if not records:
        return []
    args = [
        "-o",
        "esp.enable_encryption_decode:TRUE",
        "-o",
        "esp.enable_authentication_check:TRUE",
    ]
    for r in records:
        args += ["-o", f"uat:esp_sa:{r.uat()}"]
    return args


def run_fields(
    pcap: Path,
    fields: Sequence[str],
    *,
    sas: Iterable[SaConfig] = (),
    display_filter: str | None = None,
    prefs: Sequence[str] = ("ip.check_checksum:TRUE",),
    timeout: float = 60.0,
) -> list[dict[str, list[str]]]:
    """tshark -T fields over ``pcap``; one dict per frame, each field a list of occurrences."""
    argv = ["tshark", "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=/t"]
    argv += ["-E", "occurrence=a", "-E", "aggregator=|", "-E", "quote=n"]
    for p in prefs:
        argv += ["-o", p]
    # the lab's TCP payload is random bytes: keep heuristic dissectors from "finding" protocols
    argv += ["-d", f"tcp.port=={TCP_PORTS[0]}-{TCP_PORTS[1]},data"]
    argv += decryption_args(esp_records(sas))
    if display_filter:
        argv += ["-Y", display_filter]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise TsharkError(f"tshark failed ({res.returncode}): {res.stderr.strip()}")
    rows: list[dict[str, list[str]]] = []
    for line in res.stdout.splitlines():
        cols = line.split("\t")
        cols += [""] * (len(fields) - len(cols))
        rows.append({f: [v for v in c.split("|") if v] for f, c in zip(fields, cols, strict=True)})
    return rows


@dataclass(frozen=True, slots=True)
class Frame:
    """What the tests need to know about one captured frame."""

    number: int
    protocols: tuple[str, ...]
    severities: tuple[int, ...]
    messages: tuple[str, ...]
    icv_good: bool
    icv_bad: bool
    icmp_types: tuple[int, ...]
    icmpv6_types: tuple[int, ...]

    @property
    def malformed(self) -> bool:
        return "_ws.malformed" in self.protocols or any(
            s >= SEVERITY_ERROR for s in self.severities
        )

    @property
    def protected(self) -> bool:
        """Carried in ESP or AH (or ESP-in-UDP machinery such as NAT keepalives)."""
        return any(p in ("esp", "ah", "udpencap") for p in self.protocols)

    @property
    def link_control(self) -> bool:
        """ARP and IPv6 neighbour discovery / MLD between the two hosts themselves."""
        if "arp" in self.protocols:
            return True
        return (
            not self.protected
            and "icmpv6" in self.protocols
            and bool(self.icmpv6_types)
            and set(self.icmpv6_types) <= LINK_ICMPV6_TYPES
        )

    def inner_l4(self) -> str | None:
        """The first transport protocol tshark found (after decryption, if it had keys);
        None for frames of the link itself (ARP, neighbour discovery)."""
        if self.link_control:
            return None
        for p in self.protocols:
            if p in INNER_L4 and not (p == "udp" and "udpencap" in self.protocols):
                return p
        return None

    def wrapped_in(self, proto: str) -> bool:
        """Whether ``proto`` (esp/ah) comes before the inner transport header."""
        l4 = self.inner_l4()
        if proto not in self.protocols:
            return False
        if l4 is None:
            return True
        return self.protocols.index(proto) < self.protocols.index(l4)


def _ints(values: list[str]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(int(part, 0))
    return tuple(out)


def frames(pcap: Path, *, sas: Iterable[SaConfig] = ()) -> list[Frame]:
    """Dissect every frame of ``pcap``, decrypting ESP with ``sas`` if given."""
    out: list[Frame] = []
    for row in run_fields(pcap, STD_FIELDS, sas=sas):
        good = row["esp.icv_good"]
        bad = row["esp.icv_bad"]
        out.append(
            Frame(
                number=int(row["frame.number"][0]),
                protocols=tuple(":".join(row["frame.protocols"]).split(":")),
                severities=_ints(row["_ws.expert.severity"]),
                messages=tuple(row["_ws.expert.message"]),
                icv_good=bool(good) and all(v in ("1", "True") for v in good),
                icv_bad=any(v in ("1", "True") for v in bad),
                icmp_types=_ints(row["icmp.type"]),
                icmpv6_types=_ints(row["icmpv6.type"]),
            )
        )
    return out


def summary(fs: Iterable[Frame]) -> dict[str, int]:
    """Frame counts per protocol stack (without the eth:ethertype prefix)."""
    counts: dict[str, int] = {}
    for f in fs:
        stack = ":".join(p for p in f.protocols if p not in ("eth", "ethertype"))
        counts[stack] = counts.get(stack, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
