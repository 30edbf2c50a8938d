"""IKEv2 suites (services/core/ike/suites.py) and the exchanges that use them.

* the proposal-string parser: good strings, bad strings with readable errors, legacy gating;
* proposal encoding, checked against scapy's IKEv2 dissector (an independent oracle);
* the choice in both directions (responder: first of OUR suites the initiator offers;
  initiator: the answer must be one of ours), KE-group handling;
* key lengths from the algorithm registry;
* in-memory initiator <-> responder handshakes across the matrix of IKE suites, ESP suites,
  IPv4 / IPv6 and tunnel / transport, with the SK ciphers and Child SA keys cross-checked;
* INVALID_KE_PAYLOAD retry and COOKIE answer with their limits; transport-mode mismatches.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib.ikev2 import IKEv2_SA

from services.core.iana import Encr, Integ
from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from services.core.ike.dh import group
from services.core.ike.exchange import (
    MAX_COOKIE_RETRIES,
    MAX_KE_RETRIES,
    Ikev2Initiator,
    InitiatorConfig,
    State,
    sk_ciphers,
)
from services.core.ike.keys import child_keys
from services.core.ike.message import (
    KE,
    SA,
    Message,
    Nonce,
    Notify,
    Proposal,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    decode_message,
    encode_message,
)
from services.core.ike.prf import Prf
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.ike.sk import decrypt_message, encrypt_message
from services.core.ike.suites import (
    DEFAULT_ESP,
    DEFAULT_IKE,
    EspSuite,
    IkeSuite,
    SuiteError,
    choose_esp,
    choose_ike,
    esp_proposals,
    ike_proposals,
    match_esp,
    match_ike,
    parse_esp,
    parse_esp_list,
    parse_ike,
    parse_ike_list,
)
from services.core.sa import Mode

PSK = b"an example pre-shared key, 32 o"


def _rand(tag: bytes) -> Callable[[int], bytes]:
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(tag + state["n"].to_bytes(4, "big")).digest()
        return out[:n]

    return rand


# --- parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("aes256gcm16-prfsha256-x25519", IkeSuite(20, 256, 0, 5, 31)),
        ("aes128gcm16-prfsha384-ecp256", IkeSuite(20, 128, 0, 6, 19)),
        ("aes256-sha256-modp3072", IkeSuite(12, 256, 12, 5, 15)),
        ("aes128-sha512-prfsha384-modp2048", IkeSuite(12, 128, 14, 6, 14)),
        ("chacha20poly1305-prfsha256-curve25519", IkeSuite(28, 256, 0, 5, 31)),
        ("AES256GCM16-PRFSHA512-ecp521", IkeSuite(20, 256, 0, 7, 21)),
        ("aes256gcm16-prfsha256-ecp384", IkeSuite(20, 256, 0, 5, 20)),
        ("aes256gcm16-prfsha256-modp4096", IkeSuite(20, 256, 0, 5, 16)),
        ("aes256gcm16-prfsha256-x448", IkeSuite(20, 256, 0, 5, 32)),
        ("aes256-sha384-x25519", IkeSuite(12, 256, 13, 6, 31)),
    ],
)
def test_parse_ike_good(text: str, want: IkeSuite) -> None:
    assert parse_ike(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("aes128gcm16", EspSuite(20, 128)),
        ("aes256gcm16-esn", EspSuite(20, 256, esn=True)),
        ("aes256gcm16-noesn", EspSuite(20, 256)),
        ("aes256-sha256", EspSuite(12, 256, 12)),
        ("aes128-sha384", EspSuite(12, 128, 13)),
        ("chacha20poly1305", EspSuite(28, 256)),
        ("aes256gcm16-x25519", EspSuite(20, 256, dh=31)),
        ("aes256-sha512-modp3072-esn", EspSuite(12, 256, 14, True, 15)),
    ],
)
def test_parse_esp_good(text: str, want: EspSuite) -> None:
    assert parse_esp(text) == want


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("aes256gcm16-prfsha256", "no DH group"),
        ("aes256gcm16-x25519", "needs a PRF"),
        ("aes256-prfsha256-x25519", "needs an integrity"),
        ("aes256gcm16-sha256-prfsha256-x25519", "takes no integrity"),
        ("aes999-prfsha256-x25519", "unknown algorithm 'aes999'"),
        ("aes256gcm16--x25519", "empty token"),
        ("aes256gcm16-prfsha256-x25519-", "empty token"),
        ("aes256gcm16-aes128gcm16-prfsha256-x25519", "more than one encryption"),
        ("aes256gcm16-prfsha256-x25519-ecp256", "more than one DH"),
        ("aes256gcm16-prfsha256-x25519-esn", "ESN belongs to ESP"),
        ("prfsha256-x25519", "no encryption"),
        ("aes256gcm16-prfsha1-x25519", "legacy"),
        ("aes128-sha1-modp2048", "legacy"),
        ("aes256-sha1-x25519", "legacy"),
        ("aes256gcm16-prfsha256-modp1024", "legacy"),
        ("3des-sha256-x25519", "legacy"),
        ("aes256gcm16-prfsha256-x25519\x00", "unprintable"),
        ("a" * 300, "too long"),
    ],
)
def test_parse_ike_bad(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError, match=fragment):
        parse_ike(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("aes256gcm16-prfsha256", "PRF belongs to IKE"),
        ("aes256", "needs an integrity"),
        ("chacha20poly1305-sha256", "takes no integrity"),
        ("aes256gcm16-esn-noesn", "more than one ESN"),
        ("blowfish", "unknown algorithm"),
        ("aes256-sha1", "legacy"),
    ],
)
def test_parse_esp_bad(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError, match=fragment):
        parse_esp(text)


def test_legacy_only_with_the_flag() -> None:
    s = parse_ike("3des-sha1-prfsha256-modp1024", allow_legacy=True)
    assert s == IkeSuite(3, 192, 2, 5, 2, allow_legacy=True)
    assert s.encr_key_len == 24 and s.integ_key_len == 20 and s.prf_key_len == 32
    assert parse_esp("aes128-sha1", allow_legacy=True).integ_key_len == 20
    # the PRF HMAC-SHA1, named or implied by the SHA-1 integrity (tests/unit/test_ike_legacy_prf.py)
    assert parse_ike("aes128-sha1-modp2048", allow_legacy=True).prf == 2
    assert parse_ike("aes256gcm16-prfsha1-x25519", allow_legacy=True).prf_key_len == 20


def test_legacy_suite_handshake() -> None:
    ini, resp = _configs(
        V4,
        ["3des-sha1-prfsha256-modp1024"],
        ["3des-sha1-prfsha256-modp1024"],
        ["aes128-sha1"],
        ["aes128-sha1"],
        legacy=True,
    )
    _shuttle(ini, resp, V4)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    assert ini.result is not None and ini.result.child.integ_id == Integ.HMAC_SHA1_96


def test_lists() -> None:
    assert parse_ike_list(["aes256gcm16-prfsha256-x25519", "aes256gcm16-prfsha256-x25519"]) == (
        DEFAULT_IKE,
    )
    assert parse_esp_list(("aes256gcm16", "aes128gcm16")) == (DEFAULT_ESP, EspSuite(20, 128))
    for bad in ([], "aes256gcm16", [1], ["aes256gcm16"] * 0, ["x"]):
        with pytest.raises(SuiteError):
            parse_esp_list(bad)  # type: ignore[arg-type]
    with pytest.raises(SuiteError, match="at most"):
        parse_esp_list(["aes256gcm16"] * 40)


def test_names_round_trip() -> None:
    for text in (
        "aes256gcm16-prfsha256-x25519",
        "aes128gcm16-prfsha384-ecp256",
        "aes256-sha256-prfsha256-modp3072",
        "chacha20poly1305-prfsha256-x25519",
    ):
        assert parse_ike(text).name == text
    for text in ("aes128gcm16", "aes256gcm16-esn", "aes256-sha256", "aes256gcm16-x25519"):
        assert parse_esp(text).name == text


# --- key lengths (registry) ---------------------------------------------------------------------


def test_key_lengths_come_from_the_registry() -> None:
    cases = {
        "aes256gcm16-prfsha256-x25519": (36, 0, 32),
        "aes128gcm16-prfsha384-ecp256": (20, 0, 48),
        "aes256-sha256-modp3072": (32, 32, 32),
        "aes128-sha512-prfsha512-x25519": (16, 64, 64),
        "chacha20poly1305-prfsha256-x25519": (36, 0, 32),
    }
    for text, (e, a, p) in cases.items():
        s = parse_ike(text)
        assert (s.encr_key_len, s.integ_key_len, s.prf_key_len) == (e, a, p), text
    assert (parse_esp("aes256-sha384").encr_key_len, parse_esp("aes256-sha384").integ_key_len) == (
        32,
        48,
    )
    assert parse_esp("aes128gcm16").encr_key_len == 20


# --- proposal encoding (scapy oracle) ----------------------------------------------------------


def test_ike_proposals_encode_as_scapy_reads_them() -> None:
    suites = parse_ike_list(
        [
            "aes256gcm16-prfsha256-x25519",
            "aes256-sha256-modp3072",
            "chacha20poly1305-prfsha384-ecp256",
        ]
    )
    body = SA(ike_proposals(suites)).encode_body()
    sa = IKEv2_SA(b"\x00\x00" + (4 + len(body)).to_bytes(2, "big") + body)
    props = []
    p = sa.prop
    while p is not None and p.__class__.__name__ == "IKEv2_Proposal":
        ts = []
        t = p.trans
        while t is not None and t.__class__.__name__ == "IKEv2_Transform":
            ts.append((t.transform_type, t.transform_id, t.key_length))
            t = t.payload if t.payload.__class__.__name__ == "IKEv2_Transform" else None
        props.append((p.proposal, p.proto, p.trans_nb, ts))
        p = p.payload if p.payload.__class__.__name__ == "IKEv2_Proposal" else None
    assert props == [
        (1, 1, 3, [(1, 20, 256), (2, 5, None), (4, 31, None)]),
        (2, 1, 4, [(1, 12, 256), (3, 12, None), (2, 5, None), (4, 15, None)]),
        (3, 1, 3, [(1, 28, None), (2, 6, None), (4, 19, None)]),
    ]


def test_esp_proposals_strip_dh_in_ike_auth_and_dedupe() -> None:
    suites = parse_esp_list(["aes256gcm16-x25519", "aes256gcm16", "aes256-sha256-esn"])
    spi = b"\x01\x02\x03\x04"
    auth = esp_proposals(suites, spi, pfs=False)
    assert [p.number for p in auth] == [1, 2]
    assert all(TransformType.DH not in {t.transform_type for t in p.transforms} for p in auth)
    pfs = esp_proposals(suites, spi, pfs=True)
    assert len(pfs) == 3 and Transform(TransformType.DH, 31) in pfs[0].transforms
    assert (TransformType.ESN, 1) in {
        (t.transform_type, t.transform_id) for t in auth[1].transforms
    }
    assert all(p.spi == spi and p.protocol_id == ProtocolId.ESP for p in pfs)


# --- choice ------------------------------------------------------------------------------------


def test_responder_picks_first_of_its_own_suites() -> None:
    offer = ike_proposals(
        parse_ike_list(["aes128gcm16-prfsha256-ecp256", "aes256gcm16-prfsha256-x25519"])
    )
    ours = parse_ike_list(["aes256gcm16-prfsha256-x25519", "aes128gcm16-prfsha256-ecp256"])
    got = choose_ike(offer, ours)
    assert got is not None
    answer, suite = got
    assert suite == ours[0] and answer.number == 2  # the offer's number, our transforms
    # the other way round: the initiator's order does not matter, ours does
    got2 = choose_ike(offer, tuple(reversed(ours)))
    assert got2 is not None and got2[1] == ours[1] and got2[0].number == 1
    # KE group already sent: an acceptable suite in that group spares INVALID_KE_PAYLOAD
    got3 = choose_ike(offer, ours, ke_group=19)
    assert got3 is not None and got3[1].dh == 19
    assert choose_ike(offer, parse_ike_list(["aes256-sha256-modp3072"])) is None


def test_choice_inside_one_multi_transform_proposal() -> None:
    offer = (
        Proposal(
            7,
            ProtocolId.IKE,
            (
                Transform(TransformType.ENCR, 12, (TransformAttribute.key_length(128),)),
                Transform(TransformType.ENCR, 12, (TransformAttribute.key_length(256),)),
                Transform(TransformType.INTEG, 12),
                Transform(TransformType.INTEG, 13),
                Transform(TransformType.PRF, 5),
                Transform(TransformType.PRF, 6),
                Transform(TransformType.DH, 14),
                Transform(TransformType.DH, 15),
            ),
        ),
    )
    got = choose_ike(offer, parse_ike_list(["aes256-sha384-prfsha256-modp3072"]))
    assert got is not None and got[0].number == 7
    assert match_ike(got[0], parse_ike_list(["aes256-sha384-prfsha256-modp3072"])) is not None
    # AEAD: an offered INTEG without NONE does not fit; an SPI on an IKE proposal neither
    assert choose_ike(offer, (DEFAULT_IKE,)) is None
    spi = Proposal(1, ProtocolId.IKE, DEFAULT_IKE.transforms(), b"\x01" * 8)
    assert choose_ike((spi,), (DEFAULT_IKE,)) is None
    # an unknown transform type makes the proposal unacceptable (RFC 7296 §3.3.6)
    odd = Proposal(1, ProtocolId.IKE, (*DEFAULT_IKE.transforms(), Transform(9, 1)))
    assert choose_ike((odd,), (DEFAULT_IKE,)) is None


def test_initiator_match_refuses_what_it_did_not_offer() -> None:
    ours = parse_ike_list(["aes256gcm16-prfsha256-x25519"])
    assert match_ike(DEFAULT_IKE.proposal(1), ours) == DEFAULT_IKE
    other = parse_ike("aes128gcm16-prfsha256-x25519").proposal(1)
    assert match_ike(other, ours) is None
    esp = parse_esp_list(["aes256-sha256", "aes128gcm16"])
    ans = Proposal(2, ProtocolId.ESP, esp[1].transforms(), b"\x00\x00\x10\x00")
    assert match_esp(ans, esp) == esp[1]
    assert match_esp(Proposal(1, ProtocolId.ESP, esp[1].transforms(), b""), esp) is None


def test_esp_choice_pfs_and_esn() -> None:
    spi = b"\xaa\xbb\xcc\xdd"
    offer = esp_proposals(
        parse_esp_list(["aes256gcm16-esn", "aes128gcm16"]), b"\x01\x02\x03\x04", pfs=True
    )
    assert choose_esp(offer, (DEFAULT_ESP,), spi) is None  # 256 only offered with ESN
    c = choose_esp(offer, parse_esp_list(["aes256gcm16-esn", "aes128gcm16"]), spi)
    assert c is not None and c.suite.esn and c.answer.number == 1 and c.answer.spi == spi
    pfs_offer = esp_proposals(parse_esp_list(["aes256gcm16-ecp256"]), b"\x01\x02\x03\x04", pfs=True)
    # a suite without a group takes any non-legacy group the offer lists
    c2 = choose_esp(pfs_offer, (DEFAULT_ESP,), spi, 19, create_child=True)
    assert c2 is not None and c2.dh == 19
    assert Transform(TransformType.DH, 19) in c2.answer.transforms
    # a suite with a group takes only that group
    assert choose_esp(pfs_offer, parse_esp_list(["aes256gcm16-x25519"]), spi, 19) is None
    # a CREATE_CHILD_SA without KE does not fit a suite that requires PFS
    no_pfs = esp_proposals((DEFAULT_ESP,), b"\x01\x02\x03\x04", pfs=False)
    assert (
        choose_esp(no_pfs, parse_esp_list(["aes256gcm16-x25519"]), spi, create_child=True) is None
    )
    # ...but in IKE_AUTH (never a KE) it does
    assert choose_esp(no_pfs, parse_esp_list(["aes256gcm16-x25519"]), spi) is not None


# --- in-memory handshakes across the matrix ----------------------------------------------------

V4 = ("192.0.2.1", "192.0.2.2", "198.51.100.1", "203.0.113.1")
V6 = ("2001:db8::1", "2001:db8::2", "2001:db8:a::1", "2001:db8:b::1")

IKE_MATRIX = [
    "aes256gcm16-prfsha256-x25519",
    "aes128gcm16-prfsha384-ecp256",
    "aes256-sha256-modp2048",
    "aes128-sha512-prfsha512-ecp384",
    "chacha20poly1305-prfsha256-curve25519",
    "aes256gcm16-prfsha512-x448",
]
ESP_MATRIX = [
    "aes128gcm16",
    "aes256gcm16-esn",
    "aes256-sha256",
    "chacha20poly1305",
    "aes128-sha384",
]


def _configs(
    fam: tuple[str, str, str, str],
    ini_ike: list[str],
    resp_ike: list[str],
    ini_esp: list[str],
    resp_esp: list[str],
    ini_mode: Mode = Mode.TUNNEL,
    resp_mode: Mode = Mode.TUNNEL,
    *,
    legacy: bool = False,
) -> tuple[Ikev2Initiator, Ikev2Responder]:
    i_addr, r_addr, ts_i, ts_r = fam
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr=i_addr,
            remote_addr=r_addr,
            psk=PSK,
            ts_local=(ts_i, ts_i),
            ts_remote=(ts_r, ts_r),
            ike_suites=parse_ike_list(ini_ike, allow_legacy=legacy),
            esp_suites=parse_esp_list(ini_esp, allow_legacy=legacy),
            mode=ini_mode,
        ),
        now=0.0,
        rand=_rand(b"i"),
    )
    resp = Ikev2Responder(
        ResponderConfig(
            local_addr=r_addr,
            psk=PSK,
            ts_local=(ts_r, ts_r),
            ts_remote=(ts_i, ts_i),
            remote_id=i_addr,
            ike_suites=parse_ike_list(resp_ike, allow_legacy=legacy),
            esp_suites=parse_esp_list(resp_esp, allow_legacy=legacy),
            mode=resp_mode,
        ),
        now=0.0,
        rand=_rand(b"r"),
    )
    return ini, resp


def _shuttle(
    ini: Ikev2Initiator,
    resp: Ikev2Responder,
    fam: tuple[str, str, str, str],
    log: list[tuple[str, bytes]] | None = None,
) -> None:
    i_ep = ipaddress.ip_address(fam[0]).packed
    r_ep = ipaddress.ip_address(fam[1]).packed
    to_resp = ini.start(0.0)
    for _ in range(12):
        if not to_resp:
            return
        to_ini: list[bytes] = []
        for d in to_resp:
            if log is not None:
                log.append(("i", d))
            port = 4500 if ini.port_float else 500
            to_ini += resp.receive(d, 0.0, remote=(i_ep, port), local=(r_ep, port))
        to_resp = []
        for d in to_ini:
            if log is not None:
                log.append(("r", d))
            to_resp += ini.receive(d, 0.0)
        if not to_resp and ini.state is State.SA_INIT_SENT:
            _expire(ini)


def _expire(ini: Ikev2Initiator) -> None:
    """RFC 7296 §2.21.1: an unusable (unauthenticated) IKE_SA_INIT answer is not acted on at
    once; the attempt fails when the retransmission timer fires without a valid one."""
    assert ini.state is State.SA_INIT_SENT
    deadline = ini.next_timeout
    assert deadline is not None
    assert ini.on_timer(deadline) == []


def _cases() -> list[tuple[str, str, tuple[str, str, str, str], Mode]]:
    out = []
    for n, ike in enumerate(IKE_MATRIX):
        for m, esp in enumerate(ESP_MATRIX):
            fam = V6 if (n + m) % 2 else V4
            mode = Mode.TRANSPORT if (n * len(ESP_MATRIX) + m) % 3 == 0 else Mode.TUNNEL
            out.append((ike, esp, fam, mode))
    return out


@pytest.mark.parametrize(("ike", "esp", "fam", "mode"), _cases())
def test_handshake_matrix(ike: str, esp: str, fam: tuple[str, str, str, str], mode: Mode) -> None:
    # the initiator prefers something else first; the responder only knows the suite under test
    ini_ike = ["aes256gcm16-prfsha384-ecp521", ike] if ike != IKE_MATRIX[0] else [ike]
    ini, resp = _configs(fam, ini_ike, [ike], ["aes256gcm16", esp], [esp], mode, mode)
    _shuttle(ini, resp, fam)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    a, b = ini.result, resp.result
    assert a is not None and b is not None
    want_ike, want_esp = parse_ike(ike), parse_esp(esp)
    assert a.suite == b.suite == want_ike
    assert a.keys == b.keys
    assert len(a.keys.sk_ei) == want_ike.encr_key_len
    assert len(a.keys.sk_ai) == want_ike.integ_key_len
    assert len(a.keys.sk_d) == want_ike.prf_key_len
    for r in (a.child, b.child):
        assert (r.encr_id, r.key_bits, r.integ_id, r.esn) == (
            want_esp.encr,
            want_esp.key_bits,
            want_esp.integ,
            want_esp.esn,
        )
        assert r.mode is mode
        assert len(r.keys.encr_i) == want_esp.encr_key_len
        assert len(r.keys.integ_i) == want_esp.integ_key_len
        assert r.suite_name == want_esp.name
    assert a.child.keys == b.child.keys
    assert a.child.spi_in == b.child.spi_out and a.child.spi_out == b.child.spi_in
    alen = 16 if fam is V6 else 4
    assert all(len(t.start_address) == alen for t in (*a.child.ts_i, *a.child.ts_r))
    assert a.child.ts_i == b.child.ts_i and a.child.ts_r == b.child.ts_r


def test_no_common_ike_suite_is_no_proposal_chosen_both_sides() -> None:
    ini, resp = _configs(
        V4,
        ["aes128gcm16-prfsha256-x25519"],
        ["aes256-sha256-modp3072"],
        ["aes256gcm16"],
        ["aes256gcm16"],
    )
    _shuttle(ini, resp, V4)
    assert ini.state is State.FAILED
    assert ini.failure_reason == (
        "NO_PROPOSAL_CHOSEN: the responder accepted none of our IKE proposals "
        "(aes128gcm16-prfsha256-x25519)"
    )
    assert resp.failure_reason is not None
    assert resp.failure_reason.startswith("NO_PROPOSAL_CHOSEN")
    assert "aes256-sha256-prfsha256-modp3072" in resp.failure_reason


def test_no_common_esp_suite_is_no_proposal_chosen_both_sides() -> None:
    ini, resp = _configs(
        V6, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes128gcm16"], ["chacha20poly1305"]
    )
    _shuttle(ini, resp, V6)
    assert ini.state is State.FAILED
    assert ini.failure_reason == (
        "NO_PROPOSAL_CHOSEN: the responder accepted none of our ESP proposals (aes128gcm16)"
    )
    assert resp.failure_reason is not None and "chacha20poly1305" in resp.failure_reason


# --- INVALID_KE_PAYLOAD and COOKIE ---------------------------------------------------------------


def test_invalid_ke_retry_with_the_group_the_responder_names() -> None:
    log: list[tuple[str, bytes]] = []
    ini, resp = _configs(
        V4,
        ["aes256gcm16-prfsha256-ecp256", "aes256gcm16-prfsha256-x25519"],
        ["aes256gcm16-prfsha256-x25519"],
        ["aes256gcm16"],
        ["aes256gcm16"],
    )
    _shuttle(ini, resp, V4, log)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.invalid_ke_sent == 1
    first, second = decode_message(log[0][1]), decode_message(log[2][1])
    ke1 = next(p for p in first.payloads if isinstance(p, KE))
    ke2 = next(p for p in second.payloads if isinstance(p, KE))
    assert (ke1.dh_group, ke2.dh_group) == (19, 31)
    assert first.spi_i == second.spi_i and second.message_id == 0
    n = next(p for p in decode_message(log[1][1]).payloads if isinstance(p, Notify))
    assert n.notify_type == NotifyType.INVALID_KE_PAYLOAD and n.data == b"\x00\x1f"
    assert ini.result is not None and ini.result.suite.dh == 31


def _sa_init_answer(req: bytes, notify: Notify) -> bytes:
    m = decode_message(req)
    return encode_message(
        Message(m.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, (notify,), response=True)
    )


def test_invalid_ke_naming_a_group_we_do_not_offer_fails_readably() -> None:
    ini, _ = _configs(V4, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"])
    (req,) = ini.start(0.0)
    assert (
        ini.receive(_sa_init_answer(req, Notify(NotifyType.INVALID_KE_PAYLOAD, b"\x00\x0e")), 0.0)
        == []
    )
    _expire(ini)
    assert ini.state is State.FAILED
    assert ini.failure_reason is not None and "group 14" in ini.failure_reason


def test_invalid_ke_retries_are_bounded() -> None:
    groups = ["ecp256", "x25519", "ecp384", "modp2048"]
    ini, _ = _configs(
        V4,
        [f"aes256gcm16-prfsha256-{g}" for g in groups],
        [IKE_MATRIX[0]],
        ["aes256gcm16"],
        ["aes256gcm16"],
    )
    (req,) = ini.start(0.0)
    wanted = [b"\x00\x1f", b"\x00\x14", b"\x00\x0e"]
    for i, g in enumerate(wanted):
        out = ini.receive(_sa_init_answer(req, Notify(NotifyType.INVALID_KE_PAYLOAD, g)), 0.0)
        if i < MAX_KE_RETRIES:
            (req,) = out
            ke = next(p for p in decode_message(req).payloads if isinstance(p, KE))
            assert ke.dh_group == int.from_bytes(g, "big")
            # a stale duplicate naming the group now in use is ignored
            stale = Notify(NotifyType.INVALID_KE_PAYLOAD, g)
            assert ini.receive(_sa_init_answer(req, stale), 0.0) == []
            assert ini.state is State.SA_INIT_SENT
    _expire(ini)
    assert ini.state is State.FAILED and "retries" in (ini.failure_reason or "")


def test_cookie_is_sent_back_first_and_bounded() -> None:
    ini, resp = _configs(V4, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"])
    (req,) = ini.start(0.0)
    (again,) = ini.receive(_sa_init_answer(req, Notify(NotifyType.COOKIE, b"c" * 16)), 0.0)
    m = decode_message(again)
    first = m.payloads[0]
    assert isinstance(first, Notify) and first.notify_type == NotifyType.COOKIE
    assert first.data == b"c" * 16 and m.message_id == 0
    assert [type(p) for p in m.payloads[1:3]] == [SA, KE]
    # a duplicate of the same COOKIE answer is ignored
    assert ini.receive(_sa_init_answer(req, Notify(NotifyType.COOKIE, b"c" * 16)), 0.0) == []
    # the responder (ours ignores the COOKIE) completes the exchange from the cookie request on
    i_ep, r_ep = ipaddress.ip_address(V4[0]).packed, ipaddress.ip_address(V4[1]).packed
    to_resp = [again]
    for _ in range(4):
        to_ini = [
            x for d in to_resp for x in resp.receive(d, 0.0, remote=(i_ep, 500), local=(r_ep, 500))
        ]
        to_resp = [x for d in to_ini for x in ini.receive(d, 0.0)]
        if ini.port_float:
            break
    # AUTH covers the IKE_SA_INIT with the COOKIE (the request the responder answered)
    to_ini = [
        x for d in to_resp for x in resp.receive(d, 0.0, remote=(i_ep, 4500), local=(r_ep, 4500))
    ]
    for d in to_ini:
        ini.receive(d, 0.0)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason


def test_cookie_limit_and_bad_cookie() -> None:
    ini, _ = _configs(V4, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"])
    (req,) = ini.start(0.0)
    for i in range(MAX_COOKIE_RETRIES):
        (req,) = ini.receive(
            _sa_init_answer(req, Notify(NotifyType.COOKIE, bytes([i + 1]) * 8)), 0.0
        )
    assert ini.receive(_sa_init_answer(req, Notify(NotifyType.COOKIE, b"z" * 8)), 0.0) == []
    _expire(ini)
    assert ini.state is State.FAILED and "COOKIE" in (ini.failure_reason or "")
    ini2, _ = _configs(V4, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"])
    (req,) = ini2.start(0.0)
    assert ini2.receive(_sa_init_answer(req, Notify(NotifyType.COOKIE, b"x" * 65)), 0.0) == []
    _expire(ini2)
    assert ini2.state is State.FAILED and "65 octets" in (ini2.failure_reason or "")


# --- transport mode (RFC 7296 §1.3.1) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ini_mode", "resp_mode", "ini_state", "resp_state", "reason"),
    [
        (Mode.TRANSPORT, Mode.TRANSPORT, State.ESTABLISHED, ResponderState.ESTABLISHED, None),
        (Mode.TUNNEL, Mode.TUNNEL, State.ESTABLISHED, ResponderState.ESTABLISHED, None),
        # responder declines (tunnel): the initiator must not keep a tunnel SA -> fails
        (Mode.TRANSPORT, Mode.TUNNEL, State.FAILED, ResponderState.ESTABLISHED, "declined"),
        # responder configured for transport, initiator wants tunnel -> NO_PROPOSAL_CHOSEN
        (Mode.TUNNEL, Mode.TRANSPORT, State.FAILED, ResponderState.FAILED, "NO_PROPOSAL_CHOSEN"),
    ],
)
def test_transport_mode_negotiation(
    ini_mode: Mode,
    resp_mode: Mode,
    ini_state: State,
    resp_state: ResponderState,
    reason: str | None,
) -> None:
    ini, resp = _configs(
        V4, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"], ini_mode, resp_mode
    )
    _shuttle(ini, resp, V4)
    assert ini.state is ini_state, ini.failure_reason
    assert resp.state is resp_state, resp.failure_reason
    if reason is not None:
        assert reason in (ini.failure_reason or "")
    if resp_state is ResponderState.ESTABLISHED:
        assert resp.result is not None
        want = Mode.TRANSPORT if ini_mode is resp_mode is Mode.TRANSPORT else Mode.TUNNEL
        assert resp.result.child.mode is want


def test_ipv6_nat_detection_hashes_cover_ipv6_addresses() -> None:
    log: list[tuple[str, bytes]] = []
    ini, resp = _configs(V6, [IKE_MATRIX[0]], [IKE_MATRIX[0]], ["aes256gcm16"], ["aes256gcm16"])
    _shuttle(ini, resp, V6, log)
    assert ini.state is State.ESTABLISHED
    req = decode_message(log[0][1])
    src = next(
        p
        for p in req.payloads
        if isinstance(p, Notify) and p.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP
    )
    want = hashlib.sha1(
        req.spi_i + bytes(8) + ipaddress.IPv6Address(V6[0]).packed + (500).to_bytes(2, "big")
    ).digest()
    assert src.data == want


def test_mixed_families_are_refused_in_config() -> None:
    with pytest.raises(ValueError, match="address families"):
        InitiatorConfig(
            local_addr=V4[0],
            remote_addr=V6[1],
            psk=PSK,
            ts_local=(V4[2], V4[2]),
            ts_remote=(V4[3], V4[3]),
        )
    with pytest.raises(ValueError, match="address families"):
        ResponderConfig(
            local_addr=V6[1], psk=PSK, ts_local=(V6[3], V4[3]), ts_remote=(V6[2], V6[2])
        )


def test_registry_ids() -> None:
    # the suite values are the IANA numbers the registry and tshark use
    assert parse_ike("aes256-sha512-prfsha384-ecp521").transforms() == (
        Transform(TransformType.ENCR, Encr.AES_CBC, (TransformAttribute.key_length(256),)),
        Transform(TransformType.INTEG, Integ.HMAC_SHA2_512_256),
        Transform(TransformType.PRF, Prf.HMAC_SHA2_384),
        Transform(TransformType.DH, 21),
    )


# --- the peer's Child SA rekey (CREATE_CHILD_SA) with configured suites ------------------------


def test_peer_rekey_uses_our_esp_suites_pfs_group_and_transport_mode() -> None:
    ini, resp = _configs(
        V6,
        ["aes256-sha256-modp2048"],
        ["aes256-sha256-modp2048"],
        ["aes256-sha256-ecp256"],
        ["aes256-sha256-ecp256"],
        Mode.TRANSPORT,
        Mode.TRANSPORT,
    )
    _shuttle(ini, resp, V6)
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    r = resp.result
    assert r is not None and r.child.mode is Mode.TRANSPORT and r.child.dh == 0
    # the initiator's side of the IKE SA, built independently of the responder object
    r2i_in, i2r_out = sk_ciphers(r.suite, r.keys, initiator=True)
    offer = esp_proposals(
        parse_esp_list(["aes256-sha256-x25519", "aes256-sha256-ecp256"]),
        b"\xca\xfe\x00\x01",
        pfs=True,
    )
    ni = bytes(range(32))

    def request(mid: int, ke: KE | None, transport: bool) -> Message:
        payloads = (
            Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, r.child.spi_out),
            *((Notify(NotifyType.USE_TRANSPORT_MODE),) if transport else ()),
            SA(offer),
            Nonce(ni),
            *((ke,) if ke else ()),
            TSi(r.child.ts_i),
            TSr(r.child.ts_r),
        )
        msg = Message(r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, mid, payloads, initiator=True)
        (d,) = encrypt_message(msg, i2r_out)
        (out,) = resp.receive(d, 0.0)
        return decrypt_message(out, r2i_in)

    # KE in x25519 (offered, but our suite takes ecp256 only) -> INVALID_KE_PAYLOAD(19)
    x = group(31).generate(_rand(b"x"))
    ans = request(2, KE(31, x.public_bytes()), True)
    assert ans.payloads == (Notify(NotifyType.INVALID_KE_PAYLOAD, b"\x00\x13"),)
    # no KE at all: our suite requires PFS -> NO_PROPOSAL_CHOSEN
    ans = request(3, None, True)
    assert ans.payloads == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # KE in ecp256 with USE_TRANSPORT_MODE: accepted, transport echoed, keys for CBC + HMAC
    e = group(19).generate(_rand(b"e"))
    ans = request(4, KE(19, e.public_bytes()), True)
    notes = [p for p in ans.payloads if isinstance(p, Notify)]
    assert notes == [Notify(NotifyType.USE_TRANSPORT_MODE)]
    (sa,) = [p for p in ans.payloads if isinstance(p, SA)]
    assert match_esp(sa.proposals[0], parse_esp_list(["aes256-sha256"]), pfs_group=19)
    ker = next(p for p in ans.payloads if isinstance(p, KE))
    nr = next(p for p in ans.payloads if isinstance(p, Nonce)).data
    (ev,) = resp.take_events()
    assert ev.kind == "child_rekeyed" and ev.child is not None
    new = ev.child
    assert (new.encr_id, new.key_bits, new.integ_id, new.dh, new.mode) == (
        Encr.AES_CBC,
        256,
        Integ.HMAC_SHA2_256_128,
        19,
        Mode.TRANSPORT,
    )
    want = child_keys(
        r.suite.prf,
        r.keys.sk_d,
        ni,
        nr,
        encr_key_len=32,
        integ_key_len=32,
        g_ir_new=e.shared(ker.data),
    )
    assert new.keys == want


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=80)
    | st.lists(
        st.sampled_from(
            ["aes256gcm16", "aes128", "sha256", "prfsha384", "x25519", "esn", "3des", "", "zz"]
        ),
        max_size=6,
    ).map("-".join),
    legacy=st.booleans(),
)
def test_parser_only_raises_suite_error(text: str, legacy: bool) -> None:
    for parse in (parse_ike, parse_esp):
        try:
            s = parse(text, allow_legacy=legacy)
        except SuiteError as e:
            assert len(str(e)) < 300
        else:
            assert s.encr_key_len > 0
