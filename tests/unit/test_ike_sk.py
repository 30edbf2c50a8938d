"""IKEv2 SK / SKF protection (services.core.ike.sk).

* the published ChaCha20-Poly1305 IKEv2 example of RFC 7634 Appendix B, both directions;
* round trips for every supported cipher suite, tampering / truncation (hypothesis);
* RFC 7383 fragmentation and reassembly with its bounds;
* an independent oracle: tshark's IKEv2 decryption table decrypts and ICV-checks our messages.
"""

from __future__ import annotations

import itertools
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.algorithms import AlgorithmError, encr_algorithm, make_aead
from services.core.iana import Encr, Integ
from services.core.ike.constants import CertEncoding, ExchangeType, NotifyType, PayloadType
from services.core.ike.message import (
    SK,
    SKF,
    Cert,
    IkeDecodeError,
    Message,
    Nonce,
    Notify,
    VendorId,
    decode_message,
    encode_message,
)
from services.core.ike.sk import (
    MAX_FRAGMENTS,
    FragmentReassembler,
    SkCipher,
    SkError,
    decrypt_message,
    encrypt_message,
)
from tests.vectors import rfc7634

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("a1a2a3a4a5a6a7a8")


@dataclass(frozen=True)
class Suite:
    name: str
    encr_id: int
    encr_len: int  # SK_e* length, salt included
    integ_id: int = 0
    integ_len: int = 0
    legacy: bool = False

    def keys(self, seed: int) -> tuple[bytes, bytes]:
        e = bytes((seed + i) & 0xFF for i in range(self.encr_len))
        a = bytes((seed * 7 + i) & 0xFF for i in range(self.integ_len))
        return e, a

    def cipher(self, seed: int = 1) -> SkCipher:
        e, a = self.keys(seed)
        return SkCipher(self.encr_id, e, self.integ_id, a, allow_legacy=self.legacy)


SUITES = [
    Suite("aes-gcm-16-128", Encr.AES_GCM_16, 20),
    Suite("aes-gcm-16-256", Encr.AES_GCM_16, 36),
    Suite("chacha20-poly1305", Encr.CHACHA20_POLY1305, 36),
    Suite("aes-cbc-128/sha256", Encr.AES_CBC, 16, Integ.HMAC_SHA2_256_128, 32),
    Suite("aes-cbc-128/sha384", Encr.AES_CBC, 16, Integ.HMAC_SHA2_384_192, 48),
    Suite("aes-cbc-128/sha512", Encr.AES_CBC, 16, Integ.HMAC_SHA2_512_256, 64),
    Suite("aes-cbc-256/sha256", Encr.AES_CBC, 32, Integ.HMAC_SHA2_256_128, 32),
    Suite("aes-cbc-256/sha384", Encr.AES_CBC, 32, Integ.HMAC_SHA2_384_192, 48),
    Suite("aes-cbc-256/sha512", Encr.AES_CBC, 32, Integ.HMAC_SHA2_512_256, 64),
    Suite("aes-cbc-128/sha1-96 (legacy)", Encr.AES_CBC, 16, Integ.HMAC_SHA1_96, 20, True),
    Suite("3des/sha256 (legacy)", Encr.TRIPLE_DES, 24, Integ.HMAC_SHA2_256_128, 32, True),
]
BY_NAME = {s.name: s for s in SUITES}
suites = st.sampled_from(SUITES)
ids = [s.name for s in SUITES]


def _msg(payloads: tuple = (), **kw: object) -> Message:
    base: dict[str, object] = {
        "spi_i": SPI_I,
        "spi_r": SPI_R,
        "exchange_type": ExchangeType.INFORMATIONAL,
        "message_id": 7,
        "payloads": payloads,
        "initiator": True,
    }
    base.update(kw)
    return Message(**base)  # type: ignore[arg-type]


INNER = (
    Notify(NotifyType.INITIAL_CONTACT),
    Nonce(b"n" * 32),
    Notify(NotifyType.SET_WINDOW_SIZE, (10).to_bytes(4, "big")),
)


