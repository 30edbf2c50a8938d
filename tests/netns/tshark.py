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

from services.core.iana import IpProto
from services.core.sa import SaConfig
from services.dataplane.lab import TCP_PORTS
from services.keymgr.events import WS_ESP_ENCR, WS_ESP_INTEG

# the esp_sa names keymgr's key export writes (one table for both)
TSHARK_ENCR: dict[int, str] = WS_ESP_ENCR
TSHARK_INTEG: dict[int, str] = WS_ESP_INTEG
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


def frames(pcap: Path, *, sas: Iterable[SaConfig] = (), prefs: Sequence[str] = ()) -> list[Frame]:
    """Dissect every frame of ``pcap``, decrypting ESP with ``sas`` if given; ``prefs`` are
    extra ``-o`` values (e.g. :func:`key_file_prefs`)."""
    out: list[Frame] = []
    all_prefs = ("ip.check_checksum:TRUE", *prefs)
    for row in run_fields(pcap, STD_FIELDS, sas=sas, prefs=all_prefs):
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


# --- IKEv2 (keymgr's key export) ---------------------------------------------------------------

IKE_SA_INIT = 34  # RFC 7296 §3.1 exchange types
PAYLOAD_SK = 46  # Encrypted and Authenticated payload (RFC 7296 §3.14)
PAYLOAD_SKF = 53  # Encrypted and Authenticated Fragment (RFC 7383 §2.5)
IKE_FIELDS = (
    "frame.number",
    "frame.time_epoch",
    "isakmp.version",
    "frame.protocols",
    "_ws.expert.severity",
    "_ws.expert.message",
    "isakmp.ispi",
    "isakmp.rspi",
    "isakmp.exchangetype",
    "isakmp.typepayload",
    "isakmp.enc.pad_length",
)


def ike_uat(
    spi_i: bytes, spi_r: bytes, sk_ei: bytes, sk_er: bytes, encr: str, integ: str = "NONE [RFC4306]"
) -> str:
    """One ``ikev2_decryption_table`` record as a ``-o`` value: SPIi, SPIr, SK_ei, SK_er,
    encryption, SK_ai, SK_ar, integrity (bytes as bare hex, algorithm names quoted), e.g.
    encr "AES-GCM-256 with 16 octet ICV [RFC5282]" (keys include the 4-octet salt)."""
    return (
        f"uat:ikev2_decryption_table:{spi_i.hex()},{spi_r.hex()},{sk_ei.hex()},{sk_er.hex()},"
        f'"{encr}",,,"{integ}"'
    )


