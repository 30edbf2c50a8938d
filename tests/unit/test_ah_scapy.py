"""AH interoperability with scapy (RFC 4302), and ESP+AH bundles.

* our engine.outbound (SPD PROTECT, protocols=(51,)) -> scapy verifies and strips AH -> the
  original packet; scapy AH -> our engine.inbound -> the original packet. HMAC-SHA2-256/384/512
  and legacy HMAC-SHA1-96, transport and tunnel, IPv4 and IPv6, ESN off and on (high half 1).
* IPv4 transport packets carry a Router Alert option (immutable, RFC 4302 Appendix A.1);
  IPv6 transport packets a hop-by-hop header with options with and without the change-en-route
  bit (RFC 8200 §4.2): fields the ICV excludes may change in transit, the others may not.
* ESP+AH on one packet (IP | AH | ESP | ...): our SPD bundle (50, 51) checked by scapy applying
  AH then ESP, and scapy's ESP-then-AH packets into our engine.inbound.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from scapy.layers import inet6
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.ipsec import AH, ESP, IPSecIntegrityError, SecurityAssociation
from scapy.packet import Packet, Raw, bind_layers, split_layers

from services.core.ah import AhSa
from services.core.engine import Dataplane
from services.core.events import DropReason
from services.core.iana import Encr, Integ, IpProto
from services.core.sa import Direction, Mode, SaConfig
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry


@dataclass(frozen=True)
class Auth:
    name: str
    integ_id: int
    key_len: int
    scapy: str
    icv_len: int
    legacy: bool = False


AUTHS = [
    Auth("hmac-sha2-256-128", Integ.HMAC_SHA2_256_128, 32, "SHA2-256-128", 16),
    Auth("hmac-sha2-384-192", Integ.HMAC_SHA2_384_192, 48, "SHA2-384-192", 24),
    Auth("hmac-sha2-512-256", Integ.HMAC_SHA2_512_256, 64, "SHA2-512-256", 32),
    Auth("hmac-sha1-96", Integ.HMAC_SHA1_96, 20, "HMAC-SHA1-96", 12, legacy=True),
]

AH_SPI = 0x0A0A0A01
ESP_SPI = 0x0E0E0E01
HIGH, LOW = 1, 5
V4_HOSTS = ("10.1.0.1", "10.2.0.1")
V6_HOSTS = ("2001:db8:1::1", "2001:db8:2::1")
V4_GWS = ("192.0.2.1", "192.0.2.2")
V6_GWS = ("2001:db8:ffff::1", "2001:db8:ffff::2")

MODES = [pytest.param(Mode.TRANSPORT, id="transport"), pytest.param(Mode.TUNNEL, id="tunnel")]
FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]
ESNS = [pytest.param(False, id="sn32"), pytest.param(True, id="esn")]

# HBH option types: 0x3E has the change-en-route bit (0x20) set, 0x1E does not; both have the
# "skip if unrecognized" action bits 00.
MUTABLE_OPT = 0x3E
IMMUTABLE_OPT = 0x1E


def _key(label: str, n: int) -> bytes:
    return hashlib.sha512(label.encode()).digest()[:n]


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _rebuild(p: Packet) -> Packet:
    return p.__class__(bytes(p))


def inner_packets(v6: bool, mode: Mode) -> list[Packet]:
    if not v6:
        s, d = V4_HOSTS
        pkts = [
            _rebuild(
                IP(src=s, dst=d, ttl=33)
                / TCP(sport=3333, dport=80, flags="PA")
                / Raw(b"payload" * 5)
            ),
            _rebuild(IP(src=s, dst=d) / UDP(sport=123, dport=123) / Raw(b"\x23" * 48)),
        ]
        if mode == Mode.TRANSPORT:
            pkts.append(
                _rebuild(
                    IP(src=s, dst=d, options=[IPOption_Router_Alert()])
                    / ICMP(id=1, seq=2)
                    / Raw(b"ra" * 10)
                )
            )
        else:
            pkts.append(_rebuild(IP(src=s, dst=d) / ICMP(id=1, seq=2) / Raw(b"ra" * 10)))
        return pkts
    s, d = V6_HOSTS
    pkts = [
        _rebuild(IPv6(src=s, dst=d) / ICMPv6EchoRequest(data=b"v6" * 9)),
        _rebuild(IPv6(src=s, dst=d) / UDP(sport=500, dport=500) / Raw(b"ike" * 10)),
    ]
    if mode == Mode.TRANSPORT:
        pkts += [
            _rebuild(
                IPv6(src=s, dst=d)
                / IPv6ExtHdrHopByHop(
                    options=[
                        HBHOptUnknown(otype=MUTABLE_OPT, optdata=b"\x11\x22\x33\x44"),
                        HBHOptUnknown(otype=IMMUTABLE_OPT, optdata=b"\x55\x66\x77\x88"),
                    ]
                )
                / TCP(sport=1, dport=2, flags="S")
            ),
            _rebuild(
                IPv6(src=s, dst=d)
                / IPv6ExtHdrHopByHop(options=[RouterAlert()])
                / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=MUTABLE_OPT, optdata=b"zz")])
                / TCP(sport=5, dport=6, flags="A")
                / Raw(b"q")
            ),
        ]
    else:
        pkts.append(_rebuild(IPv6(src=s, dst=d) / TCP(sport=7, dport=8) / Raw(b"t" * 20)))
    return pkts


@dataclass
class AhSetup:
    auth: Auth
    mode: Mode
    v6: bool
    esn: bool

    @property
    def outer(self) -> tuple[str, str]:
        if self.mode == Mode.TUNNEL:
            return V6_GWS if self.v6 else V4_GWS
        return V6_HOSTS if self.v6 else V4_HOSTS

    def cfg(self, direction: Direction, seq: int = 1) -> SaConfig:
        s, d = self.outer
        return SaConfig(
            spi=AH_SPI,
            protocol=IpProto.AH,
            direction=direction,
            mode=self.mode,
            src=_addr(s),
            dst=_addr(d),
            integ_id=self.auth.integ_id,
            integ_key=_key(self.auth.name, self.auth.key_len),
            esn=self.esn,
            reqid=1,
            allow_legacy=self.auth.legacy,
            seq_lease_start=seq,
        )

    def first_seq(self) -> int:
        return (HIGH << 32 | LOW) if self.esn else LOW

    def sender(self) -> Dataplane:
        dp = Dataplane()
        dp.install_sa(self.cfg(Direction.OUTBOUND, self.first_seq()), 0.0)
        sel = Selector.make("::/0", "::/0") if self.v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
        dp.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=1, protocols=(51,))], 1)
        return dp

    def receiver(self) -> tuple[Dataplane, AhSa]:
        dp = Dataplane()
        sa = dp.install_sa(self.cfg(Direction.INBOUND), 0.0)
        assert isinstance(sa, AhSa)
        if self.esn:
            sa.replay.update((1 << 32) - 1)  # as if 2^32-1 had been authenticated
        return dp, sa

    def scapy_sa(self, esn_high: int = HIGH) -> SecurityAssociation:
        s, d = self.outer
        tunnel = None
        if self.mode == Mode.TUNNEL:
            tunnel = IPv6(src=s, dst=d) if self.v6 else IP(src=s, dst=d)
        return SecurityAssociation(
            AH,
            spi=AH_SPI,
            auth_algo=self.auth.scapy,
            auth_key=_key(self.auth.name, self.auth.key_len),
            tunnel_header=tunnel,
            esn_en=self.esn,
            esn=esn_high,
        )

    def parse(self, wire: bytes) -> Packet:
        return IPv6(wire) if self.v6 else IP(wire)


# --- AH alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("auth", AUTHS, ids=lambda a: a.name)
def test_our_ah_is_verified_by_scapy(auth: Auth, mode: Mode, v6: bool, esn: bool) -> None:
    st = AhSetup(auth, mode, v6, esn)
    dp = st.sender()
    for i, inner in enumerate(inner_packets(v6, mode)):
        out = dp.outbound(bytes(inner), 0.0)
        assert out is not None, dp.drops
        wire = st.parse(out.packet)
        assert wire.haslayer(AH)
        ah = wire[AH]
        assert ah.spi == AH_SPI and ah.seq == LOW + i
        # RFC 4302 §2.2: AH length is a multiple of 8 octets over IPv6, 4 over IPv4
        ah_len = (ah.payloadlen + 2) * 4
        assert ah_len % (8 if v6 else 4) == 0
        assert ah_len == 12 + auth.icv_len + (-(12 + auth.icv_len) % (8 if v6 else 4))
        clear = st.scapy_sa().decrypt(st.parse(out.packet))
        assert bytes(clear) == bytes(inner)
        if esn:
            with pytest.raises(IPSecIntegrityError):
                st.scapy_sa(esn_high=0).decrypt(st.parse(out.packet))
    assert not dp.drops


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("auth", AUTHS, ids=lambda a: a.name)
def test_scapy_ah_is_verified_by_our_engine(auth: Auth, mode: Mode, v6: bool, esn: bool) -> None:
    st = AhSetup(auth, mode, v6, esn)
    dp, sa = st.receiver()
    ssa = st.scapy_sa()
    for i, inner in enumerate(inner_packets(v6, mode)):
        enc = ssa.encrypt(inner, seq_num=LOW + i)
        assert dp.inbound(bytes(enc), 0.0) == bytes(inner), dp.drops
        assert sa.replay.top == st.first_seq() + i
    assert not dp.drops
    assert dp.inbound(bytes(enc), 0.0) is None
    assert dp.drops == {DropReason.REPLAY: 1}


# --- mutable and immutable fields (RFC 4302 §3.3.3.1) ---------------------------------------


def _mutate_v4(wire: bytes) -> bytes:
    """Change what routers may change: TOS/DSCP, DF flag, TTL (checksum recomputed)."""
    p = IP(wire)
    p.tos, p.ttl, p.flags = 0xB8, p.ttl - 3, "DF"
    del p.chksum
    return bytes(p)


def _v6_set_opt(wire: bytes, otype: int, data: bytes) -> bytes:
    i = wire.index(bytes([otype, len(data)]), 40)
    return wire[: i + 2] + data + wire[i + 2 + len(data) :]


@pytest.mark.parametrize("auth", AUTHS[:1] + AUTHS[3:], ids=lambda a: a.name)
def test_ipv4_mutable_fields_may_change_but_router_alert_option_is_protected(auth: Auth) -> None:
    st = AhSetup(auth, Mode.TRANSPORT, False, False)
    inner = inner_packets(False, Mode.TRANSPORT)[2]
    assert inner[IP].options, "Router Alert present"
    wire = st.sender().outbound(bytes(inner), 0.0)
    assert wire is not None
    moved = _mutate_v4(wire.packet)
    assert moved != wire.packet
    dp, _ = st.receiver()
    got = dp.inbound(moved, 0.0)
    assert got is not None and IP(got)[ICMP].load == inner[ICMP].load
    st.scapy_sa().decrypt(IP(moved))  # scapy agrees: still valid
    # Router Alert value is immutable: changing it breaks the ICV (for us and for scapy)
    bad = bytearray(wire.packet)
    assert bad[20] == 0x94
    bad[23] ^= 0x01
    p = IP(bytes(bad))
    del p.chksum
    bad_wire = bytes(p)
    dp2, sa2 = st.receiver()
    assert dp2.inbound(bad_wire, 0.0) is None
    assert dp2.drops == {DropReason.AUTH: 1} and sa2.auth_drops == 1
    with pytest.raises(IPSecIntegrityError):
        st.scapy_sa().decrypt(IP(bad_wire))


@pytest.mark.parametrize("ours", [True, False], ids=["our-ah", "scapy-ah"])
def test_ipv6_change_en_route_option_data_is_excluded_from_the_icv(ours: bool) -> None:
    st = AhSetup(AUTHS[0], Mode.TRANSPORT, True, False)
    inner = inner_packets(True, Mode.TRANSPORT)[2]
    if ours:
        out = st.sender().outbound(bytes(inner), 0.0)
        assert out is not None
        wire = out.packet
    else:
        wire = bytes(st.scapy_sa().encrypt(inner, seq_num=1))
    p = IPv6(wire)
    p.tc, p.fl, p.hlim = 0x2E, 0xABCDE, 7  # mutable IPv6 header fields
    moved = _v6_set_opt(bytes(p), MUTABLE_OPT, b"\xde\xad\xbe\xef")
    dp, _ = st.receiver()
    got = dp.inbound(moved, 0.0)
    assert got is not None, dp.drops
    assert (
        _v6_set_opt(bytes(IPv6(got)), MUTABLE_OPT, b"\x11\x22\x33\x44")[40:] == (bytes(inner)[40:])
    )
    st.scapy_sa().decrypt(IPv6(moved))
    # the option without the change-en-route bit is covered
    bad = _v6_set_opt(wire, IMMUTABLE_OPT, b"\x55\x66\x77\x89")
    dp2, _ = st.receiver()
    assert dp2.inbound(bad, 0.0) is None
    assert dp2.drops == {DropReason.AUTH: 1}
    with pytest.raises(IPSecIntegrityError):
        st.scapy_sa().decrypt(IPv6(bad))


# --- ESP and AH together (AH outside) -------------------------------------------------------

ESP_ALGS = {
    "aes-gcm-16-128": (Encr.AES_GCM_16, 20, 0, 0, "AES-GCM", None),
    "aes-cbc-128-hmac-sha2-512": (
        Encr.AES_CBC,
        16,
        Integ.HMAC_SHA2_512_256,
        64,
        "AES-CBC",
        "SHA2-512-256",
    ),
}


@dataclass
class Bundle:
    esp_alg: str
    esp_mode: Mode
    v6: bool
    esn: bool
    auth: Auth = AUTHS[0]

    @property
    def outer(self) -> tuple[str, str]:
        if self.esp_mode == Mode.TUNNEL:
            return V6_GWS if self.v6 else V4_GWS
        return V6_HOSTS if self.v6 else V4_HOSTS

    def cfgs(self, direction: Direction, seq: int = 1) -> tuple[SaConfig, SaConfig]:
        encr, eklen, integ, iklen, _, _ = ESP_ALGS[self.esp_alg]
        s, d = _addr(self.outer[0]), _addr(self.outer[1])
        esp = SaConfig(
            spi=ESP_SPI,
            protocol=IpProto.ESP,
            direction=direction,
            mode=self.esp_mode,
            src=s,
            dst=d,
            encr_id=encr,
            encr_key=_key("e" + self.esp_alg, eklen),
            integ_id=integ,
            integ_key=_key("i" + self.esp_alg, iklen),
            esn=self.esn,
            reqid=7,
            seq_lease_start=seq,
        )
        ah = SaConfig(
            spi=AH_SPI,
            protocol=IpProto.AH,
            direction=direction,
            mode=Mode.TRANSPORT,
            src=s,
            dst=d,
            integ_id=self.auth.integ_id,
            integ_key=_key(self.auth.name, self.auth.key_len),
            esn=self.esn,
            reqid=7,
            seq_lease_start=seq,
        )
        return esp, ah

    def scapy_sas(self) -> tuple[SecurityAssociation, SecurityAssociation]:
        _, eklen, _, iklen, scrypt, sauth = ESP_ALGS[self.esp_alg]
        s, d = self.outer
        tunnel = None
        if self.esp_mode == Mode.TUNNEL:
            tunnel = IPv6(src=s, dst=d) if self.v6 else IP(src=s, dst=d)
        esp = SecurityAssociation(
            ESP,
            spi=ESP_SPI,
            crypt_algo=scrypt,
            crypt_key=_key("e" + self.esp_alg, eklen),
            auth_algo=sauth,
            auth_key=_key("i" + self.esp_alg, iklen) if iklen else None,
            tunnel_header=tunnel,
            esn_en=self.esn,
            esn=HIGH,
        )
        ah = SecurityAssociation(
            AH,
            spi=AH_SPI,
            auth_algo=self.auth.scapy,
            auth_key=_key(self.auth.name, self.auth.key_len),
            esn_en=self.esn,
            esn=HIGH,
        )
        return esp, ah

    def parse(self, wire: bytes) -> Packet:
        return IPv6(wire) if self.v6 else IP(wire)


BUNDLES = [
    pytest.param(
        Bundle(alg, mode, v6, esn),
        id=f"{alg}-{mode.name.lower()}-{'ipv6' if v6 else 'ipv4'}-{'esn' if esn else 'sn32'}",
    )
    for alg in ESP_ALGS
    for mode in (Mode.TUNNEL, Mode.TRANSPORT)
    for v6 in (False, True)
    for esn in (False, True)
]


def _bundle_inner(b: Bundle) -> list[Packet]:
    return inner_packets(b.v6, Mode.TUNNEL)


@pytest.mark.parametrize("b", BUNDLES)
def test_our_esp_then_ah_bundle_is_undone_by_scapy_ah_then_esp(b: Bundle) -> None:
    dp = Dataplane()
    seq = (HIGH << 32 | LOW) if b.esn else LOW
    for cfg in b.cfgs(Direction.OUTBOUND, seq):
        dp.install_sa(cfg, 0.0)
    sel = Selector.make("::/0", "::/0") if b.v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    dp.replace_spd([SpdEntry(3, 1, Action.PROTECT, sel, reqid=7, protocols=(50, 51))], 1)
    s_esp, s_ah = b.scapy_sas()
    for inner in _bundle_inner(b):
        out = dp.outbound(bytes(inner), 0.0)
        assert out is not None, dp.drops
        wire = b.parse(out.packet)
        # IP | AH | ESP: AH is outside and names ESP as its next header
        assert wire.haslayer(AH) and wire[AH].nh == IpProto.ESP
        assert bytes(wire[AH].payload)[:4] == ESP_SPI.to_bytes(4, "big")
        after_ah = s_ah.decrypt(b.parse(out.packet))
        clear = s_esp.decrypt(b.parse(bytes(after_ah)))
        assert bytes(clear) == bytes(inner)
    assert not dp.drops


@contextmanager
def _esp_dissected_as_raw() -> Iterator[None]:
    """scapy's AuthAlgo.sign tests ``haslayer(ESP)`` before ``haslayer(AH)``, so AH over a
    dissected ESP layer signs (and extends) the ESP data instead of filling the AH ICV. While
    scapy applies AH over ESP, let it see the ESP header as opaque bytes (which is what AH
    protects anyway); scapy's AH code itself runs unmodified."""
    saved = inet6.ipv6nhcls.pop(IpProto.ESP)
    split_layers(IP, ESP, proto=IpProto.ESP)
    split_layers(IPv6, ESP, nh=IpProto.ESP)
    try:
        yield
    finally:
        bind_layers(IP, ESP, proto=IpProto.ESP)
        bind_layers(IPv6, ESP, nh=IpProto.ESP)
        inet6.ipv6nhcls[IpProto.ESP] = saved