def _refit(raw: bytes, new_body: bytes) -> bytes:
    """Replace an SK message's sealed body, fixing the header and payload Length fields."""
    hdr = bytearray(raw[:32])
    struct.pack_into("!I", hdr, 24, 32 + len(new_body))
    struct.pack_into("!H", hdr, 30, 4 + len(new_body))
    return bytes(hdr) + new_body


# --- 1. RFC 7634 Appendix B --------------------------------------------------------------------


@pytest.mark.parametrize("case", rfc7634.IKE_CASES, ids=lambda c: c.name)
def test_rfc7634_appendix_b_decrypt(case: rfc7634.IkeChaChaCase) -> None:
    cipher = SkCipher(Encr.CHACHA20_POLY1305, case.key + case.salt, key_bits=256)
    msg = decrypt_message(case.ike_message, cipher)
    assert msg.payloads == (Notify(NotifyType.SET_WINDOW_SIZE, (10).to_bytes(4, "big")),)
    assert (msg.spi_i, msg.spi_r) == (bytes(range(0xC0, 0xC8)), bytes(range(0xD0, 0xD8)))
    assert msg.exchange_type == ExchangeType.INFORMATIONAL and msg.message_id == 9
    assert not (msg.initiator or msg.response)


@pytest.mark.parametrize("case", rfc7634.IKE_CASES, ids=lambda c: c.name)
def test_rfc7634_appendix_b_encrypt_reproduces_the_published_bytes(
    case: rfc7634.IkeChaChaCase,
) -> None:
    cipher = SkCipher(Encr.CHACHA20_POLY1305, case.key + case.salt)
    msg = Message(
        bytes(range(0xC0, 0xC8)),
        bytes(range(0xD0, 0xD8)),
        ExchangeType.INFORMATIONAL,
        9,
        (Notify(NotifyType.SET_WINDOW_SIZE, (10).to_bytes(4, "big")),),
    )
    assert encrypt_message(msg, cipher, iv=case.iv) == [case.ike_message]
    # also the payload-level pieces the RFC lists
    sk = decode_message(case.ike_message).payloads[0]
    assert isinstance(sk, SK) and sk.data == case.iv + case.ciphertext + case.tag


@pytest.mark.parametrize("case", rfc7634.IKE_CASES, ids=lambda c: c.name)
def test_rfc7634_appendix_b_every_tampered_byte_is_rejected(case: rfc7634.IkeChaChaCase) -> None:
    cipher = SkCipher(Encr.CHACHA20_POLY1305, case.key + case.salt)
    for i in range(len(case.ike_message)):
        bad = bytearray(case.ike_message)
        bad[i] ^= 0x01
        with pytest.raises((SkError, IkeDecodeError)):
            decrypt_message(bytes(bad), cipher)


# --- 2. round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=ids)
@pytest.mark.parametrize(
    "payloads",
    [(), INNER, (Cert(CertEncoding.X509_SIGNATURE, bytes(range(256)) * 3),)],
    ids=["empty", "notify-nonce-notify", "cert"],
)
def test_round_trip(suite: Suite, payloads: tuple) -> None:
    tx, rx = suite.cipher(), suite.cipher()
    msg = _msg(payloads, exchange_type=ExchangeType.IKE_AUTH, message_id=1, response=True)
    (raw,) = encrypt_message(msg, tx)
    outer = decode_message(raw)
    assert len(outer.payloads) == 1 and isinstance(outer.payloads[0], SK)
    sk = outer.payloads[0]
    assert sk.next_payload == (payloads[0].payload_type if payloads else 0)
    blk = encr_algorithm(suite.encr_id, allow_legacy=True).block_size if not tx.aead else 1
    assert tx.block_size == blk and (len(sk.data) - tx.iv_len - tx.icv_len) % blk == 0
    assert decrypt_message(raw, rx) == msg
    # a second message gets a fresh IV
    (raw2,) = encrypt_message(msg, tx)
    assert raw2[32 : 32 + tx.iv_len] != raw[32 : 32 + tx.iv_len]
    assert decrypt_message(raw2, rx) == msg


