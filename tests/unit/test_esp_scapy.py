"""ESP interoperability with scapy (scapy.layers.ipsec.SecurityAssociation) as the oracle.

Both directions for every algorithm we offer, transport and tunnel mode, IPv4 and IPv6, with
and without ESN:

* our engine.outbound (SPD PROTECT -> outbound SA) -> scapy decrypts -> the original packet;
* scapy encrypts -> our engine.inbound -> the original packet.

With ESN the sequence numbers sit above 2^32 (high half 1): scapy only verifies our packets
when told esn=1, and fails with esn=0, so the high bits are really in the ICV/AAD. IPv6
transport-mode packets carry hop-by-hop and destination-options headers to exercise the ESP
placement of RFC 4303 §3.1.1. ESP-in-UDP (RFC 3948) is checked both ways as well.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation
from scapy.packet import Packet, Raw

from services.core.algorithms import ENCR, split_encr_key
from services.core.engine import Dataplane, UdpKind
from services.core.esp import EspSa
from services.core.events import DropReason
from services.core.iana import Encr, Integ, IpProto
from services.core.sa import Direction, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

# --- algorithms --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alg:
    name: str
    encr_id: int
    encr_key_len: int  # keying material, salt included
    integ_id: int
    integ_key_len: int
    scapy_crypt: str
    scapy_auth: str | None
    legacy: bool = False


ALGS = [
    Alg("aes-gcm-16-128", Encr.AES_GCM_16, 16 + 4, 0, 0, "AES-GCM", None),
    Alg("aes-gcm-16-256", Encr.AES_GCM_16, 32 + 4, 0, 0, "AES-GCM", None),
    Alg("chacha20-poly1305", Encr.CHACHA20_POLY1305, 32 + 4, 0, 0, "CHACHA20-POLY1305", None),
    *(
        Alg(f"aes-cbc-{bits}-{hname}", Encr.AES_CBC, bits // 8, integ, klen, "AES-CBC", sname)
        for bits in (128, 256)
        for hname, integ, klen, sname in (
            ("hmac-sha2-256", Integ.HMAC_SHA2_256_128, 32, "SHA2-256-128"),
            ("hmac-sha2-384", Integ.HMAC_SHA2_384_192, 48, "SHA2-384-192"),
            ("hmac-sha2-512", Integ.HMAC_SHA2_512_256, 64, "SHA2-512-256"),
        )
    ),
    Alg("null-hmac-sha2-256", Encr.NULL, 0, Integ.HMAC_SHA2_256_128, 32, "NULL", "SHA2-256-128"),
    Alg("aes-gmac-128", Encr.NULL_AUTH_AES_GMAC, 16 + 4, 0, 0, "AES-NULL-GMAC", None),
    Alg("aes-gmac-256", Encr.NULL_AUTH_AES_GMAC, 32 + 4, 0, 0, "AES-NULL-GMAC", None),
    Alg(
        "3des-cbc-hmac-sha1-96",
        Encr.TRIPLE_DES,
        24,
        Integ.HMAC_SHA1_96,
        20,
        "3DES",
        "HMAC-SHA1-96",
        legacy=True,
    ),
]
ALG_IDS = [a.name for a in ALGS]


def _key(label: str, n: int) -> bytes:
    return hashlib.sha512(label.encode()).digest()[:n] if n else b""


def _keys(alg: Alg) -> tuple[bytes, bytes]:
    return _key("encr/" + alg.name, alg.encr_key_len), _key("integ/" + alg.name, alg.integ_key_len)


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


SPI = 0x0C0FFEE1
HIGH = 1  # ESN high half used in ESN cases: sequence numbers above 2^32
LOW = 5

# --- packets -----------------------------------------------------------------------------------

V4_HOSTS = ("10.1.0.1", "10.2.0.1")
V6_HOSTS = ("2001:db8:1::1", "2001:db8:2::1")
V4_GWS = ("192.0.2.1", "192.0.2.2")
V6_GWS = ("2001:db8:ffff::1", "2001:db8:ffff::2")


def _rebuild(p: Packet) -> Packet:
    """Resolve lengths and checksums so the packet compares byte for byte."""
    return p.__class__(bytes(p))


DNS_QUERY = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")


def inner_packets(v6: bool, mode: Mode) -> list[Packet]:
    """Realistic inner datagrams: ICMP echo, TCP and UDP with payload; IPv6 transport mode adds
    hop-by-hop (Router Alert) and destination-options extension headers."""
    if not v6:
        s, d = V4_HOSTS
        return [
            _rebuild(IP(src=s, dst=d, id=0x4242, ttl=61) / ICMP(id=7, seq=1) / Raw(b"ping" * 14)),
            _rebuild(
                IP(src=s, dst=d, flags="DF", tos=0x10)
                / TCP(sport=40000, dport=443, flags="PA", seq=1000, ack=2000)
                / Raw(b"GET / HTTP/1.1\r\n\r\n" * 3)
            ),
            _rebuild(IP(src=s, dst=d) / UDP(sport=53000, dport=53) / Raw(DNS_QUERY)),
        ]
    s, d = V6_HOSTS
    pkts = [
        _rebuild(IPv6(src=s, dst=d, hlim=60) / ICMPv6EchoRequest(id=9, seq=2, data=b"x" * 37)),
        _rebuild(
            IPv6(src=s, dst=d, fl=0x12345)
            / TCP(sport=50000, dport=22, flags="PA")
            / Raw(b"SSH-2.0-test\r\n")
        ),
        _rebuild(IPv6(src=s, dst=d) / UDP(sport=443, dport=51000) / Raw(b"\x40quic" * 9)),
    ]
    if mode == Mode.TRANSPORT:
        pkts += [
            _rebuild(
                IPv6(src=s, dst=d)
                / IPv6ExtHdrHopByHop(options=[RouterAlert()])
                / TCP(sport=1234, dport=80, flags="S")
            ),
            _rebuild(
                IPv6(src=s, dst=d)
                / IPv6ExtHdrHopByHop(options=[RouterAlert()])
                / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x1E, optdata=b"abcd")])
                / ICMPv6EchoRequest(data=b"dest-opts")
            ),
        ]
    return pkts


# --- SA pairs ----------------------------------------------------------------------------------


@dataclass
class Setup:
    alg: Alg
    mode: Mode
    v6: bool
    esn: bool
    encap: bool = False

    @property
    def outer(self) -> tuple[str, str]:
        if self.mode == Mode.TUNNEL:
            return V6_GWS if self.v6 else V4_GWS
        return V6_HOSTS if self.v6 else V4_HOSTS

    def cfg(self, direction: Direction, seq: int = 1) -> SaConfig:
        ek, ik = _keys(self.alg)
        s, d = self.outer
        return SaConfig(
            spi=SPI,
            protocol=IpProto.ESP,
            direction=direction,
            mode=self.mode,
            src=_addr(s),
            dst=_addr(d),
            encr_id=self.alg.encr_id,
            encr_key=ek,
            integ_id=self.alg.integ_id,
            integ_key=ik,
            esn=self.esn,
            reqid=1,
            allow_legacy=self.alg.legacy,
            seq_lease_start=seq,
            encap=UdpEncap() if self.encap else None,
        )

    def first_seq(self) -> int:
        return (HIGH << 32 | LOW) if self.esn else LOW

    def sender(self) -> Dataplane:
        """Our engine with an SPD PROTECT entry for all traffic and one outbound SA."""
        dp = Dataplane()
        dp.install_sa(self.cfg(Direction.OUTBOUND, self.first_seq()), 0.0)
        sel = Selector.make("::/0", "::/0") if self.v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
        dp.replace_spd([SpdEntry(1, 10, Action.PROTECT, sel, reqid=1)], 1)
        return dp

    def receiver(self) -> tuple[Dataplane, EspSa]:
        dp = Dataplane()
        sa = dp.install_sa(self.cfg(Direction.INBOUND), 0.0)
        assert isinstance(sa, EspSa)
        if self.esn:
            # as if 2^32 - 1 had been authenticated: the next subspace is inferred (A2.2)
            sa.replay.update((1 << 32) - 1)
        return dp, sa

    def scapy_sa(self, *, esn_high: int | None = None) -> SecurityAssociation:
        ek, ik = _keys(self.alg)
        s, d = self.outer
        tunnel = None
        if self.mode == Mode.TUNNEL:
            tunnel = IPv6(src=s, dst=d) if self.v6 else IP(src=s, dst=d)
        return SecurityAssociation(
            ESP,
            spi=SPI,
            crypt_algo=self.alg.scapy_crypt,
            crypt_key=ek or None,
            auth_algo=self.alg.scapy_auth,
            auth_key=ik or None,
            tunnel_header=tunnel,
            nat_t_header=UDP(sport=4500, dport=4500) if self.encap else None,
            esn_en=self.esn,
            esn=HIGH if esn_high is None else esn_high,
        )

    def parse(self, wire: bytes) -> Packet:
        return IPv6(wire) if self.v6 else IP(wire)


MODES = [pytest.param(Mode.TRANSPORT, id="transport"), pytest.param(Mode.TUNNEL, id="tunnel")]
FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]
ESNS = [pytest.param(False, id="sn32"), pytest.param(True, id="esn")]


def _esp_seq(layer: Packet) -> int:
    return int(layer[ESP].seq)


# --- our protect -> scapy decrypt ----------------------------------------------------------------


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_our_esp_is_decrypted_by_scapy(alg: Alg, mode: Mode, v6: bool, esn: bool) -> None:
    st = Setup(alg, mode, v6, esn)
    dp = st.sender()
    for i, inner in enumerate(inner_packets(v6, mode)):
        out = dp.outbound(bytes(inner), 0.0)
        assert out is not None, dp.drops
        wire = st.parse(out.packet)
        assert wire.haslayer(ESP)
        assert _esp_seq(wire) == LOW + i
        if mode == Mode.TUNNEL:
            assert (wire.src, wire.dst) == st.outer
        clear = st.scapy_sa().decrypt(st.parse(out.packet))
        assert bytes(clear) == bytes(inner)
        if esn:
            # the ICV / AAD covers the high half: high = 0 must not verify
            with pytest.raises(IPSecIntegrityError):
                st.scapy_sa(esn_high=0).decrypt(st.parse(out.packet))
    assert not dp.drops


# --- scapy encrypt -> our engine.inbound ----------------------------------------------------


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_scapy_esp_is_decrypted_by_our_engine(alg: Alg, mode: Mode, v6: bool, esn: bool) -> None:
    st = Setup(alg, mode, v6, esn)
    dp, sa = st.receiver()
    ssa = st.scapy_sa()
    base = st.first_seq()
    for i, inner in enumerate(inner_packets(v6, mode)):
        enc = ssa.encrypt(inner, seq_num=LOW + i)
        assert dp.inbound(bytes(enc), 0.0) == bytes(inner), dp.drops
        assert sa.replay.top == base + i
    assert not dp.drops
    # the last one again is a replay
    assert dp.inbound(bytes(enc), 0.0) is None
    assert dp.drops == {DropReason.REPLAY: 1}


def test_scapy_esn_packet_with_the_wrong_high_half_is_rejected() -> None:
    st = Setup(ALGS[0], Mode.TUNNEL, False, True)
    dp, sa = st.receiver()
    inner = inner_packets(False, Mode.TUNNEL)[0]
    enc = st.scapy_sa(esn_high=2).encrypt(inner, seq_num=LOW)  # receiver infers high = 1
    assert dp.inbound(bytes(enc), 0.0) is None
    assert dp.drops == {DropReason.AUTH: 1}
    assert sa.replay.top == (1 << 32) - 1


# --- scapy key-material conventions -----------------------------------------------------------


@pytest.mark.parametrize("alg", [a for a in ALGS if ENCR[a.encr_id].salt_len], ids=lambda a: a.name)
def test_scapy_takes_combined_mode_keys_with_the_trailing_4_byte_salt(alg: Alg) -> None:
    """RFC 4106 §8.1 / RFC 4543 §5 / RFC 7634 §2: keying material = key || 4-byte salt;
    scapy's crypt_key is the same string, split the same way as ours."""
    ek, _ = _keys(alg)
    ssa = Setup(alg, Mode.TUNNEL, False, False).scapy_sa()
    key, salt = split_encr_key(ENCR[alg.encr_id], ek)
    assert len(salt) == 4
    assert (ssa.crypt_key, ssa.crypt_salt) == (key, salt)


