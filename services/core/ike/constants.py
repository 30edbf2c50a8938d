"""IKEv2 protocol numbers of RFC 7296 §3 (and the IANA "IKEv2 Parameters" registry) for the codec.

Transform IDs for ENCR / INTEG live in services.core.iana; PRF and DH group IDs belong with the
PRF and key-exchange modules. Values beyond RFC 7296 cite the RFC that assigned them.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

IKE_HEADER_LEN = 28  # RFC 7296 §3.1
GENERIC_HEADER_LEN = 4  # RFC 7296 §3.2
IKE_MAJOR_VERSION = 2  # RFC 7296 §3.1


class ExchangeType(IntEnum):
    """RFC 7296 §3.1 Exchange Type."""

    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_SESSION_RESUME = 38  # RFC 5723
    IKE_INTERMEDIATE = 43  # RFC 9242
    IKE_FOLLOWUP_KE = 44  # RFC 9370


class HeaderFlag(IntFlag):
    """RFC 7296 §3.1 Flags: bit 3 = I(nitiator), bit 4 = V(ersion), bit 5 = R(esponse)."""

    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class PayloadType(IntEnum):
    """RFC 7296 §3.2 Next Payload values (IKEv2 Payload Types registry)."""

    NONE = 0
    SA = 33
    KE = 34
    IDi = 35
    IDr = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR_ID = 43
    TSi = 44
    TSr = 45
    SK = 46
    CP = 47
    EAP = 48
    GSPM = 49  # RFC 6467 (not decoded: kept as UnknownPayload)
    SKF = 53  # RFC 7383 §2.5
    PS = 54  # RFC 8019 (not decoded: kept as UnknownPayload)


class ProtocolId(IntEnum):
    """RFC 7296 §3.3.1 Protocol ID (also used by Notify §3.10 and Delete §3.11)."""

    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(IntEnum):
    """RFC 7296 §3.3.2 Transform Type."""

    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4  # "Key Exchange Method" since RFC 9370
    ESN = 5


class TransformAttr(IntEnum):
    """RFC 7296 §3.3.5 Transform Attribute Types."""

    KEY_LENGTH = 14  # TV format, value in bits


class Esn(IntEnum):
    """RFC 7296 §3.3.2 Transform Type 5 (Extended Sequence Numbers) IDs."""

    NO_ESN = 0
    ESN = 1


class IdType(IntEnum):
    """RFC 7296 §3.5 ID Type."""

    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11
    ID_NULL = 13  # RFC 7619


class CertEncoding(IntEnum):
    """RFC 7296 §3.6 Certificate Encoding."""

    PKCS7_X509 = 1
    PGP = 2
    DNS_SIGNED_KEY = 3
    X509_SIGNATURE = 4
    KERBEROS_TOKEN = 6
    CRL = 7
    ARL = 8
    SPKI = 9
    X509_ATTRIBUTE = 10
    RAW_RSA_KEY = 11
    HASH_URL_X509_CERT = 12
    HASH_URL_X509_BUNDLE = 13
    OCSP_CONTENT = 14  # RFC 4806
    RAW_PUBLIC_KEY = 15  # RFC 7670


class AuthMethod(IntEnum):
    """RFC 7296 §3.8 Auth Method."""

    RSA_SIG = 1
    SHARED_KEY_MIC = 2
    DSS_SIG = 3
    ECDSA_SHA256_P256 = 9  # RFC 4754
    ECDSA_SHA384_P384 = 10  # RFC 4754
    ECDSA_SHA512_P521 = 11  # RFC 4754
    GENERIC_SECURE_PASSWORD = 12  # RFC 6467
    NULL_AUTH = 13  # RFC 7619
    DIGITAL_SIGNATURE = 14  # RFC 7427


class NotifyType(IntEnum):
    """RFC 7296 §3.10.1 Notify Message Types (errors < 16384, status >= 16384)."""

    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396  # RFC 4555
    MULTIPLE_AUTH_SUPPORTED = 16404  # RFC 4739
    ANOTHER_AUTH_FOLLOWS = 16405  # RFC 4739
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431  # RFC 7427


class TsType(IntEnum):
    """RFC 7296 §3.13.1 Traffic Selector Type."""

    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8
    TS_FC_ADDR_RANGE = 9  # RFC 4595 (kept raw)
    TS_SECLABEL = 10  # RFC 9478 (kept raw)


class CfgType(IntEnum):
    """RFC 7296 §3.15 CFG Type."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class ConfigAttr(IntEnum):
    """RFC 7296 §3.15.1 Configuration Attribute Types."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP6_DHCP = 12
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15
