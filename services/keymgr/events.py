"""What keymgr tells the outside about its SAs: the event bus behind the operator API's
WatchEvents, the key-free views behind ListIkeSas / ListChildSas, and the opt-in Wireshark
key export.

Event bus: each subscriber has a bounded queue; when it is full the oldest event is dropped and
counted (the worker's :class:`~services.dataplane.worker.FanOut` does exactly that and is reused).
Publishing never blocks keymgr's main loop.

Key export (troubleshooting only, off by default): one line per IKE SA in tshark's
``ikev2_decryption_table`` UAT format and one line per ESP or AH SA in its ``esp_sa`` format
(AH with encryption ``NULL``; tshark does not verify AH ICVs with it, see :func:`esp_uat`), each
written as the value of a tshark ``-o`` option (``uat:<table>:<record>``), so::

    args=(); while IFS= read -r l; do args+=(-o "$l"); done < keys.txt
    tshark -r capture.pcap -o esp.enable_encryption_decode:TRUE "${args[@]}"

decrypts the capture. The file is created with mode 0600 and only appended to. Keys go to this
file and nowhere else: no event, view or log line carries them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import threading
from dataclasses import dataclass

from services.core.algorithms import AlgorithmError, encr_algorithm
from services.core.iana import Encr, Integ, IpProto
from services.core.ike.keys import IkeKeys
from services.core.sa import SaConfig
from services.dataplane.worker import FanOut, Subscription

log = logging.getLogger("keymgr")

EVENT_QUEUE = 256  # events buffered per WatchEvents subscriber before the oldest is dropped

# event kinds (KeymgrEventKind in proto/ipsec/v1/keymgr.proto)
UP = "up"
DOWN = "down"
CHILD_UP = "child_up"
CHILD_DOWN = "child_down"
REKEYED = "rekeyed"
AUTH_FAILED = "auth_failed"
NEGOTIATION_FAILED = "negotiation_failed"
CONFIG = "config"  # Keymgr.reconfigure applied a configuration (connection "")
KINDS = (UP, DOWN, CHILD_UP, CHILD_DOWN, REKEYED, AUTH_FAILED, NEGOTIATION_FAILED, CONFIG)


@dataclass(frozen=True, slots=True)
class KeymgrEvent:
    """One SA lifecycle event. SPIs are hex strings; no key material."""

    kind: str
    time: float  # seconds since the epoch
    connection: str
    role: str = ""
    ike_sa_id: int = 0
    spi_i: str = ""
    spi_r: str = ""
    spi_in: str = ""
    spi_out: str = ""
    old_spi_in: str = ""
    old_spi_out: str = ""
    reason: str = ""
    child: str = ""  # the configured Child SA's name (child_up, child_down, rekeyed, ...)


class EventBus:
    """Fan keymgr events out to any number of subscribers (drop-oldest per subscriber)."""

    def __init__(self, maxsize: int = EVENT_QUEUE) -> None:
        self._hub: FanOut[KeymgrEvent] = FanOut(maxsize)

    def publish(self, event: KeymgrEvent) -> None:
        self._hub.publish([event])

    def subscribe(self) -> Subscription[KeymgrEvent]:
        return self._hub.subscribe()

    def close(self) -> None:
        self._hub.close()

    @property
    def dropped(self) -> int:
        """Events dropped across all subscribers because a queue was full."""
        return self._hub.dropped

    @property
    def published(self) -> int:
        return self._hub.published

    @property
    def subscribers(self) -> int:
        return self._hub.subscribers


def failure_kind(reason: str | None) -> str:
    """auth_failed when the peer or we rejected the authentication, else negotiation_failed."""
    return AUTH_FAILED if reason and "AUTHENTICATION_FAILED" in reason else NEGOTIATION_FAILED


def failure_hint(reason: str | None) -> str:
    """The core's failure reason plus what an admin can check."""
    text = reason or "unknown"
    if "cannot cross NAT" in text:
        return f"{text}: use esp_proposals (ESP is UDP-encapsulated across NAT) or remove the NAT"
    if "AUTHENTICATION_FAILED" in text:
        return f"{text}: check that both sides use the same pre-shared key and identities"
    if "NO_PROPOSAL_CHOSEN" in text:
        return f"{text}: the peer accepts none of our algorithms; compare the proposals"
    if "TS_UNACCEPTABLE" in text:
        return f"{text}: the peer rejects our traffic selectors; compare local_ts/remote_ts"
    if "NO_ADDITIONAL_SAS" in text:
        return f"{text}: the peer takes no further Child SA on this IKE SA; check its children"
    if "INVALID_KE_PAYLOAD" in text:
        return f"{text}: the peer wants another Diffie-Hellman group"
    if "no response" in text or "timeout" in text.lower():
        return f"{text}: the peer did not answer; check reachability of UDP 500/4500"
    return text