def test_a_scapy_sa_without_the_salt_does_not_interoperate() -> None:
    alg = ALGS[0]
    st = Setup(alg, Mode.TUNNEL, False, False)
    out = st.sender().outbound(bytes(inner_packets(False, Mode.TUNNEL)[0]), 0.0)
    assert out is not None
    ek, _ = _keys(alg)
    wrong = SecurityAssociation(
        ESP,
        spi=SPI,
        crypt_algo="AES-GCM",
        crypt_key=ek[:16] + bytes(4),
        tunnel_header=IP(src=V4_GWS[0], dst=V4_GWS[1]),
    )
    with pytest.raises(IPSecIntegrityError):
        wrong.decrypt(IP(out.packet))


# --- ESP-in-UDP (RFC 3948) ------------------------------------------------------------------

NATT_ALGS = [
    a
    for a in ALGS
    if a.name
    in ("aes-gcm-16-128", "aes-cbc-256-hmac-sha2-256", "chacha20-poly1305", "aes-gmac-128")
]


def _natt_inner(v6: bool) -> list[Packet]:
    # scapy's NAT-T transport decryption assumes no extension headers before UDP
    return inner_packets(v6, Mode.TUNNEL)


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", NATT_ALGS, ids=lambda a: a.name)
def test_our_esp_in_udp_is_parsed_and_decrypted_by_scapy(
    alg: Alg, mode: Mode, v6: bool, esn: bool
) -> None:
    st = Setup(alg, mode, v6, esn, encap=True)
    dp = st.sender()
    for inner in _natt_inner(v6):
        out = dp.outbound(bytes(inner), 0.0)
        assert out is not None, dp.drops
        wire = st.parse(out.packet)
        assert wire.haslayer(UDP) and wire.haslayer(ESP)
        assert (wire[UDP].sport, wire[UDP].dport) == (4500, 4500)
        assert wire[UDP].len == len(out.packet) - out.udp_offset + 8
        assert out.packet[out.udp_offset :] == bytes(wire[ESP])
        assert out.dport == 4500
        clear = st.scapy_sa().decrypt(st.parse(out.packet))
        assert bytes(clear) == bytes(inner)