@pytest.mark.parametrize("b", BUNDLES)
def test_scapy_esp_then_ah_bundle_into_our_engine(b: Bundle) -> None:
    dp = Dataplane()
    esp_cfg, ah_cfg = b.cfgs(Direction.INBOUND)
    esp_sa = dp.install_sa(esp_cfg, 0.0)
    ah_sa = dp.install_sa(ah_cfg, 0.0)
    if b.esn:
        esp_sa.replay.update((1 << 32) - 1)
        ah_sa.replay.update((1 << 32) - 1)
    s_esp, s_ah = b.scapy_sas()
    for i, inner in enumerate(_bundle_inner(b)):
        esp_wire = bytes(s_esp.encrypt(inner, seq_num=LOW + i))
        with _esp_dissected_as_raw():
            wire = s_ah.encrypt(b.parse(esp_wire), seq_num=LOW + i)
        assert bytes(wire[AH].payload) == esp_wire[40 if b.v6 else 20 :]
        assert dp.inbound(bytes(wire), 0.0) == bytes(inner), dp.drops
    assert not dp.drops
    assert esp_sa.packets == ah_sa.packets == len(_bundle_inner(b))
    # tampering with the ESP ciphertext under a valid AH is caught by AH first
    n = len(_bundle_inner(b))
    esp_wire = bytes(s_esp.encrypt(_bundle_inner(b)[0], seq_num=LOW + n))
    with _esp_dissected_as_raw():
        wire = s_ah.encrypt(b.parse(esp_wire), seq_num=LOW + n)
    bad = bytearray(bytes(wire))
    bad[-1] ^= 1
    assert dp.inbound(bytes(bad), 0.0) is None
    assert dp.drops == {DropReason.AUTH: 1}
    assert ah_sa.auth_drops == 1 and esp_sa.auth_drops == 0


