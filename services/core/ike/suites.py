"""IKEv2 algorithm suites: RFC 7296 §2.7 / §3.3 (proposals and transforms, choice), §3.3.1 /
§3.3.3 (ESP and AH proposals), §3.3.6 (the responder's answer), §1.3 (the KE group of a suite),
RFC 8247 / RFC 8221 (what is legacy).

A *suite* is one value per transform type: an IKE suite is ENCR (+ key length), INTEG (none for
a combined-mode cipher), PRF and a DH group; an ESP (Child SA) suite is ENCR (+ key length),
INTEG (none for combined mode), ESN yes/no and an optional DH group for PFS in CREATE_CHILD_SA;
an AH Child SA suite (protocol ID 2) is INTEG, ESN yes/no and an optional DH group, no ENCR.
Suites are written as strongSwan-style proposal strings, tokens joined by ``-``::

    aes256gcm16-prfsha256-x25519    aes128gcm16-prfsha384-ecp256    aes256-sha256-modp3072
    chacha20poly1305-prfsha256-curve25519                        (IKE)
    aes128gcm16    aes256gcm16-esn    aes256-sha256    chacha20poly1305    aes256gcm16-x25519
                                                                  (ESP; the DH group is PFS)
    sha256    sha384-esn    sha512    sha256-x25519               (AH; the DH group is PFS)

ESP and AH suites are one type (:class:`EspSuite`, ``protocol`` ESP or AH), so offering,
choosing and matching Child SA proposals is one implementation with the protocol as a
parameter (:func:`esp_proposals`, :func:`choose_esp`, :func:`match_esp`).

One string is one suite (one value per type). A non-AEAD IKE suite without a PRF token takes
the PRF of its integrity algorithm (as strongSwan does). SHA-1 (``sha1``: INTEG
HMAC-SHA1-96, RFC 2404, and with it the PRF HMAC-SHA1, RFC 2104; or ``prfsha1``), MODP-1024
(``modp1024``) and 3DES (``3des``) parse only with ``allow_legacy`` (RFC 8247 §2.2, §2.3:
SHA-1 is MUST NOT / SHOULD NOT for new deployments).

Proposals are built one per suite, numbered from 1 (§3.3.1). The responder takes the first of
*its own* suites that the initiator offers (strongSwan's default), see :func:`choose_ike` and
:func:`choose_esp`; key lengths for SK_* and Child SA keys come from the algorithm registry
(:mod:`services.core.algorithms`, :mod:`services.core.ike.prf`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from services.core.algorithms import AlgorithmError, encr_algorithm, integ_algorithm
from services.core.iana import Encr, Integ
from services.core.ike.constants import Esn, ProtocolId, TransformType
from services.core.ike.dh import GROUPS, DhGroupId
from services.core.ike.dh import group as dh_group
from services.core.ike.message import Proposal, Transform, TransformAttribute
from services.core.ike.prf import Prf, PrfAlgorithm, prf_algorithm

__all__ = [
    "DEFAULT_ESP",
    "DEFAULT_IKE",
    "DEFAULT_PFS_GROUP",
    "EspChoice",
    "EspSuite",
    "IkeSuite",
    "SuiteError",
    "choose_esp",
    "choose_ike",
    "esp_ke_hint",
    "esp_proposals",
    "ike_proposals",
    "match_esp",
    "match_ike",
    "parse_ah",
    "parse_ah_list",
    "parse_esp",
    "parse_esp_list",
    "parse_ike",
    "parse_ike_list",
]

MAX_SUITES = 32  # per list; more proposals than any sane peer offers
MAX_PROPOSAL_TEXT = 256


class SuiteError(ValueError):
    """A proposal string that cannot be used; the message names the offending token."""


# strongSwan keywords -> (ENCR id, key bits)
_ENCR: dict[str, tuple[int, int]] = {
    "aes128": (Encr.AES_CBC, 128),
    "aes256": (Encr.AES_CBC, 256),
    "aes128gcm16": (Encr.AES_GCM_16, 128),
    "aes256gcm16": (Encr.AES_GCM_16, 256),
    "aes128gcm128": (Encr.AES_GCM_16, 128),
    "aes256gcm128": (Encr.AES_GCM_16, 256),
    "chacha20poly1305": (Encr.CHACHA20_POLY1305, 256),
    "3des": (Encr.TRIPLE_DES, 192),
}
_INTEG: dict[str, int] = {
    "sha256": Integ.HMAC_SHA2_256_128,
    "sha2_256": Integ.HMAC_SHA2_256_128,
    "sha384": Integ.HMAC_SHA2_384_192,
    "sha2_384": Integ.HMAC_SHA2_384_192,
    "sha512": Integ.HMAC_SHA2_512_256,
    "sha2_512": Integ.HMAC_SHA2_512_256,
    "sha1": Integ.HMAC_SHA1_96,
}
_PRF: dict[str, int] = {
    "prfsha256": Prf.HMAC_SHA2_256,
    "prfsha384": Prf.HMAC_SHA2_384,
    "prfsha512": Prf.HMAC_SHA2_512,
    "prfsha1": Prf.HMAC_SHA1,
}
_DH: dict[str, int] = {
    "modp1024": DhGroupId.MODP_1024,
    "modp2048": DhGroupId.MODP_2048,
    "modp3072": DhGroupId.MODP_3072,
    "modp4096": DhGroupId.MODP_4096,
    "ecp256": DhGroupId.ECP_256,
    "ecp384": DhGroupId.ECP_384,
    "ecp521": DhGroupId.ECP_521,
    "x25519": DhGroupId.CURVE25519,
    "curve25519": DhGroupId.CURVE25519,
    "x448": DhGroupId.CURVE448,
    "curve448": DhGroupId.CURVE448,
}
_PRF_OF_INTEG = {
    Integ.HMAC_SHA2_256_128: Prf.HMAC_SHA2_256,
    Integ.HMAC_SHA2_384_192: Prf.HMAC_SHA2_384,
    Integ.HMAC_SHA2_512_256: Prf.HMAC_SHA2_512,
    Integ.HMAC_SHA1_96: Prf.HMAC_SHA1,
}
# canonical names for printing
_ENCR_NAME = {
    (Encr.AES_CBC, 128): "aes128",
    (Encr.AES_CBC, 256): "aes256",
    (Encr.AES_GCM_16, 128): "aes128gcm16",
    (Encr.AES_GCM_16, 256): "aes256gcm16",
    (Encr.CHACHA20_POLY1305, 256): "chacha20poly1305",
    (Encr.TRIPLE_DES, 192): "3des",
}
_INTEG_NAME = {
    Integ.HMAC_SHA2_256_128: "sha256",
    Integ.HMAC_SHA2_384_192: "sha384",
    Integ.HMAC_SHA2_512_256: "sha512",
    Integ.HMAC_SHA1_96: "sha1",
}
_PRF_NAME = {v: k for k, v in _PRF.items()}
_DH_NAME = {
    int(DhGroupId.MODP_1024): "modp1024",
    int(DhGroupId.MODP_2048): "modp2048",
    int(DhGroupId.MODP_3072): "modp3072",
    int(DhGroupId.MODP_4096): "modp4096",
    int(DhGroupId.ECP_256): "ecp256",
    int(DhGroupId.ECP_384): "ecp384",
    int(DhGroupId.ECP_521): "ecp521",
    int(DhGroupId.CURVE25519): "x25519",
    int(DhGroupId.CURVE448): "x448",
}
_KEY_LENGTH_ATTR = frozenset({Encr.AES_CBC, Encr.AES_GCM_16})  # RFC 7296 §3.3.5; not ChaCha/3DES
_IKE_TYPES = frozenset(
    {TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH}
)
_ESP_TYPES = frozenset(
    {TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN}
)
_AH_TYPES = frozenset({TransformType.INTEG, TransformType.DH, TransformType.ESN})  # §3.3.3
DEFAULT_PFS_GROUP = int(DhGroupId.CURVE25519)  # asked for when our ESP suites name no group


def _encr_name(encr: int, key_bits: int) -> str:
    try:
        return _ENCR_NAME.get((Encr(encr), key_bits), f"encr{encr}")
    except ValueError:
        return f"encr{encr}"


def _encr_transform(encr: int, key_bits: int) -> Transform:
    if encr in _KEY_LENGTH_ATTR:
        return Transform(TransformType.ENCR, encr, (TransformAttribute.key_length(key_bits),))
    return Transform(TransformType.ENCR, encr)


def _encr_key_len(encr: int, key_bits: int, allow_legacy: bool) -> int:
    """Octets of keying material for one direction: cipher key plus salt (RFC 5282 §7.1,
    RFC 4106 §8.1, RFC 7634 §4)."""
    alg = encr_algorithm(encr, allow_legacy=allow_legacy)
    return key_bits // 8 + alg.salt_len


def _integ_key_len(integ: int, allow_legacy: bool) -> int:
    return integ_algorithm(integ, allow_legacy=allow_legacy).key_len if integ else 0


@dataclass(frozen=True, slots=True)
class IkeSuite:
    """One IKE SA suite (RFC 7296 §3.3.2). ``integ`` is 0 (NONE) for combined-mode ciphers."""

    encr: int
    key_bits: int
    integ: int
    prf: int
    dh: int
    allow_legacy: bool = False

    @property
    def name(self) -> str:
        parts = [_ENCR_NAME.get((Encr(self.encr), self.key_bits), f"encr{self.encr}")]
        if self.integ:
            parts.append(_INTEG_NAME.get(Integ(self.integ), f"integ{self.integ}"))
        parts.append(_PRF_NAME.get(self.prf, f"prf{self.prf}"))
        parts.append(_DH_NAME.get(self.dh, f"dh{self.dh}"))
        return "-".join(parts)

    @property
    def aead(self) -> bool:
        return self.integ == Integ.NONE

    @property
    def encr_key_len(self) -> int:
        """SK_e? length in octets (salt included)."""
        return _encr_key_len(self.encr, self.key_bits, self.allow_legacy)

    @property
    def integ_key_len(self) -> int:
        """SK_a? length in octets (0 for combined mode)."""
        return _integ_key_len(self.integ, self.allow_legacy)

    @property
    def prf_alg(self) -> PrfAlgorithm:
        """The PRF, resolved as the suite allows (HMAC-SHA1 only with ``allow_legacy``): what
        every computation with this IKE SA's PRF takes."""
        return prf_algorithm(self.prf, allow_legacy=self.allow_legacy)

    @property
    def prf_key_len(self) -> int:
        return self.prf_alg.key_len

    def transforms(self) -> tuple[Transform, ...]:
        out = [_encr_transform(self.encr, self.key_bits)]
        if self.integ:
            out.append(Transform(TransformType.INTEG, self.integ))
        out.append(Transform(TransformType.PRF, self.prf))
        out.append(Transform(TransformType.DH, self.dh))
        return tuple(out)

    def proposal(self, number: int = 1) -> Proposal:
        return Proposal(number, ProtocolId.IKE, self.transforms())


