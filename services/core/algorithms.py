"""Algorithm registry, algorithms as data: RFC 4106 (GCM), RFC 4543 (GMAC), RFC 7634 (ChaCha20-
Poly1305), RFC 3602 (AES-CBC), RFC 2451 (3DES-CBC), RFC 2410 (NULL), RFC 4868 / RFC 2404 (HMAC).

Each record describes sizes; ``make_*`` builds a keyed context once per SA so that no cipher or
HMAC object is constructed per packet.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from services.core.iana import Encr, Integ


class AlgorithmError(ValueError):
    """An algorithm or key that cannot be used (unknown, legacy not enabled, wrong key size)."""


class AuthenticationFailed(Exception):
    """The ICV did not verify. Carries no key or data."""


@dataclass(frozen=True, slots=True)
class EncrAlgorithm:
    transform_id: Encr
    name: str
    key_bits: tuple[int, ...]  # allowed cipher key lengths, salt excluded
    salt_len: int  # bytes of salt appended to the key material (RFC 4106 §8.1)
    iv_len: int  # explicit IV carried in each packet
    block_size: int  # padding alignment (at least 4, RFC 4303 §2.4)
    icv_len: int  # tag length for combined-mode algorithms, else 0
    aead: bool  # combined mode: provides integrity, no separate INTEG transform
    encrypts: bool  # False for NULL and GMAC (integrity only)
    legacy: bool = False


@dataclass(frozen=True, slots=True)
class IntegAlgorithm:
    transform_id: Integ
    name: str
    key_len: int
    icv_len: int
    digest: str  # hashlib name
    legacy: bool = False


ENCR: dict[int, EncrAlgorithm] = {
    a.transform_id: a
    for a in (
        EncrAlgorithm(Encr.AES_GCM_16, "aes-gcm-16", (128, 256), 4, 8, 4, 16, True, True),
        EncrAlgorithm(Encr.NULL_AUTH_AES_GMAC, "aes-gmac", (128, 256), 4, 8, 4, 16, True, False),
        EncrAlgorithm(Encr.CHACHA20_POLY1305, "chacha20-poly1305", (256,), 4, 8, 4, 16, True, True),
        EncrAlgorithm(Encr.AES_CBC, "aes-cbc", (128, 256), 0, 16, 16, 0, False, True),
        EncrAlgorithm(Encr.NULL, "null", (0,), 0, 0, 4, 0, False, False),
        EncrAlgorithm(Encr.TRIPLE_DES, "3des-cbc", (192,), 0, 8, 8, 0, False, True, legacy=True),
    )
}

INTEG: dict[int, IntegAlgorithm] = {
    a.transform_id: a
    for a in (
        IntegAlgorithm(Integ.HMAC_SHA2_256_128, "hmac-sha256-128", 32, 16, "sha256"),
        IntegAlgorithm(Integ.HMAC_SHA2_384_192, "hmac-sha384-192", 48, 24, "sha384"),
        IntegAlgorithm(Integ.HMAC_SHA2_512_256, "hmac-sha512-256", 64, 32, "sha512"),
        IntegAlgorithm(Integ.HMAC_SHA1_96, "hmac-sha1-96", 20, 12, "sha1", legacy=True),
    )
}


def encr_algorithm(transform_id: int, *, allow_legacy: bool = False) -> EncrAlgorithm:
    alg = ENCR.get(transform_id)
    if alg is None:
        raise AlgorithmError(f"unsupported encryption transform {transform_id}")
    if alg.legacy and not allow_legacy:
        raise AlgorithmError(f"{alg.name} is legacy and not enabled")
    return alg


def integ_algorithm(transform_id: int, *, allow_legacy: bool = False) -> IntegAlgorithm:
    alg = INTEG.get(transform_id)
    if alg is None:
        raise AlgorithmError(f"unsupported integrity transform {transform_id}")
    if alg.legacy and not allow_legacy:
        raise AlgorithmError(f"{alg.name} is legacy and not enabled")
    return alg


def split_encr_key(alg: EncrAlgorithm, key_material: bytes) -> tuple[bytes, bytes]:
    """Split keying material into (cipher key, salt), checking its length (RFC 4106 §8.1)."""
    for bits in alg.key_bits:
        if len(key_material) == bits // 8 + alg.salt_len:
            cut = bits // 8
            return key_material[:cut], key_material[cut:]
    raise AlgorithmError(f"{alg.name}: key material of {len(key_material)} bytes is not valid")


# --- keyed contexts ----------------------------------------------------------------------------


class Aead(Protocol):
    """A keyed combined-mode transform: nonce = salt || explicit IV."""

    icv_len: int

    def seal(self, iv: bytes, aad: bytes, plaintext: bytes) -> bytes: ...

    def open(self, iv: bytes | memoryview, aad: bytes, sealed: bytes | memoryview) -> bytes: ...


class _AeadBase:
    """AES-GCM / ChaCha20-Poly1305. ``impl`` and ``salt`` are public so the ESP hot path can
    call the keyed primitive directly (nonce = salt || IV)."""

    __slots__ = ("icv_len", "impl", "salt")

    def __init__(self, impl: AESGCM | ChaCha20Poly1305, salt: bytes) -> None:
        self.impl = impl
        self.salt = salt
        self.icv_len = 16

    def seal(self, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        return self.impl.encrypt(self.salt + iv, plaintext, aad)

    def open(self, iv: bytes | memoryview, aad: bytes, sealed: bytes | memoryview) -> bytes:
        try:
            return self.impl.decrypt(self.salt + bytes(iv), sealed, aad)
        except InvalidTag:
            raise AuthenticationFailed from None


class _GmacAead:
    """RFC 4543 §3: no encryption; the payload and IV are authenticated as AAD."""

    __slots__ = ("_impl", "_salt", "icv_len")

    def __init__(self, impl: AESGCM, salt: bytes) -> None:
        self._impl = impl
        self._salt = salt
        self.icv_len = 16

    def seal(self, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        tag = self._impl.encrypt(self._salt + iv, b"", aad + iv + plaintext)
        return plaintext + tag

    def open(self, iv: bytes | memoryview, aad: bytes, sealed: bytes | memoryview) -> bytes:
        if len(sealed) < 16:
            raise AuthenticationFailed
        body = bytes(sealed[:-16])
        try:
            self._impl.decrypt(self._salt + bytes(iv), sealed[-16:], aad + bytes(iv) + body)
        except InvalidTag:
            raise AuthenticationFailed from None
        return body


def make_aead(alg: EncrAlgorithm, key_material: bytes) -> Aead:
    key, salt = split_encr_key(alg, key_material)
    if alg.transform_id == Encr.AES_GCM_16:
        return _AeadBase(AESGCM(key), salt)
    if alg.transform_id == Encr.CHACHA20_POLY1305:
        return _AeadBase(ChaCha20Poly1305(key), salt)
    if alg.transform_id == Encr.NULL_AUTH_AES_GMAC:
        return _GmacAead(AESGCM(key), salt)
    raise AlgorithmError(f"{alg.name} is not a combined-mode algorithm")


class BlockCipher:
    """CBC encryption (RFC 3602 §2/§3) with persistent cipher contexts.

    A CBC context keeps the last ciphertext block as its chaining value. To encrypt a packet,
    one fresh block R (a counter; never repeats) is fed first: C0 = E(R xor chain) is an
    unpredictable IV (RFC 3602 §2.3 allows IVs made by encrypting a counter), and the blocks
    that follow are exactly CBC under IV = C0. Decryption feeds IV || C and drops the first
    output block. This avoids building an OpenSSL context per packet.
    """

    __slots__ = ("_counter", "_dec", "_enc", "_key", "_make", "block_size", "iv_len")

    def __init__(self, make: Callable[[bytes], Cipher[modes.CBC]], key: bytes, block: int) -> None:
        self._make = make
        self._key = key
        self.block_size = block
        self.iv_len = block
        zero = bytes(block)
        self._enc: CipherContext = make(zero).encryptor()
        self._dec: CipherContext = make(zero).decryptor()
        self._counter = 0

    def encrypt(self, plaintext: bytes, iv: bytes | None = None) -> bytes:
        """Return IV || ciphertext. ``iv`` is for published-vector tests only (slow path)."""
        if iv is not None:
            enc = self._make(iv).encryptor()
            return iv + enc.update(plaintext)
        self._counter += 1
        r = self._counter.to_bytes(self.block_size, "big")
        return self._enc.update(r + plaintext)

    def decrypt(self, iv_and_ciphertext: bytes | memoryview) -> bytes:
        """Decrypt IV || ciphertext; the caller guarantees a whole number of blocks."""
        return self._dec.update(iv_and_ciphertext)[self.block_size :]


def make_block_cipher(alg: EncrAlgorithm, key_material: bytes) -> BlockCipher:
    key, _ = split_encr_key(alg, key_material)
    if alg.transform_id == Encr.AES_CBC:
        aes = algorithms.AES(key)
        return BlockCipher(lambda iv: Cipher(aes, modes.CBC(iv)), key, 16)
    if alg.transform_id == Encr.TRIPLE_DES:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        des3 = TripleDES(key)
        return BlockCipher(lambda iv: Cipher(des3, modes.CBC(iv)), key, 8)
    raise AlgorithmError(f"{alg.name} is not a block cipher")


class Mac:
    """Keyed, truncated HMAC (RFC 2104; truncation per RFC 4868 §2.1 / RFC 2404)."""

    __slots__ = ("_base", "icv_len")

    def __init__(self, alg: IntegAlgorithm, key: bytes) -> None:
        if len(key) != alg.key_len:
            raise AlgorithmError(f"{alg.name}: key of {len(key)} bytes, need {alg.key_len}")
        self._base = hmac.new(key, digestmod=getattr(hashlib, alg.digest))
        self.icv_len = alg.icv_len

    def compute(self, *parts: bytes | bytearray | memoryview) -> bytes:
        h = self._base.copy()
        for p in parts:
            h.update(p)
        return h.digest()[: self.icv_len]

    def verify(self, icv: bytes | memoryview, *parts: bytes | bytearray | memoryview) -> bool:
        return hmac.compare_digest(self.compute(*parts), bytes(icv))


def make_mac(transform_id: int, key: bytes, *, allow_legacy: bool = False) -> Mac:
    return Mac(integ_algorithm(transform_id, allow_legacy=allow_legacy), key)
