"""IKEv2 pseudorandom functions: RFC 7296 §2.13 (prf, prf+) with HMAC-SHA2 of RFC 4868 §2.1.2.

The registry is keyed by IKEv2 Transform Type 2 (PRF) IDs. HMAC-SHA1 (RFC 2104, ID 2) is
legacy: it resolves only with ``allow_legacy=True``. Functions take either a transform ID
(resolved with legacy refused) or a :class:`PrfAlgorithm` record already resolved by
:func:`prf_algorithm` (the way to use a legacy PRF on purpose).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum

from services.core.algorithms import AlgorithmError


class Prf(IntEnum):
    """IKEv2 Transform Type 2 (Pseudorandom Function) IDs, RFC 7296 §3.3.2 and IANA."""

    HMAC_SHA1 = 2
    HMAC_SHA2_256 = 5
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7


@dataclass(frozen=True, slots=True)
class PrfAlgorithm:
    transform_id: Prf
    name: str
    digest: str  # hashlib name
    output_len: int  # octets of one prf output (the hash length)
    key_len: int  # preferred key length (RFC 7296 §2.14: SK_d, SK_pi, SK_pr); = output_len
    legacy: bool = False


PRF: dict[int, PrfAlgorithm] = {
    a.transform_id: a
    for a in (
        PrfAlgorithm(Prf.HMAC_SHA2_256, "hmac-sha256", "sha256", 32, 32),
        PrfAlgorithm(Prf.HMAC_SHA2_384, "hmac-sha384", "sha384", 48, 48),
        PrfAlgorithm(Prf.HMAC_SHA2_512, "hmac-sha512", "sha512", 64, 64),
        PrfAlgorithm(Prf.HMAC_SHA1, "hmac-sha1", "sha1", 20, 20, legacy=True),
    )
}

PrfLike = int | PrfAlgorithm  # a transform ID (legacy refused) or a resolved algorithm

PRF_PLUS_MAX_BLOCKS = 255  # the counter octet of prf+ runs 0x01..0xff (RFC 7296 §2.13)


def prf_algorithm(transform_id: int, *, allow_legacy: bool = False) -> PrfAlgorithm:
    alg = PRF.get(transform_id)
    if alg is None:
        raise AlgorithmError(f"unsupported PRF transform {transform_id}")
    if alg.legacy and not allow_legacy:
        raise AlgorithmError(f"{alg.name} is legacy and not enabled")
    return alg


def _resolve(alg: int | PrfAlgorithm) -> PrfAlgorithm:
    return alg if isinstance(alg, PrfAlgorithm) else prf_algorithm(alg)


def prf(alg: int | PrfAlgorithm, key: bytes, data: bytes) -> bytes:
    """prf(K, S) of RFC 7296 §2.13: HMAC over ``data`` keyed with ``key`` (any length)."""
    a = _resolve(alg)
    return hmac.new(key, data, getattr(hashlib, a.digest)).digest()


def prf_plus(alg: int | PrfAlgorithm, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+(K, S) of RFC 7296 §2.13, truncated to ``length`` octets.

    T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); at most 255 blocks, so a request for
    more than 255 * hash length octets is refused (AlgorithmError).
    """
    a = _resolve(alg)
    if length < 0:
        raise AlgorithmError("prf+ length must not be negative")
    if length > PRF_PLUS_MAX_BLOCKS * a.output_len:
        raise AlgorithmError(
            f"prf+ with {a.name} yields at most {PRF_PLUS_MAX_BLOCKS * a.output_len} octets"
        )
    base = hmac.new(key, digestmod=getattr(hashlib, a.digest))
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        h = base.copy()
        h.update(block + seed + bytes((counter,)))
        block = h.digest()
        out += block
        counter += 1
    return bytes(out[:length])