@dataclass(frozen=True, slots=True)
class EspSuite:
    """One Child SA suite. ``dh`` is the PFS group for CREATE_CHILD_SA (0: none).
    ``protocol`` ESP (default) or AH; an AH suite has no cipher (``encr`` and ``key_bits``
    0) and always an integrity algorithm (RFC 7296 §3.3.3)."""

    encr: int
    key_bits: int
    integ: int = 0
    esn: bool = False
    dh: int = 0
    allow_legacy: bool = False
    protocol: int = ProtocolId.ESP

    @property
    def ah(self) -> bool:
        return self.protocol == ProtocolId.AH

    @property
    def name(self) -> str:
        parts = [] if self.ah else [_encr_name(self.encr, self.key_bits)]
        if self.integ:
            parts.append(_INTEG_NAME.get(Integ(self.integ), f"integ{self.integ}"))
        if self.dh:
            parts.append(_DH_NAME.get(self.dh, f"dh{self.dh}"))
        if self.esn:
            parts.append("esn")
        return "-".join(parts)

    @property
    def aead(self) -> bool:
        return not self.ah and self.integ == Integ.NONE

    @property
    def encr_key_len(self) -> int:
        """Octets of ESP encryption keying material per direction (salt included; 0 for AH)."""
        if self.ah:
            return 0
        return _encr_key_len(self.encr, self.key_bits, self.allow_legacy)

    @property
    def integ_key_len(self) -> int:
        return _integ_key_len(self.integ, self.allow_legacy)

    def transforms(self, *, dh: int | None = None) -> tuple[Transform, ...]:
        """Our transforms; ``dh`` overrides the suite's group (0: no DH transform)."""
        group = self.dh if dh is None else dh
        out = [] if self.ah else [_encr_transform(self.encr, self.key_bits)]
        if self.integ:
            out.append(Transform(TransformType.INTEG, self.integ))
        if group:
            out.append(Transform(TransformType.DH, group))
        out.append(Transform(TransformType.ESN, Esn.ESN if self.esn else Esn.NO_ESN))
        return tuple(out)

    def without_dh(self) -> EspSuite:
        return replace(self, dh=0)


