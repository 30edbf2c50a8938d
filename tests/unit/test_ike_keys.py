"""IKEv2 PRF and key schedule (services.core.ike.prf / .keys) against published vectors.

* RFC 4231 §4.2-§4.3 (HMAC-SHA-256/384/512 test cases 1 and 2) for prf().
* NIST SP 800-135 IKEv2 KDF vectors (CAVS sample, ACVP, via NSS / OpenSSL test files) for
  SKEYSEED, prf+ (DKM), Child SA KEYMAT with and without PFS, and rekey SKEYSEED, one case
  per hash SHA-1 / SHA-256 / SHA-384 / SHA-512 (sources named at each case).
* RFC 7634 Appendix B: the IKE SA's ChaCha20-Poly1305 SK_e layout (key || 4-octet salt).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import pytest

from services.core.algorithms import AlgorithmError, encr_algorithm, make_aead, split_encr_key
from services.core.iana import Encr
from services.core.ike.keys import (
    ChildKeys,
    IkeKeys,
    child_keymat,
    child_keys,
    derive_ike_keys,
    rekey_skeyseed,
    skeyseed,
    split_child_keymat,
)
from services.core.ike.prf import PRF, Prf, PrfAlgorithm, prf, prf_algorithm, prf_plus
from tests.vectors.rfc7634 import IKE_CASES


def h(s: str) -> bytes:
    """Decode hex that may contain whitespace."""
    return bytes.fromhex("".join(s.split()))


def _alg(prf_id: int) -> PrfAlgorithm:
    return prf_algorithm(prf_id, allow_legacy=True)


# --- RFC 4231 ---------------------------------------------------------------------------------

# RFC 4231 §4.2 (test case 1) and §4.3 (test case 2): (key, data, {PRF ID: HMAC}).
RFC4231 = (
    (
        "tc1",
        bytes([0x0B] * 20),
        b"Hi There",
        {
            Prf.HMAC_SHA2_256: "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            Prf.HMAC_SHA2_384: "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec6"
            "82aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
            Prf.HMAC_SHA2_512: "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
            "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        },
    ),
    (
        "tc2",
        b"Jefe",
        b"what do ya want for nothing?",
        {
            Prf.HMAC_SHA2_256: "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            Prf.HMAC_SHA2_384: "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47"
            "e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
            Prf.HMAC_SHA2_512: "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
            "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        },
    ),
)


@pytest.mark.parametrize(
    ("key", "data", "prf_id", "expected"),
    [
        pytest.param(key, data, pid, out, id=f"{name}-{pid.name}")
        for name, key, data, outs in RFC4231
        for pid, out in outs.items()
    ],
)
def test_prf_rfc4231(key: bytes, data: bytes, prf_id: Prf, expected: str) -> None:
    assert prf(prf_id, key, data) == h(expected)


# --- prf+ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prf_id", [Prf.HMAC_SHA2_256, Prf.HMAC_SHA2_384, Prf.HMAC_SHA2_512])
def test_prf_plus_is_the_rfc7296_chain(prf_id: Prf) -> None:
    """T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n), written out independently."""
    alg = PRF[prf_id]
    key, seed = b"k" * 7, b"seed"
    digest = getattr(hashlib, alg.digest)
    t1 = hmac.new(key, seed + b"\x01", digest).digest()
    t2 = hmac.new(key, t1 + seed + b"\x02", digest).digest()
    t3 = hmac.new(key, t2 + seed + b"\x03", digest).digest()
    n = alg.output_len
    assert prf_plus(prf_id, key, seed, 3 * n) == t1 + t2 + t3
    assert prf_plus(prf_id, key, seed, 2 * n + 1) == t1 + t2 + t3[:1]
    assert prf_plus(prf_id, key, seed, 1) == t1[:1]
    assert prf_plus(prf_id, key, seed, 0) == b""


@pytest.mark.parametrize("prf_id", [Prf.HMAC_SHA2_256, Prf.HMAC_SHA2_384, Prf.HMAC_SHA2_512])
def test_prf_plus_length_limit(prf_id: Prf) -> None:
    n = PRF[prf_id].output_len
    out = prf_plus(prf_id, b"key", b"seed", 255 * n)
    assert len(out) == 255 * n
    assert len(set(out[i : i + n] for i in range(0, len(out), n))) == 255
    with pytest.raises(AlgorithmError):
        prf_plus(prf_id, b"key", b"seed", 255 * n + 1)
    with pytest.raises(AlgorithmError):
        prf_plus(prf_id, b"key", b"seed", -1)


def test_prf_registry_refuses_legacy_and_unknown() -> None:
    with pytest.raises(AlgorithmError, match="legacy"):
        prf_algorithm(Prf.HMAC_SHA1)
    with pytest.raises(AlgorithmError, match="legacy"):
        prf(Prf.HMAC_SHA1, b"k", b"d")
    with pytest.raises(AlgorithmError, match="legacy"):
        skeyseed(2, b"n", b"n", b"g")
    assert prf_algorithm(Prf.HMAC_SHA1, allow_legacy=True).output_len == 20
    for unknown in (0, 1, 3, 4, 8, 9):  # MD5, TIGER, AES128-XCBC, AES128-CMAC, ... not offered
        with pytest.raises(AlgorithmError, match="unsupported"):
            prf_algorithm(unknown, allow_legacy=True)
    for pid, alg in PRF.items():
        assert alg.transform_id == pid and alg.key_len == alg.output_len


# --- SP 800-135 IKEv2 KDF ---------------------------------------------------------------------


@dataclass(frozen=True)
class KdfCase:
    name: str
    prf_id: Prf
    ni: bytes
    nr: bytes
    g_ir: bytes
    g_ir_new: bytes
    spi_i: bytes
    spi_r: bytes
    skeyseed: bytes  # prf(Ni | Nr, g^ir)
    dkm: bytes  # prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)
    skeyseed_rekey: bytes  # prf(SK_d, g^ir (new) | Ni | Nr), SK_d = DKM[:prf length]
    dkm_child: bytes | None = None  # prf+(SK_d, Ni | Nr)
    dkm_child_dh: bytes | None = None  # prf+(SK_d, g^ir (new) | Ni | Nr)


# --- NIST CAVP SP 800-135 "ikev2" KDF vectors -------------------------------------------------
#
# _CAVS_SAMPLE: the inputs of the sample file of NIST's SP 800-135 IKEv2 KDF component test
# (csrc.nist.gov .../components/800-135testvectors/ikev2.zip, [SHA-1] COUNT 0: 64-bit nonces,
# 1024-bit g^ir, 132-octet DKM), as reproduced with its intermediate prf+ blocks T1..T7 in a
# public Rust KDF crate's test ("test_tpm_ike2"). Its SKEYSEED and SK_d also appear in
# openssl/openssl test/recipes/30-test_evp_data/evpkdf_ikev2.txt (negative cases).
_CAVS_SAMPLE = dict(
    ni=h("3651fef5c9c35e93"),
    nr=h("c09a8b90a3f04d59"),
    g_ir=h(
        """
        d084a301 66a50fb7 325c3960 874a8394 49ef9741 c2f4f947 d0201dd8 c1269273
        d79509f3 7e3ca3eb 4fa2fe2a 28254e28 9cd3f34d ad4eb4df 1a07685a 4b8a94fa
        61e2491f 7598b3ce 65547ff1 33b3f63d 1ac4175e aa695033 f3cedb02 6a6873a3
        6455172a 8540b8a5 d23a0143 bed0390e e49b1682 69d75fff ee9fb62b e965993c
        """
    ),
    g_ir_new=h(
        """
        52f00ab1 74c25d5b 7139ae5f f4e8e9ed dee5992d 2e36adf8 a559ffd9 0dab1442
        e4fbe429 d320c0f3 3552a17d 1557fa41 ea70e8fb 916c4fa2 7ed52b5f 8ebd8461
        afa78f11 59159a64 055ac5f6 319e29c2 8eae58cb c6847770 f32c3fed 1d047504
        84f85479 0f95e9ec 01bc5bc4 61f24966 462e3595 11329305 038e94de b6dd42c2
        """
    ),
    spi_i=h("8e5c3ae507221684"),
    spi_r=h("b1f201bb155c3acd"),
)

KDF_CASES: tuple[KdfCase, ...] = (
    # SHA-1 (legacy PRF 2): NIST CAVS sample outputs, same source as _CAVS_SAMPLE.
    KdfCase(
        name="cavs-sample-sha1",
        prf_id=Prf.HMAC_SHA1,
        **_CAVS_SAMPLE,
        skeyseed=h("cd2e8050137832245f1dbacc6e4f0a92f94d45d6"),
        dkm=h(
            """
            6f1b12ca d3cbe097 b3543035 6d869d54 cddb0198 ec859174 d53ceb92 dddedbe2
            436db69f 60977c58 fa63bbb6 67f8d369 20b109ba ae8f6c61 a9ac49fe da018432
            25d080ec 5539d588 1a25521f fb2a0a91 874a9c0a 27fcc2d7 17eb8963 a9e3a89c
            7ab26475 7284c28c f8c3ca40 576f4220 b052b1fb 8e9ad60b a3c80557 323331a8
            cbb89f20
            """
        ),
        dkm_child=h(
            """
            4727dc0e f94eb326 ce131cf2 82fb652f aa638ad0 ddae3786 a11bcc03 09876009
            f8c485de 011ad962 c5b1ca8a 41ff8145 44574907 9c5686e2 6ffebbc3 42f06981
            f3da745e 11ca0976 424d1f8c aec623d5 9dc7186d eb20a27b 411d1dcb 70a36544
            0bf7de90 5088b069 2e8addc0 94e18d19 39bdb67e 89798ca6 b239e2cc b81c2409
            dac0106c
            """
        ),
        dkm_child_dh=h(
            """
            b109c21a d4c07977 68c1cec9 e6355468 1e48f224 bca7f23c 20c4ea70 41983451
            e9aa1d54 08656c8a 975ff1b9 d9a12c75 ffeb64bd ecb30174 664cccb4 e14f1c37
            7b7f6d15 25af77c7 092aac3e 47f917eb ae8297fb 5539d200 8ce83082 3a09cc19
            7361d4a2 89c72745 f6ce9fef e812be5b f55b3200 fbb82e41 a4a40877 d3fe106d
            b909707b
            """
        ),
        skeyseed_rekey=h("3b03bce748c96d5e8306918d2ff89b68f0648da3"),
    ),
    # SHA-256: OpenSSL's FIPS self-test answers for the CAVS sample inputs above
    # (openssl/openssl test/recipes/30-test_evp_data/evpkdf_ikev2.txt, "self_test_data.c").
    KdfCase(
        name="openssl-selftest-sha256",
        prf_id=Prf.HMAC_SHA2_256,
        **_CAVS_SAMPLE,
        skeyseed=h("efaa7ab0eaa85a3d0be2100cd4b6fe00ff5025a9eafddb3ef518e9f0d3fe60e6"),
        dkm=h(
            """
            462b9dd5 25d4fd71 16917427 2779e704 baf62c62 31779ae9 efe8c58b 21916b42
            010164af 2111ebd7 62f6916c a9a6f0ee 05c8b320 e4ee2770 5521de25 89adea18
            78f1a551 738af7c8 8dc4f0bb 0c096a3f 7d1f1a67 0fc79f49 f678d60d 665bb371
            0c8657f0 3ba9f62b 9a818d7a 228968c5 06e237ae 9502aa6d b395c61e a6a3e795
            04f86b73 68bfb542 3df79e48 809bbccd 49fd826d 024f63d7 c2a55664 00a12e73
            6aa03451 0428f5ea 008fe2fc 16886fa3 88274ea6 c2b4fcfc 6141bf04 f8207ef8
            afc224ea 1059cb22 0dc0b23a c0e4ccda 495a4e13 1b1d56e2 23aba5a4 8e8ed1f5
            """
        ),
        dkm_child=h(
            """
            23647677 e7d403fa 1e3006f1 9840aee1 8ad9fecc 4215814c 4131bdeb a98433d8
            b0e31bfb bddf822a bcce5e06 486aa388 022b75e2 7e1e68aa 5983028b 65282c73
            0c5d49ef 76067703 76cfdec4 1f7cc435 d8160299 89bc353d 3b67b9fd 1168ddcb
            8978850d a9b752ae e6a30d00 86d2c4d7 4ec0e036 48a0dad3 34faf5fe 88084e67
            b0f3e8fe e8b5e1bd 3850db54 0f1fb8cf fe23c9e9 2cda2093 73f35488 0c246c75
            3e2a0eca 9cb73b99 10a8531c 4010e676 8fa29f90 9e60af77 7fed6e73 9c3cfda0
            3467e915 d6f03fce 9c41f5f9 d578f891 2d66a754 57e79ee1 d5bcc2be 5c2f9bae
            """
        ),
        dkm_child_dh=h(
            """
            6a919387 a5fa2835 fe8a8237 e4a14845 bd2b9930 db87eff7 adf268f6 21860049
            02dba9aa 942d0259 a0edc412 0b932a50 3865b57b a8fb8811 7ef5df7b 26799cd8
            ba37aa54 38108cb1 a4fe1179 07c9d059 7b708c3f 11151fef d624d231 7202b7c8
            1430600e 6fcbb6e1 a8df2b48 61ef2363 d53de1be 69057b0c f6634a7e 7bfa97b3
            c2810623 e2bd6757 73877717 7036e9c3 a3979445 6954bd41 fc444a12 507ab9ca
            c69a0540 d13c29db 8510f566 a691691b aa2d9569 dacc990d 56a454bb 444bcbbe
            8751b055 0a527881 2fc5ab4f 28990dd6 d608538d 7ddde24d c81bdaac a7751fde
            """
        ),
        skeyseed_rekey=h("90722c42bd849e9b72d240fc254174270fa8295de6f0338dafc303a9ec104f12"),
    ),
    # SHA-384: NSS gtests/common/testvectors/ike-sha384-vectors.h cases 6 (SKEYSEED), 7 (rekey)
    # and 8 (prf+, 132 octets), marked there "from this NIST samples".
    KdfCase(
        name="nist-sample-sha384-via-nss",
        prf_id=Prf.HMAC_SHA2_384,
        ni=h("fd1b572a8e735591"),
        nr=h("6013b0ef88dacd3d"),
        g_ir=h("d3288cd87565101e88fe3bad918f31939d8dd26ff1071f8b2d7f447524e58d7c"),
        g_ir_new=h("3358f620539473aee8d07e779764c4c6a9aabddc79a28e136b3bac021dbde44a"),
        spi_i=h("2116ad07ce61f749"),
        spi_r=h("24880e55f11a65b7"),
        skeyseed=h(
            """
            69fe7a1a c94adaeb 711295f5 fe004b1a 8d6a0b65 d0569275 8ce8ad2f 7a45f59d
            7d0b596f 51f7dfcf 33300618 88f6a94f
            """
        ),
        dkm=h(
            """
            4f904c20 25c90c81 7ea5ff9b 662a6fdb 445a73b5 7cdf09ea cd379b95 e1f03cac
            b04cd6de eda4f952 191dd9bc 1f7a9502 471a648d 74dc06d3 8112de48 a42501f6
            b1a3ad55 c2099cd9 a648e5f1 7e5bf3e3 4bf9b595 3decb768 a34f875f e2b78dca
            0c2fcca8 1ec1a412 006dfaed 38fa0688 2e61f4c1 48105fb8 e231fdb3 3c4d484c
            001721d4
            """
        ),
        skeyseed_rekey=h(
            """
            e0548c16 82e13bce 454026b3 b1bdf429 85b24e4e 7408095a 7c529de3 8c3d1fcb
            04c9fe68 68042a34 c9614c6c 99e3fcea
            """
        ),
    ),
    # SHA-512: ACVP kdf-components-ikev2-1.0 tgId 13 tcId 241 (GEN, DKM, DKM(Child_SA),
    # DKM(Child_DH), ReKey), as carried by openssl/openssl evpkdf_ikev2.txt.
    KdfCase(
        name="acvp-tg13-tc241-sha512",
        prf_id=Prf.HMAC_SHA2_512,
        ni=h(
            """
            834ea475 3e9a0683 2072fa15 e89e7990 35a1285c e241caf3 b5c724ec e8ecd0d2
            d1ac46fa b3d9d86b f2ebf4cc 8f93e06c 5342415e 14dfcbc9 49574e16 06f96f14
            3e8aa8c8 0bccd376 ff3d3bae 0b134a04 dd2ae557 010e5d7a 7552c686 4fd8a82d
            99ffdfda 97be9738 9a426d72 59411b10 dd9eefae 2709141e 654087a2 056eb86d
            af95ef26 2328a2cd d90c6115 2dc2bbfc f4ccf408 4557c389 2603023a 8b7045fc
            589a3514 3e10dcd1 a73406ea 923b2168 7a12134b 6a1007e4 aa2e37ff fa4901df
            f6f3514e 2b350f08 175e194d 3c6db75e 03fd838d 503cefa9 e9604a4e 18f330c0
            8142574a 992465fe a063875a baf144f4 7c50f32a 0a83224e 3eea7390 33af6b9f
            """
        ),
        nr=h(
            """
            f833709d e457fb58 abe1d26e 8decc8fe 889d5039 54c4812a c0f41271 394af7c1
            48b15a24 1c2d6d65 02c3c57d ae854a97 bfb3ccdc ec650153 578ccb51 bdfe1c71
            5e81f3d7 8488b154 7a3c9e56 17d9b78b 46d06f56 bb56423c 88deaccd 82e7a2a1
            1add5665 1091682f 0987332e a28a3204 5a4d3960 9f364eb5 e70468ec b7bbdcad
            6b41e04a dd11d97f 300e8d0a 0c2941f1 cb64885f 940ee2fa 273477e9 10983e96
            913f58e3 7bfd68e3 adcd6e81 3176e95f ee7985f5 526eedc3 245c4746 f5864d9e
            90bf80f6 882f6a50 5adacd81 d106576f 7a6c705e 37ce5512 35e012e6 4ec3be7b
            4f3f8889 e664cc5e d7bcc4a8 8022a437 439609b3 019cde19 48665a54 8e420d1e
            """
        ),
        g_ir=h(
            """
            9566a04b f95f433c 6497b3ae 8cb0f600 043f8438 eb2b9e97 e912af1c 5ace9a73
            a8884bf1 ff80a895 eb97a6f5 494b6cea 5b1c3123 c3a9cbe0 57a0cba2 f52fd40a
            8dfdf9f9 9b521d35 6347e2b7 0cf637b5 b4a44c2e d92770a2 81e6431c b50bddce
            4fb2ec81 00218fa8 4b0a4a34 4c4dc79b bc81add2 fd23bc79 7efa1b2a fa6840ad
            7b2e04d3 91f33662 774a5296 a0ef9c9c 113e84f5 b958fd54 857e7537 8406f29d
            a1eb23e9 e9d9d941 77672bfa 7742f7f4 319f31ed 06e1999e 17eeac6b 35adc9a2
            45cad998 e3ce3c42 2b8ad752 f7144332 e9aae44e a837677a 8406b726 1c04cb4e
            b9230fba 75e09e16 eeda246d 5b1da5cf 14c96f00 fc83c555 854e7982 e52a1d4f
            """
        ),
        g_ir_new=h(
            """
            f34450ec 9f4b0788 1ff17db4 ae1681b2 6f2fc8cb ecdb7ef0 463b09c4 fe79f841
            4fbea9fd 3e7c18c8 45d04e28 3e1eeb78 24484c72 354a7a9c 418e69b8 134d596e
            1abcd299 8ea5fabc a1fd1566 78bf7fb0 f31c1158 e812fd21 5837a239 38bac55b
            37c6e8be cedf9435 a0348432 6cd2d4e3 c7a273d8 a9913502 7aa17823 da9bf026
            3082394c a3475266 f5bae91d 1577c3d1 5a7dd429 e1f5de70 138b0521 4589ef8a
            519aa930 a42f609c cc54ce87 01488e80 c2beacca 2542c0d9 b2dd7c04 e41ebbc3
            41eb65a3 f7869007 47fa6ca2 cf914e90 8fea4001 4d3175b7 3da1b634 37a89638
            f69e184f d91e6a02 c0f9fc9a fafe7b68 11b3ac7a 57b2615a 3b3fc262 89500143
            """
        ),
        spi_i=h("6e5f49d279f4fbbb"),
        spi_r=h("ff7ae472aa4dd7af"),
        skeyseed=h(
            """
            3daa296c 25dd8cbd e8e9f5fe 85498cb0 6339fc7a aa93f609 87831a0f a79829e2
            44afe92b d66590d8 c7f1bc28 1badc619 ed2c9762 fdb913b0 52842e50 e3989863
            """
        ),
        dkm=h(
            """
            2bd66826 c397a196 18e3133a ce96f616 8a04ef9a fa53f2f0 7cecda9e 0f6139c3
            7cc65125 51f52300 6b74d501 c5dd1ae5 02689ece 8a43ce7b 3d866c73 72176b1d
            5bc4a0b8 63f64235 1fd4822c 79f0a8d9 7b03b09f a1393679 14943279 8bea545f
            70c66367 5e751a68 aeeb7b23 8ca79022 9c7775e6 a074becd faad324a c546eeb5
            d0a9480b 1aa06b6f 225cbfac 7447de3d 8d292b0b eb7d9a5b 709c0294 6a10f879
            9dd4e4b1 8c6d10ce da39a82b 9dae01ef ebe6c317 35590ef7 d44e1c8d bbad98da
            fe620843 065e5141 d7c57770 23412859 9e322313 9656dbb3 d0c494fa ba482ae9
            740faa3d 3957efd9 d90fd241 44bc9b31 7c795572 2426a671 9d0095d0 68fd0b63
            469140d1 ef9ddefc 43b2bcff f971a08a 7e67e75b 8f0ded8c 4737175a bf04c32b
            906fe7d5 3e8c3b11 b3829db0 082b73f4 4c042c28 5f079a3b d6c33f91 559f3104
            3e23bb0a 79b83c93 aaf1cfea f6c5996e 717869c2 d7f6528c 8acae665 6a843016
            48863854 41484107 261de0d9 a9b6b39a 24812ccf a24c1f96 4aeac69c e6d00541
            """
        ),
        dkm_child=h(
            """
            0b0d01a1 3515ac07 27f7d904 56d3d2fd 9c117209 6cded4a2 0bda43fc 796184ba
            eb3a7f34 ffc09c58 4dd9beeb c7629a36 a5d143df b1c2931f 369e6702 769b6a01
            aa20b7b9 55c30481 d7894df2 aebab0dd 669c3e1e 168be5f1 22f8a9d8 a589f3c6
            c48efc03 1129481e 2dea1f6f c10e07f3 e39a1fcc 3d660e28 9778458e 75280250
            1dbde1eb 0ede3d22 27de7fae 3f265d66 986b1ae4 cf407edc 3a5168a6 179ed8ca
            2006acc2 d9104749 c3e22314 82374e5f 0ce3da3c 8b8520d3 7f370926 69fbb78e
            aa4cc818 be8ca319 35529e08 5bce3830 040f6798 83e3375c 274cef5b f5f36f34
            d8705b9e c48b4dc2 fe9e3a26 9b41bed2 d6597677 26dc7754 04610ed1 b285067d
            900d20a3 8d021924 75d2934a e8e4c47b 4cf5729a 42fec7af 15c01aeb 019069f2
            c87f2e64 29d6cb27 55384980 dfab9173 c70aedb3 0611a05f cd03078f 2caa8cb3
            23452d6e 89919799 2cf3b933 43eebaa1 251e1d8f 0b3664d0 d0310217 88951088
            5d319c2b d8cd3a8f d49848d8 331f8c24 8e6c3c7b 6e3d4e37 6f7bc71f f10d66d1
            """
        ),
        dkm_child_dh=h(
            """
            48e185dc 18e52193 e01eca3c 0d739c30 70a73b89 a4d0fac7 b40e4d51 250eeae7
            232c2031 daa700e3 a2d570ba 67eca56f 1dbe5de5 b96cd718 faf2fcc7 ebca08d1
            fefa2db5 b024cc9a 03f50ef3 10d43a3e 66d53912 af846cff 6bb039cb ff37bdd1
            c2d32999 3a98d3fa f9026a32 ebf6747e 347115aa 3c604d18 7a252044 07db7e3f
            d4e1d283 00e89802 8542c4b8 d3c4eb26 bd0adf87 439ccb7c 0230351d 38c92772
            ca234b88 7ca8f766 7b4fbb96 19151d75 fecb2c30 f570bc0e edd5c6d8 9f39de1a
            547ac99c fb7cf608 ad4c56c8 3077e97c e850be40 344177cb ef2f22e3 7353e6a1
            64a2683d e957a487 54e8e743 31a07503 069e8ed4 4c68f27c 0a414d58 2aa2dd7a
            66098e3c 4d0be5f0 cc5fe9eb c042c3e7 94e53639 a452f044 9685dc3f c34c0eae
            58af6c7e 862faf0f c2e2c8f5 7c889e1d c19e8dae 2e92f828 a3f01a1d 3dbdcf3c
            7a0f6182 8e0e5c26 e559e8d1 320110d8 477ff8a2 8d90bc96 93bb99e1 0b7a3ea6
            2e3559d7 cc2e5427 9012d2c3 cc7fba33 49e098d6 756bcc7e e62507b3 50dbf3a3
            """
        ),
        skeyseed_rekey=h(
            """
            1cc9237e bb1704d7 03952b6e dbe275ca 51ac17e2 e224f13e 38f4c49f 5fa9af00
            f8ecb96f a0ecd6ff 282c08a2 9d3e313a b4a4ee10 22580118 b8deff0c d8432a00
            """
        ),
    ),
)

CASE_IDS = [c.name for c in KDF_CASES]
# Cases whose DKM holds at least the three PRF keys, and cases publishing Child SA KEYMAT.
SPLIT_CASES = [c for c in KDF_CASES if len(c.dkm) >= 3 * PRF[c.prf_id].key_len]
CHILD_CASES = [c for c in KDF_CASES if c.dkm_child is not None]


def test_every_hash_has_a_published_case() -> None:
    assert {c.prf_id for c in KDF_CASES} == set(Prf)


@pytest.mark.parametrize("case", KDF_CASES, ids=CASE_IDS)
def test_skeyseed(case: KdfCase) -> None:
    assert skeyseed(_alg(case.prf_id), case.ni, case.nr, case.g_ir) == case.skeyseed


@pytest.mark.parametrize("case", KDF_CASES, ids=CASE_IDS)
def test_dkm(case: KdfCase) -> None:
    seed = case.ni + case.nr + case.spi_i + case.spi_r
    assert prf_plus(_alg(case.prf_id), case.skeyseed, seed, len(case.dkm)) == case.dkm


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_derive_ike_keys_cuts_the_published_dkm(case: KdfCase) -> None:
    """SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr, in that order (RFC 7296 §2.14)."""
    alg = _alg(case.prf_id)
    d = alg.key_len
    room = len(case.dkm) - 3 * d
    integ = min(room // 4, d)
    encr = (room - 2 * integ) // 2
    keys = derive_ike_keys(
        alg,
        case.skeyseed,
        case.ni,
        case.nr,
        case.spi_i,
        case.spi_r,
        encr_key_len=encr,
        integ_key_len=integ,
    )
    sizes = (d, integ, integ, encr, encr, d, d)
    got = (keys.sk_d, keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er, keys.sk_pi, keys.sk_pr)
    at = 0
    for n, part in zip(sizes, got, strict=True):
        assert part == case.dkm[at : at + n]
        at += n


def test_cavs_sample_dkm_is_exactly_sha1_hmac_sha1_aes128() -> None:
    """The CAVS sample's 132 octets are one whole IKE SA key set: 3 x 20 + 2 x 20 + 2 x 16."""
    case = KDF_CASES[0]
    keys = derive_ike_keys(
        _alg(Prf.HMAC_SHA1),
        case.skeyseed,
        case.ni,
        case.nr,
        case.spi_i,
        case.spi_r,
        encr_key_len=16,
        integ_key_len=20,
    )
    joined = keys.sk_d + keys.sk_ai + keys.sk_ar + keys.sk_ei + keys.sk_er + keys.sk_pi
    assert joined + keys.sk_pr == case.dkm