@pytest.mark.parametrize("esn", ESNS)
@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", NATT_ALGS, ids=lambda a: a.name)
def test_scapy_esp_in_udp_into_inbound_and_inbound_udp(
    alg: Alg, mode: Mode, v6: bool, esn: bool
) -> None:
    st = Setup(alg, mode, v6, esn, encap=True)
    dp, sa = st.receiver()
    ssa = st.scapy_sa()
    seq = LOW
    for inner in _natt_inner(v6):
        # a full IP/UDP/ESP datagram (raw socket path)
        enc = ssa.encrypt(inner, seq_num=seq)
        assert enc.haslayer(UDP) and enc[UDP].dport == 4500
        assert dp.inbound(bytes(enc), 0.0) == bytes(inner), dp.drops
        seq += 1
        # the UDP payload only (UDP 4500 socket path)
        enc = ssa.encrypt(inner, seq_num=seq)
        s, d = st.outer
        kind, clear = dp.inbound_udp(_addr(s), _addr(d), 4500, 4500, bytes(enc[UDP].payload), 0.0)
        assert kind is UdpKind.ESP
        assert clear is not None, dp.drops
        if mode == Mode.TUNNEL:
            assert clear == bytes(inner)
        else:
            # transport mode: the socket does not hand us the received IP header, so the clear
            # header is rebuilt from the addresses (TTL/ID/flow label are not the sender's)
            got = st.parse(clear)
            assert (got.src, got.dst) == (inner.src, inner.dst)
            assert bytes(got.payload) == bytes(inner.payload)
        seq += 1
    assert not dp.drops
    assert sa.replay_drops == sa.auth_drops == 0