DEFAULT_IKE = IkeSuite(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroupId.CURVE25519)
DEFAULT_ESP = EspSuite(Encr.AES_GCM_16, 256)


# -- parsing ------------------------------------------------------------------------------------


def _tokens(text: object, what: str) -> list[str]:
    if not isinstance(text, str):
        raise SuiteError(f"{what} proposal must be a string, not {type(text).__name__}")
    if not text.strip():
        raise SuiteError(f"empty {what} proposal")
    if len(text) > MAX_PROPOSAL_TEXT or not text.isprintable():
        raise SuiteError(f"{what} proposal is too long or has unprintable characters")
    return [t for t in text.strip().lower().split("-")]


def _show(tok: str) -> str:
    return repr(tok if len(tok) <= 32 else tok[:29] + "...")


def _set_once(slots: dict[str, int], kind: str, value: int, text: str, tok: str) -> None:
    if kind in slots:
        raise SuiteError(
            f"proposal {_show(text)}: more than one {kind} algorithm ({_show(tok)}); "
            "write one proposal string per suite"
        )
    slots[kind] = value


def _legacy_check(allow_legacy: bool, tok: str, text: str, legacy: bool) -> None:
    if legacy and not allow_legacy:
        raise SuiteError(
            f"proposal {_show(text)}: {_show(tok)} is legacy (RFC 8247/8221) and not enabled"
        )