@FUZZ
@given(suites, st.binary(max_size=300), st.integers(0, 0xFFFFFFFF), st.booleans())
def test_round_trip_any_payload(suite: Suite, blob: bytes, mid: int, response: bool) -> None:
    msg = _msg((VendorId(blob), Nonce(blob[:16])), message_id=mid, response=response)
    (raw,) = encrypt_message(msg, suite.cipher())
    assert decrypt_message(raw, suite.cipher()) == msg


def test_aead_ivs_are_a_counter_and_unique() -> None:
    c = BY_NAME["aes-gcm-16-256"].cipher()
    ivs = [encrypt_message(_msg(INNER), c)[0][32:40] for _ in range(200)]
    assert len(set(ivs)) == 200
    nums = [int.from_bytes(iv, "big") for iv in ivs]
    assert all((b - a) % (1 << 64) == 1 for a, b in itertools.pairwise(nums))


def test_cbc_ivs_are_random() -> None:
    c = BY_NAME["aes-cbc-256/sha256"].cipher()
    ivs = {encrypt_message(_msg(INNER), c)[0][32:48] for _ in range(50)}
    assert len(ivs) == 50


def test_wrong_key_or_direction_is_an_sk_error() -> None:
    for suite in SUITES:
        (raw,) = encrypt_message(_msg(INNER), suite.cipher(1))
        with pytest.raises(SkError):
            decrypt_message(raw, suite.cipher(2))


def test_explicit_iv_must_have_the_iv_length() -> None:
    with pytest.raises(ValueError):
        encrypt_message(_msg(INNER), BY_NAME["aes-gcm-16-128"].cipher(), iv=bytes(16))
    with pytest.raises(ValueError):
        encrypt_message(_msg(INNER), BY_NAME["aes-cbc-128/sha256"].cipher(), iv=bytes(8))
    (raw,) = encrypt_message(_msg(INNER), BY_NAME["aes-cbc-128/sha256"].cipher(), iv=bytes(16))
    assert raw[32:48] == bytes(16)


def test_cipher_construction_rules() -> None:
    k36, k32 = bytes(36), bytes(32)
    with pytest.raises(AlgorithmError):  # AEAD with an integrity transform
        SkCipher(Encr.AES_GCM_16, k36, Integ.HMAC_SHA2_256_128, k32)
    with pytest.raises(AlgorithmError):  # CBC without integrity
        SkCipher(Encr.AES_CBC, k32)
    with pytest.raises(AlgorithmError):  # legacy integrity not enabled
        SkCipher(Encr.AES_CBC, k32, Integ.HMAC_SHA1_96, bytes(20))
    with pytest.raises(AlgorithmError):  # legacy cipher not enabled
        SkCipher(Encr.TRIPLE_DES, bytes(24), Integ.HMAC_SHA2_256_128, k32)
    with pytest.raises(AlgorithmError):  # wrong integrity key length
        SkCipher(Encr.AES_CBC, k32, Integ.HMAC_SHA2_256_128, bytes(20))
    with pytest.raises(AlgorithmError):  # key length vs negotiated Key Length
        SkCipher(Encr.AES_GCM_16, k36, key_bits=128)
    with pytest.raises(AlgorithmError):  # salt missing
        SkCipher(Encr.AES_GCM_16, k32)
    for bad in (Encr.NULL, Encr.NULL_AUTH_AES_GMAC, Encr.AES_CTR):
        with pytest.raises(AlgorithmError):
            SkCipher(bad, k36, allow_legacy=True)
    assert SkCipher(Encr.AES_GCM_16, bytes(20), key_bits=128).icv_len == 16
    assert (
        SkCipher(Encr.AES_CBC, k32, Integ.HMAC_SHA2_512_256, bytes(64), key_bits=256).icv_len == 32
    )


