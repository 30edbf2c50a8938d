"""AH Child SAs negotiated by IKEv2 (RFC 7296 §3.3.1 / §3.3.3 AH proposals, §2.17 keys, §1.3.3
rekey, §1.4.1 Delete), in memory, both roles.

The AH proposal encoding is read back with scapy's IKEv2 dissector; KEYMAT is recomputed with an
independent prf+ over hmac/hashlib from SK_d and the nonces taken from the (unencrypted)
IKE_SA_INIT messages, so the §2.17 cut (initiator→responder integrity key first, no encryption
key) is checked against the core rather than with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

import pytest
from scapy.contrib.ikev2 import IKEv2_SA

from services.core.iana import Integ
from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from services.core.ike.exchange import (
    AH_NAT_REASON,
    IkeSaResult,
    Ikev2Initiator,
    InitiatorConfig,
    State,
    sk_ciphers,
)
from services.core.ike.informational import InfoSession
from services.core.ike.message import (
    SA,
    Delete,
    Message,
    Nonce,
    Notify,
    Transform,
    TSi,
    TSr,
    decode_message,
)
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.ike.sk import decrypt_message, encrypt_message
from services.core.ike.suites import (
    EspSuite,
    SuiteError,
    choose_esp,
    esp_proposals,
    match_esp,
    parse_ah,
    parse_ah_list,
    parse_esp_list,
)
from services.core.sa import Mode

PSK = b"an example pre-shared key for AH"
V4 = ("192.0.2.1", "192.0.2.2", "198.51.100.1", "203.0.113.1")
V6 = ("2001:db8::1", "2001:db8::2", "2001:db8:a::1", "2001:db8:b::1")
SPI = b"\x00\x00\x12\x34"


def _rand(tag: bytes) -> Callable[[int], bytes]:
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(tag + state["n"].to_bytes(4, "big")).digest()
        return out[:n]

    return rand


def _prf_plus(key: bytes, seed: bytes, n: int) -> bytes:
    """RFC 7296 §2.13 prf+ with HMAC-SHA2-256, independent of services.core.ike.prf."""
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]


# --- parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "integ", "esn", "dh"),
    [
        ("sha256", Integ.HMAC_SHA2_256_128, False, 0),
        ("sha384-esn", Integ.HMAC_SHA2_384_192, True, 0),
        ("sha512-noesn", Integ.HMAC_SHA2_512_256, False, 0),
        ("sha256-x25519", Integ.HMAC_SHA2_256_128, False, 31),
        ("SHA2_512-ecp384-esn", Integ.HMAC_SHA2_512_256, True, 20),
    ],
)
def test_parse_ah_good(text: str, integ: int, esn: bool, dh: int) -> None:
    s = parse_ah(text)
    assert s == EspSuite(0, 0, integ, esn, dh, protocol=ProtocolId.AH)
    assert s.ah and not s.aead and s.encr_key_len == 0
    assert s.integ_key_len == {12: 32, 13: 48, 14: 64}[integ]
    assert parse_ah(s.name) == s  # the name round-trips


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("aes256-sha256", "AH has no encryption algorithm"),
        ("aes256gcm16", "AH has no encryption algorithm"),
        ("x25519", "no integrity algorithm"),
        ("esn", "no integrity algorithm"),
        ("sha256-prfsha256", "PRF belongs to IKE"),
        ("sha256-sha384", "more than one integrity"),
        ("sha1", "legacy"),
        ("sha256-modp1024", "legacy"),
        ("md5", "unknown algorithm"),
        ("", "empty AH proposal"),
    ],
)
def test_parse_ah_bad(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError, match=fragment):
        parse_ah(text)


def test_sha1_only_as_legacy() -> None:
    s = parse_ah("sha1", allow_legacy=True)
    assert s.integ == Integ.HMAC_SHA1_96 and s.integ_key_len == 20
    assert parse_ah_list(["sha256", "sha256", "sha512"]) == (parse_ah("sha256"), parse_ah("sha512"))
    with pytest.raises(SuiteError, match="list"):
        parse_ah_list("sha256")  # type: ignore[arg-type]


# --- proposals and choice ----------------------------------------------------------------------


def test_ah_proposals_encode_as_scapy_reads_them() -> None:
    suites = parse_ah_list(["sha256-x25519", "sha512-esn"])
    body = SA(esp_proposals(suites, SPI, pfs=True)).encode_body()
    sa = IKEv2_SA(b"\x00\x00" + (4 + len(body)).to_bytes(2, "big") + body)
    props = []
    p = sa.prop
    while p is not None and p.__class__.__name__ == "IKEv2_Proposal":
        ts = []
        t = p.trans
        while t is not None and t.__class__.__name__ == "IKEv2_Transform":
            ts.append((t.transform_type, t.transform_id))
            t = t.payload if t.payload.__class__.__name__ == "IKEv2_Transform" else None
        props.append((p.proposal, p.proto, bytes(p.SPI), ts))
        p = p.payload if p.payload.__class__.__name__ == "IKEv2_Proposal" else None
    # protocol ID 2 (AH), INTEG + DH + ESN, no ENCR transform (RFC 7296 §3.3.3)
    assert props == [
        (1, 2, SPI, [(3, 12), (4, 31), (5, 0)]),
        (2, 2, SPI, [(3, 14), (5, 1)]),
    ]
    # IKE_AUTH: no DH transform
    auth = esp_proposals(suites, SPI, pfs=False)
    assert all(TransformType.DH not in {t.transform_type for t in q.transforms} for q in auth)


def test_choice_is_protocol_aware() -> None:
    ah = parse_ah_list(["sha384", "sha256"])
    esp = parse_esp_list(["aes256-sha256"])
    offer_ah = esp_proposals(parse_ah_list(["sha256", "sha384"]), SPI, pfs=False)
    offer_esp = esp_proposals(esp, SPI, pfs=False)
    c = choose_esp(offer_ah, ah, b"\x00\x00\x99\x99")
    assert c is not None and c.suite == ah[0] and c.answer.protocol_id == ProtocolId.AH
    assert c.answer.number == 2 and c.answer.spi == b"\x00\x00\x99\x99"
    # an ESP offer never matches AH suites and the other way round, even with equal INTEG
    assert choose_esp(offer_esp, ah, SPI) is None
    assert choose_esp(offer_ah, esp, SPI) is None
    # an AH proposal carrying an ENCR transform is not a valid AH proposal (§3.3.3)
    bad = offer_ah[0].__class__(
        1, ProtocolId.AH, (Transform(TransformType.ENCR, 12), *offer_ah[0].transforms), SPI
    )
    assert choose_esp((bad,), ah, SPI) is None
    # the initiator accepts only an answer of its protocol
    assert match_esp(c.answer, ah) == ah[0]
    assert match_esp(c.answer, parse_esp_list(["aes256-sha384"])) is None


# --- handshakes --------------------------------------------------------------------------------


def _pair(
    fam: tuple[str, str, str, str],
    ini_child: tuple[EspSuite, ...],
    resp_child: tuple[EspSuite, ...],
    mode: Mode = Mode.TUNNEL,
) -> tuple[Ikev2Initiator, Ikev2Responder]:
    i_addr, r_addr, ts_i, ts_r = fam
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr=i_addr,
            remote_addr=r_addr,
            psk=PSK,
            ts_local=(ts_i, ts_i),
            ts_remote=(ts_r, ts_r),
            esp_suites=ini_child,
            mode=mode,
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
            esp_suites=resp_child,
            mode=mode,
        ),
        now=0.0,
        rand=_rand(b"r"),
    )
    return ini, resp


def _shuttle(
    ini: Ikev2Initiator,
    resp: Ikev2Responder,
    fam: tuple[str, str, str, str],
    *,
    seen_from: str | None = None,
) -> list[bytes]:
    """IKE_SA_INIT + IKE_AUTH; ``seen_from``: the initiator's address as the responder sees it
    (a NAT rewrote it). Returns every datagram in order."""
    i_ep = ipaddress.ip_address(seen_from or fam[0]).packed
    r_ep = ipaddress.ip_address(fam[1]).packed
    log: list[bytes] = []
    to_resp = ini.start(0.0)
    for _ in range(6):
        if not to_resp:
            break
        to_ini: list[bytes] = []
        for d in to_resp:
            log.append(d)
            port = 4500 if ini.port_float else 500
            to_ini += resp.receive(d, 0.0, remote=(i_ep, port), local=(r_ep, port))
        to_resp = []
        for d in to_ini:
            log.append(d)
            to_resp += ini.receive(d, 0.0)
    return log


def _nonces(log: list[bytes]) -> tuple[bytes, bytes]:
    ni = next(p for p in decode_message(log[0]).payloads if isinstance(p, Nonce)).data
    nr = next(p for p in decode_message(log[1]).payloads if isinstance(p, Nonce)).data
    return ni, nr


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", [Mode.TUNNEL, Mode.TRANSPORT], ids=["tunnel", "transport"])
@pytest.mark.parametrize("ah", ["sha256", "sha384-esn", "sha512"])
def test_ah_handshake_both_roles(fam: tuple[str, str, str, str], mode: Mode, ah: str) -> None:
    # the initiator prefers a suite the responder does not take; the responder's choice wins
    ini, resp = _pair(fam, parse_ah_list(["sha512-esn", ah]), parse_ah_list([ah]), mode)
    log = _shuttle(ini, resp, fam)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    a, b = ini.result, resp.result
    assert a is not None and b is not None and not a.nat_detected and not b.nat_detected
    want = parse_ah(ah)
    # the IKE_AUTH request offered AH proposals only (protocol 2); the answer is AH too
    req = decrypt_message(log[2], sk_ciphers(a.suite, a.keys, initiator=False)[0])
    (sa,) = [p for p in req.payloads if isinstance(p, SA)]
    assert {p.protocol_id for p in sa.proposals} == {ProtocolId.AH}
    ans = decrypt_message(log[3], sk_ciphers(a.suite, a.keys, initiator=True)[0])
    (sa,) = [p for p in ans.payloads if isinstance(p, SA)]
    assert sa.proposals[0].protocol_id == ProtocolId.AH and sa.proposals[0].spi == b.child.spi_in
    for r in (a.child, b.child):
        assert r.ah and r.protocol == ProtocolId.AH
        assert (r.encr_id, r.key_bits, r.integ_id, r.esn, r.mode) == (
            0,
            0,
            want.integ,
            want.esn,
            mode,
        )
        assert r.suite_name == want.name
    assert a.child.spi_in == b.child.spi_out and a.child.spi_out == b.child.spi_in
    # RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr); AH takes integrity keys only, the
    # initiator→responder one first
    ni, nr = _nonces(log)
    n = want.integ_key_len
    km = _prf_plus(a.keys.sk_d, ni + nr, 2 * n)
    for r in (a.child, b.child):
        assert r.keys.encr_i == r.keys.encr_r == b""
        assert (r.keys.integ_i, r.keys.integ_r) == (km[:n], km[n:])


@pytest.mark.parametrize("initiator_ah", [True, False], ids=["ah-to-esp", "esp-to-ah"])
def test_ah_against_esp_only_is_no_proposal_chosen(initiator_ah: bool) -> None:
    ah, esp = parse_ah_list(["sha256"]), parse_esp_list(["aes256-sha256"])
    ini, resp = _pair(V4, ah if initiator_ah else esp, esp if initiator_ah else ah)
    _shuttle(ini, resp, V4)
    assert ini.state is State.FAILED and resp.state is ResponderState.FAILED
    ours, theirs = ("AH", "ESP") if initiator_ah else ("ESP", "AH")
    mine = "sha256" if initiator_ah else "aes256-sha256"
    assert ini.failure_reason == (
        f"NO_PROPOSAL_CHOSEN: the responder accepted none of our {ours} proposals ({mine})"
    )
    assert resp.failure_reason is not None
    assert resp.failure_reason.startswith(f"NO_PROPOSAL_CHOSEN: no {theirs} proposal")


def test_mixed_esp_and_ah_suites_are_refused() -> None:
    with pytest.raises(ValueError, match="all ESP or all AH"):
        _pair(V4, (*parse_ah_list(["sha256"]), *parse_esp_list(["aes256gcm16"])), ())


def test_ah_across_nat_is_refused_by_the_responder() -> None:
    # the initiator's address is rewritten on the way (its NAT-D hashes no longer match)
    ini, resp = _pair(V4, parse_ah_list(["sha256"]), parse_ah_list(["sha256"]))
    _shuttle(ini, resp, V4, seen_from="198.18.0.7")
    # both see it: the responder's NAT-D names the rewritten address as the destination
    assert resp.nat_detected and ini.nat_detected
    assert resp.state is ResponderState.FAILED
    assert resp.failure_reason == f"NO_PROPOSAL_CHOSEN: {AH_NAT_REASON}"
    assert ini.state is State.FAILED
    assert ini.failure_reason == (
        "NO_PROPOSAL_CHOSEN: the responder accepted none of our AH proposals (sha256); "
        + AH_NAT_REASON
    )
    # the same path is fine for ESP (UDP-encapsulated)
    ini, resp = _pair(V4, parse_esp_list(["aes256gcm16"]), parse_esp_list(["aes256gcm16"]))
    _shuttle(ini, resp, V4, seen_from="198.18.0.7")
    assert resp.nat_detected and ini.state is State.ESTABLISHED
    assert ini.result is not None and resp.result is not None and resp.result.nat_detected


def test_ah_across_nat_is_refused_by_the_initiator() -> None:
    """A responder that does not check (the NAT is only visible from the initiator's side):
    the initiator does not use the AH Child SA and deletes the IKE SA."""
    ini, resp = _pair(V4, parse_ah_list(["sha256"]), parse_ah_list(["sha256"]))
    i_ep, r_ep = (ipaddress.ip_address(x).packed for x in V4[:2])
    (init,) = ini.start(0.0)
    # the responder's own address as it sees it differs from what the initiator sent to
    (resp_init,) = resp.receive(
        init, 0.0, remote=(i_ep, 500), local=(ipaddress.ip_address("198.18.0.9").packed, 500)
    )
    resp.nat_detected = False  # a responder without the AH rule
    (auth,) = ini.receive(resp_init, 0.0)
    assert ini.nat_detected
    (auth_ans,) = resp.receive(auth, 0.0, remote=(i_ep, 4500), local=(r_ep, 4500))
    assert resp.state is ResponderState.ESTABLISHED
    out = ini.receive(auth_ans, 0.0)
    assert ini.state is State.FAILED and ini.failure_reason == AH_NAT_REASON
    assert ini.result is None
    r = resp.result
    assert r is not None
    (delete,) = out
    msg = decrypt_message(delete, sk_ciphers(r.suite, r.keys, initiator=False)[0])
    assert msg.exchange_type == ExchangeType.INFORMATIONAL
    assert msg.payloads == (Delete(ProtocolId.IKE),)


# --- after IKE_AUTH: rekey and Delete with protocol AH ------------------------------------------


def _info(x: Ikev2Initiator | Ikev2Responder) -> InfoSession:
    info = x.info
    assert info is not None
    return info


def _established_ah(ah: list[str]) -> tuple[Ikev2Initiator, Ikev2Responder, IkeSaResult]:
    ini, resp = _pair(V4, parse_ah_list(ah), parse_ah_list(ah))
    _shuttle(ini, resp, V4)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    r = ini.result
    assert r is not None
    return ini, resp, r


@pytest.mark.parametrize("initiator_starts", [True, False], ids=["initiator", "responder"])
@pytest.mark.parametrize("pfs", [False, True], ids=["no-pfs", "pfs"])
def test_ah_child_rekey_and_delete(initiator_starts: bool, pfs: bool) -> None:
    ini, resp, r = _established_ah(["sha256-x25519" if pfs else "sha256"])
    me, peer = (ini, resp) if initiator_starts else (resp, ini)
    old, old_peer = _info(me).child, _info(peer).child
    assert old is not None and old_peer is not None
    (req,) = _info(me).rekey_child(1.0)
    i2r_in, _ = sk_ciphers(r.suite, r.keys, initiator=False)
    r2i_in, _ = sk_ciphers(r.suite, r.keys, initiator=True)
    mine, theirs = (i2r_in, r2i_in) if initiator_starts else (r2i_in, i2r_in)
    msg = decrypt_message(req, mine)
    rekey = next(p for p in msg.payloads if isinstance(p, Notify))
    assert (rekey.notify_type, rekey.protocol_id, rekey.spi) == (
        NotifyType.REKEY_SA,
        ProtocolId.AH,
        old[0],
    )
    (sa,) = [p for p in msg.payloads if isinstance(p, SA)]
    assert {p.protocol_id for p in sa.proposals} == {ProtocolId.AH}
    kinds = {(t.transform_type, t.transform_id) for t in sa.proposals[0].transforms}
    assert ((TransformType.DH, 31) in kinds) is pfs
    ni = next(p for p in msg.payloads if isinstance(p, Nonce)).data
    (ans,) = peer.receive(req, 1.0)
    (delete,) = me.receive(ans, 1.0)
    (ev_me,) = me.take_events()
    (ev_peer,) = peer.take_events()
    new_me, new_peer = ev_me.child, ev_peer.child
    assert new_me is not None and new_peer is not None
    assert new_me.ah and new_peer.ah and new_me.dh == new_peer.dh == (31 if pfs else 0)
    assert new_me.keys == new_peer.keys and new_me.keys.encr_i == b""
    assert len(new_me.keys.integ_i) == 32
    if not pfs:
        nr = next(p for p in decrypt_message(ans, theirs).payloads if isinstance(p, Nonce)).data
        km = _prf_plus(r.keys.sk_d, ni + nr, 64)  # the starter is the §2.17 initiator
        assert (new_me.keys.integ_i, new_me.keys.integ_r) == (km[:32], km[32:])
    # make-before-break: the Delete of the old Child SA names protocol AH
    assert decrypt_message(delete, mine).payloads == (Delete(ProtocolId.AH, 4, (old[0],)),)
    (dans,) = peer.receive(delete, 1.0)
    assert decrypt_message(dans, theirs).payloads == (Delete(ProtocolId.AH, 4, (old_peer[0],)),)
    assert me.receive(dans, 1.0) == []
    assert [e.kind for e in peer.take_events()] == ["child_deleted"]
    assert [e.kind for e in me.take_events()] == ["child_deleted"]
    assert _info(me).children == [(new_me.spi_in, new_me.spi_out)]


def test_peer_rekey_naming_esp_for_an_ah_child_is_child_sa_not_found() -> None:
    _, resp, r = _established_ah(["sha256"])
    _, i2r_out = sk_ciphers(r.suite, r.keys, initiator=True)
    r2i_in, _ = sk_ciphers(r.suite, r.keys, initiator=True)
    offer = esp_proposals(parse_ah_list(["sha256"]), b"\xca\xfe\x00\x01", pfs=False)
    for mid, proto in ((2, ProtocolId.ESP), (3, ProtocolId.AH)):
        payloads = (
            Notify(NotifyType.REKEY_SA, b"", proto, r.child.spi_in),
            SA(offer),
            Nonce(bytes(range(32))),
            TSi(r.child.ts_i),
            TSr(r.child.ts_r),
        )
        msg = Message(r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, mid, payloads, initiator=True)
        (d,) = encrypt_message(msg, i2r_out)
        (out,) = resp.receive(d, 0.0)
        ans = decrypt_message(out, r2i_in)
        if proto == ProtocolId.ESP:
            assert ans.payloads == (
                Notify(NotifyType.CHILD_SA_NOT_FOUND, b"", ProtocolId.ESP, r.child.spi_in),
            )
        else:
            (sa,) = [p for p in ans.payloads if isinstance(p, SA)]
            assert sa.proposals[0].protocol_id == ProtocolId.AH
    # a Delete of ESP naming the AH Child SA's SPI deletes nothing
    msg = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.INFORMATIONAL,
        4,
        (Delete(ProtocolId.ESP, 4, (r.child.spi_in,)),),
        initiator=True,
    )
    (d,) = encrypt_message(msg, i2r_out)
    (out,) = resp.receive(d, 0.0)
    assert decrypt_message(out, r2i_in).payloads == ()
    assert r.child.spi_in in {c[1] for c in _info(resp).children}
    assert resp.take_events()[-1].kind == "liveness"
