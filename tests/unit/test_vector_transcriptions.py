"""Prove the published-vector transcriptions in tests/vectors with `cryptography` primitives only.

Nothing here imports the project's own code: each published output is recomputed from the
published inputs, so a mistyped byte in a transcription fails a test.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.poly1305 import Poly1305

# tests/ is not a package and the repository root is not on sys.path under plain `pytest`.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.vectors import mcgrew_gcm, rfc3602, rfc7634  # noqa: E402

# --- helpers -------------------------------------------------------------------------------


def _inet_checksum_ok(data: bytes) -> bool:
    """True when the one's-complement sum over data (checksum field included) is 0xffff."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def _check_ipv4(
    packet: bytes, *, protocol: int, src: str | None = None, dst: str | None = None
) -> int:
    """Check an IPv4 header's version/IHL, header checksum and protocol; return its length."""
    assert packet[0] == 0x45
    assert _inet_checksum_ok(packet[:20]), "IPv4 header checksum does not verify"
    assert packet[9] == protocol
    if src is not None:
        assert ".".join(str(b) for b in packet[12:16]) == src
    if dst is not None:
        assert ".".join(str(b) for b in packet[16:20]) == dst
    return int.from_bytes(packet[2:4], "big")


def _cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def _cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def _pad16(n: int) -> bytes:
    return bytes(-n % 16)


# --- RFC 3602 ------------------------------------------------------------------------------


def test_rfc3602_counts() -> None:
    assert [c.name for c in rfc3602.RAW_CASES] == [f"rfc3602-case{i}" for i in range(1, 5)]
    assert [c.name for c in rfc3602.CASES] == [f"rfc3602-case{i}" for i in range(5, 9)]


@pytest.mark.parametrize("case", rfc3602.RAW_CASES, ids=lambda c: c.name)
def test_rfc3602_raw_cbc(case: rfc3602.CbcCase) -> None:
    assert len(case.key) == 16 and len(case.iv) == 16
    assert _cbc_encrypt(case.key, case.iv, case.plaintext) == case.ciphertext
    assert _cbc_decrypt(case.key, case.iv, case.ciphertext) == case.plaintext


@pytest.mark.parametrize("case", rfc3602.CASES, ids=lambda c: c.name)
def test_rfc3602_esp_ciphertext(case: rfc3602.EspCbcCase) -> None:
    assert len(case.key) == 16 and len(case.iv) == 16
    assert _cbc_encrypt(case.key, case.iv, case.plaintext) == case.ciphertext
    assert _cbc_decrypt(case.key, case.iv, case.ciphertext) == case.plaintext


@pytest.mark.parametrize("case", rfc3602.CASES, ids=lambda c: c.name)
def test_rfc3602_esp_structure(case: rfc3602.EspCbcCase) -> None:
    # trailer: default monotonic padding, then pad length and next header
    assert case.padding == bytes(range(1, case.pad_length + 1))
    trailer = case.padding + bytes([case.pad_length, case.next_header])
    assert case.plaintext == case.payload + trailer
    assert len(case.plaintext) % 16 == 0

    # the original packet: valid IPv4 header, ICMP echo with a valid checksum
    orig_len = _check_ipv4(case.original_packet, protocol=1, src=case.src, dst=case.dst)
    assert orig_len == len(case.original_packet)
    assert _inet_checksum_ok(case.original_packet[20:]), "ICMP checksum does not verify"

    if case.mode == "transport":
        assert case.next_header == 1
        assert case.payload == case.original_packet[20:]
    else:
        assert case.mode == "tunnel"
        assert case.next_header == 4
        assert case.payload == case.original_packet

    # the ESP header and payload, and the full resulting packet
    esp_header = struct.pack("!II", case.spi, case.seq)
    assert case.esp == esp_header + case.iv + case.ciphertext
    assert case.esp_packet == case.outer_ip_header + case.esp
    out_len = _check_ipv4(case.esp_packet, protocol=50, src=case.src, dst=case.dst)
    assert out_len == len(case.esp_packet)


# --- draft-mcgrew-gcm-test-01 --------------------------------------------------------------


