"""AES-CBC test vectors of RFC 3602 section 4 (cases #1-#4 raw AES-CBC, #5-#8 ESP packets)."""

# Source text: section 4 of draft-ietf-ipsec-ciph-aes-cbc-04 (June 2002), the draft
# published as RFC 3602. Cases #5 and #7 were compared against independent verbatim
# quotations of RFC 3602 and their hex agrees byte for byte. The RFC prints values as
# whitespace-separated hex groups; these are copied exactly, only whitespace is dropped.
#
# These vectors use encryption only (no integrity algorithm, so no ICV). Padding is the
# RFC 2406/4303 default monotonic 01 02 03 ... sequence.

from __future__ import annotations

from dataclasses import dataclass


def h(s: str) -> bytes:
    """Decode hex that may contain whitespace (as RFCs print it)."""
    return bytes.fromhex("".join(s.split()))


@dataclass(frozen=True)
class CbcCase:
    """A raw AES-CBC encryption (RFC 3602 cases #1-#4): no ESP framing, no padding."""

    name: str
    key: bytes
    iv: bytes
    plaintext: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class EspCbcCase:
    """A complete IPv4 ESP packet with AES-CBC and no integrity (RFC 3602 cases #5-#8).

    original_packet: the IP packet before IPsec processing ("Original packet").
    payload: the data ESP protects -- the IP payload in transport mode, the whole
        original packet in tunnel mode.
    plaintext: payload || padding || pad length || next header, the CBC input
        ("Pre-encryption Data with padding, pad length and next header").
    ciphertext: the CBC output ("Encrypted Data").
    outer_ip_header: the IPv4 header of the resulting packet ("Post-encryption ... IP header").
    esp: SPI || sequence number || IV || ciphertext (the ESP header and payload).
    esp_packet: outer_ip_header || esp, the full resulting IP packet.
    """

    name: str
    mode: str  # "transport" or "tunnel"
    key: bytes
    iv: bytes
    spi: int
    seq: int
    src: str
    dst: str
    original_packet: bytes
    payload: bytes
    padding: bytes
    pad_length: int
    next_header: int
    plaintext: bytes
    ciphertext: bytes
    outer_ip_header: bytes
    esp: bytes
    esp_packet: bytes


def _esp_case(
    *,
    name: str,
    mode: str,
    key: str,
    spi: int,
    seq: int,
    src: str,
    dst: str,
    iv: str,
    original_ip_header: str,
    data: str,
    padding: str,
    pad_length: int,
    next_header: int,
    plaintext: str,
    outer_ip_header: str,
    spi_seq: str,
    ciphertext: str,
) -> EspCbcCase:
    """Assemble a case from the fields exactly as the RFC lays them out."""
    original = h(original_ip_header) + h(data)
    payload = original if mode == "tunnel" else h(data)
    esp = h(spi_seq) + h(iv) + h(ciphertext)
    return EspCbcCase(
        name=name,
        mode=mode,
        key=h(key),
        iv=h(iv),
        spi=spi,
        seq=seq,
        src=src,
        dst=dst,
        original_packet=original,
        payload=payload,
        padding=h(padding),
        pad_length=pad_length,
        next_header=next_header,
        plaintext=h(plaintext),
        ciphertext=h(ciphertext),
        outer_ip_header=h(outer_ip_header),
        esp=esp,
        esp_packet=h(outer_ip_header) + esp,
    )


RAW_CASES: tuple[CbcCase, ...] = (
    CbcCase(
        name="rfc3602-case1",
        key=h("06a9214036b8a15b512e03d534120006"),
        iv=h("3dafba429d9eb430b422da802c9fac41"),
        plaintext=b"Single block msg",
        ciphertext=h("e353779c1079aeb82708942dbe77181a"),
    ),
    CbcCase(
        name="rfc3602-case2",
        key=h("c286696d887c9aa0611bbb3e2025a45a"),
        iv=h("562e17996d093d28ddb3ba695a2e6f58"),
        plaintext=h(
            """
            000102030405060708090a0b0c0d0e0f
            101112131415161718191a1b1c1d1e1f
            """
        ),
        ciphertext=h(
            """
            d296cd94c2cccf8a3a863028b5e1dc0a
            7586602d253cfff91b8266bea6d61ab1
            """
        ),
    ),
    CbcCase(
        name="rfc3602-case3",
        key=h("6c3ea0477630ce21a2ce334aa746c2cd"),
        iv=h("c782dc4c098c66cbd9cd27d825682c81"),
        plaintext=b"This is a 48-byte message (exactly 3 AES blocks)",
        ciphertext=h(
            """
            d0a02b3836451753d493665d33f0e886
            2dea54cdb293abc7506939276772f8d5
            021c19216bad525c8579695d83ba2684
            """
        ),
    ),
    CbcCase(
        name="rfc3602-case4",
        key=h("56e47a38c5598974bc46903dba290349"),
        iv=h("8ce82eefbea0da3c44699ed7db51b7d9"),
        plaintext=h(
            """
            a0a1a2a3a4a5a6a7a8a9aaabacadaeaf
            b0b1b2b3b4b5b6b7b8b9babbbcbdbebf
            c0c1c2c3c4c5c6c7c8c9cacbcccdcecf
            d0d1d2d3d4d5d6d7d8d9dadbdcdddedf
            """
        ),
        ciphertext=h(
            """
            c30e32ffedc0774e6aff6af0869f71aa
            0f3af07a9a31a9c684db207eb0ef8e4e
            35907aa632c3ffdf868bb7b29d3d46ad
            83ce9f9a102ee99d49a53e87f4c3da55
            """
        ),
    ),
)


