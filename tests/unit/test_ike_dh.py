"""IKEv2 key exchange groups (services.core.ike.dh) against published values.

* RFC 3526 §3-§5 / RFC 7296 Appendix B.2 MODP primes: prime and safe prime (Miller-Rabin with
  fixed bases), bit length, and the RFC's own formula 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130)
  pi] + k), with pi computed here (Machin's formula, integers only).
* RFC 5903 §8 ECP test vectors (groups 19, 20, 21): KE data of i and r, and g^ir both ways.
* RFC 7748 §6.1 / §6.2 Curve25519 / Curve448 Diffie-Hellman examples (groups 31, 32).
* Wycheproof x25519_test.json, ecdh_secp256r1_ecpoint_test.json, ecdh_secp384r1_ecpoint_test.json:
  every case through our peer-value checks and shared(): "valid" gives the expected secret,
  "invalid" raises InvalidKeyExchange, "acceptable" either; never another exception.
* RFC 6989 / RFC 7296 §3.4 refusals of bad peer values, and the API's hygiene (legacy group,
  unknown IDs, injected randomness, no key bytes in repr or exception text).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.core.algorithms import AlgorithmError
from services.core.ike import dh
from services.core.ike.dh import DhGroupId, EcpGroup, InvalidKeyExchange, ModpGroup, group

WYCHEPROOF = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "wycheproof"


def h(s: str) -> bytes:
    """Decode hex that may contain whitespace (as RFCs print it)."""
    return bytes.fromhex("".join(s.split()))


def counter_rand(label: bytes) -> Callable[[int], bytes]:
    """A deterministic stand-in for secrets.token_bytes (SHA-256 in counter mode)."""
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(label + state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return rand


# --- MODP primes ------------------------------------------------------------------------------


def _miller_rabin(n: int, bases: tuple[int, ...]) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _pi_fixed(bits: int) -> int:
    """floor(pi * 2^bits), from pi = 16 atan(1/5) - 4 atan(1/239) in integer fixed point."""
    guard = 64
    one = 1 << (bits + guard)

    def atan_inv(x: int) -> int:
        power = one // x
        total, k, x2 = power, 1, x * x
        while power:
            power //= x2
            term = power // (2 * k + 1)
            total += -term if k % 2 else term
            k += 1
        return total

    return (16 * atan_inv(5) - 4 * atan_inv(239)) >> guard


# (group, bits, k of the RFC's formula): RFC 7296 B.2; RFC 3526 §3, §4, §5.
MODP = (
    (DhGroupId.MODP_1024, 1024, 129093),
    (DhGroupId.MODP_2048, 2048, 124476),
    (DhGroupId.MODP_3072, 3072, 1690314),
    (DhGroupId.MODP_4096, 4096, 240904),
)


@pytest.mark.parametrize(("gid", "bits", "k"), MODP, ids=[g.name for g, _, _ in MODP])
def test_modp_prime_is_the_published_safe_prime(gid: DhGroupId, bits: int, k: int) -> None:
    g = group(gid, allow_legacy=True)
    assert isinstance(g, ModpGroup)
    p = g.p
    assert p.bit_length() == bits and g.ke_len == bits // 8 and g.g == 2
    assert p >> (bits - 64) == (1 << 64) - 1 and p & ((1 << 64) - 1) == (1 << 64) - 1
    assert p == 2**bits - 2 ** (bits - 64) - 1 + 2**64 * (_pi_fixed(bits - 130) + k)
    assert _miller_rabin(p, (2, 3, 5, 7))
    q = (p - 1) // 2
    assert _miller_rabin(q, (2, 3))
    assert pow(2, q, p) == 1  # 2 generates the prime-order subgroup (p = 7 mod 8)


def test_pi_fixed_point_is_pi() -> None:
    assert _pi_fixed(64) == 0x3243F6A8885A308D3  # pi = 3.243F6A8885A308D3... (hex)


# --- registry ---------------------------------------------------------------------------------


def test_group_registry() -> None:
    assert sorted(dh.GROUPS) == [2, 14, 15, 16, 19, 20, 21, 31, 32]
    with pytest.raises(AlgorithmError, match="legacy"):
        group(DhGroupId.MODP_1024)
    assert group(DhGroupId.MODP_1024, allow_legacy=True).ke_len == 128
    for unknown in (0, 1, 5, 17, 18, 22, 23, 24, 25, 26, 27, 28, 29, 30, 33, 35):
        with pytest.raises(AlgorithmError, match="unsupported"):
            group(unknown, allow_legacy=True)
    lengths = {gid: group(gid).ke_len for gid in (14, 15, 16, 19, 20, 21, 31, 32)}
    assert lengths == {14: 256, 15: 384, 16: 512, 19: 64, 20: 96, 21: 132, 31: 32, 32: 56}


@pytest.mark.parametrize("gid", [19, 20, 21])
def test_ecp_orders(gid: int) -> None:
    """The hard-coded n: (n-1)·G = -G (same x, negated y), and n is refused as a scalar."""
    g = group(gid)
    assert isinstance(g, EcpGroup)
    one = g.from_private_value(1).public_bytes()
    minus_one = g.from_private_value(g.order - 1).public_bytes()
    c = g.coord_len
    assert minus_one[:c] == one[:c] and minus_one[c:] != one[c:]
    p = _field_prime(g)
    assert int.from_bytes(one[c:], "big") + int.from_bytes(minus_one[c:], "big") == p
    with pytest.raises(AlgorithmError):
        g.from_private_value(g.order)
    with pytest.raises(AlgorithmError):
        g.from_private_value(0)


def _field_prime(g: EcpGroup) -> int:
    return {
        19: 2**256 - 2**224 + 2**192 + 2**96 - 1,
        20: 2**384 - 2**128 - 2**96 + 2**32 - 1,
        21: 2**521 - 1,
    }[int(g.transform_id)]


# --- RFC 5903 §8 ------------------------------------------------------------------------------

# RFC 5903 §8.1-§8.3 (i, gix, giy, r, grx, gry, girx), transcribed from public repositories
# that copy the RFC's text (an independent P-256/P-384 copy agrees); every value is checked
# below against the others (i·G, r·G, both shared secrets), so a transcription slip fails.
RFC5903 = {
    19: (
        "C88F01F5 10D9AC3F 70A292DA A2316DE5 44E9AAB8 AFE84049 C62A9C57 862D1433",
        "DAD0B653 94221CF9 B051E1FE CA5787D0 98DFE637 FC90B9EF 945D0C37 72581180",
        "5271A046 1CDB8252 D61F1C45 6FA3E59A B1F45B33 ACCF5F58 389E0577 B8990BB3",
        "C6EF9C5D 78AE012A 011164AC B397CE20 88685D8F 06BF9BE0 B283AB46 476BEE53",
        "D12DFB52 89C8D4F8 1208B702 70398C34 2296970A 0BCCB74C 736FC755 4494BF63",
        "56FBF3CA 366CC23E 8157854C 13C58D6A AC23F046 ADA30F83 53E74F33 039872AB",
        "D6840F6B 42F6EDAF D13116E0 E1256520 2FEF8E9E CE7DCE03 812464D0 4B9442DE",
    ),
    20: (
        "099F3C70 34D4A2C6 99884D73 A375A67F 7624EF7C 6B3C0F16 0647B674 14DCE655"
        "E35B5380 41E649EE 3FAEF896 783AB194",
        "667842D7 D180AC2C DE6F74F3 7551F557 55C7645C 20EF73E3 1634FE72 B4C55EE6"
        "DE3AC808 ACB4BDB4 C88732AE E95F41AA",
        "9482ED1F C0EEB9CA FC498462 5CCFC23F 65032149 E0E144AD A0241815 35A0F38E"
        "EB9FCFF3 C2C947DA E69B4C63 4573A81C",
        "41CB0779 B4BDB85D 47846725 FBEC3C94 30FAB46C C8DC5060 855CC9BD A0AA2942"
        "E0308312 916B8ED2 960E4BD5 5A7448FC",
        "E558DBEF 53EECDE3 D3FCCFC1 AEA08A89 A987475D 12FD950D 83CFA417 32BC509D"
        "0D1AC43A 0336DEF9 6FDA41D0 774A3571",
        "DCFBEC7A ACF31964 72169E83 8430367F 66EEBE3C 6E70C416 DD5F0C68 759DD1FF"
        "F83FA401 42209DFF 5EAAD96D B9E6386C",
        "11187331 C279962D 93D60424 3FD592CB 9D0A926F 422E4718 7521287E 7156C5C4"
        "D6031355 69B9E9D0 9CF5D4A2 70F59746",
    ),
    21: (
        "0037ADE9 319A89F4 DABDB3EF 411AACCC A5123C61 ACAB57B5 393DCE47 608172A0"
        "95AA85A3 0FE1C295 2C6771D9 37BA9777 F5957B26 39BAB072 462F68C2 7A57382D 4A52",
        "0015417E 84DBF28C 0AD3C278 713349DC 7DF153C8 97A1891B D98BAB43 57C9ECBE"
        "E1E3BF42 E00B8E38 0AEAE57C 2D107564 94188594 2AF5A7F4 601723C4 195D176C ED3E",
        "017CAE20 B6641D2E EB695786 D8C94614 6239D099 E18E1D5A 514C739D 7CB4A10A"
        "D8A78801 5AC405D7 799DC75E 7B7D5B6C F2261A6A 7F150743 8BF01BEB 6CA3926F 9582",
        "0145BA99 A847AF43 793FDD0E 872E7CDF A16BE30F DC780F97 BCCC3F07 8380201E"
        "9C677D60 0B343757 A3BDBF2A 3163E4C2 F869CCA7 458AA4A4 EFFC311F 5CB15168 5EB9",
        "00D0B397 5AC4B799 F5BEA16D 5E13E9AF 971D5E9B 984C9F39 728B5E57 39735A21"
        "9B97C356 436ADC6E 95BB0352 F6BE64A6 C2912D4E F2D0433C ED2B6171 640012D9 460F",
        "015C6822 6383956E 3BD066E7 97B623C2 7CE0EAC2 F551A10C 2C724D98 52077B87"
        "220B6536 C5C408A1 D2AEBB8E 86D678AE 49CB5709 1F473229 6579AB44 FCD17F0F C56A",
        "01144C7D 79AE6956 BC8EDB8E 7C787C45 21CB086F A64407F9 7894E5E6 B2D79B04"
        "D1427E73 CA4BAA24 0A347868 59810C06 B3C715A3 A8CC3151 F2BEE417 996D19F3 DDEA",
    ),
}


@pytest.mark.parametrize("gid", sorted(RFC5903))
def test_rfc5903_section8(gid: int) -> None:
    i, gix, giy, r, grx, gry, girx = (h(v) for v in RFC5903[gid])
    g = group(gid)
    initiator = g.from_private_value(i)
    responder = g.from_private_value(int.from_bytes(r, "big"))
    assert initiator.public_bytes() == gix + giy  # KEi data, RFC 5903 §7: x || y
    assert responder.public_bytes() == grx + gry
    assert initiator.shared(grx + gry) == girx  # g^ir is the x coordinate only
    assert responder.shared(gix + giy) == girx
    assert len(girx) == g.ke_len // 2


# --- RFC 7748 §6 ------------------------------------------------------------------------------

# RFC 7748 §6.1 (X25519) and §6.2 (X448): Alice's private, Alice's public, Bob's private,
# Bob's public, shared secret K.
RFC7748 = {
    31: (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
    ),
    32: (
        "9a8f4925d1519f5775cf46b04b5800d4ee9ee8bae8bc5565d498c28d"
        "d9c9baf574a9419744897391006382a6f127ab1d9ac2d8c0a598726b",
        "9b08f7cc31b7e3e67d22d5aea121074a273bd2b83de09c63faa73d2c"
        "22c5d9bbc836647241d953d40c5b12da88120d53177f80e532c41fa0",
        "1c306a7ac2a0e2e0990b294470cba339e6453772b075811d8fad0d1d"
        "6927c120bb5ee8972b0d3e21374c9c921b09d1b0366f10b65173992d",
        "3eb7a829b0cd20f5bcfc0b599b6feccf6da4627107bdb0d4f345b430"
        "27d8b972fc3e34fb4232a13ca706dcb57aec3dae07bdc1c67bf33609",
        "07fff4181ac6cc95ec1c16a94a0f74d12da232ce40a77552281d282b"
        "b60c0b56fd2464c335543936521c24403085d59a449a5037514a879d",
    ),
}


@pytest.mark.parametrize("gid", sorted(RFC7748))
def test_rfc7748_section6(gid: int) -> None:
    a, a_pub, b, b_pub, k = (h(v) for v in RFC7748[gid])
    g = group(gid)
    alice, bob = g.from_private_value(a), g.from_private_value(b)
    assert alice.public_bytes() == a_pub and bob.public_bytes() == b_pub
    assert alice.shared(b_pub) == k and bob.shared(a_pub) == k


# --- generation -------------------------------------------------------------------------------

ALL_GROUPS = [14, 15, 16, 19, 20, 21, 31, 32]


@pytest.mark.parametrize("gid", ALL_GROUPS)
def test_agreement_and_injected_randomness(gid: int) -> None:
    g = group(gid)
    a, b = g.generate(), g.generate()
    assert len(a.public_bytes()) == g.ke_len
    assert a.public_bytes() != b.public_bytes()
    s = a.shared(b.public_bytes())
    assert s == b.shared(a.public_bytes())
    assert len(s) == (g.ke_len // 2 if isinstance(g, EcpGroup) else g.ke_len)
    # The same injected source gives the same private value; another source another one.
    x1 = g.generate(counter_rand(b"one")).public_bytes()
    assert x1 == g.generate(counter_rand(b"one")).public_bytes()
    assert x1 != g.generate(counter_rand(b"two")).public_bytes()


def test_modp_exponent_is_512_bits_from_the_injected_source() -> None:
    asked: list[int] = []

    def rand(n: int) -> bytes:
        asked.append(n)
        return b"\x5a" * n

    g = group(14)
    assert isinstance(g, ModpGroup)
    priv = g.generate(rand)
    assert asked == [64 + 8]
    x = (int.from_bytes(b"\x5a" * 72, "big") % (2**512 - 2)) + 2
    assert 2 <= x < 2**512
    assert priv.public_bytes() == pow(2, x, g.p).to_bytes(256, "big")


# --- peer value checks ------------------------------------------------------------------------


@pytest.mark.parametrize("gid", [14, 15, 16])
def test_modp_peer_value_checks(gid: int) -> None:
    g = group(gid)
    assert isinstance(g, ModpGroup)
    n, p = g.ke_len, g.p
    priv = g.generate(counter_rand(b"modp"))
    for y in (0, 1, p - 1, p, p + 1, 2 ** (8 * n) - 1):
        with pytest.raises(InvalidKeyExchange):
            priv.shared(y.to_bytes(n, "big"))
    for data in (b"", b"\x02", (2).to_bytes(n - 1, "big"), (2).to_bytes(n + 1, "big")):
        with pytest.raises(InvalidKeyExchange, match="octets"):
            priv.shared(data)
    # Small but in range, padded to the modulus length: accepted (RFC 7296 §3.4 pads).
    assert len(priv.shared((2).to_bytes(n, "big"))) == n
    assert len(priv.shared((p - 2).to_bytes(n, "big"))) == n


@pytest.mark.parametrize("gid", [19, 20, 21])
def test_ecp_peer_value_checks(gid: int) -> None:
    g = group(gid)
    assert isinstance(g, EcpGroup)
    c = g.coord_len
    priv = g.generate(counter_rand(b"ecp"))
    good = g.generate(counter_rand(b"peer")).public_bytes()
    assert len(priv.shared(good)) == c
    p = _field_prime(g)
    y = int.from_bytes(good[c:], "big")
    bad = {
        "sec1 0x04 prefix": b"\x04" + good,
        "short": good[:-1],
        "long": good + b"\x00",
        "compressed": bytes([2 + (y & 1)]) + good[:c],
        "empty": b"",
        "infinity as (0, 0)": bytes(2 * c),
        "off the curve": good[:-1] + bytes([good[-1] ^ 1]),
        "x >= p": p.to_bytes(c, "big") + good[c:],
        "y + p": good[:c] + (y + p).to_bytes(c, "big") if y + p < 2 ** (8 * c) else b"",
        "peer of another curve": group(19 if gid != 19 else 20).generate().public_bytes(),
    }
    for name, data in bad.items():
        with pytest.raises(InvalidKeyExchange):
            priv.shared(data)
        assert name


@pytest.mark.parametrize("gid", [31, 32])
def test_montgomery_peer_value_checks(gid: int) -> None:
    g = group(gid)
    n = g.ke_len
    priv = g.generate(counter_rand(b"x"))
    for data in (b"", bytes(n - 1), bytes(n + 1)):
        with pytest.raises(InvalidKeyExchange, match="octets"):
            priv.shared(data)
    # Low-order points give an all-zero secret (RFC 7748 §6, RFC 8031 §2.2): u = 0 and u = 1.
    for u in (0, 1):
        with pytest.raises(InvalidKeyExchange, match="all-zero"):
            priv.shared(u.to_bytes(n, "little"))


def test_no_key_bytes_in_repr_or_errors() -> None:
    i = h(RFC5903[19][0])
    priv = group(19).from_private_value(i)
    text = repr(priv) + str(priv)
    assert i.hex() not in text.lower() and str(int.from_bytes(i, "big")) not in text
    assert repr(priv) == "<_EcpPrivate group=19>"
    peer = h(RFC5903[19][4]) + bytes(32)
    with pytest.raises(InvalidKeyExchange) as err:
        priv.shared(peer)
    assert peer.hex() not in str(err.value) and err.value.__cause__ is None
    assert err.value.__suppress_context__
    modp = group(14).generate(counter_rand(b"repr"))
    assert "_x" not in repr(modp) and repr(modp) == "<_ModpPrivate group=14>"


def test_from_private_value_checks() -> None:
    with pytest.raises(AlgorithmError):
        group(31).from_private_value(5)
    with pytest.raises(AlgorithmError):
        group(31).from_private_value(bytes(31))
    g = group(14)
    assert isinstance(g, ModpGroup)
    with pytest.raises(AlgorithmError):
        g.from_private_value(g.p - 1)
    assert g.from_private_value(b"\x05").public_bytes() == (32).to_bytes(256, "big")


# --- Wycheproof -------------------------------------------------------------------------------


def _wycheproof(name: str) -> dict[str, Any]:
    path = WYCHEPROOF / name
    if not path.is_file():
        pytest.skip(f"Wycheproof file {path} is absent (expected beside the repository)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _outcome(priv: dh.DhPrivate, peer: bytes, expected: bytes) -> str:
    """'match', 'mismatch' or 'refused'; any exception but InvalidKeyExchange propagates."""
    try:
        got = priv.shared(peer)
    except InvalidKeyExchange:
        return "refused"
    return "match" if got == expected else "mismatch"


def _check(result: str, outcome: str) -> None:
    if result == "valid":
        assert outcome == "match"
    elif result == "invalid":
        assert outcome == "refused"
    else:
        assert outcome in ("match", "refused")


def test_wycheproof_x25519() -> None:
    data = _wycheproof("x25519_test.json")
    g = group(DhGroupId.CURVE25519)
    seen: Counter[tuple[str, str]] = Counter()
    for tg in data["testGroups"]:
        assert tg["curve"] == "curve25519"
        for t in tg["tests"]:
            priv = g.from_private_value(bytes.fromhex(t["private"]))
            outcome = _outcome(priv, bytes.fromhex(t["public"]), h(t["shared"]))
            _check(t["result"], outcome)
            if outcome == "refused":  # only all-zero secrets are refused
                assert t["shared"] == "00" * 32
            seen[t["result"], outcome] += 1
    assert sum(seen.values()) == data["numberOfTests"]
    assert seen["valid", "match"] == sum(v for (r, _), v in seen.items() if r == "valid")


_ECP_FILES = {
    "ecdh_secp256r1_ecpoint_test.json": (DhGroupId.ECP_256, "secp256r1"),
    "ecdh_secp384r1_ecpoint_test.json": (DhGroupId.ECP_384, "secp384r1"),
}


@pytest.mark.parametrize("name", sorted(_ECP_FILES))
def test_wycheproof_ecdh_ecpoint(name: str) -> None:
    """Wycheproof gives the peer point in SEC 1 form. An uncompressed point 0x04 || x || y of
    the right length is exactly IKE's KE data without the 0x04 and is fed as such; any other
    encoding cannot appear in a KE payload (RFC 5903 §7) and is fed raw: it must be refused.
    A *valid* compressed point is additionally decompressed (by cryptography, test side) and
    fed as x || y, which must give the expected secret."""
    data = _wycheproof(name)
    gid, curve_name = _ECP_FILES[name]
    g = group(gid)
    assert isinstance(g, EcpGroup)
    c = g.coord_len
    seen: Counter[tuple[str, str]] = Counter()
    for tg in data["testGroups"]:
        assert tg["curve"] == curve_name and tg["encoding"] == "ecpoint"
        for t in tg["tests"]:
            priv = g.from_private_value(int(t["private"], 16))
            public, expected = bytes.fromhex(t["public"]), h(t["shared"])
            if len(public) == 1 + 2 * c and public[0] == 4:
                outcome = _outcome(priv, public[1:], expected)
                kind = "x||y"
            else:
                outcome = _outcome(priv, public, expected)
                assert outcome == "refused"
                kind = "not x||y"
                if t["result"] == "valid":
                    point = ec.EllipticCurvePublicKey.from_encoded_point(g.curve, public)
                    xy = point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
                    outcome = _outcome(priv, xy, expected)
                    kind = "decompressed"
            _check(t["result"], outcome)
            seen[t["result"], f"{kind}:{outcome}"] += 1
    assert sum(seen.values()) == data["numberOfTests"]
