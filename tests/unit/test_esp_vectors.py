"""Published ESP vectors through OUR code (services.core.esp / services.core.engine).

The transcriptions in tests/vectors are proven byte for byte against `cryptography` in
test_vector_transcriptions.py; here the same bytes must come out of (and go back through) the
project's own ESP implementation:

* RFC 3602 §4 cases #5-#8: AES-CBC, no integrity (legacy), transport and tunnel mode, full
  IPv4 packets.
* draft-mcgrew-gcm-test-01: AES-GCM-16 (RFC 4106) with 128/256-bit keys, 32-bit SN and ESN,
  and the one AES-GMAC (RFC 4543, ENCR_NULL_AUTH_AES_GMAC) case.
* RFC 7634 Appendix A: ChaCha20-Poly1305 tunnel-mode IPv4 packet.

The published IVs are injected through EspSa's ``iv_source`` hook; outbound SAs start their
sequence-number lease at the vector's sequence number, so the first packet carries it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest

from services.core.algorithms import ENCR, AuthenticationFailed, make_aead
from services.core.engine import Dataplane
from services.core.esp import EspSa
from services.core.events import Drop, DropReason
from services.core.iana import Encr, IpProto
from services.core.sa import ConfigError, Direction, Mode, SaConfig
from tests.vectors import mcgrew_gcm, rfc3602, rfc7634

# --- helpers -------------------------------------------------------------------------------


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _inet_checksum(data: bytes) -> int:
    """RFC 1071 checksum, written independently of services.core.packet."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _iv_hook(iv: bytes) -> tuple[list[int], Callable[[int], bytes]]:
    """An iv_source that returns the published IV and records the sequence numbers asked for."""
    seen: list[int] = []

    def source(seq: int) -> bytes:
        seen.append(seq)
        return iv

    return seen, source


def _assert_outer_ipv4_matches(ours: bytes, published: bytes) -> None:
    """Tunnel mode: the outer IPv4 header is built by the sender.

    RFC 791 §3.2 leaves the Identification field to the sender (ours counts per SA, the
    published packets came from other stacks), so the ID cannot be byte-equal. Every field
    the RFCs do fix -- version/IHL, TOS, total length, flags/fragment offset, TTL (both sides
    use 64), protocol 50, addresses -- must equal the published header, our checksum must be
    valid, and substituting the published ID (and recomputing the checksum) must reproduce
    the published header exactly.
    """
    assert len(ours) == len(published) == 20
    assert ours[0:4] == published[0:4], "version/IHL, TOS, total length"
    assert ours[6:10] == published[6:10], "flags/fragment offset, TTL, protocol"
    assert ours[12:20] == published[12:20], "source and destination address"
    assert _inet_checksum(ours) == 0, "our header checksum is valid"
    patched = bytearray(ours)
    patched[4:6] = published[4:6]
    patched[10:12] = b"\x00\x00"
    patched[10:12] = _inet_checksum(bytes(patched)).to_bytes(2, "big")
    assert bytes(patched) == published


def _cbc_cfg(case: rfc3602.EspCbcCase, direction: Direction) -> SaConfig:
    mode = Mode.TRANSPORT if case.mode == "transport" else Mode.TUNNEL
    return SaConfig(
        spi=case.spi,
        protocol=IpProto.ESP,
        direction=direction,
        mode=mode,
        src=_addr(case.src),
        dst=_addr(case.dst),
        encr_id=Encr.AES_CBC,
        encr_key=case.key,
        integ_id=0,
        allow_legacy=True,
        seq_lease_start=case.seq,
    )


# --- RFC 3602 §4, cases #5-#8 (AES-CBC, no integrity) ------------------------------------