def test_repr_and_errors_carry_no_key() -> None:
    key = bytes.fromhex("5a" * 36)
    c = SkCipher(Encr.AES_GCM_16, key)
    assert "5a5a" not in repr(c) and "Z" not in repr(c)
    (raw,) = encrypt_message(_msg(INNER), c)
    bad = raw[:-1] + bytes((raw[-1] ^ 1,))
    with pytest.raises(SkError) as ei:
        decrypt_message(bad, c)
    assert "5a5a" not in str(ei.value) and ei.value.__cause__ is None


# --- 3. tampering, truncation, lengths, padding -------------------------------------------------


@FUZZ
@given(suites, st.data())
def test_tampering_any_byte_is_rejected(suite: Suite, data: st.DataObject) -> None:
    (raw,) = encrypt_message(_msg(INNER), suite.cipher())
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    bad = bytearray(raw)
    bad[i] ^= mask
    expected: tuple[type[Exception], ...] = (SkError,) if i >= 32 else (SkError, IkeDecodeError)
    with pytest.raises(expected):
        decrypt_message(bytes(bad), suite.cipher())


@pytest.mark.parametrize("suite", SUITES, ids=ids)
def test_authenticated_header_fields(suite: Suite) -> None:
    """SPIs, flags, exchange type, Message ID, minor version, SK header are all covered."""
    (raw,) = encrypt_message(_msg(INNER), suite.cipher())
    for i in [*range(16), 17, *range(18, 24), 28, 29]:
        bad = bytearray(raw)
        bad[i] ^= 0x01 if i != 29 else 0x80
        with pytest.raises(SkError):
            decrypt_message(bytes(bad), suite.cipher())


@FUZZ
@given(suites, st.data())
def test_truncation_is_rejected(suite: Suite, data: st.DataObject) -> None:
    (raw,) = encrypt_message(_msg(INNER), suite.cipher())
    n = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises((SkError, IkeDecodeError)):
        decrypt_message(raw[:n], suite.cipher())
    # the same with consistent Length fields: only the crypto layer can object
    if n > 32:
        with pytest.raises(SkError):
            decrypt_message(_refit(raw, raw[32:n]), suite.cipher())


@FUZZ
@given(suites, st.binary(min_size=1, max_size=40))
def test_extension_is_rejected(suite: Suite, extra: bytes) -> None:
    (raw,) = encrypt_message(_msg(INNER), suite.cipher())
    with pytest.raises(IkeDecodeError):
        decrypt_message(raw + extra, suite.cipher())
    with pytest.raises(SkError):
        decrypt_message(_refit(raw, raw[32:] + extra), suite.cipher())


@pytest.mark.parametrize("suite", SUITES, ids=ids)
def test_short_sealed_bodies_are_sk_errors(suite: Suite) -> None:
    (raw,) = encrypt_message(_msg(), suite.cipher())
    c = suite.cipher()
    for n in range(c.iv_len + c.icv_len + 1):
        with pytest.raises(SkError):
            decrypt_message(_refit(raw, bytes(n)), c)


def _aead_with_padded(key: bytes, padded: bytes) -> bytes:
    alg = encr_algorithm(Encr.AES_GCM_16)
    aead = make_aead(alg, key)
    iv = bytes(8)
    plen = 4 + 8 + len(padded) + 16
    hdr = (
        SPI_I
        + SPI_R
        + bytes((PayloadType.SK, 0x20, ExchangeType.INFORMATIONAL, 0x08))
        + struct.pack("!II", 7, 28 + plen)
        + struct.pack("!BBH", PayloadType.NOTIFY, 0, plen)
    )
    return hdr + iv + aead.seal(iv, hdr, padded)


