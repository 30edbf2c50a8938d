"""IANA registry values used by the core (RFC 7296 §3.3.2 transform IDs, IANA protocols).

Protocol numbers are those of the IANA "Protocol Numbers" registry."""

from __future__ import annotations

from enum import IntEnum


class IpProto(IntEnum):
    """IP protocol / IPv6 next-header numbers (IANA Protocol Numbers)."""

    HOPOPT = 0
    ICMP = 1
    IPV4 = 4
    TCP = 6
    UDP = 17
    IPV6 = 41
    IPV6_ROUTE = 43
    IPV6_FRAG = 44
    ESP = 50
    AH = 51
    ICMPV6 = 58
    IPV6_NONXT = 59
    IPV6_OPTS = 60


class Encr(IntEnum):
    """IKEv2 Transform Type 1 (Encryption Algorithm) IDs, RFC 7296 §3.3.2 and IANA."""

    DES_IV64 = 1
    DES = 2
    TRIPLE_DES = 3
    NULL = 11
    AES_CBC = 12
    AES_CTR = 13
    AES_CCM_16 = 16
    AES_GCM_8 = 18
    AES_GCM_12 = 19
    AES_GCM_16 = 20
    NULL_AUTH_AES_GMAC = 21
    CHACHA20_POLY1305 = 28


class Integ(IntEnum):
    """IKEv2 Transform Type 3 (Integrity Algorithm) IDs, RFC 7296 §3.3.2 and IANA."""

    NONE = 0
    HMAC_MD5_96 = 1
    HMAC_SHA1_96 = 2
    AES_XCBC_96 = 5
    HMAC_SHA2_256_128 = 12
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


ESP_UDP_PORT = 4500  # RFC 3948 §2
IKE_UDP_PORT = 500  # RFC 7296 §2