@pytest.mark.parametrize("case", rfc3602.CASES, ids=lambda c: c.name)
def test_rfc3602_aes_cbc_outbound_produces_the_published_packet(
    case: rfc3602.EspCbcCase,
) -> None:
    seen, source = _iv_hook(case.iv)
    sa = EspSa(_cbc_cfg(case, Direction.OUTBOUND), 0.0, lambda e: None, iv_source=source)
    out = sa.protect(case.original_packet, 0.0)
    assert seen == [case.seq]
    assert len(out) == len(case.esp_packet)
    if case.mode == "transport":
        # Transport mode keeps the original IPv4 header (ID, TTL, flags) and only changes the
        # protocol, total length and checksum: the whole packet is byte-exact.
        assert out == case.esp_packet
    else:
        assert out[20:] == case.esp, "ESP header, IV and ciphertext are byte-exact"
        _assert_outer_ipv4_matches(out[:20], case.outer_ip_header)


@pytest.mark.parametrize("case", rfc3602.CASES, ids=lambda c: c.name)
def test_rfc3602_aes_cbc_published_packet_decrypts_to_the_original(
    case: rfc3602.EspCbcCase,
) -> None:
    dp = Dataplane()
    sa = dp.install_sa(_cbc_cfg(case, Direction.INBOUND), 0.0)
    assert dp.inbound(case.esp_packet, 0.0) == case.original_packet
    assert not dp.drops
    assert sa.replay.top == case.seq
    # the same packet again is a replay
    assert dp.inbound(case.esp_packet, 0.0) is None
    assert dp.drops[DropReason.REPLAY] == 1


def test_rfc3602_cbc_without_integrity_is_refused_unless_legacy_is_enabled() -> None:
    case = rfc3602.CASES[0]
    cfg = _cbc_cfg(case, Direction.OUTBOUND)
    with pytest.raises(ConfigError):
        EspSa(SaConfig(**{**_fields(cfg), "allow_legacy": False}), 0.0, lambda e: None)


def _fields(cfg: SaConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in SaConfig.__dataclass_fields__}


# --- draft-mcgrew-gcm-test-01 ----------------------------------------------------------------


def _split_trailer(plaintext: bytes) -> tuple[bytes, int]:
    """(payload, next header) from payload || padding || pad length || next header."""
    pad_len = plaintext[-2]
    return plaintext[: len(plaintext) - 2 - pad_len], plaintext[-1]


def _gcm_cfg(case: mcgrew_gcm.EspGcmCase, direction: Direction, encr: int) -> SaConfig:
    return SaConfig(
        spi=case.spi,
        protocol=IpProto.ESP,
        direction=direction,
        mode=Mode.TUNNEL,
        src=_addr("192.0.2.1"),
        dst=_addr("192.0.2.2"),
        encr_id=encr,
        encr_key=case.key + case.salt,
        esn=case.esn,
        seq_lease_start=case.seq,
    )


def _gcm_cases() -> list[object]:
    out: list[object] = []
    for c in mcgrew_gcm.CASES:
        marks = []
        if c.key_bits == 192:
            marks.append(pytest.mark.skip(reason="192-bit AES is not offered (key_bits 128/256)"))
        elif c.spi < 256:
            marks.append(
                pytest.mark.skip(reason="SPI 0 is reserved (RFC 4303 §2.1); see the SPI-0 test")
            )
        out.append(pytest.param(c, id=c.name, marks=marks))
    return out


@pytest.mark.parametrize("case", _gcm_cases())
def test_mcgrew_gcm_seal_produces_the_published_esp_bytes(case: mcgrew_gcm.EspGcmCase) -> None:
    assert case.esp_packet is not None
    payload, nh = _split_trailer(case.plaintext)
    seen, source = _iv_hook(case.iv)
    sa = EspSa(
        _gcm_cfg(case, Direction.OUTBOUND, Encr.AES_GCM_16), 0.0, lambda e: None, iv_source=source
    )
    esp = sa.seal(payload, nh)
    assert seen == [case.seq]
    assert esp == case.esp_packet


def _position_window(sa: EspSa, seq: int) -> None:
    """Put the inbound window where it would be after authenticating ``seq - 1``.

    The vectors start at arbitrary (E)SNs; with ESN the receiver can only infer the high half
    from its window (RFC 4303 Appendix A2.2), so it must already be near the vector's number.
    """
    if seq > 1:
        sa.replay.update(seq - 1)