def test_bad_pad_length_is_an_sk_error_and_any_padding_is_accepted() -> None:
    key = bytes(range(36))
    c = SkCipher(Encr.AES_GCM_16, key)
    notify = Notify(NotifyType.INITIAL_CONTACT)
    body = encode_message(_msg((notify,)))[28:]
    with pytest.raises(SkError):
        decrypt_message(_aead_with_padded(key, body + bytes((len(body) + 1,))), c)
    # RFC 7296 §3.14: padding content is arbitrary; AEAD peers may still pad
    m = decrypt_message(_aead_with_padded(key, body + b"\xff" * 7 + b"\x07"), c)
    assert m.payloads == (notify,)
    # pad length covering everything: no inner payloads, but SK's Next Payload says NOTIFY
    with pytest.raises(IkeDecodeError):
        decrypt_message(_aead_with_padded(key, body + bytes((len(body),))), c)


def test_malformed_inner_payloads_raise_ike_decode_error_with_header() -> None:
    key = bytes(range(36))
    c = SkCipher(Encr.AES_GCM_16, key)
    with pytest.raises(IkeDecodeError) as ei:
        decrypt_message(_aead_with_padded(key, b"\x00\x00\x00\x02\x00"), c)
    assert ei.value.notify_type == NotifyType.INVALID_SYNTAX
    assert ei.value.header is not None and ei.value.header.spi_i == SPI_I


def test_messages_without_sk_are_ike_decode_errors() -> None:
    c = BY_NAME["aes-gcm-16-128"].cipher()
    with pytest.raises(IkeDecodeError):
        decrypt_message(encode_message(_msg(INNER)), c)
    with pytest.raises(IkeDecodeError):
        decrypt_message(encode_message(_msg()), c)
    frags = encrypt_message(_msg((VendorId(bytes(3000)),)), c, fragment_size=1280)
    with pytest.raises(IkeDecodeError):
        decrypt_message(frags[0], c)


# --- 4. fragmentation (RFC 7383) ---------------------------------------------------------------

BIG = (
    Cert(CertEncoding.X509_SIGNATURE, bytes(random.Random(5).randbytes(5000))),
    Notify(NotifyType.INITIAL_CONTACT),
)


@pytest.mark.parametrize("suite", SUITES, ids=ids)
def test_fragments_reassemble_out_of_order(suite: Suite) -> None:
    msg = _msg(BIG, exchange_type=ExchangeType.IKE_AUTH, message_id=1)
    frags = encrypt_message(msg, suite.cipher(), fragment_size=1280)
    assert len(frags) == 5
    total = len(frags)
    for n, raw in enumerate(frags, 1):
        assert len(raw) <= 1280
        outer = decode_message(raw)
        assert replace(outer, payloads=()) == replace(msg, payloads=())
        (skf,) = outer.payloads
        assert isinstance(skf, SKF)
        assert (skf.fragment_number, skf.total_fragments) == (n, total)
        assert skf.next_payload == (PayloadType.CERT if n == 1 else 0)
    # all but the last are filled to the size
    assert all(len(r) > 1280 - 16 for r in frags[:-1])
    r = FragmentReassembler()
    order = [3, 0, 4, 2, 1]
    results = [r.add(frags[i], suite.cipher()) for i in order]
    assert results[:-1] == [None] * 4 and results[-1] == msg
    assert len(r) == 0


@FUZZ
@given(suites, st.binary(min_size=0, max_size=4000), st.integers(200, 1500), st.randoms())
def test_fragment_round_trip_any_size(
    suite: Suite, blob: bytes, size: int, rnd: random.Random
) -> None:
    msg = _msg((VendorId(blob),))
    frags = encrypt_message(msg, suite.cipher(), fragment_size=size)
    assert all(len(f) <= size for f in frags) or len(frags) == 1
    rnd.shuffle(frags)
    r = FragmentReassembler()
    out = [r.add(f, suite.cipher()) for f in frags]
    assert out[-1] == msg and all(o is None for o in out[:-1])


def test_unfragmented_when_it_fits_and_add_passes_sk_through() -> None:
    c = BY_NAME["aes-gcm-16-256"].cipher()
    (raw,) = encrypt_message(_msg(INNER), c, fragment_size=1280)
    assert isinstance(decode_message(raw).payloads[0], SK)
    assert FragmentReassembler().add(raw, c) == _msg(INNER)


