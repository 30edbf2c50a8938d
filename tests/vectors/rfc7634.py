"""ChaCha20-Poly1305 ESP (and IKEv2) examples of RFC 7634 Appendices A and B."""

# Source text: Appendices A and B of draft-ietf-ipsecme-chacha20-poly1305-12 (July 2015),
# the final draft, published as RFC 7634 (August 2015). The examples' ciphertext and tags
# agree with independent transcriptions citing RFC 7634 itself. Hex dumps are copied
# exactly (offset columns and ASCII gutters dropped, whitespace removed).

from __future__ import annotations

import base64
from dataclasses import dataclass


def h(s: str) -> bytes:
    """Decode hex that may contain whitespace (as RFCs print it)."""
    return bytes.fromhex("".join(s.split()))


@dataclass(frozen=True)
class EspChaChaCase:
    """Appendix A: a tunnel-mode IPv4 ESP packet protected with ChaCha20-Poly1305.

    keymat: 36 octets = key (32) || salt (4).
    nonce: salt || iv (12 octets), as published.
    source_packet: the inner IP packet (ICMP 198.51.100.5 -> 192.0.2.5).
    padding / pad_length / next_header: the ESP trailer (plaintext ends with them).
    plaintext: source_packet || padding || pad length || next header.
    aad: SPI || sequence number (ESN not enabled).
    poly1305_key: the one-time key (ChaCha20 block 0 with key and nonce).
    poly1305_input: aad || pad16 || ciphertext || pad16 || len(aad) || len(ciphertext).
    esp_packet: the complete resulting IPv4 packet (outer header, ESP header, IV,
        ciphertext, ICV), gateway 203.0.113.153 -> peer 203.0.113.5.
    """

    name: str
    keymat: bytes
    key: bytes
    salt: bytes
    iv: bytes
    nonce: bytes
    spi: int
    seq: int
    esn: bool
    source_packet: bytes
    padding: bytes
    pad_length: int
    next_header: int
    plaintext: bytes
    ciphertext: bytes
    poly1305_key: bytes
    aad: bytes
    poly1305_input: bytes
    tag: bytes
    outer_ip_header: bytes
    esp_packet: bytes


@dataclass(frozen=True)
class IkeChaChaCase:
    """Appendix B: an IKEv2 Encrypted payload protected with ChaCha20-Poly1305."""

    name: str
    key: bytes
    salt: bytes
    iv: bytes
    nonce: bytes
    notify_payload: bytes
    plaintext: bytes  # notify payload || zero pad length octet
    ciphertext: bytes
    aad: bytes  # IKE header || Encrypted payload header
    poly1305_input: bytes
    tag: bytes
    encrypted_payload: bytes
    ike_message: bytes


_KEYMAT = h(
    """
    80 81 82 83 84 85 86 87 88 89 8a 8b 8c 8d 8e 8f
    90 91 92 93 94 95 96 97 98 99 9a 9b 9c 9d 9e 9f
    a0 a1 a2 a3
    """
)

_ESP_PACKET = h(
    """
    45 00 00 8c 23 45 00 00 40 32 de 5b cb 00 71 99
    cb 00 71 05 01 02 03 04 00 00 00 05 10 11 12 13
    14 15 16 17 24 03 94 28 b9 7f 41 7e 3c 13 75 3a
    4f 05 08 7b 67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef
    40 7a e5 c6 14 ee 80 99 d5 28 44 eb 61 aa 95 df
    ab 4c 02 f7 2a a7 1e 7c 4c 4f 64 c9 be fe 2f ac
    c6 38 e8 f3 cb ec 16 3f ac 46 9b 50 27 73 f6 fb
    94 e6 64 da 91 65 b8 28 29 f6 41 e0 76 aa a8 26
    6b 7f b0 f7 b1 1b 36 99 07 e1 ad 43
    """
)

CASES: tuple[EspChaChaCase, ...] = (
    EspChaChaCase(
        name="rfc7634-appendix-a",
        keymat=_KEYMAT,
        key=_KEYMAT[:32],
        salt=_KEYMAT[32:],
        iv=h("10 11 12 13 14 15 16 17"),
        nonce=h("a0 a1 a2 a3 10 11 12 13 14 15 16 17"),
        spi=0x01020304,
        seq=5,
        esn=False,
        source_packet=h(
            """
            45 00 00 54 a6 f2 00 00 40 01 e7 78 c6 33 64 05
            c0 00 02 05 08 00 5b 7a 3a 08 00 00 55 3b ec 10
            00 07 36 27 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13
            14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 20 21 22 23
            24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33
            34 35 36 37
            """
        ),
        padding=h("01 02"),
        pad_length=2,
        next_header=4,
        plaintext=h(
            """
            45 00 00 54 a6 f2 00 00 40 01 e7 78 c6 33 64 05
            c0 00 02 05 08 00 5b 7a 3a 08 00 00 55 3b ec 10
            00 07 36 27 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13
            14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 20 21 22 23
            24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33
            34 35 36 37 01 02 02 04
            """
        ),
        ciphertext=h(
            """
            24 03 94 28 b9 7f 41 7e 3c 13 75 3a 4f 05 08 7b
            67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef 40 7a e5 c6
            14 ee 80 99 d5 28 44 eb 61 aa 95 df ab 4c 02 f7
            2a a7 1e 7c 4c 4f 64 c9 be fe 2f ac c6 38 e8 f3
            cb ec 16 3f ac 46 9b 50 27 73 f6 fb 94 e6 64 da
            91 65 b8 28 29 f6 41 e0
            """
        ),
        poly1305_key=h(
            """
            af 1f 41 2c c1 15 ad ce 5e 4d 0e 29 d5 c1 30 bf
            46 31 21 0e 0f ef 74 31 c0 45 4f e7 0f d7 c2 d1
            """
        ),
        aad=h("01 02 03 04 00 00 00 05"),
        poly1305_input=h(
            """
            01 02 03 04 00 00 00 05 00 00 00 00 00 00 00 00
            24 03 94 28 b9 7f 41 7e 3c 13 75 3a 4f 05 08 7b
            67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef 40 7a e5 c6
            14 ee 80 99 d5 28 44 eb 61 aa 95 df ab 4c 02 f7
            2a a7 1e 7c 4c 4f 64 c9 be fe 2f ac c6 38 e8 f3
            cb ec 16 3f ac 46 9b 50 27 73 f6 fb 94 e6 64 da
            91 65 b8 28 29 f6 41 e0 00 00 00 00 00 00 00 00
            08 00 00 00 00 00 00 00 58 00 00 00 00 00 00 00
            """
        ),
        tag=h("76 aa a8 26 6b 7f b0 f7 b1 1b 36 99 07 e1 ad 43"),
        outer_ip_header=_ESP_PACKET[:20],
        esp_packet=_ESP_PACKET,
    ),
)