def key_file_prefs(path: Path) -> list[str]:
    """``-o`` values for a key file keymgr wrote with ``--export-keys`` (one
    ``uat:ikev2_decryption_table:`` or ``uat:esp_sa:`` record a line), plus the ESP decryption
    and ICV check switches."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    bad = [
        ln[:30] for ln in lines if not ln.startswith(("uat:ikev2_decryption_table:", "uat:esp_sa:"))
    ]
    if bad:
        raise TsharkError(f"not a key export line: {bad[0]!r}...")
    return ["esp.enable_encryption_decode:TRUE", "esp.enable_authentication_check:TRUE", *lines]


@dataclass(frozen=True, slots=True)
class IkeFrame:
    """One captured IKEv2 message as tshark dissected it."""

    number: int
    exchange: int
    spi_i: str
    spi_r: str
    payloads: tuple[int, ...]  # every payload type tshark found, inner ones after SK
    decrypted: bool  # tshark decrypted the SK payload (it shows the pad length)
    protocols: tuple[str, ...]
    severities: tuple[int, ...]
    messages: tuple[str, ...]
    time: float = 0.0  # capture time, seconds since the epoch
    version: int = 0x20  # major/minor version octet of the header (0 if tshark found none)

    @property
    def ikev2(self) -> bool:
        return self.version >> 4 == 2

    @property
    def encrypted(self) -> bool:
        """Carries an SK payload or an SKF fragment (RFC 7383)."""
        return PAYLOAD_SK in self.payloads or PAYLOAD_SKF in self.payloads

    @property
    def malformed(self) -> bool:
        return "_ws.malformed" in self.protocols or any(
            s >= SEVERITY_ERROR for s in self.severities
        )


def ike_frames(pcap: Path, *, prefs: Sequence[str] = ()) -> list[IkeFrame]:
    """Every IKEv2 message in ``pcap`` (UDP 500 and 4500), decrypted where ``prefs`` carry the
    ikev2_decryption_table records (see :func:`key_file_prefs`)."""
    out: list[IkeFrame] = []
    rows = run_fields(
        pcap, IKE_FIELDS, prefs=("ip.check_checksum:TRUE", *prefs), display_filter="isakmp"
    )
    for row in rows:
        out.append(
            IkeFrame(
                number=int(row["frame.number"][0]),
                exchange=_ints(row["isakmp.exchangetype"])[0] if row["isakmp.exchangetype"] else 0,
                spi_i=(row["isakmp.ispi"] or [""])[0],
                spi_r=(row["isakmp.rspi"] or [""])[0],
                payloads=_ints(row["isakmp.typepayload"]),
                decrypted=bool(row["isakmp.enc.pad_length"]),
                protocols=tuple(":".join(row["frame.protocols"]).split(":")),
                severities=_ints(row["_ws.expert.severity"]),
                messages=tuple(row["_ws.expert.message"]),
                time=float((row["frame.time_epoch"] or ["0"])[0]),
                version=(_ints(row["isakmp.version"]) or (0,))[0],
            )
        )
    return out


# --- IKEv2 capture check of the keymgr interop labs --------------------------------------------

# IKE on UDP 500, and on UDP 4500 only what carries the non-ESP marker (RFC 3948 §2.2): ESP in
# UDP and NAT keepalives stay out of the capture, so it is small even under traffic. BPF's
# udp[] works on IPv4 only: for IPv6 the marker follows the 40-octet header and UDP's 8.
IKE_CAPTURE_FILTER = (
    "udp port 500 or (udp port 4500 and ((ip and udp[8:4] = 0) or (ip6 and ip6[48:4] = 0)))"
)
TSHARK_CANNOT = "not decryptable by tshark 4.0"


def exported_ike_spis(path: Path) -> set[tuple[str, str]]:
    """(SPIi, SPIr) as bare lower-case hex of every ikev2_decryption_table line of a key file."""
    out: set[tuple[str, str]] = set()
    if not path.exists():
        return out
    prefix = "uat:ikev2_decryption_table:"
    for line in path.read_text().splitlines():
        if line.startswith(prefix):
            spi_i, spi_r = line[len(prefix) :].split(",")[:2]
            out.add((spi_i.lower(), spi_r.lower()))
    return out


@dataclass(frozen=True, slots=True)
class IkeCheck:
    """What :func:`check_ike_capture` found."""

    messages: int  # IKEv2 messages checked
    encrypted: int  # of those, with an SK payload or SKF fragment
    decrypted: int
    undecryptable: int  # encrypted ones of IKE SAs tshark cannot decrypt (see ``reason``)
    exempt: int  # frames inside a deliberate-garbage window (not checked)
    problems: tuple[str, ...]
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"tshark: {self.messages} IKEv2 messages, {self.encrypted} encrypted, "
        if self.problems:
            tail = f"{self.decrypted} decrypted, {len(self.problems)} problem(s)"
        elif self.undecryptable:
            tail = f"{self.decrypted} decrypted, {self.undecryptable} {self.reason}"
        elif self.encrypted:
            tail = "all decrypted"
        else:
            tail = "none to decrypt"
        if self.exempt:
            tail += f"; {self.exempt} frames of deliberate garbage not checked"
        return head + tail


def check_ike_capture(
    pcap: Path,
    key_file: Path,
    *,
    undecryptable: str = "",
    garbage: Sequence[tuple[float, float]] = (),
) -> IkeCheck:
    """One tshark pass over ``pcap`` with the IKE SA keys keymgr exported to ``key_file``:
    every IKEv2 message must parse (no ``_ws.malformed``, no expert error) and every message
    with an SK payload or SKF fragment must be decrypted (both directions of every IKE SA,
    rekeyed ones too: each must have its own line in the key file).

    ``undecryptable`` names why an IKE SA's keys cannot be used by tshark (e.g. ChaCha20-
    Poly1305, which Wireshark 4.0 does not know): encrypted messages of IKE SAs with no
    exported line are then counted apart instead of failing; messages of exported SAs must
    still decrypt. Frames captured inside a ``garbage`` window (epoch seconds, start and end)
    are deliberate garbage and are only counted."""
    prefs = key_file_prefs(key_file) if key_file.exists() else []
    exported = exported_ike_spis(key_file)
    messages = encrypted = decrypted = cannot = exempt = 0
    problems: list[str] = []
    for f in ike_frames(pcap, prefs=prefs):
        if any(start <= f.time <= end for start, end in garbage):
            exempt += 1
            continue
        if not f.ikev2:
            problems.append(f"frame {f.number}: not IKEv2 (version 0x{f.version:02x})")
            continue
        messages += 1
        if f.malformed:
            problems.append(f"frame {f.number}: malformed: {'; '.join(f.messages)}")
        if not f.encrypted:
            continue
        encrypted += 1
        sa = (f.spi_i.lower(), f.spi_r.lower())
        if f.decrypted:
            decrypted += 1
        elif undecryptable and sa not in exported:
            cannot += 1
        else:
            why = "" if sa in exported else " (no exported keys for this IKE SA)"
            problems.append(
                f"frame {f.number}: exchange {f.exchange} of IKE SA {sa[0]}/{sa[1]} "
                f"not decrypted{why}"
            )
    if messages == 0 and exempt == 0:
        problems.append("no IKEv2 message captured")
    return IkeCheck(messages, encrypted, decrypted, cannot, exempt, tuple(problems), undecryptable)