def test_fragment_argument_checks() -> None:
    c = BY_NAME["aes-cbc-256/sha512"].cipher()
    with pytest.raises(ValueError):
        encrypt_message(_msg(BIG), c, fragment_size=60)
    with pytest.raises(ValueError):
        encrypt_message(_msg(BIG), c, fragment_size=1280, iv=bytes(16))


@pytest.mark.parametrize("suite", [BY_NAME["aes-gcm-16-256"], BY_NAME["aes-cbc-256/sha256"]])
def test_tampered_fragment_is_rejected_and_the_set_survives(suite: Suite) -> None:
    frags = encrypt_message(_msg(BIG), suite.cipher(), fragment_size=1280)
    r = FragmentReassembler()
    assert r.add(frags[0], suite.cipher()) is None
    for i in (20, 29, 33, 35, 40, len(frags[1]) - 1):  # header, SKF header, frag fields, data, ICV
        bad = bytearray(frags[1])
        bad[i] ^= 0x01
        with pytest.raises(SkError):
            r.add(bytes(bad), suite.cipher())
    with pytest.raises(SkError):  # a fragment from another key
        r.add(frags[1], suite.cipher(9))
    for f in frags[1:-1]:
        assert r.add(f, suite.cipher()) is None
    assert r.add(frags[-1], suite.cipher()) == _msg(BIG)


@FUZZ
@given(st.data())
def test_fragment_tampering_never_raises_anything_else(data: st.DataObject) -> None:
    suite = data.draw(suites)
    frags = encrypt_message(_msg(BIG), suite.cipher(), fragment_size=1280)
    k = data.draw(st.integers(0, len(frags) - 1))
    i = data.draw(st.integers(0, len(frags[k]) - 1))
    bad = bytearray(frags[k])
    bad[i] ^= data.draw(st.integers(1, 255))
    n = data.draw(st.integers(0, len(bad)))
    with pytest.raises((SkError, IkeDecodeError)):
        FragmentReassembler().add(bytes(bad[:n]) if n < len(bad) else bytes(bad), suite.cipher())


def test_duplicates_are_ignored() -> None:
    c = BY_NAME["chacha20-poly1305"].cipher()
    frags = encrypt_message(_msg(BIG), c, fragment_size=1280)
    r = FragmentReassembler()
    for f in frags[:-1]:
        assert r.add(f, c) is None
        assert r.add(f, c) is None
    assert r.add(frags[-1], c) == _msg(BIG)
    assert r.dropped == 0


def test_too_many_fragments_are_dropped() -> None:
    c = BY_NAME["aes-gcm-16-128"].cipher()
    frags = encrypt_message(_msg((VendorId(bytes(65 * 100)),)), c, fragment_size=160)
    assert len(frags) > MAX_FRAGMENTS
    r = FragmentReassembler()
    assert all(r.add(f, c) is None for f in frags)
    assert len(r) == 0 and r.dropped == len(frags)
    small = FragmentReassembler(max_fragments=4)
    assert all(small.add(f, c) is None for f in encrypt_message(_msg(BIG), c, fragment_size=1280))
    assert len(small) == 0


def test_oversized_reassembly_is_dropped() -> None:
    c = BY_NAME["aes-gcm-16-256"].cipher()
    payloads = (VendorId(bytes(40000)), VendorId(bytes(30000)))  # 70 kB > 64 KiB
    frags = encrypt_message(_msg(payloads), c, fragment_size=1400)
    assert len(frags) <= MAX_FRAGMENTS
    r = FragmentReassembler()
    assert all(r.add(f, c) is None for f in frags)
    assert len(r) <= 1 and r.dropped >= 1
    # a 60 kB message is fine
    ok = (VendorId(bytes(30000)), VendorId(bytes(30000)))
    frags = encrypt_message(_msg(ok), c, fragment_size=1400)
    r = FragmentReassembler()
    assert [r.add(f, c) for f in frags][-1] == _msg(ok)


