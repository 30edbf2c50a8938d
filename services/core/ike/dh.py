"""IKEv2 key exchange groups: RFC 7296 §3.4, RFC 3526 (MODP), RFC 5903 §7 (ECP), RFC 8031.

Groups are keyed by IKEv2 Transform Type 4 IDs: 14/15/16 (MODP 2048/3072/4096, RFC 3526
§3-§5), 19/20/21 (NIST P-256/384/521, RFC 5903), 31/32 (Curve25519/Curve448, RFC 8031), and
legacy 2 (MODP 1024, RFC 7296 Appendix B.2) only with ``allow_legacy=True``.

KE payload data (RFC 7296 §3.4) is exactly the group's length: the modulus length for MODP
(big-endian, zero-padded), x || y each padded to the field size for ECP (RFC 5903 §7), the
RFC 7748 encoding for X25519/X448 (RFC 8031 §2). The shared secret g^ir is padded the same way
(RFC 7296 §2.14); for ECP it is the x coordinate only (RFC 5903 §7).

Every peer value is checked before use (RFC 6989 §2.1, §2.2; RFC 8031 §2.2): length; MODP
1 < y < p-1; ECP a point on the curve (never the point at infinity, which has no x || y
encoding); X25519/X448 a shared secret that is not all zero. Any failure raises the single
:class:`InvalidKeyExchange`, whose text carries lengths and group IDs only, never key bytes.

MODP arithmetic uses Python integers (``pow``), which is not constant time; the ECP and
Montgomery groups run in OpenSSL through ``cryptography``.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.core.algorithms import AlgorithmError

Rand = Callable[[int], bytes]  # n -> n random octets (secrets.token_bytes by default)


class DhGroupId(IntEnum):
    """IKEv2 Transform Type 4 (Key Exchange Method) IDs, RFC 7296 §3.3.2 and IANA."""

    MODP_1024 = 2
    MODP_2048 = 14
    MODP_3072 = 15
    MODP_4096 = 16
    ECP_256 = 19
    ECP_384 = 20
    ECP_521 = 21
    CURVE25519 = 31
    CURVE448 = 32


class InvalidKeyExchange(ValueError):
    """A peer's KE data (or the secret it yields) is not acceptable. Carries no key bytes."""


def _h(s: str) -> int:
    return int("".join(s.split()), 16)


# RFC 7296 Appendix B.2 (= RFC 2409 §6.2), "Group 2 - 1024-bit MODP"; generator 2.
MODP_1024_P = _h(
    """
    FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
    29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
    EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
    E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
    EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE65381
    FFFFFFFF FFFFFFFF
    """
)

# RFC 3526 §3, "2048-bit MODP Group", id 14; generator 2.
MODP_2048_P = _h(
    """
    FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
    29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
    EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
    E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
    EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
    C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
    83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
    670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
    E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
    DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
    15728E5A 8AACAA68 FFFFFFFF FFFFFFFF
    """
)

# RFC 3526 §4, "3072-bit MODP Group", id 15; generator 2.
MODP_3072_P = _h(
    """
    FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
    29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
    EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
    E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
    EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
    C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
    83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
    670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
    E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
    DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
    15728E5A 8AAAC42D AD33170D 04507A33 A85521AB DF1CBA64
    ECFB8504 58DBEF0A 8AEA7157 5D060C7D B3970F85 A6E1E4C7
    ABF5AE8C DB0933D7 1E8C94E0 4A25619D CEE3D226 1AD2EE6B
    F12FFA06 D98A0864 D8760273 3EC86A64 521F2B18 177B200C
    BBE11757 7A615D6C 770988C0 BAD946E2 08E24FA0 74E5AB31
    43DB5BFC E0FD108E 4B82D120 A93AD2CA FFFFFFFF FFFFFFFF
    """
)