def test_mcgrew_counts() -> None:
    assert len(mcgrew_gcm.CASES) == 16
    assert len({c.name for c in mcgrew_gcm.CASES}) == 16
    assert sorted({c.key_bits for c in mcgrew_gcm.CASES}) == [128, 192, 256]
    assert sum(c.key_bits == 192 for c in mcgrew_gcm.CASES) == 1
    assert sum(c.esn for c in mcgrew_gcm.CASES) == 11
    assert len(mcgrew_gcm.GMAC_CASES) == 1


@pytest.mark.parametrize("case", mcgrew_gcm.CASES, ids=lambda c: c.name)
def test_mcgrew_gcm_encrypt(case: mcgrew_gcm.EspGcmCase) -> None:
    assert case.algorithm == "AES-GCM-ESP"
    assert len(case.key) * 8 == case.key_bits
    out = AESGCM(case.key).encrypt(case.salt + case.iv, case.plaintext, case.aad)
    assert out == case.ciphertext_and_icv
    assert AESGCM(case.key).decrypt(case.nonce, case.ciphertext_and_icv, case.aad) == (
        case.plaintext
    )


@pytest.mark.parametrize("case", mcgrew_gcm.CASES + mcgrew_gcm.GMAC_CASES, ids=lambda c: c.name)
def test_mcgrew_structure(case: mcgrew_gcm.EspGcmCase) -> None:
    assert len(case.salt) == 4 and len(case.iv) == 8
    assert case.salt + case.iv == case.nonce
    seq_field = case.seq.to_bytes(8 if case.esn else 4, "big")
    seq_low = (case.seq & 0xFFFFFFFF).to_bytes(4, "big")
    spi = case.spi.to_bytes(4, "big")
    assert case.esp_packet is not None
    if case.algorithm == "AES-GCM-ESP":
        assert case.aad == spi + seq_field
        assert len(case.ciphertext_and_icv) == len(case.plaintext) + 16
        assert case.esp_packet == spi + seq_low + case.iv + case.ciphertext_and_icv
        # ESP trailer: default padding 1..n, then pad length (next header is last)
        pad_len = case.plaintext[-2]
        assert case.plaintext[-2 - pad_len : -2] == bytes(range(1, pad_len + 1))
    else:
        # RFC 4543: aad = SPI || SN || IV || payload || trailer; packet = that || tag
        assert case.plaintext == b""
        assert case.aad[:8] == spi + seq_field
        assert case.aad[8:16] == case.iv
        assert case.esp_packet == case.aad + case.ciphertext_and_icv


@pytest.mark.parametrize("case", mcgrew_gcm.GMAC_CASES, ids=lambda c: c.name)
def test_mcgrew_gmac_tag(case: mcgrew_gcm.EspGcmCase) -> None:
    assert case.algorithm == "AES-GMAC-ESP"
    assert AESGCM(case.key).encrypt(case.nonce, b"", case.aad) == case.ciphertext_and_icv


# --- RFC 7634 ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", rfc7634.CASES, ids=lambda c: c.name)
def test_rfc7634_esp_aead(case: rfc7634.EspChaChaCase) -> None:
    assert case.keymat == case.key + case.salt
    assert len(case.key) == 32 and len(case.salt) == 4 and len(case.iv) == 8
    assert case.nonce == case.salt + case.iv
    out = ChaCha20Poly1305(case.key).encrypt(case.nonce, case.plaintext, case.aad)
    assert out == case.ciphertext + case.tag


@pytest.mark.parametrize("case", rfc7634.CASES, ids=lambda c: c.name)
def test_rfc7634_esp_intermediates(case: rfc7634.EspChaChaCase) -> None:
    # one-time Poly1305 key: ChaCha20 block 0 (RFC 8439 s2.6); cryptography's ChaCha20
    # takes a 16-octet nonce = 32-bit little-endian block counter || 96-bit nonce
    block0 = Cipher(algorithms.ChaCha20(case.key, bytes(4) + case.nonce), mode=None)
    otk = block0.encryptor().update(bytes(32))
    assert otk == case.poly1305_key

    mac_data = (
        case.aad
        + _pad16(len(case.aad))
        + case.ciphertext
        + _pad16(len(case.ciphertext))
        + struct.pack("<QQ", len(case.aad), len(case.ciphertext))
    )
    assert mac_data == case.poly1305_input
    assert Poly1305.generate_tag(case.poly1305_key, case.poly1305_input) == case.tag

    # keystream from block 1 encrypts the plaintext
    block1 = Cipher(algorithms.ChaCha20(case.key, b"\x01\x00\x00\x00" + case.nonce), mode=None)
    assert block1.encryptor().update(case.plaintext) == case.ciphertext