# --- views for the operator API (no keys) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IkeSaView:
    id: int
    connection: str
    role: str
    state: str
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    spi_i: str
    spi_r: str
    encryption: str
    integrity: str
    prf: str
    dh_group: str
    nat_t: bool
    established_time: float
    failure_reason: str = ""


@dataclass(frozen=True, slots=True)
class ChildSaView:
    ike_sa_id: int
    connection: str
    state: str
    spi_in: int
    spi_out: int
    dst_in: bytes  # the inbound SA's outer destination (for the worker's counters)
    dst_out: bytes
    encryption: str
    integrity: str
    esn: bool
    udp_encap: bool
    mode: str  # "tunnel" or "transport"
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    reqid: int
    install_time: float
    protocol: str = "esp"  # "esp" or "ah"
    name: str = ""  # the configured Child SA's name


def algorithm_name(encr_id: int, key_bits: int) -> str:
    """IANA name and key size, e.g. ``AES_GCM_16-256``."""
    try:
        name = Encr(encr_id).name
    except ValueError:
        name = f"ENCR_{encr_id}"
    return f"{name}-{key_bits}" if key_bits else name


def sa_encryption(sa: SaConfig) -> str:
    """The name of an SA's cipher with its key size (salt excluded, RFC 4106 §8.1); empty for
    AH, which has none."""
    if sa.protocol == IpProto.AH:
        return ""
    try:
        salt = encr_algorithm(sa.encr_id, allow_legacy=True).salt_len
    except AlgorithmError:
        salt = 0
    return algorithm_name(sa.encr_id, max(0, len(sa.encr_key) - salt) * 8)


def sa_integrity(sa: SaConfig) -> str:
    try:
        return Integ(sa.integ_id).name
    except ValueError:
        return f"INTEG_{sa.integ_id}"


# --- key export ---------------------------------------------------------------------------------

# Wireshark 4.0 names (the enum strings of the ikev2_decryption_table and esp_sa UATs in
# packet-isakmp.c / packet-esp.c), byte for byte: tshark refuses a record with any other name.
# Wireshark 4.0 knows no ChaCha20-Poly1305 (RFC 7634) in either table, so IKE and ESP SAs of
# that cipher are not exported (counted in KeyExporter.failures, one warning each).
WS_IKE_ENCR: dict[tuple[int, int], str] = {
    (Encr.AES_GCM_16, 128): "AES-GCM-128 with 16 octet ICV [RFC5282]",
    (Encr.AES_GCM_16, 192): "AES-GCM-192 with 16 octet ICV [RFC5282]",
    (Encr.AES_GCM_16, 256): "AES-GCM-256 with 16 octet ICV [RFC5282]",
    (Encr.AES_CBC, 128): "AES-CBC-128 [RFC3602]",
    (Encr.AES_CBC, 192): "AES-CBC-192 [RFC3602]",
    (Encr.AES_CBC, 256): "AES-CBC-256 [RFC3602]",
    (Encr.TRIPLE_DES, 192): "3DES [RFC2451]",
}
WS_IKE_INTEG: dict[int, str] = {
    Integ.NONE: "NONE [RFC4306]",
    Integ.HMAC_SHA1_96: "HMAC_SHA1_96 [RFC2404]",
    Integ.HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
    Integ.HMAC_SHA2_384_192: "HMAC_SHA2_384_192 [RFC4868]",
    Integ.HMAC_SHA2_512_256: "HMAC_SHA2_512_256 [RFC4868]",
}
WS_ESP_ENCR: dict[int, str] = {
    Encr.AES_GCM_16: "AES-GCM with 16 octet ICV [RFC4106]",
    Encr.AES_GCM_12: "AES-GCM with 12 octet ICV [RFC4106]",
    Encr.AES_GCM_8: "AES-GCM with 8 octet ICV [RFC4106]",
    Encr.AES_CBC: "AES-CBC [RFC3602]",
    Encr.AES_CTR: "AES-CTR [RFC3686]",
    Encr.TRIPLE_DES: "TripleDES-CBC [RFC2451]",
    Encr.NULL: "NULL",
}
WS_ESP_INTEG: dict[int, str] = {
    Integ.NONE: "NULL",
    Integ.HMAC_SHA1_96: "HMAC-SHA-1-96 [RFC2404]",
    Integ.HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
    Integ.HMAC_SHA2_384_192: "HMAC-SHA-384-192 [RFC4868]",
    Integ.HMAC_SHA2_512_256: "HMAC-SHA-512-256 [RFC4868]",
}


