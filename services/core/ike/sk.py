"""IKEv2 Encrypted payload protection: RFC 7296 §3.14 (SK payload), RFC 5282 §5.1 (AES-GCM in
IKEv2: nonce, AAD), RFC 7634 §4 (ChaCha20-Poly1305 in IKEv2), RFC 4868 §2 (HMAC-SHA2 ICVs) and
RFC 7383 §2.5-§2.6 (SKF fragments, reassembly).

Layout of a sealed SK payload body: IV || Encrypted(inner payloads || Padding || Pad Length) ||
ICV. Combined-mode ciphers (AES-GCM-16, ChaCha20-Poly1305) use nonce = salt || IV and
AAD = IKE header || SK generic payload header (for SKF also the Fragment Number and Total
Fragments fields); padding is then not needed but the Pad Length octet is always present. With
AES-CBC the ICV (HMAC-SHA2-*, truncated per RFC 4868) covers everything from the first octet of
the IKE header to the last octet of the ciphertext, and is checked before anything is decrypted.

``SkCipher`` is one direction of an IKE SA (SK_ei/SK_ai or SK_er/SK_ar). Failures of integrity,
padding or sealed lengths raise ``SkError`` (which never carries key material); structurally
malformed messages raise ``IkeDecodeError`` as the codec does.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field

from services.core.algorithms import (
    Aead,
    AlgorithmError,
    AuthenticationFailed,
    BlockCipher,
    EncrAlgorithm,
    Mac,
    encr_algorithm,
    make_aead,
    make_block_cipher,
    make_mac,
)
from services.core.iana import Encr, Integ
from services.core.ike.constants import GENERIC_HEADER_LEN, IKE_HEADER_LEN, PayloadType
from services.core.ike.message import (
    SK,
    SKF,
    IkeDecodeError,
    IkeHeader,
    Message,
    Payload,
    decode_header,
    decode_message,
    decode_payloads,
    encode_payloads,
)
from services.core.ike.payloads import syntax_error

__all__ = [
    "MAX_FRAGMENTS",
    "MAX_REASSEMBLED_SIZE",
    "FragmentReassembler",
    "SkCipher",
    "SkError",
    "decrypt_message",
    "encrypt_message",
]

MAX_FRAGMENTS = 64  # receiver bound on Total Fragments
MAX_REASSEMBLED_SIZE = 64 * 1024  # receiver bound on the reassembled inner payloads (octets)
_SKF_FIELDS_LEN = 4  # RFC 7383 §2.5 Fragment Number || Total Fragments
_AEAD_IDS = (Encr.AES_GCM_16, Encr.CHACHA20_POLY1305)
_CBC_IDS = (Encr.AES_CBC, Encr.TRIPLE_DES)
_GENERIC = struct.Struct("!BBH")
_U64 = 1 << 64


class SkError(Exception):
    """An SK / SKF payload failed integrity, padding or length checks. Carries no key material."""


class SkCipher:
    """One direction of IKE SA protection (keys SK_e?/SK_a?).

    ``encr_id`` is an IKEv2 ENCR transform ID: AES_GCM_16 (``encr_key`` includes the 4-octet
    salt, RFC 5282 §7.1), CHACHA20_POLY1305 (key includes the salt, RFC 7634 §4) or AES_CBC with
    ``integ_id`` HMAC_SHA2_256_128 / 384_192 / 512_256 (HMAC_SHA1_96 and 3DES only with
    ``allow_legacy``). ``key_bits`` (the negotiated Key Length, salt excluded) is checked against
    the key when given. Bad combinations raise AlgorithmError.
    """

    __slots__ = (
        "_aead",
        "_block",
        "_iv_base",
        "_iv_count",
        "_mac",
        "aead",
        "block_size",
        "encr_id",
        "icv_len",
        "integ_id",
        "iv_len",
        "name",
    )

    def __init__(
        self,
        encr_id: int,
        encr_key: bytes,
        integ_id: int = 0,
        integ_key: bytes = b"",
        *,
        key_bits: int | None = None,
        allow_legacy: bool = False,
    ) -> None:
        alg: EncrAlgorithm = encr_algorithm(encr_id, allow_legacy=allow_legacy)
        if encr_id not in _AEAD_IDS and encr_id not in _CBC_IDS:
            raise AlgorithmError(f"{alg.name} cannot protect an IKE SA")
        if key_bits is not None and (len(encr_key) - alg.salt_len) * 8 != key_bits:
            raise AlgorithmError(f"{alg.name}: key does not have {key_bits} bits")
        self.encr_id = int(encr_id)
        self.integ_id = int(integ_id)
        self.aead = alg.aead
        self.iv_len = alg.iv_len
        self._aead: Aead | None = None
        self._block: BlockCipher | None = None
        self._mac: Mac | None = None
        if alg.aead:
            if integ_id != Integ.NONE or integ_key:
                raise AlgorithmError(f"{alg.name} is combined mode: no integrity transform")
            self._aead = make_aead(alg, bytes(encr_key))
            self.block_size = 1
            self.icv_len = self._aead.icv_len
            self.name = alg.name
        else:
            if integ_id == Integ.NONE:
                raise AlgorithmError(f"{alg.name} needs an integrity transform")
            self._block = make_block_cipher(alg, bytes(encr_key))
            self._mac = make_mac(integ_id, bytes(integ_key), allow_legacy=allow_legacy)
            self.block_size = self._block.block_size
            self.icv_len = self._mac.icv_len
            self.name = f"{alg.name}/{Integ(integ_id).name.lower()}"
        # AEAD IVs: a 64-bit counter from a random start. Unique per key within this object (it
        # refuses to wrap); the random start keeps two objects built on one key apart.
        self._iv_base = secrets.randbits(64)
        self._iv_count = 0

    def __repr__(self) -> str:
        return f"SkCipher({self.name})"

    def _next_iv(self) -> bytes:
        if self.aead:
            if self._iv_count >= _U64:
                raise SkError("IV space of this key exhausted; rekey the IKE SA")
            iv = ((self._iv_base + self._iv_count) % _U64).to_bytes(8, "big")
            self._iv_count += 1
            return iv
        return secrets.token_bytes(self.iv_len)

    def sealed_len(self, plaintext_len: int) -> int:
        """Octets of IV || ciphertext || ICV for ``plaintext_len`` octets of inner payloads."""
        return self.iv_len + self._padded_len(plaintext_len) + self.icv_len

    def _padded_len(self, n: int) -> int:
        b = self.block_size
        return (n + 1 + b - 1) // b * b

    def seal(self, prefix: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
        """IV || ciphertext || ICV; ``prefix`` = IKE header .. SK/SKF header (AAD / ICV start)."""
        if iv is None:
            iv = self._next_iv()
        elif len(iv) != self.iv_len:
            raise ValueError(f"{self.name}: IV must be {self.iv_len} octets")
        pad = self._padded_len(len(plaintext)) - len(plaintext) - 1
        padded = plaintext + bytes(pad) + bytes((pad,))
        if self._aead is not None:
            return iv + self._aead.seal(iv, prefix, padded)
        assert self._block is not None and self._mac is not None
        body = self._block.encrypt(padded, iv)
        return body + self._mac.compute(prefix, body)

    def open(self, prefix: bytes, sealed: bytes) -> bytes:
        """Verify and decrypt IV || ciphertext || ICV; return the inner payloads (pad removed)."""
        n = len(sealed) - self.iv_len - self.icv_len
        if n < 1 or n % self.block_size:
            raise SkError(f"{self.name}: sealed length {len(sealed)} is not valid")
        if self._aead is not None:
            iv = sealed[: self.iv_len]
            try:
                padded = self._aead.open(iv, prefix, sealed[self.iv_len :])
            except AuthenticationFailed:
                raise SkError(f"{self.name}: ICV check failed") from None
        else:
            assert self._block is not None and self._mac is not None
            body, icv = sealed[: -self.icv_len], sealed[-self.icv_len :]
            if not self._mac.verify(icv, prefix, body):
                raise SkError(f"{self.name}: ICV check failed")
            padded = self._block.decrypt(body)
        pad = padded[-1]
        if pad + 1 > len(padded):
            raise SkError(f"{self.name}: Pad Length {pad} exceeds the plaintext")
        return padded[: len(padded) - 1 - pad]


# --- sending ----------------------------------------------------------------------------------


def _header(msg: Message, next_payload: int, length: int) -> bytes:
    return IkeHeader(
        msg.spi_i,
        msg.spi_r,
        next_payload,
        msg.exchange_type,
        msg.message_id,
        length,
        msg.initiator,
        msg.response,
        msg.higher_version,
        msg.minor_version,
    ).encode()


def _seal_sk(msg: Message, cipher: SkCipher, first: int, inner: bytes, iv: bytes | None) -> bytes:
    plen = GENERIC_HEADER_LEN + cipher.sealed_len(len(inner))
    prefix = _header(msg, PayloadType.SK, IKE_HEADER_LEN + plen) + _GENERIC.pack(first, 0, plen)
    return prefix + cipher.seal(prefix, inner, iv)


def _seal_skf(
    msg: Message, cipher: SkCipher, first: int, chunk: bytes, number: int, total: int
) -> bytes:
    plen = GENERIC_HEADER_LEN + _SKF_FIELDS_LEN + cipher.sealed_len(len(chunk))
    nxt = first if number == 1 else PayloadType.NONE
    prefix = (
        _header(msg, PayloadType.SKF, IKE_HEADER_LEN + plen)
        + _GENERIC.pack(nxt, 0, plen)
        + struct.pack("!HH", number, total)
    )
    return prefix + cipher.seal(prefix, chunk)


def encrypt_message(
    msg: Message,
    cipher: SkCipher,
    *,
    iv: bytes | None = None,
    fragment_size: int | None = None,
) -> list[bytes]:
    """Protect ``msg`` (whose ``payloads`` are the inner payloads) and return the datagram(s).

    Without ``fragment_size``, or when the whole message fits in it, the result is one message
    holding a single SK payload. Otherwise it is RFC 7383 fragments: IKE messages of at most
    ``fragment_size`` octets (IKE header included; UDP/IP headers and a non-ESP marker are the
    caller's to subtract), each with one SKF payload. ``iv`` is for published test vectors and
    is refused when fragments are produced (it would repeat an AEAD nonce).
    """
    first, inner = encode_payloads(msg.payloads)
    whole = IKE_HEADER_LEN + GENERIC_HEADER_LEN + cipher.sealed_len(len(inner))
    if fragment_size is None or whole <= fragment_size:
        return [_seal_sk(msg, cipher, first, inner, iv)]
    if iv is not None:
        raise ValueError("an explicit IV cannot be used for fragments")
    room = fragment_size - (
        IKE_HEADER_LEN + GENERIC_HEADER_LEN + _SKF_FIELDS_LEN + cipher.iv_len + cipher.icv_len
    )
    chunk_len = room // cipher.block_size * cipher.block_size - 1  # 1: the Pad Length octet
    if chunk_len < 1:
        raise ValueError(f"fragment size {fragment_size} leaves no room for data")
    chunks = [inner[i : i + chunk_len] for i in range(0, len(inner), chunk_len)]
    total = len(chunks)
    if total > 0xFFFF:
        raise ValueError(f"{total} fragments do not fit the Total Fragments field")
    return [_seal_skf(msg, cipher, first, c, i, total) for i, c in enumerate(chunks, 1)]


# --- receiving --------------------------------------------------------------------------------


def _sealed_prefix(data: bytes, sealed_body_len: int) -> bytes:
    """IKE header .. end of the last (SK/SKF) payload's fixed header: the AAD / ICV prefix."""
    return data[: len(data) - sealed_body_len]


def _with_header(e: IkeDecodeError, data: bytes) -> IkeDecodeError:
    if e.header is None:
        e.header = decode_header(data)
    return e


def _as_message(outer: Message, payloads: tuple[Payload, ...]) -> Message:
    return Message(
        outer.spi_i,
        outer.spi_r,
        outer.exchange_type,
        outer.message_id,
        payloads,
        outer.initiator,
        outer.response,
        outer.higher_version,
        outer.minor_version,
    )


def _inner(first: int, plaintext: bytes, data: bytes) -> list[Payload]:
    """Decode verified plaintext; its IkeDecodeError is marked ``authenticated``."""
    try:
        return decode_payloads(first, plaintext)
    except IkeDecodeError as e:
        e.authenticated = True
        raise _with_header(e, data) from None


def decrypt_message(data: bytes, cipher: SkCipher) -> Message:
    """Verify and decrypt a message whose last payload is SK; return it with the inner payloads.

    Unencrypted payloads before SK (covered by the ICV as well) are kept in front of the inner
    ones. SkError: integrity / padding / sealed-length failure. IkeDecodeError: malformed
    message, no SK payload (an SKF fragment goes to FragmentReassembler), or malformed inner
    payloads (with ``header`` set and ``authenticated`` true: the ICV was good).
    """
    data = bytes(data)
    outer = decode_message(data)
    last = outer.payloads[-1] if outer.payloads else None
    if not isinstance(last, SK):
        what = "an SKF fragment" if isinstance(last, SKF) else "no Encrypted payload"
        raise _with_header(syntax_error(f"{what}: cannot decrypt as a whole message"), data)
    plaintext = cipher.open(_sealed_prefix(data, len(last.data)), last.data)
    inner = _inner(last.next_payload, plaintext, data)
    return _as_message(outer, (*outer.payloads[:-1], *inner))


def answers_retransmission(data: bytes, cipher: SkCipher) -> bool:
    """Whether a retransmitted encrypted request is answered again with the cached response
    (RFC 7296 §2.1, RFC 7383 §2.6.1): a whole SK message, or fragment 1 of an SKF set, that
    verifies with ``cipher`` (SkError / IkeDecodeError otherwise); False for the other
    fragments, so the response goes out once per retransmission."""
    data = bytes(data)
    outer = decode_message(data)
    last = outer.payloads[-1] if outer.payloads else None
    if isinstance(last, SKF):
        if last.fragment_number != 1:
            return False
        cipher.open(_sealed_prefix(data, len(last.data)), last.data)
        return True
    decrypt_message(data, cipher)
    return True


@dataclass
class _FragmentSet:
    total: int
    first: Message | None = None  # fragment 1's outer message (header fields, next payload)
    first_next: int = 0
    chunks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class FragmentReassembler:
    """RFC 7383 §2.6 reassembly of SKF fragments, for one direction (one SkCipher).

    Each fragment is verified and decrypted on its own; only authentic fragments are stored,
    keyed by (SPIi, SPIr, Message ID). Bounds: at most ``max_fragments`` per message,
    ``max_size`` octets of reassembled inner payloads, ``max_sets`` messages in progress (the
    oldest is dropped). A fragment whose Total Fragments is larger than the stored set's
    replaces the set; a smaller one is discarded (RFC 7383 §2.6). Duplicates are ignored.
    Dropped fragments / sets are counted in ``dropped``. An unfragmented (SK) message is simply
    decrypted and returned.
    """

    def __init__(
        self,
        *,
        max_fragments: int = MAX_FRAGMENTS,
        max_size: int = MAX_REASSEMBLED_SIZE,
        max_sets: int = 8,
    ) -> None:
        self.max_fragments = max_fragments
        self.max_size = max_size
        self.max_sets = max_sets
        self.dropped = 0
        self._sets: dict[tuple[bytes, bytes, int], _FragmentSet] = {}

    def __len__(self) -> int:
        """Messages with fragments pending."""
        return len(self._sets)

    def add(self, data: bytes, cipher: SkCipher) -> Message | None:
        """Take one received datagram; return the whole Message once every fragment is in.

        Raises SkError / IkeDecodeError for a fragment that fails verification or is malformed
        (the stored fragments are kept), and IkeDecodeError if the reassembled inner payloads
        are malformed (the set is then dropped).
        """
        data = bytes(data)
        outer = decode_message(data)
        last = outer.payloads[-1] if outer.payloads else None
        if isinstance(last, SK):
            return decrypt_message(data, cipher)
        if not isinstance(last, SKF) or len(outer.payloads) != 1:
            raise _with_header(syntax_error("not a lone SKF payload"), data)
        # the prefix ends after Fragment Number / Total Fragments: they are authenticated too
        chunk = cipher.open(_sealed_prefix(data, len(last.data)), last.data)

        key = (outer.spi_i, outer.spi_r, outer.message_id)
        if last.total_fragments > self.max_fragments:
            self._drop(key)
            return None
        s = self._sets.get(key)
        if s is not None and last.total_fragments != s.total:
            if last.total_fragments < s.total:
                self.dropped += 1
                return None
            self._drop(key)
            s = None
        if s is None:
            while len(self._sets) >= self.max_sets:
                self._drop(next(iter(self._sets)))
            s = self._sets[key] = _FragmentSet(last.total_fragments)
        if last.fragment_number in s.chunks:
            return None
        s.chunks[last.fragment_number] = chunk
        s.size += len(chunk)
        if s.size > self.max_size:
            self._drop(key)
            return None
        if last.fragment_number == 1:
            s.first, s.first_next = outer, last.next_payload
        if len(s.chunks) < s.total:
            return None
        del self._sets[key]
        assert s.first is not None
        plaintext = b"".join(s.chunks[i] for i in range(1, s.total + 1))
        inner = _inner(s.first_next, plaintext, data)
        return _as_message(s.first, tuple(inner))

    def _drop(self, key: tuple[bytes, bytes, int]) -> None:
        self._sets.pop(key, None)
        self.dropped += 1