@pytest.mark.parametrize("case", _gcm_cases())
def test_mcgrew_gcm_published_esp_bytes_open_to_the_published_plaintext(
    case: mcgrew_gcm.EspGcmCase,
) -> None:
    assert case.esp_packet is not None
    payload, nh = _split_trailer(case.plaintext)
    sa = EspSa(_gcm_cfg(case, Direction.INBOUND, Encr.AES_GCM_16), 0.0, lambda e: None)
    _position_window(sa, case.seq)
    assert sa.open(case.esp_packet, 0.0) == (nh, payload)
    assert sa.replay.top == case.seq, "the full (E)SN was inferred from its low half"


@pytest.mark.parametrize("case", _gcm_cases())
def test_mcgrew_gcm_published_packet_through_the_engine(case: mcgrew_gcm.EspGcmCase) -> None:
    """The published ESP bytes under an IPv4 header into engine.inbound (transport mode):
    the result is the header with protocol = the vector's next header, then the payload."""
    assert case.esp_packet is not None
    payload, nh = _split_trailer(case.plaintext)
    cfg = SaConfig(
        **{
            **_fields(_gcm_cfg(case, Direction.INBOUND, Encr.AES_GCM_16)),
            "mode": Mode.TRANSPORT,
            "seq_lease_start": 1,
        }
    )
    dp = Dataplane()
    sa = dp.install_sa(cfg, 0.0)
    assert isinstance(sa, EspSa)
    _position_window(sa, case.seq)
    hdr = _ipv4(cfg.src, cfg.dst, IpProto.ESP, len(case.esp_packet))
    clear = dp.inbound(hdr + case.esp_packet, 0.0)
    assert clear == _ipv4(cfg.src, cfg.dst, nh, len(payload)) + payload
    assert dp.drops.total() == 0


def _ipv4(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0x1234, 0, 64, proto, 0, src, dst)
    return hdr[:10] + _inet_checksum(hdr).to_bytes(2, "big") + hdr[12:]


def test_mcgrew_gcm_tampered_esn_vector_is_rejected() -> None:
    """Negative control for the ESN vectors: the same bytes with a different inferred high
    half must fail authentication (the high bits really are in the AAD)."""
    case = next(c for c in mcgrew_gcm.CASES if c.esn and c.seq >> 32 and c.key_bits == 128)
    assert case.esp_packet is not None
    sa = EspSa(_gcm_cfg(case, Direction.INBOUND, Encr.AES_GCM_16), 0.0, lambda e: None)
    sa.replay.update(case.seq - 1 + (1 << 32))  # window one subspace later
    with pytest.raises(Drop) as exc:
        sa.open(case.esp_packet, 0.0)
    assert exc.value.reason == DropReason.AUTH
    assert sa.auth_drops == 1


def test_mcgrew_gcm_spi0_case_through_the_registry_aead_and_refused_as_an_sa() -> None:
    """The page-10 case uses SPI 0, which RFC 4303 §2.1 reserves: no SA may be installed with
    it, but the AEAD transform still reproduces the published bytes."""
    case = next(c for c in mcgrew_gcm.CASES if c.spi == 0)
    assert case.esp_packet is not None
    with pytest.raises(ConfigError):
        EspSa(_gcm_cfg(case, Direction.OUTBOUND, Encr.AES_GCM_16), 0.0, lambda e: None)
    aead = make_aead(ENCR[Encr.AES_GCM_16], case.key + case.salt)
    aad = case.esp_packet[:8]
    assert aad == case.aad
    assert case.esp_packet[:8] + case.iv + aead.seal(case.iv, aad, case.plaintext) == (
        case.esp_packet
    )
    assert aead.open(case.iv, aad, case.esp_packet[16:]) == case.plaintext
    with pytest.raises(AuthenticationFailed):
        aead.open(case.iv, b"\x00\x00\x00\x01" + aad[4:], case.esp_packet[16:])


