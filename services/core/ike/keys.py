"""IKEv2 key schedule: RFC 7296 §2.14 (IKE SA keys), §2.17 (Child SA KEYMAT), §2.18 (rekey).

Lengths are the caller's: the PRF keys (SK_d, SK_pi, SK_pr) take the PRF's preferred key
length; SK_a* the integrity transform's key length (0 with a combined-mode cipher); SK_e* the
cipher key length *including* any salt: AES-GCM 4 octets (RFC 5282 §7.1), ChaCha20-Poly1305
4 octets (RFC 7634 §4), salt last. Nonce sizes are not checked here (the payload codec does
that, RFC 7296 §3.9); SPIs are the 8-octet values of the IKE header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.algorithms import AlgorithmError
from services.core.ike.prf import PrfAlgorithm, prf, prf_algorithm, prf_plus

SPI_LEN = 8  # IKE SA SPIs (RFC 7296 §3.1)


@dataclass(frozen=True, slots=True)
class IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} (RFC 7296 §2.14). No key in repr."""

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChildKeys:
    """A Child SA's keys (RFC 7296 §2.17): ``*_i`` protect initiator→responder traffic,
    ``*_r`` responder→initiator. No key in repr."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def _prf(alg: int | PrfAlgorithm) -> PrfAlgorithm:
    return alg if isinstance(alg, PrfAlgorithm) else prf_algorithm(alg)


def _check_lengths(encr_key_len: int, integ_key_len: int) -> None:
    if encr_key_len < 0 or integ_key_len < 0:
        raise AlgorithmError("key lengths must not be negative")


def skeyseed(alg: int | PrfAlgorithm, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 §2.14; HMAC PRFs take the whole nonces)."""
    return prf(alg, ni + nr, g_ir)


def derive_ike_keys(
    alg: int | PrfAlgorithm,
    skeyseed: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
    *,
    encr_key_len: int,
    integ_key_len: int,
) -> IkeKeys:
    """prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) cut into the seven IKE SA keys (RFC 7296 §2.14)."""
    a = _prf(alg)
    _check_lengths(encr_key_len, integ_key_len)
    if len(spi_i) != SPI_LEN or len(spi_r) != SPI_LEN:
        raise AlgorithmError("IKE SA SPIs are 8 octets")
    d = a.key_len
    sizes = (d, integ_key_len, integ_key_len, encr_key_len, encr_key_len, d, d)
    keymat = prf_plus(a, skeyseed, ni + nr + spi_i + spi_r, sum(sizes))
    parts: list[bytes] = []
    at = 0
    for n in sizes:
        parts.append(keymat[at : at + n])
        at += n
    return IkeKeys(*parts)


def child_keymat(
    alg: int | PrfAlgorithm,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    length: int,
    g_ir_new: bytes | None = None,
) -> bytes:
    """KEYMAT = prf+(SK_d, Ni | Nr), or prf+(SK_d, g^ir (new) | Ni | Nr) with PFS (§2.17)."""
    seed = (g_ir_new or b"") + ni + nr
    return prf_plus(alg, sk_d, seed, length)


def split_child_keymat(keymat: bytes, *, encr_key_len: int, integ_key_len: int) -> ChildKeys:
    """Cut KEYMAT (RFC 7296 §2.17): initiator→responder keys first, then responder→initiator;
    within each direction the encryption key, then the integrity key. ``keymat`` must be
    exactly 2 * (encr_key_len + integ_key_len) octets."""
    _check_lengths(encr_key_len, integ_key_len)
    e, i = encr_key_len, integ_key_len
    if len(keymat) != 2 * (e + i):
        raise AlgorithmError(f"KEYMAT of {len(keymat)} octets, need {2 * (e + i)}")
    return ChildKeys(
        encr_i=keymat[:e],
        integ_i=keymat[e : e + i],
        encr_r=keymat[e + i : 2 * e + i],
        integ_r=keymat[2 * e + i :],
    )


def child_keys(
    alg: int | PrfAlgorithm,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    *,
    encr_key_len: int,
    integ_key_len: int,
    g_ir_new: bytes | None = None,
) -> ChildKeys:
    """The keys of one single-protocol Child SA (ESP or AH) from SK_d (RFC 7296 §2.17)."""
    _check_lengths(encr_key_len, integ_key_len)
    length = 2 * (encr_key_len + integ_key_len)
    keymat = child_keymat(alg, sk_d, ni, nr, length, g_ir_new)
    return split_child_keymat(keymat, encr_key_len=encr_key_len, integ_key_len=integ_key_len)


def rekey_skeyseed(
    alg: int | PrfAlgorithm, sk_d_old: bytes, g_ir_new: bytes, ni: bytes, nr: bytes
) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) for a rekeyed IKE SA (RFC 7296 §2.18).

    ``alg`` is the PRF of the *old* IKE SA; the new SA's keys then follow from
    :func:`derive_ike_keys` with the new SA's PRF, nonces and SPIs.
    """
    return prf(alg, sk_d_old, g_ir_new + ni + nr)