def _classify(text: str, tok: str, allow_legacy: bool, slots: dict[str, int]) -> None:
    if tok in _ENCR:
        encr, bits = _ENCR[tok]
        _legacy_check(allow_legacy, tok, text, encr == Encr.TRIPLE_DES)
        _set_once(slots, "encryption", encr, text, tok)
        slots["key_bits"] = bits
    elif tok in _INTEG:
        integ = _INTEG[tok]
        _legacy_check(allow_legacy, tok, text, integ == Integ.HMAC_SHA1_96)
        _set_once(slots, "integrity", integ, text, tok)
    elif tok in _PRF:
        prf = _PRF[tok]
        _legacy_check(allow_legacy, tok, text, prf == Prf.HMAC_SHA1)
        _set_once(slots, "PRF", prf, text, tok)
    elif tok in _DH:
        dh = _DH[tok]
        _legacy_check(allow_legacy, tok, text, GROUPS[dh].legacy)
        _set_once(slots, "DH", dh, text, tok)
    elif tok in ("esn", "noesn"):
        _set_once(slots, "ESN", 1 if tok == "esn" else 0, text, tok)
    elif tok == "":
        raise SuiteError(f"proposal {_show(text)}: empty token (doubled or trailing '-')")
    else:
        raise SuiteError(f"proposal {_show(text)}: unknown algorithm {_show(tok)}")


def _common(text: str, slots: dict[str, int], what: str) -> tuple[int, int, int]:
    if "encryption" not in slots:
        raise SuiteError(f"{what} proposal {_show(text)}: no encryption algorithm")
    encr, bits = slots["encryption"], slots["key_bits"]
    aead = encr_algorithm(encr, allow_legacy=True).aead
    integ = slots.get("integrity", 0)
    if aead and integ:
        raise SuiteError(
            f"{what} proposal {_show(text)}: {_ENCR_NAME[(Encr(encr), bits)]} is a combined-mode "
            "cipher and takes no integrity algorithm"
        )
    if not aead and not integ:
        raise SuiteError(
            f"{what} proposal {_show(text)}: a CBC cipher needs an integrity algorithm"
        )
    return encr, bits, integ