IKE_CASES: tuple[IkeChaChaCase, ...] = (
    IkeChaChaCase(
        name="rfc7634-appendix-b",
        key=_KEYMAT[:32],
        salt=_KEYMAT[32:],
        iv=h("10 11 12 13 14 15 16 17"),
        nonce=h("a0 a1 a2 a3 10 11 12 13 14 15 16 17"),
        notify_payload=h("00 00 00 0c 00 00 40 01 00 00 00 0a"),
        plaintext=h("00 00 00 0c 00 00 40 01 00 00 00 0a 00"),
        ciphertext=h("61 03 94 70 1f 8d 01 7f 7c 12 92 48 89"),
        aad=h(
            """
            c0 c1 c2 c3 c4 c5 c6 c7 d0 d1 d2 d3 d4 d5 d6 d7
            2e 20 25 00 00 00 00 09 00 00 00 45 29 00 00 29
            """
        ),
        poly1305_input=h(
            """
            c0 c1 c2 c3 c4 c5 c6 c7 d0 d1 d2 d3 d4 d5 d6 d7
            2e 20 25 00 00 00 00 09 00 00 00 45 29 00 00 29
            61 03 94 70 1f 8d 01 7f 7c 12 92 48 89 00 00 00
            20 00 00 00 00 00 00 00 0d 00 00 00 00 00 00 00
            """
        ),
        tag=h("6b 71 bf e2 52 36 ef d7 cd c6 70 66 90 63 15 b2"),
        encrypted_payload=h(
            """
            29 00 00 29 10 11 12 13 14 15 16 17 61 03 94 70
            1f 8d 01 7f 7c 12 92 48 89 6b 71 bf e2 52 36 ef
            d7 cd c6 70 66 90 63 15 b2
            """
        ),
        ike_message=h(
            """
            c0 c1 c2 c3 c4 c5 c6 c7 d0 d1 d2 d3 d4 d5 d6 d7
            2e 20 25 00 00 00 00 09 00 00 00 45 29 00 00 29
            10 11 12 13 14 15 16 17 61 03 94 70 1f 8d 01 7f
            7c 12 92 48 89 6b 71 bf e2 52 36 ef d7 cd c6 70
            66 90 63 15 b2
            """
        ),
    ),
)


# Appendix B also publishes a snoop (RFC 1761) capture, base64-encoded, holding three
# frames: the Appendix A ICMP source packet, the Appendix A ESP packet and the Appendix B
# IKEv2 packet. It is an independent rendering of the same bytes, used to cross-check.
SNOOP_CAPTURE: bytes = base64.b64decode(
    "".join(
        """
        c25vb3AAAAAAAAACAAAABAAAAGIAAABiAAAAegAAAABVPq8PAAADVdhs6fUQBHgx
        wbcpwggARQAAVKbyAABAAed4xjNkBcAAAgUIAFt6OggAAFU77BAABzYnCAkKCwwN
        Dg8QERITFBUWFxgZGhscHR4fICEiIyQlJicoKSorLC0uLzAxMjM0NTY3AAAAmgAA
        AJoAAACyAAAAAFU+rw8AAAo62Gzp9RAEeDHBtynCCABFAACMI0UAAEAy3lvLAHGZ
        ywBxBQECAwQAAAAFEBESExQVFhckA5QouX9BfjwTdTpPBQh7Z8NS5qf6sbmC1Gbv
        QHrlxhTugJnVKETrYaqV36tMAvcqpx58TE9kyb7+L6zGOOjzy+wWP6xGm1Anc/b7
        lOZk2pFluCgp9kHgdqqoJmt/sPexGzaZB+GtQwAAAG8AAABvAAAAhwAAAABVPq8P
        AAARH9hs6fUQBHgxwbcpwggARQAAYSNFAABAEd6nywBxmcsAcQUB9AH0AE0IUcDB
        wsPExcbH0NHS09TV1tcuICUAAAAACQAAAEUpAAApEBESExQVFhdhA5RwH40Bf3wS
        kkiJa3G/4lI279fNxnBmkGMVsg==
        """.split()
    )
)