# --- cross-family tunnels (RFC 4301 §4.1: IPv6 over IPv4 and IPv4 over IPv6) -----------------


@pytest.mark.parametrize("outer_v6", FAMILIES)
@pytest.mark.parametrize("alg", [ALGS[0], ALGS[4]], ids=lambda a: a.name)
def test_cross_family_tunnel_both_directions(alg: Alg, outer_v6: bool) -> None:
    st = Setup(alg, Mode.TUNNEL, outer_v6, False)
    inner_family_v6 = not outer_v6
    inners = inner_packets(inner_family_v6, Mode.TUNNEL)
    tx = Dataplane()
    tx.install_sa(st.cfg(Direction.OUTBOUND, LOW), 0.0)
    sel = (
        Selector.make("::/0", "::/0")
        if inner_family_v6
        else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    )
    tx.replace_spd([SpdEntry(1, 10, Action.PROTECT, sel, reqid=1)], 1)
    rx, _ = st.receiver()
    for i, inner in enumerate(inners):
        out = tx.outbound(bytes(inner), 0.0)
        assert out is not None, tx.drops
        assert out.packet[0] >> 4 == (6 if outer_v6 else 4)
        assert bytes(st.scapy_sa().decrypt(st.parse(out.packet))) == bytes(inner)
        enc = st.scapy_sa().encrypt(inner, seq_num=100 + i)
        assert rx.inbound(bytes(enc), 0.0) == bytes(inner), rx.drops