def test_mcgrew_192_bit_key_is_refused() -> None:
    case = next(c for c in mcgrew_gcm.CASES if c.key_bits == 192)
    with pytest.raises(ConfigError):
        EspSa(_gcm_cfg(case, Direction.OUTBOUND, Encr.AES_GCM_16), 0.0, lambda e: None)


@pytest.mark.parametrize("case", mcgrew_gcm.GMAC_CASES, ids=lambda c: c.name)
def test_mcgrew_gmac_case_through_encr_null_auth_aes_gmac(case: mcgrew_gcm.EspGcmCase) -> None:
    assert case.esp_packet is not None
    # The ESP payload travels in the clear: it is the published packet between the IV and the
    # tag (and the draft's AAD after SPI || SN || IV).
    clear = case.esp_packet[16:-16]
    assert case.aad == case.esp_packet[:16] + clear
    payload, nh = _split_trailer(clear)
    seen, source = _iv_hook(case.iv)
    out_sa = EspSa(
        _gcm_cfg(case, Direction.OUTBOUND, Encr.NULL_AUTH_AES_GMAC),
        0.0,
        lambda e: None,
        iv_source=source,
    )
    assert out_sa.seal(payload, nh) == case.esp_packet
    assert seen == [case.seq]
    in_sa = EspSa(_gcm_cfg(case, Direction.INBOUND, Encr.NULL_AUTH_AES_GMAC), 0.0, lambda e: None)
    assert in_sa.open(case.esp_packet, 0.0) == (nh, payload)
    # GMAC authenticates the clear payload: one flipped payload bit fails
    bad = bytearray(case.esp_packet)
    bad[20] ^= 0x01
    in_sa2 = EspSa(_gcm_cfg(case, Direction.INBOUND, Encr.NULL_AUTH_AES_GMAC), 0.0, lambda e: None)
    with pytest.raises(Drop) as exc:
        in_sa2.open(bytes(bad), 0.0)
    assert exc.value.reason == DropReason.AUTH


# --- RFC 7634 Appendix A (ChaCha20-Poly1305) -------------------------------------------------


def _chacha_cfg(case: rfc7634.EspChaChaCase, direction: Direction) -> SaConfig:
    return SaConfig(
        spi=case.spi,
        protocol=IpProto.ESP,
        direction=direction,
        mode=Mode.TUNNEL,
        src=case.outer_ip_header[12:16],
        dst=case.outer_ip_header[16:20],
        encr_id=Encr.CHACHA20_POLY1305,
        encr_key=case.keymat,
        esn=case.esn,
        seq_lease_start=case.seq,
    )


@pytest.mark.parametrize("case", rfc7634.CASES, ids=lambda c: c.name)
def test_rfc7634_chacha20_poly1305_outbound_produces_the_published_packet(
    case: rfc7634.EspChaChaCase,
) -> None:
    seen, source = _iv_hook(case.iv)
    sa = EspSa(_chacha_cfg(case, Direction.OUTBOUND), 0.0, lambda e: None, iv_source=source)
    out = sa.protect(case.source_packet, 0.0)
    assert seen == [case.seq]
    assert out[20:] == case.esp_packet[20:], "SPI .. ICV byte-exact"
    _assert_outer_ipv4_matches(out[:20], case.outer_ip_header)


@pytest.mark.parametrize("case", rfc7634.CASES, ids=lambda c: c.name)
def test_rfc7634_published_packet_decrypts_to_the_source_packet(
    case: rfc7634.EspChaChaCase,
) -> None:
    dp = Dataplane()
    dp.install_sa(_chacha_cfg(case, Direction.INBOUND), 0.0)
    assert dp.inbound(case.esp_packet, 0.0) == case.source_packet
    assert dp.drops.total() == 0
    tampered = bytearray(case.esp_packet)
    tampered[-1] ^= 0x80
    dp2 = Dataplane()
    dp2.install_sa(_chacha_cfg(case, Direction.INBOUND), 0.0)
    assert dp2.inbound(bytes(tampered), 0.0) is None
    assert dp2.drops == {DropReason.AUTH: 1}