@pytest.mark.parametrize("case", rfc7634.CASES, ids=lambda c: c.name)
def test_rfc7634_esp_structure(case: rfc7634.EspChaChaCase) -> None:
    assert case.padding == bytes(range(1, case.pad_length + 1))
    trailer = case.padding + bytes([case.pad_length, case.next_header])
    assert case.plaintext == case.source_packet + trailer
    assert len(case.plaintext) % 4 == 0
    assert not case.esn
    assert case.aad == struct.pack("!II", case.spi, case.seq)

    inner_len = _check_ipv4(case.source_packet, protocol=1, src="198.51.100.5", dst="192.0.2.5")
    assert inner_len == len(case.source_packet)
    assert _inet_checksum_ok(case.source_packet[20:]), "ICMP checksum does not verify"

    outer_len = _check_ipv4(case.esp_packet, protocol=50, src="203.0.113.153", dst="203.0.113.5")
    assert outer_len == len(case.esp_packet)
    assert case.esp_packet == (
        case.outer_ip_header + case.aad + case.iv + case.ciphertext + case.tag
    )


def _snoop_frames(capture: bytes) -> list[bytes]:
    """Split an RFC 1761 snoop capture into its packet records' data."""
    assert capture[:8] == b"snoop\x00\x00\x00"
    version, datalink = struct.unpack("!II", capture[8:16])
    assert (version, datalink) == (2, 4)  # version 2, Ethernet
    frames: list[bytes] = []
    off = 16
    while off < len(capture):
        _orig, incl, rec_len, _drops, _sec, _usec = struct.unpack("!6I", capture[off : off + 24])
        frames.append(capture[off + 24 : off + 24 + incl])
        off += rec_len
    assert off == len(capture)
    return frames


def test_rfc7634_snoop_capture_agrees() -> None:
    esp = rfc7634.CASES[0]
    ike = rfc7634.IKE_CASES[0]
    frames = _snoop_frames(rfc7634.SNOOP_CAPTURE)
    assert len(frames) == 3
    assert frames[0][14:] == esp.source_packet
    assert frames[1][14:] == esp.esp_packet
    # IPv4 (20) + UDP (8) header before the IKE message
    assert frames[2][14 + 28 :] == ike.ike_message


@pytest.mark.parametrize("case", rfc7634.IKE_CASES, ids=lambda c: c.name)
def test_rfc7634_ike_aead(case: rfc7634.IkeChaChaCase) -> None:
    assert case.nonce == case.salt + case.iv
    assert case.plaintext == case.notify_payload + b"\x00"
    out = ChaCha20Poly1305(case.key).encrypt(case.nonce, case.plaintext, case.aad)
    assert out == case.ciphertext + case.tag

    mac_data = (
        case.aad
        + _pad16(len(case.aad))
        + case.ciphertext
        + _pad16(len(case.ciphertext))
        + struct.pack("<QQ", len(case.aad), len(case.ciphertext))
    )
    assert mac_data == case.poly1305_input
    otk = rfc7634.CASES[0].poly1305_key  # same key and nonce as Appendix A (RFC says so)
    assert Poly1305.generate_tag(otk, case.poly1305_input) == case.tag

    # Encrypted payload = generic payload header (last 4 AAD octets) || IV || ct || ICV
    assert case.encrypted_payload == case.aad[-4:] + case.iv + case.ciphertext + case.tag
    assert case.ike_message == case.aad[:28] + case.encrypted_payload
    assert int.from_bytes(case.ike_message[24:28], "big") == len(case.ike_message)