# RFC 3526 §5, "4096-bit MODP Group", id 16; generator 2.
MODP_4096_P = _h(
    """
    FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
    29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
    EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
    E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
    EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
    C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
    83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
    670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
    E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
    DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
    15728E5A 8AAAC42D AD33170D 04507A33 A85521AB DF1CBA64
    ECFB8504 58DBEF0A 8AEA7157 5D060C7D B3970F85 A6E1E4C7
    ABF5AE8C DB0933D7 1E8C94E0 4A25619D CEE3D226 1AD2EE6B
    F12FFA06 D98A0864 D8760273 3EC86A64 521F2B18 177B200C
    BBE11757 7A615D6C 770988C0 BAD946E2 08E24FA0 74E5AB31
    43DB5BFC E0FD108E 4B82D120 A9210801 1A723C12 A787E6D7
    88719A10 BDBA5B26 99C32718 6AF4E23C 1A946834 B6150BDA
    2583E9CA 2AD44CE8 DBBBC2DB 04DE8EF9 2E8EFC14 1FBECAA6
    287C5947 4E6BC05D 99B2964F A090C3A2 233BA186 515BE7ED
    1F612970 CEE2D7AF B81BDD76 2170481C D0069127 D5B05AA9
    93B4EA98 8D8FDDC1 86FFB7DC 90A6C08F 4DF435C9 34063199
    FFFFFFFF FFFFFFFF
    """
)

# Orders n of the base points (FIPS 186-4 D.1.2 / SEC 2), for drawing scalars from an
# injected random source; tests/unit/test_ike_dh.py checks each one against OpenSSL.
P256_N = _h("FFFFFFFF 00000000 FFFFFFFF FFFFFFFF BCE6FAAD A7179E84 F3B9CAC2 FC632551")
P384_N = _h(
    """
    FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF C7634D81 F4372DDF
    581A0DB2 48B0A77A ECEC196A CCC52973
    """
)
P521_N = _h(
    """
    01FF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFA
    51868783 BF2F966B 7FCC0148 F709A5D0 3BB5C9B8 899C47AE BB6FB71E 91386409
    """
)

MODP_EXPONENT_BITS = 512
_EXTRA = 8  # extra random octets when reducing modulo n (bias below 2^-64)


def _rand_below(rand: Rand, n: int) -> int:
    """A uniform-enough integer in [1, n-1] from ``rand``."""
    size = (n.bit_length() + 7) // 8 + _EXTRA
    return int.from_bytes(rand(size), "big") % (n - 1) + 1