@pytest.mark.parametrize("auth", [a for a in AUTHS if (12 + a.icv_len) % 8], ids=lambda a: a.name)
def test_ipv6_ah_icv_padding_is_covered_as_sent(auth: Auth) -> None:
    """RFC 4302 §3.3.3.2.1: ICV padding content is the sender's choice and is included in
    the ICV (only the ICV itself is zeroed). A scapy-signed packet with non-zero padding must
    verify; changing the padding afterwards must not."""
    st = AhSetup(auth, Mode.TRANSPORT, True, False)
    inner = inner_packets(True, Mode.TRANSPORT)[0]
    p = IPv6(bytes(st.scapy_sa().encrypt(inner, seq_num=1)))
    pad_len = len(p[AH].icv) - auth.icv_len
    assert pad_len == 4
    p[AH].padding = b"\xa5\x5a\xc3\x3c"
    p[AH].icv = bytes(auth.icv_len)
    signed = st.scapy_sa().auth_algo.sign(p, _key(auth.name, auth.key_len))
    wire = bytes(signed)
    assert wire[40 + 12 + auth.icv_len : 40 + 16 + auth.icv_len] == b"\xa5\x5a\xc3\x3c"
    st.scapy_sa().decrypt(IPv6(wire))  # scapy itself accepts it
    dp, _ = st.receiver()
    assert dp.inbound(wire, 0.0) == bytes(inner), dp.drops
    bad = bytearray(wire)
    bad[40 + 12 + auth.icv_len] ^= 0xFF
    dp2, sa2 = st.receiver()
    assert dp2.inbound(bytes(bad), 0.0) is None
    assert sa2.auth_drops == 1