def test_mismatched_totals() -> None:
    """RFC 7383 §2.6: a larger Total Fragments restarts the set, a smaller one is discarded."""
    c = BY_NAME["aes-gcm-16-256"].cipher()
    coarse = encrypt_message(_msg(BIG), c, fragment_size=1280)  # 5 fragments
    fine = encrypt_message(_msg(BIG), c, fragment_size=600)
    assert len(fine) > len(coarse)
    r = FragmentReassembler()
    for f in coarse[:3]:
        assert r.add(f, c) is None
    for f in fine[:-1]:
        assert r.add(f, c) is None
    assert r.dropped == 1  # the coarse set
    assert r.add(coarse[3], c) is None  # smaller total: discarded
    assert r.dropped == 2
    assert r.add(fine[-1], c) == _msg(BIG)


def test_sets_are_keyed_by_spis_and_message_id_and_bounded() -> None:
    c = BY_NAME["aes-gcm-16-256"].cipher()
    a = encrypt_message(_msg(BIG, message_id=1), c, fragment_size=1280)
    b = encrypt_message(_msg(BIG, message_id=2), c, fragment_size=1280)
    d = encrypt_message(_msg(BIG, message_id=1, spi_r=bytes(8)), c, fragment_size=1280)
    r = FragmentReassembler()
    for fa, fb, fd in zip(a[:-1], b[:-1], d[:-1], strict=True):
        assert r.add(fa, c) is None and r.add(fb, c) is None and r.add(fd, c) is None
    assert len(r) == 3
    assert r.add(b[-1], c) == _msg(BIG, message_id=2)
    assert r.add(d[-1], c) == _msg(BIG, message_id=1, spi_r=bytes(8))
    assert r.add(a[-1], c) == _msg(BIG, message_id=1)
    small = FragmentReassembler(max_sets=2)
    for mid in range(1, 5):
        small.add(encrypt_message(_msg(BIG, message_id=mid), c, fragment_size=1280)[0], c)
    assert len(small) == 2 and small.dropped == 2


# --- 5. tshark oracle --------------------------------------------------------------------------

_TSHARK = shutil.which("tshark")
_FIELDS = [
    "_ws.malformed",
    "_ws.expert.message",
    "isakmp.ispi",
    "isakmp.typepayload",
    "isakmp.notify.msgtype",
    "isakmp.enc.pad_length",
    "isakmp.frag.number",
]
# tshark 4.0 value strings of its IKEv2 decryption table (packet-isakmp.c vs_ikev2_*_algs);
# ChaCha20-Poly1305 is not among them in 4.0.
_WS_ENCR = {
    ("aes-gcm-16", 20): "AES-GCM-128 with 16 octet ICV [RFC5282]",
    ("aes-gcm-16", 36): "AES-GCM-256 with 16 octet ICV [RFC5282]",
    ("aes-cbc", 16): "AES-CBC-128 [RFC3602]",
    ("aes-cbc", 32): "AES-CBC-256 [RFC3602]",
}
_WS_INTEG = {
    0: "NONE [RFC4306]",
    Integ.HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
    Integ.HMAC_SHA2_384_192: "HMAC_SHA2_384_192 [RFC4868]",
    Integ.HMAC_SHA2_512_256: "HMAC_SHA2_512_256 [RFC4868]",
}


def _uat(suite: Suite, spi_i: bytes, ei: bytes, er: bytes, ai: bytes, ar: bytes) -> str:
    """One ikev2_decryption_table record: SPIi, SPIr, SK_ei, SK_er, encr, SK_ai, SK_ar, integ
    (byte fields as bare hex, the algorithms as quoted display strings)."""
    encr = _WS_ENCR[(encr_algorithm(suite.encr_id).name, suite.encr_len)]
    return (
        f'uat:ikev2_decryption_table:{spi_i.hex()},{SPI_R.hex()},{ei.hex()},{er.hex()},"{encr}",'
        f'{ai.hex()},{ar.hex()},"{_WS_INTEG[suite.integ_id]}"'
    )