def parse_ike(text: str, *, allow_legacy: bool = False) -> IkeSuite:
    """One IKE suite from a strongSwan-style proposal string (SuiteError if unusable)."""
    slots: dict[str, int] = {}
    for tok in _tokens(text, "IKE"):
        _classify(text, tok, allow_legacy, slots)
    if "ESN" in slots:
        raise SuiteError(f"IKE proposal {_show(text)}: ESN belongs to ESP proposals")
    encr, bits, integ = _common(text, slots, "IKE")
    prf = slots.get("PRF")
    if prf is None:
        if not integ:
            raise SuiteError(
                f"IKE proposal {_show(text)}: a combined-mode cipher needs a PRF (e.g. prfsha256)"
            )
        prf = _PRF_OF_INTEG[Integ(integ)]
    if "DH" not in slots:
        raise SuiteError(f"IKE proposal {_show(text)}: no DH group (e.g. x25519, ecp256, modp3072)")
    suite = IkeSuite(encr, bits, integ, prf, slots["DH"], allow_legacy)
    try:  # every algorithm must be usable by the registry
        _ = (suite.encr_key_len, suite.integ_key_len, suite.prf_key_len)
        dh_group(suite.dh, allow_legacy=allow_legacy)
    except AlgorithmError as e:
        raise SuiteError(f"IKE proposal {_show(text)}: {e}") from None
    return suite


def parse_esp(text: str, *, allow_legacy: bool = False) -> EspSuite:
    """One ESP suite from a strongSwan-style proposal string (SuiteError if unusable)."""
    slots: dict[str, int] = {}
    for tok in _tokens(text, "ESP"):
        _classify(text, tok, allow_legacy, slots)
    if "PRF" in slots:
        raise SuiteError(f"ESP proposal {_show(text)}: a PRF belongs to IKE proposals")
    encr, bits, integ = _common(text, slots, "ESP")
    suite = EspSuite(encr, bits, integ, bool(slots.get("ESN", 0)), slots.get("DH", 0), allow_legacy)
    try:
        _ = (suite.encr_key_len, suite.integ_key_len)
    except AlgorithmError as e:
        raise SuiteError(f"ESP proposal {_show(text)}: {e}") from None
    return suite


def parse_ah(text: str, *, allow_legacy: bool = False) -> EspSuite:
    """One AH suite (protocol AH: integrity, optional ESN and PFS group, no cipher) from a
    strongSwan-style proposal string such as ``sha256`` or ``sha384-x25519-esn``."""
    slots: dict[str, int] = {}
    for tok in _tokens(text, "AH"):
        _classify(text, tok, allow_legacy, slots)
    if "PRF" in slots:
        raise SuiteError(f"AH proposal {_show(text)}: a PRF belongs to IKE proposals")
    if "encryption" in slots:
        raise SuiteError(
            f"AH proposal {_show(text)}: AH has no encryption algorithm (RFC 7296 §3.3.3); "
            "use esp_proposals for encryption"
        )
    if "integrity" not in slots:
        raise SuiteError(f"AH proposal {_show(text)}: no integrity algorithm (e.g. sha256)")
    suite = EspSuite(
        0,
        0,
        slots["integrity"],
        bool(slots.get("ESN", 0)),
        slots.get("DH", 0),
        allow_legacy,
        ProtocolId.AH,
    )
    try:
        _ = suite.integ_key_len
    except AlgorithmError as e:
        raise SuiteError(f"AH proposal {_show(text)}: {e}") from None
    return suite


def _parse_list(items: object, what: str, one: object, allow_legacy: bool) -> tuple[object, ...]:
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise SuiteError(f"{what} proposals must be a list of strings")
    if not items:
        raise SuiteError(f"{what} proposals must not be empty")
    if len(items) > MAX_SUITES:
        raise SuiteError(f"at most {MAX_SUITES} {what} proposals")
    out: list[object] = []
    for it in items:
        s = one(it, allow_legacy=allow_legacy)  # type: ignore[operator]
        if s not in out:
            out.append(s)
    return tuple(out)


def parse_ike_list(items: Sequence[str], *, allow_legacy: bool = False) -> tuple[IkeSuite, ...]:
    """IKE suites in our order of preference (duplicates dropped)."""
    out = _parse_list(items, "IKE", parse_ike, allow_legacy)
    return tuple(s for s in out if isinstance(s, IkeSuite))


def parse_esp_list(items: Sequence[str], *, allow_legacy: bool = False) -> tuple[EspSuite, ...]:
    """ESP suites in our order of preference (duplicates dropped)."""
    out = _parse_list(items, "ESP", parse_esp, allow_legacy)
    return tuple(s for s in out if isinstance(s, EspSuite))