@pytest.mark.parametrize("case", CHILD_CASES, ids=lambda c: c.name)
def test_child_keymat(case: KdfCase) -> None:
    assert case.dkm_child is not None and case.dkm_child_dh is not None
    alg = _alg(case.prf_id)
    sk_d = case.dkm[: alg.key_len]
    assert child_keymat(alg, sk_d, case.ni, case.nr, len(case.dkm_child)) == case.dkm_child
    with_pfs = child_keymat(alg, sk_d, case.ni, case.nr, len(case.dkm_child_dh), case.g_ir_new)
    assert with_pfs == case.dkm_child_dh


@pytest.mark.parametrize("case", CHILD_CASES, ids=lambda c: c.name)
def test_child_keys_order_on_published_keymat(case: KdfCase) -> None:
    """RFC 7296 §2.17: initiator→responder first; encryption key before integrity key."""
    assert case.dkm_child is not None and case.dkm_child_dh is not None
    alg = _alg(case.prf_id)
    sk_d = case.dkm[: alg.key_len]
    for g_ir_new, keymat in ((None, case.dkm_child), (case.g_ir_new, case.dkm_child_dh)):
        keys = child_keys(
            alg, sk_d, case.ni, case.nr, encr_key_len=36, integ_key_len=20, g_ir_new=g_ir_new
        )
        assert keys.encr_i == keymat[0:36]
        assert keys.integ_i == keymat[36:56]
        assert keys.encr_r == keymat[56:92]
        assert keys.integ_r == keymat[92:112]