class DhPrivate(ABC):
    """One side's ephemeral private value. Never shown in repr."""

    __slots__ = ("group",)

    def __init__(self, group: DhGroup) -> None:
        self.group = group

    @abstractmethod
    def public_bytes(self) -> bytes:
        """The KE payload's Key Exchange Data (RFC 7296 §3.4)."""

    @abstractmethod
    def shared(self, peer: bytes) -> bytes:
        """g^ir from the peer's KE data; InvalidKeyExchange if that data is not acceptable."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={int(self.group.transform_id)}>"


class DhGroup(ABC):
    transform_id: DhGroupId
    name: str
    ke_len: int  # octets of KE data; g^ir has as many (MODP, Montgomery) or half (ECP: x only)
    legacy: bool

    def __init__(self, transform_id: DhGroupId, name: str, ke_len: int, legacy: bool) -> None:
        self.transform_id = transform_id
        self.name = name
        self.ke_len = ke_len
        self.legacy = legacy

    @abstractmethod
    def generate(self, rand: Rand | None = None) -> DhPrivate:
        """A fresh private value from ``rand`` (default: the secrets module / OpenSSL)."""

    @abstractmethod
    def from_private_value(self, value: int | bytes) -> DhPrivate:
        """FOR PUBLISHED-VECTOR TESTS ONLY: wrap a known private value.

        MODP and ECP take an int (or its big-endian octets); X25519/X448 take the RFC 7748
        private key octets. Live SAs must use :meth:`generate`.
        """

    def _check_length(self, peer: bytes, want: int) -> None:
        if len(peer) != want:
            raise InvalidKeyExchange(
                f"group {int(self.transform_id)}: KE data of {len(peer)} octets, need {want}"
            )

    def _invalid(self, what: str) -> InvalidKeyExchange:
        return InvalidKeyExchange(f"group {int(self.transform_id)}: {what}")

    def __repr__(self) -> str:
        return f"<DhGroup {int(self.transform_id)} {self.name}>"


# --- MODP (RFC 3526, RFC 7296 Appendix B) ------------------------------------------------------


class _ModpPrivate(DhPrivate):
    __slots__ = ("_public", "_x")
    group: ModpGroup

    def __init__(self, group: ModpGroup, x: int) -> None:
        super().__init__(group)
        self._x = x
        self._public = pow(group.g, x, group.p).to_bytes(group.ke_len, "big")

    def public_bytes(self) -> bytes:
        return self._public

    def shared(self, peer: bytes) -> bytes:
        g = self.group
        g._check_length(peer, g.ke_len)
        y = int.from_bytes(peer, "big")
        if not 1 < y < g.p - 1:  # RFC 6989 §2.1: rejects 0, 1, p-1 and values >= p
            raise g._invalid("public value out of range")
        z = pow(y, self._x, g.p)
        if not 1 < z < g.p - 1:
            raise g._invalid("degenerate shared secret")
        return z.to_bytes(g.ke_len, "big")


class ModpGroup(DhGroup):
    def __init__(self, transform_id: DhGroupId, p: int, *, legacy: bool = False) -> None:
        bits = p.bit_length()
        super().__init__(transform_id, f"modp{bits}", (bits + 7) // 8, legacy)
        self.p = p
        self.g = 2

    def generate(self, rand: Rand | None = None) -> DhPrivate:
        # An exponent in [2, 2^512 - 1]: at least twice the strength estimates of RFC 3526 §8
        # for groups 14-16 (320/420/480-bit exponents). p is a safe prime and 2 generates the
        # subgroup of prime order (p-1)/2, so distinct exponents give distinct values.
        r: Rand = rand or secrets.token_bytes
        x = _rand_below(r, (1 << MODP_EXPONENT_BITS) - 1) + 1
        return _ModpPrivate(self, x)

    def from_private_value(self, value: int | bytes) -> DhPrivate:
        x = int.from_bytes(value, "big") if isinstance(value, bytes) else value
        if not 0 < x < self.p - 1:
            raise AlgorithmError(f"{self.name}: private exponent out of range")
        return _ModpPrivate(self, x)


# --- ECP (RFC 5903) ----------------------------------------------------------------------------


class _EcpPrivate(DhPrivate):
    __slots__ = ("_key",)
    group: EcpGroup

    def __init__(self, group: EcpGroup, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(group)
        self._key = key

    def public_bytes(self) -> bytes:
        point = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return point[1:]  # drop the 0x04 of SEC 1: RFC 5903 §7 sends x || y

    def shared(self, peer: bytes) -> bytes:
        g = self.group
        g._check_length(peer, 2 * g.coord_len)
        try:
            # SEC 1 decoding with 0x04 checks that (x, y) is a point of the curve with
            # coordinates below p; the point at infinity has no such encoding.
            pub = ec.EllipticCurvePublicKey.from_encoded_point(g.curve, b"\x04" + peer)
            return self._key.exchange(ec.ECDH(), pub)  # x coordinate, field-size octets
        except ValueError:
            raise g._invalid("not a point of the curve") from None


class EcpGroup(DhGroup):
    def __init__(
        self, transform_id: DhGroupId, curve: ec.EllipticCurve, coord_len: int, order: int
    ) -> None:
        super().__init__(transform_id, f"ecp{curve.key_size}", 2 * coord_len, False)
        self.curve = curve
        self.coord_len = coord_len
        self.order = order

    def generate(self, rand: Rand | None = None) -> DhPrivate:
        if rand is None:
            return _EcpPrivate(self, ec.generate_private_key(self.curve))
        return self.from_private_value(_rand_below(rand, self.order))

    def from_private_value(self, value: int | bytes) -> DhPrivate:
        d = int.from_bytes(value, "big") if isinstance(value, bytes) else value
        if not 0 < d < self.order:
            raise AlgorithmError(f"{self.name}: private scalar out of range")
        return _EcpPrivate(self, ec.derive_private_key(d, self.curve))


# --- Curve25519 / Curve448 (RFC 8031, RFC 7748) ------------------------------------------------


class _MontgomeryPrivate(DhPrivate):
    __slots__ = ("_key",)
    group: MontgomeryGroup

    def __init__(
        self, group: MontgomeryGroup, key: x25519.X25519PrivateKey | x448.X448PrivateKey
    ) -> None:
        super().__init__(group)
        self._key = key

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def shared(self, peer: bytes) -> bytes:
        g = self.group
        g._check_length(peer, g.ke_len)
        try:
            if isinstance(self._key, x25519.X25519PrivateKey):
                z = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            else:
                z = self._key.exchange(x448.X448PublicKey.from_public_bytes(peer))
        except ValueError:  # OpenSSL refuses an all-zero result
            raise g._invalid("all-zero shared secret") from None
        if not any(z):  # RFC 8031 §2.2 (checked here too, whatever the backend does)
            raise g._invalid("all-zero shared secret")
        return z


class MontgomeryGroup(DhGroup):
    def __init__(self, transform_id: DhGroupId, name: str, ke_len: int) -> None:
        super().__init__(transform_id, name, ke_len, False)

    def _load(self, raw: bytes) -> DhPrivate:
        if len(raw) != self.ke_len:
            raise AlgorithmError(f"{self.name}: private key of {len(raw)} octets")
        if self.ke_len == 32:
            return _MontgomeryPrivate(self, x25519.X25519PrivateKey.from_private_bytes(raw))
        return _MontgomeryPrivate(self, x448.X448PrivateKey.from_private_bytes(raw))

    def generate(self, rand: Rand | None = None) -> DhPrivate:
        return self._load((rand or secrets.token_bytes)(self.ke_len))

    def from_private_value(self, value: int | bytes) -> DhPrivate:
        if not isinstance(value, bytes):
            raise AlgorithmError(f"{self.name}: private key is given as RFC 7748 octets")
        return self._load(value)


GROUPS: dict[int, DhGroup] = {
    g.transform_id: g
    for g in (
        ModpGroup(DhGroupId.MODP_2048, MODP_2048_P),
        ModpGroup(DhGroupId.MODP_3072, MODP_3072_P),
        ModpGroup(DhGroupId.MODP_4096, MODP_4096_P),
        EcpGroup(DhGroupId.ECP_256, ec.SECP256R1(), 32, P256_N),
        EcpGroup(DhGroupId.ECP_384, ec.SECP384R1(), 48, P384_N),
        EcpGroup(DhGroupId.ECP_521, ec.SECP521R1(), 66, P521_N),
        MontgomeryGroup(DhGroupId.CURVE25519, "curve25519", 32),
        MontgomeryGroup(DhGroupId.CURVE448, "curve448", 56),
        ModpGroup(DhGroupId.MODP_1024, MODP_1024_P, legacy=True),
    )
}


def group(transform_id: int, *, allow_legacy: bool = False) -> DhGroup:
    """The key exchange group for a Transform Type 4 ID (AlgorithmError if unknown/legacy)."""
    g = GROUPS.get(transform_id)
    if g is None:
        raise AlgorithmError(f"unsupported key exchange group {transform_id}")
    if g.legacy and not allow_legacy:
        raise AlgorithmError(f"{g.name} is legacy and not enabled")
    return g