def parse_ah_list(items: Sequence[str], *, allow_legacy: bool = False) -> tuple[EspSuite, ...]:
    """AH suites in our order of preference (duplicates dropped)."""
    out = _parse_list(items, "AH", parse_ah, allow_legacy)
    return tuple(s for s in out if isinstance(s, EspSuite))


# -- proposals ----------------------------------------------------------------------------------


def ike_proposals(suites: Iterable[IkeSuite]) -> tuple[Proposal, ...]:
    """One IKE proposal per suite, numbered 1, 2, ... (RFC 7296 §3.3.1)."""
    return tuple(s.proposal(i) for i, s in enumerate(suites, start=1))


def esp_proposals(suites: Iterable[EspSuite], spi: bytes, *, pfs: bool) -> tuple[Proposal, ...]:
    """One Child SA proposal per suite (ESP or AH, the suite's protocol), numbered from 1, all
    carrying ``spi``. Without ``pfs`` (IKE_AUTH: no KE payload, RFC 7296 §1.2) the DH
    transforms are left out and suites that then coincide are sent once."""
    seen: list[tuple[int, tuple[Transform, ...]]] = []
    for s in suites:
        t = (s.protocol, s.transforms() if pfs else s.transforms(dh=0))
        if t not in seen:
            seen.append(t)
    return tuple(Proposal(i, pr, t, spi) for i, (pr, t) in enumerate(seen, start=1))


def _by_type(p: Proposal, allowed: frozenset[int]) -> dict[int, set[tuple[int, int | None]]] | None:
    by_type: dict[int, set[tuple[int, int | None]]] = {}
    for t in p.transforms:
        by_type.setdefault(t.transform_type, set()).add((t.transform_id, t.key_length))
    return by_type if set(by_type) <= allowed else None


def _ids(by_type: dict[int, set[tuple[int, int | None]]], ttype: int) -> set[int] | None:
    v = by_type.get(ttype)
    return None if v is None else {i for i, _ in v}


def _encr_offered(by_type: dict[int, set[tuple[int, int | None]]], encr: int, bits: int) -> bool:
    want = bits if encr in _KEY_LENGTH_ATTR else None
    return (encr, want) in by_type.get(TransformType.ENCR, set())


def _integ_ok(by_type: dict[int, set[tuple[int, int | None]]], integ: int) -> bool:
    offered = _ids(by_type, TransformType.INTEG)
    if integ == Integ.NONE:  # combined mode: INTEG absent or NONE offered
        return offered is None or 0 in offered
    return offered is not None and integ in offered


def _ike_offers(p: Proposal, s: IkeSuite) -> bool:
    if p.protocol_id != ProtocolId.IKE or p.spi:
        return False
    by_type = _by_type(p, _IKE_TYPES)
    if by_type is None:
        return False
    return (
        _encr_offered(by_type, s.encr, s.key_bits)
        and _integ_ok(by_type, s.integ)
        and s.prf in (_ids(by_type, TransformType.PRF) or set())
        and s.dh in (_ids(by_type, TransformType.DH) or set())
    )


def choose_ike(
    offered: Sequence[Proposal], ours: Sequence[IkeSuite], ke_group: int | None = None
) -> tuple[Proposal, IkeSuite] | None:
    """The responder's choice (RFC 7296 §2.7): the first of *our* suites that some offered
    proposal contains, as (the answer: offer's number, our transforms; the suite).

    With ``ke_group`` (the KE payload's group): when the first match is in another group but
    a later suite of ours that the initiator also offers is in ``ke_group``, that one is taken,
    sparing the INVALID_KE_PAYLOAD round trip (strongSwan does the same). The caller answers
    INVALID_KE_PAYLOAD naming ``suite.dh`` when it still differs from ``ke_group``.
    """
    matches = [(p, s) for s in ours for p in offered if _ike_offers(p, s)]
    if not matches:
        return None
    p, s = matches[0]
    if ke_group is not None and s.dh != ke_group:
        same = [(q, t) for q, t in matches if t.dh == ke_group]
        if same:
            p, s = same[0]
    return Proposal(p.number, ProtocolId.IKE, s.transforms()), s


def _transform_key(ts: Iterable[Transform]) -> frozenset[tuple[int, int, int | None]]:
    return frozenset((t.transform_type, t.transform_id, t.key_length) for t in ts)