@pytest.mark.parametrize("case", KDF_CASES, ids=CASE_IDS)
def test_rekey_skeyseed(case: KdfCase) -> None:
    alg = _alg(case.prf_id)
    sk_d = case.dkm[: alg.key_len]
    assert rekey_skeyseed(alg, sk_d, case.g_ir_new, case.ni, case.nr) == case.skeyseed_rekey


# --- RFC 7634 Appendix B and the AEAD layout --------------------------------------------------


def test_rfc7634_appendix_b_sk_e_layout() -> None:
    """Appendix B gives no SKEYSEED: what it pins down is SK_e for ChaCha20-Poly1305, 36 octets
    = key (32) || salt (4) (RFC 7634 §4). A 36-octet SK_ei cut by derive_ike_keys, split the way
    the ESP registry splits it, opens the appendix's Encrypted payload."""
    case = IKE_CASES[0]
    sk_e = case.key + case.salt
    chacha = encr_algorithm(Encr.CHACHA20_POLY1305)
    assert split_encr_key(chacha, sk_e) == (case.key, case.salt)
    aead = make_aead(chacha, sk_e)
    assert aead.open(case.iv, case.aad, case.ciphertext + case.tag) == case.plaintext
    assert aead.seal(case.iv, case.aad, case.plaintext) == case.ciphertext + case.tag

    # Our schedule hands out SK_e of exactly that shape, and no SK_a, for an AEAD cipher.
    keys = derive_ike_keys(
        Prf.HMAC_SHA2_256,
        b"\x01" * 32,
        b"\x02" * 32,
        b"\x03" * 32,
        b"\xc0\xc1\xc2\xc3\xc4\xc5\xc6\xc7",
        b"\xd0\xd1\xd2\xd3\xd4\xd5\xd6\xd7",
        encr_key_len=32 + chacha.salt_len,
        integ_key_len=0,
    )
    assert keys.sk_ai == keys.sk_ar == b""
    assert len(keys.sk_ei) == len(keys.sk_er) == 36
    key, salt = split_encr_key(chacha, keys.sk_ei)
    assert (len(key), len(salt)) == (32, 4) and keys.sk_ei == key + salt
    gcm = encr_algorithm(Encr.AES_GCM_16)  # RFC 5282 §7.1: AES-256-GCM SK_e = 32 + 4 octets
    assert split_encr_key(gcm, keys.sk_er)[1] == keys.sk_er[32:]