def _tshark(messages: list[bytes], uats: list[str], tmp_path: Path) -> tuple[list[dict], str]:
    from scapy.all import IP, UDP, Ether, Raw, wrpcap

    pcap = tmp_path / "sk.pcap"
    wrpcap(
        str(pcap),
        [
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="192.0.2.1", dst="192.0.2.2")
            / UDP(sport=500, dport=500)
            / Raw(m)
            for m in messages
        ],
    )
    base = [str(_TSHARK), "-n", "-r", str(pcap)]
    for uat in uats:
        base += ["-o", uat]
    cmd = [*base, "-T", "fields", "-E", "separator=|", "-E", "aggregator=;"]
    for f in _FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split("|")
        rows.append({f: [v for v in c.split(";") if v] for f, c in zip(_FIELDS, cols, strict=True)})
    assert len(rows) == len(messages)
    verbose = subprocess.run(
        [*base, "-V"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return rows, verbose


TSHARK_SUITES = [
    "aes-gcm-16-256",
    "aes-gcm-16-128",
    "aes-cbc-256/sha256",
    "aes-cbc-128/sha384",
    "aes-cbc-256/sha512",
]


@pytest.mark.skipif(_TSHARK is None, reason="tshark is not installed")
@pytest.mark.parametrize("name", TSHARK_SUITES)
def test_tshark_decrypts_and_verifies_our_messages(name: str, tmp_path: Path) -> None:
    suite = BY_NAME[name]
    (ei, ai), (er, ar) = suite.keys(1), suite.keys(2)
    tx_i = SkCipher(suite.encr_id, ei, suite.integ_id, ai)
    tx_r = SkCipher(suite.encr_id, er, suite.integ_id, ar)
    req = _msg(INNER, message_id=3)
    resp = _msg((Notify(NotifyType.SET_WINDOW_SIZE, bytes(4)),), message_id=3, response=True)
    resp = replace(resp, initiator=False)
    big = _msg((VendorId(bytes(range(256)) * 12),), exchange_type=ExchangeType.IKE_AUTH)
    frags = encrypt_message(big, tx_i, fragment_size=1000)
    assert len(frags) == 4
    # a message under a second SPI whose table record has wrong SK_ei / SK_ai: negative control
    spi_x = bytes(8)
    bad_ei, bad_ai = bytes(b ^ 1 for b in ei), bytes(b ^ 1 for b in ai)
    msgs = [
        *encrypt_message(req, tx_i),
        *encrypt_message(resp, tx_r),
        *frags,
        *encrypt_message(replace(req, spi_i=spi_x), tx_i),
    ]
    uats = [_uat(suite, SPI_I, ei, er, ai, ar), _uat(suite, spi_x, bad_ei, er, bad_ai, ar)]
    rows, verbose = _tshark(msgs, uats, tmp_path)

    for row in rows[:6]:
        assert not row["_ws.malformed"], row
        assert not row["_ws.expert.message"], row
    # decrypted inner payloads: SK (46) then the inner chain
    assert [int(t) for t in rows[0]["isakmp.typepayload"]] == [46, 41, 40, 41]
    assert [int(t) for t in rows[0]["isakmp.notify.msgtype"]] == [16384, 16385]
    assert [int(t) for t in rows[1]["isakmp.typepayload"]] == [46, 41]
    assert [int(t) for t in rows[1]["isakmp.notify.msgtype"]] == [16385]
    # fragments: each SKF decrypted (tshark checks each ICV), the last shows the reassembled
    # Vendor ID
    assert [r["isakmp.frag.number"] for r in rows[2:6]] == [["1"], ["2"], ["3"], ["4"]]
    assert [int(t) for t in rows[5]["isakmp.typepayload"]] == [53, 43]
    # ICV / tag checked by tshark: correct for our six messages, not for the control
    assert verbose.count("[correct]") == 6 and verbose.count("[incorrect") == 1
    assert rows[6]["_ws.expert.message"] and not rows[6]["isakmp.notify.msgtype"]