def match_ike(chosen: Proposal, ours: Sequence[IkeSuite]) -> IkeSuite | None:
    """Initiator side: the suite of ours the responder's one proposal is, or None (then it
    chose something we did not offer)."""
    if chosen.protocol_id != ProtocolId.IKE or chosen.spi:
        return None
    got = _transform_key(chosen.transforms)
    for s in ours:
        if _transform_key(s.transforms()) == got:
            return s
    return None


@dataclass(frozen=True)
class EspChoice:
    """A responder's Child SA choice: the offer taken, our answer (offer's number, the suite's
    protocol, our transforms, our SPI), the suite and the PFS group used (0: none)."""

    offered: Proposal
    answer: Proposal
    suite: EspSuite
    dh: int


def _esp_offers(p: Proposal, s: EspSuite) -> dict[int, set[tuple[int, int | None]]] | None:
    """The offer's transforms by type when proposal ``p`` contains Child SA suite ``s`` (same
    protocol, ESP or AH), else None."""
    if p.protocol_id != s.protocol or len(p.spi) != 4:
        return None
    by_type = _by_type(p, _AH_TYPES if s.ah else _ESP_TYPES)
    if by_type is None:
        return None
    if not s.ah and not _encr_offered(by_type, s.encr, s.key_bits):
        return None
    if not _integ_ok(by_type, s.integ):
        return None
    esn = _ids(by_type, TransformType.ESN)
    if esn is not None and (Esn.ESN if s.esn else Esn.NO_ESN) not in esn:
        return None
    if esn is None and s.esn:
        return None
    return by_type


def _pfs_group_ok(group: int) -> bool:
    g = GROUPS.get(group)
    return g is not None and not g.legacy


def choose_esp(
    offered: Sequence[Proposal],
    ours: Sequence[EspSuite],
    our_spi: bytes,
    ke_group: int | None = None,
    *,
    create_child: bool = False,
) -> EspChoice | None:
    """The responder's Child SA choice (RFC 7296 §2.7, §1.3.1, §3.3.6): the first of our suites
    that an offered proposal of the suite's protocol (ESP or AH) contains.

    Without a KE payload (``ke_group`` None) the offer must carry no DH transform or include
    NONE; in IKE_AUTH (never a KE, §1.2) our suites' PFS groups do not matter, in
    CREATE_CHILD_SA (``create_child``) a suite of ours that names a group requires PFS and does
    not match. With a KE payload the offer must list ``ke_group``; a suite of ours that names a
    group takes only that group, one without a group takes any non-legacy group (PFS only adds
    strength).
    """
    for s in ours:
        for p in offered:
            by_type = _esp_offers(p, s)
            if by_type is None:
                continue
            dh = _ids(by_type, TransformType.DH)
            if ke_group is None:
                if (dh is not None and 0 not in dh) or (create_child and s.dh):
                    continue
                group = 0
            else:
                if dh is None or ke_group not in dh:
                    continue
                if s.dh and s.dh != ke_group:
                    continue
                if not s.dh and not _pfs_group_ok(ke_group):
                    continue
                group = ke_group
            answer = Proposal(p.number, s.protocol, s.transforms(dh=group), our_spi)
            return EspChoice(p, answer, s, group)
    return None


def esp_ke_hint(offered: Sequence[Proposal], ours: Sequence[EspSuite]) -> int | None:
    """The group to name in INVALID_KE_PAYLOAD when a CREATE_CHILD_SA's KE is in a group we do
    not take (RFC 7296 §1.3): our first suite's group that the offer lists, else
    DEFAULT_PFS_GROUP when a group-less suite matches an offer listing it; None: no hint (the
    answer is NO_PROPOSAL_CHOSEN)."""
    for s in ours:
        want = s.dh or DEFAULT_PFS_GROUP
        for p in offered:
            by_type = _esp_offers(p, s)
            if by_type is not None and want in (_ids(by_type, TransformType.DH) or set()):
                return want
    return None


def match_esp(chosen: Proposal, ours: Sequence[EspSuite], *, pfs_group: int = 0) -> EspSuite | None:
    """Initiator side: our suite equal to the responder's chosen Child SA proposal (same
    protocol, ESP or AH; with the PFS group ``pfs_group``, 0 for IKE_AUTH), or None."""
    if len(chosen.spi) != 4:
        return None
    got = _transform_key(chosen.transforms)
    for s in ours:
        if s.protocol == chosen.protocol_id and _transform_key(s.transforms(dh=pfs_group)) == got:
            return s
    return None