CASES: tuple[EspCbcCase, ...] = (
    # Case #5: Sample transport-mode ESP packet (ping 192.168.123.100)
    _esp_case(
        name="rfc3602-case5",
        mode="transport",
        key="90d382b4 10eeba7a d938c46c ec1a82bf",
        spi=0x4321,
        seq=1,
        src="192.168.123.3",
        dst="192.168.123.100",
        iv="e96e8c08 ab465763 fd098d45 dd3ff893",
        original_ip_header="45000054 08f20000 4001f9fe c0a87b03 c0a87b64",
        data="""
            08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
            18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637
        """,
        padding="01020304 05060708 090a0b0c 0d0e",
        pad_length=0x0E,
        next_header=0x01,
        plaintext="""
            08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
            18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637
            01020304 05060708 090a0b0c 0d0e0e01
        """,
        outer_ip_header="4500007c 08f20000 4032f9a5 c0a87b03 c0a87b64",
        spi_seq="00004321 00000001",
        ciphertext="""
            f663c25d 325c18c6 a9453e19 4e120849 a4870b66 cc6b9965 330013b4 898dc856
            a4699e52 3a55db08 0b59ec3a 8e4b7e52 775b07d1 db34ed9c 538ab50c 551b874a
            a269add0 47ad2d59 13ac19b7 cfbad4a6
        """,
    ),
    # Case #6: Sample transport-mode ESP packet (ping -p 77 -s 20 192.168.123.100)
    _esp_case(
        name="rfc3602-case6",
        mode="transport",
        key="90d382b4 10eeba7a d938c46c ec1a82bf",
        spi=0x4321,
        seq=8,
        src="192.168.123.3",
        dst="192.168.123.100",
        iv="69d08df7 d203329d b093fc49 24e5bd80",
        original_ip_header="45000030 08fe0000 4001fa16 c0a87b03 c0a87b64",
        data="0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777",
        padding="0102",
        pad_length=0x02,
        next_header=0x01,
        plaintext="""
            0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777 01020201
        """,
        outer_ip_header="4500004c 08fe0000 4032f9c9 c0a87b03 c0a87b64",
        spi_seq="00004321 00000008",
        ciphertext="""
            f5199588 1ec4e0c4 488987ce 742e8109 689bb379 d2d750c0 d915dca3 46a89f75
        """,
    ),
    # Case #7: Sample tunnel-mode ESP packet (ping 192.168.123.200)
    _esp_case(
        name="rfc3602-case7",
        mode="tunnel",
        key="01234567 89abcdef 01234567 89abcdef",
        spi=0x8765,
        seq=2,
        src="192.168.123.3",
        dst="192.168.123.200",
        iv="f4e76524 4f6407ad f13dc138 0f673f37",
        original_ip_header="45000054 09040000 4001f988 c0a87b03 c0a87bc8",
        data="""
            08009f76 a90a0100 b49c083d 02a20400 08090a0b 0c0d0e0f 10111213 14151617
            18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637
        """,
        padding="01020304 05060708 090a",
        pad_length=0x0A,
        next_header=0x04,
        plaintext="""
            45000054 09040000 4001f988 c0a87b03 c0a87bc8 08009f76 a90a0100 b49c083d
            02a20400 08090a0b 0c0d0e0f 10111213 14151617 18191a1b 1c1d1e1f 20212223
            24252627 28292a2b 2c2d2e2f 30313233 34353637 01020304 05060708 090a0a04
        """,
        outer_ip_header="4500008c 09050000 4032f91e c0a87b03 c0a87bc8",
        spi_seq="00008765 00000002",
        ciphertext="""
            773b5241 a4c44922 5e4f3ce5 ed611b0c 237ca96c f74a9301 3c1b0ea1 a0cf70f8
            e4ecaec7 8ac53aad 7a0f022b 859243c6 47752e94 a859352b 8a4d4d2d ecd136e5
            c177f132 ad3fbfb2 201ac990 4c74ee0a 109e0ca1 e4dfe9d5 a100b842 f1c22f0d
        """,
    ),
    # Case #8: Sample tunnel-mode ESP packet (ping -p ff -s 40 192.168.123.200)
    _esp_case(
        name="rfc3602-case8",
        mode="tunnel",
        key="01234567 89abcdef 01234567 89abcdef",
        spi=0x8765,
        seq=5,
        src="192.168.123.3",
        dst="192.168.123.200",
        iv="85d47224 b5f3dd5d 2101d4ea 8dffab22",
        original_ip_header="45000044 090c0000 4001f990 c0a87b03 c0a87bc8",
        data="""
            0800d63c aa0a0200 c69c083d a3de0300 ffffffff ffffffff ffffffff ffffffff
            ffffffff ffffffff ffffffff ffffffff
        """,
        padding="01020304 05060708 090a",
        pad_length=0x0A,
        next_header=0x04,
        plaintext="""
            45000044 090c0000 4001f990 c0a87b03 c0a87bc8 0800d63c aa0a0200 c69c083d
            a3de0300 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff
            ffffffff 01020304 05060708 090a0a04
        """,
        outer_ip_header="4500007c 090d0000 4032f926 c0a87b03 c0a87bc8",
        spi_seq="00008765 00000005",
        ciphertext="""
            15b92683 819596a8 047232cc 00f7048f e45318e1 1f8a0f62 ede3c3fc 61203bb5
            0f980a08 c9843fd3 a1b06d5c 07ff9639 b7eb7dfb 3512e5de 435e7207 ed971ef3
            d2726d9b 5ef6affc 6d17a0de cbb13892
        """,
    ),
)