_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW


class KeyExportError(ValueError):
    """An SA whose algorithms Wireshark's tables cannot name (nothing is written)."""


def ike_uat(
    spi_i: bytes, spi_r: bytes, keys: IkeKeys, encr_id: int, key_bits: int, integ_id: int
) -> str:
    """One ``ikev2_decryption_table`` record as a tshark option value: SPIi, SPIr, SK_ei,
    SK_er, encryption, SK_ai, SK_ar, integrity (bytes as bare hex, algorithms quoted)."""
    encr = WS_IKE_ENCR.get((encr_id, key_bits))
    integ = WS_IKE_INTEG.get(integ_id)
    if encr is None or integ is None:
        raise KeyExportError(
            f"Wireshark 4.0 cannot decrypt IKE {algorithm_name(encr_id, key_bits)} integ {integ_id}"
        )
    return (
        f"uat:ikev2_decryption_table:{spi_i.hex()},{spi_r.hex()},{keys.sk_ei.hex()},"
        f'{keys.sk_er.hex()},"{encr}",{keys.sk_ai.hex()},{keys.sk_ar.hex()},"{integ}"'
    )


def esp_uat(sa: SaConfig) -> str:
    """One ``esp_sa`` record as a tshark option value: eight quoted fields (family, src, dst,
    SPI, encryption, key, authentication, key), as tests/netns/tshark.py's EspSaRecord.

    An AH SA is written in the same table with encryption ``NULL`` and its integrity key:
    tshark 4.0 accepts the record but its AH dissector does not verify ICVs (it has no SA
    lookup), so the line only serves other tools (e.g. scapy) and keeps one file format."""
    if sa.protocol not in (IpProto.ESP, IpProto.AH):
        raise KeyExportError("only ESP and AH SAs carry keys")
    encr = WS_ESP_ENCR.get(Encr.NULL if sa.protocol == IpProto.AH else sa.encr_id)
    auth = WS_ESP_INTEG.get(sa.integ_id)
    if encr is None or auth is None:
        raise KeyExportError(
            f"Wireshark 4.0 cannot decrypt ESP {algorithm_name(sa.encr_id, 0)} integ {sa.integ_id}"
        )
    src = ipaddress.ip_address(sa.src)
    fam = "IPv6" if src.version == 6 else "IPv4"
    ek = f"0x{sa.encr_key.hex()}" if sa.encr_key else ""
    ak = f"0x{sa.integ_key.hex()}" if sa.integ_key else ""
    dst = str(ipaddress.ip_address(sa.dst))
    fields = (fam, str(src), dst, f"0x{sa.spi:08x}", encr, ek, auth, ak)
    return "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)


class KeyExporter:
    """Appends SA keys to one file (mode 0600) in Wireshark's UAT formats. Opt-in only."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._warned = False
        self.failures = 0

    def open(self) -> None:
        """Create the file (0600; an existing one is narrowed to 0600, a symlink refused) now
        so a bad path fails at start-up; warn once."""
        fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        if not self._warned:
            self._warned = True
            log.warning(
                "key export is ON: IKE and ESP keys are written to a file for Wireshark; "
                "use only for troubleshooting",
                extra={"file": str(self.path)},
            )

    def _append(self, lines: list[str]) -> None:
        data = "".join(f"{line}\n" for line in lines).encode()
        with self._lock:
            try:
                fd = os.open(self.path, _OPEN_FLAGS, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as e:
                self.failures += 1
                log.error(
                    "key export write failed", extra={"file": str(self.path), "errno": e.errno}
                )

    def ike_sa(
        self,
        spi_i: bytes,
        spi_r: bytes,
        keys: IkeKeys,
        *,
        encr_id: int,
        key_bits: int,
        integ_id: int = Integ.NONE,
    ) -> None:
        try:
            line = ike_uat(spi_i, spi_r, keys, encr_id, key_bits, integ_id)
        except KeyExportError as e:
            self.failures += 1
            log.warning("IKE SA keys not exported", extra={"reason": str(e)})
            return
        self._append([line])

    def child_sas(self, sas: tuple[SaConfig, ...]) -> None:
        lines: list[str] = []
        for sa in sas:
            try:
                lines.append(esp_uat(sa))
            except KeyExportError as e:
                self.failures += 1
                log.warning("ESP SA keys not exported", extra={"reason": str(e)})
        if lines:
            self._append(lines)