# --- API hygiene ------------------------------------------------------------------------------


def test_keys_are_not_in_repr() -> None:
    case = KDF_CASES[1]
    keys = derive_ike_keys(
        case.prf_id,
        case.skeyseed,
        case.ni,
        case.nr,
        case.spi_i,
        case.spi_r,
        encr_key_len=20,
        integ_key_len=32,
    )
    child = child_keys(case.prf_id, keys.sk_d, case.ni, case.nr, encr_key_len=20, integ_key_len=32)
    for obj in (keys, child):
        text = repr(obj) + str(obj)
        for value in _key_fields(obj):
            assert value and value.hex() not in text
            assert repr(value) not in text
    assert repr(keys) == "IkeKeys()" and repr(child) == "ChildKeys()"


def _key_fields(obj: IkeKeys | ChildKeys) -> list[bytes]:
    return [getattr(obj, f) for f in obj.__dataclass_fields__]


def test_argument_checks() -> None:
    with pytest.raises(AlgorithmError, match="SPI"):
        derive_ike_keys(
            5, b"s", b"n", b"n", b"\x00" * 4, b"\x00" * 8, encr_key_len=16, integ_key_len=0
        )
    with pytest.raises(AlgorithmError):
        derive_ike_keys(
            5, b"s", b"n", b"n", b"\x00" * 8, b"\x00" * 8, encr_key_len=-1, integ_key_len=0
        )
    with pytest.raises(AlgorithmError, match="KEYMAT"):
        split_child_keymat(b"\x00" * 10, encr_key_len=4, integ_key_len=2)
    # A request beyond 255 prf+ blocks is refused rather than silently wrapping the counter.
    with pytest.raises(AlgorithmError):
        child_keys(5, b"k", b"n", b"n", encr_key_len=255 * 16, integ_key_len=1)


def test_rekeyed_sa_chains_from_old_sk_d() -> None:
    """§2.18: the new SA's SKEYSEED is the old PRF over the new g^ir and nonces."""
    case = KDF_CASES[3]
    old = derive_ike_keys(
        case.prf_id,
        case.skeyseed,
        case.ni,
        case.nr,
        case.spi_i,
        case.spi_r,
        encr_key_len=36,
        integ_key_len=0,
    )
    assert old.sk_d == case.dkm[:64]
    seed = rekey_skeyseed(case.prf_id, old.sk_d, case.g_ir_new, case.ni, case.nr)
    assert seed == case.skeyseed_rekey
    new = derive_ike_keys(
        Prf.HMAC_SHA2_256,
        seed,
        case.nr,
        case.ni,
        case.spi_r,
        case.spi_i,
        encr_key_len=36,
        integ_key_len=0,
    )
    assert len(new.sk_d) == 32 and new.sk_d != old.sk_d[:32]
