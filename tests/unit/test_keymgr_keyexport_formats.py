"""keymgr's Wireshark key export records (services/keymgr/events.py ike_uat / esp_uat) for
every suite keymgr negotiates (services/core/ike/suites.py), checked byte for byte against
hand-written records and against tshark 4.0 itself: tshark refuses a ``-o uat:...`` value
whose algorithm name is not one of its table's strings, so a record it accepts names an
algorithm it knows (a mangled name is refused: the oracle can fail). ChaCha20-Poly1305 is in
neither of Wireshark 4.0's tables: keymgr exports nothing for it and says why.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from services.core.iana import Encr, Integ, IpProto
from services.core.ike.keys import IkeKeys
from services.core.ike.suites import EspSuite, IkeSuite, parse_esp, parse_ike
from services.core.sa import Direction, Mode, SaConfig
from services.keymgr.events import KeyExporter, KeyExportError, esp_uat, ike_uat
from tests.netns import tshark

SPI_I = bytes.fromhex("0011223344556677")
SPI_R = bytes.fromhex("8899aabbccddeeff")

# every IKE encryption x integrity keymgr can negotiate that Wireshark 4.0 can decrypt
IKE_SUITES = {
    "aes128-sha256-modp2048": ("AES-CBC-128 [RFC3602]", "HMAC_SHA2_256_128 [RFC4868]"),
    "aes256-sha256-modp2048": ("AES-CBC-256 [RFC3602]", "HMAC_SHA2_256_128 [RFC4868]"),
    "aes256-sha384-ecp384": ("AES-CBC-256 [RFC3602]", "HMAC_SHA2_384_192 [RFC4868]"),
    "aes128-sha512-x25519": ("AES-CBC-128 [RFC3602]", "HMAC_SHA2_512_256 [RFC4868]"),
    "aes128gcm16-prfsha256-x25519": ("AES-GCM-128 with 16 octet ICV [RFC5282]", "NONE [RFC4306]"),
    "aes256gcm16-prfsha384-ecp256": ("AES-GCM-256 with 16 octet ICV [RFC5282]", "NONE [RFC4306]"),
}
LEGACY_IKE_SUITES = {
    "3des-sha1-prfsha256-modp2048": ("3DES [RFC2451]", "HMAC_SHA1_96 [RFC2404]"),
}
ESP_SUITES = {
    "aes128-sha256": ("AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
    "aes256-sha384": ("AES-CBC [RFC3602]", "HMAC-SHA-384-192 [RFC4868]"),
    "aes256-sha512": ("AES-CBC [RFC3602]", "HMAC-SHA-512-256 [RFC4868]"),
    "aes128gcm16": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "aes256gcm16-x25519": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
}
LEGACY_ESP_SUITES = {
    "3des-sha1": ("TripleDES-CBC [RFC2451]", "HMAC-SHA-1-96 [RFC2404]"),
}


def _keys(suite: IkeSuite) -> IkeKeys:
    def k(n: int, fill: int) -> bytes:
        return bytes([fill]) * n

    return IkeKeys(
        sk_d=k(32, 0xD0),
        sk_ai=k(suite.integ_key_len, 0xA1),
        sk_ar=k(suite.integ_key_len, 0xA2),
        sk_ei=k(suite.encr_key_len, 0xE1),
        sk_er=k(suite.encr_key_len, 0xE2),
        sk_pi=k(32, 0xB1),
        sk_pr=k(32, 0xB2),
    )


def _ike_record(text: str, legacy: bool = False) -> str:
    s = parse_ike(text, allow_legacy=legacy)
    return ike_uat(SPI_I, SPI_R, _keys(s), s.encr, s.key_bits, s.integ)


def _esp_sa(s: EspSuite, src: str = "192.0.2.1", dst: str = "192.0.2.2") -> SaConfig:
    return SaConfig(
        spi=0x0A0B0C0D,
        protocol=IpProto.ESP,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=ipaddress.ip_address(src).packed,
        dst=ipaddress.ip_address(dst).packed,
        encr_id=s.encr,
        encr_key=bytes([0xE1]) * s.encr_key_len,
        integ_id=s.integ,
        integ_key=bytes([0xA1]) * s.integ_key_len,
        allow_legacy=True,
    )


@pytest.mark.parametrize("text", [*IKE_SUITES, *LEGACY_IKE_SUITES])
def test_ike_record_names_wiresharks_algorithms_byte_for_byte(text: str) -> None:
    legacy = text in LEGACY_IKE_SUITES
    encr, integ = {**IKE_SUITES, **LEGACY_IKE_SUITES}[text]
    s = parse_ike(text, allow_legacy=legacy)
    ai = "" if s.aead else (bytes([0xA1]) * s.integ_key_len).hex()
    ar = "" if s.aead else (bytes([0xA2]) * s.integ_key_len).hex()
    ei, er = (bytes([b]) * s.encr_key_len for b in (0xE1, 0xE2))
    want = (
        "uat:ikev2_decryption_table:0011223344556677,8899aabbccddeeff,"
        f'{ei.hex()},{er.hex()},"{encr}",{ai},{ar},"{integ}"'
    )
    assert _ike_record(text, legacy) == want


def test_gcm_record_matches_the_test_helpers_format() -> None:
    s = parse_ike("aes256gcm16-prfsha256-x25519")
    keys = _keys(s)
    assert len(keys.sk_ei) == 36  # 32-octet key || 4-octet salt (RFC 5282 §7.1)
    assert ike_uat(SPI_I, SPI_R, keys, s.encr, s.key_bits, s.integ) == tshark.ike_uat(
        SPI_I, SPI_R, keys.sk_ei, keys.sk_er, "AES-GCM-256 with 16 octet ICV [RFC5282]"
    )


@pytest.mark.parametrize("text", [*ESP_SUITES, *LEGACY_ESP_SUITES])
def test_esp_record_names_wiresharks_algorithms_byte_for_byte(text: str) -> None:
    encr, auth = {**ESP_SUITES, **LEGACY_ESP_SUITES}[text]
    s = parse_esp(text, allow_legacy=text in LEGACY_ESP_SUITES)
    ek = "0x" + (bytes([0xE1]) * s.encr_key_len).hex()
    ak = "0x" + (bytes([0xA1]) * s.integ_key_len).hex() if s.integ_key_len else ""
    want = f'uat:esp_sa:"IPv4","192.0.2.1","192.0.2.2","0x0a0b0c0d","{encr}","{ek}","{auth}","{ak}"'
    assert esp_uat(_esp_sa(s)) == want
    v6 = esp_uat(_esp_sa(s, "2001:db8::1", "2001:db8::2"))
    assert v6.startswith('uat:esp_sa:"IPv6","2001:db8::1","2001:db8::2","0x0a0b0c0d",')
    # the netns helpers build the same record from the same SA
    (rec,) = tshark.esp_records([_esp_sa(s)])
    assert "uat:esp_sa:" + rec.uat() == want


def test_chacha20_poly1305_is_not_exported_and_says_why(tmp_path: Path) -> None:
    ike = parse_ike("chacha20poly1305-prfsha256-x25519")
    with pytest.raises(KeyExportError, match=r"4\.0 cannot decrypt IKE CHACHA20_POLY1305"):
        ike_uat(SPI_I, SPI_R, _keys(ike), ike.encr, ike.key_bits, ike.integ)
    esp = parse_esp("chacha20poly1305")
    with pytest.raises(KeyExportError, match="cannot decrypt ESP CHACHA20_POLY1305"):
        esp_uat(_esp_sa(esp))
    exp = KeyExporter(tmp_path / "keys.txt")
    exp.open()
    exp.ike_sa(SPI_I, SPI_R, _keys(ike), encr_id=ike.encr, key_bits=ike.key_bits)
    exp.child_sas((_esp_sa(esp), _esp_sa(parse_esp("aes128gcm16"))))
    lines = (tmp_path / "keys.txt").read_text().splitlines()
    assert exp.failures == 2 and len(lines) == 1 and '"AES-GCM with 16 octet ICV' in lines[0]


def test_unknown_integrity_is_refused() -> None:
    s = parse_ike("aes128-sha256-modp2048")
    with pytest.raises(KeyExportError):
        ike_uat(SPI_I, SPI_R, _keys(s), Encr.AES_CBC, 128, Integ.AES_XCBC_96)


# --- tshark 4.0 as the oracle for the names ----------------------------------------------------


def _tshark_accepts(tmp_path: Path, records: list[str]) -> subprocess.CompletedProcess[str]:
    pcap = tmp_path / "empty.pcap"
    pcap.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    argv = ["tshark", "-n", "-r", str(pcap)]
    for r in records:
        argv += ["-o", r]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_accepts_every_exported_record(tmp_path: Path) -> None:
    records = [_ike_record(t) for t in IKE_SUITES]
    records += [_ike_record(t, legacy=True) for t in LEGACY_IKE_SUITES]
    records += [esp_uat(_esp_sa(parse_esp(t))) for t in ESP_SUITES]
    records += [esp_uat(_esp_sa(parse_esp(t, allow_legacy=True))) for t in LEGACY_ESP_SUITES]
    for rec in records:  # one at a time: the error names the record
        res = _tshark_accepts(tmp_path, [rec])
        assert res.returncode == 0, (rec[:60], res.stderr[-300:])
    # the oracle can fail: a name off by one character is refused
    bad = _ike_record("aes128-sha256-modp2048").replace("HMAC_SHA2_256_128", "HMAC-SHA2-256-128")
    assert _tshark_accepts(tmp_path, [bad]).returncode != 0
    bad_esp = esp_uat(_esp_sa(parse_esp("aes128gcm16"))).replace("16 octet", "16 octets")
    assert _tshark_accepts(tmp_path, [bad_esp]).returncode != 0
