"""Our own rekeys with configured suites (RFC 7296 §1.3.1, §1.3.2, §1.3.3, §2.7, §2.17, §2.18),
in memory: the CHILD SA rekey offers our ESP suites (PFS group, transport mode) and takes the
peer's choice, the IKE SA rekey offers our IKE suites and the new IKE SA runs on the chosen one;
INVALID_KE_PAYLOAD answers are retried once in the named group.

Child SA keys without PFS are checked against an independent prf+ over hmac (§2.17 order:
initiator's encryption then integrity key, then the responder's).
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.core.iana import Encr, Integ
from services.core.ike.constants import NotifyType
from services.core.ike.exchange import ChildSaResult, Ikev2Initiator, sk_ciphers
from services.core.ike.informational import InfoEvent, InfoSession
from services.core.ike.message import KE, SA, Nonce, Notify
from services.core.ike.responder import Ikev2Responder, ResponderState
from services.core.ike.sk import decrypt_message
from services.core.ike.suites import parse_ike
from services.core.sa import Mode
from tests.unit.test_ike_suites import V4, V6, _configs
from tests.unit.test_ike_suites import _shuttle as _handshake


def _info(x: Ikev2Initiator | Ikev2Responder) -> InfoSession:
    info = x.info
    assert info is not None
    return info


def _run(ini: Ikev2Initiator, resp: Ikev2Responder, first: list[bytes], *, from_ini: bool) -> None:
    """Deliver datagrams back and forth until both sides are quiet."""
    to_resp, to_ini = (first, []) if from_ini else ([], first)
    for _ in range(20):
        if not to_ini and not to_resp:
            return
        nxt_ini: list[bytes] = []
        nxt_resp: list[bytes] = []
        for d in to_resp:
            nxt_ini += resp.receive(d, 1.0)
        for d in to_ini:
            nxt_resp += ini.receive(d, 1.0)
        to_ini, to_resp = nxt_ini, nxt_resp
    raise AssertionError("the exchanges did not settle")


def _established(
    ini_ike: list[str],
    resp_ike: list[str],
    ini_esp: list[str],
    resp_esp: list[str],
    mode: Mode = Mode.TUNNEL,
    fam: tuple[str, str, str, str] = V4,
) -> tuple[Ikev2Initiator, Ikev2Responder]:
    ini, resp = _configs(fam, ini_ike, resp_ike, ini_esp, resp_esp, mode, mode)
    _handshake(ini, resp, fam)
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    assert ini.info is not None and resp.info is not None
    return ini, resp


def _prf_plus(key: bytes, seed: bytes, n: int, h: str = "sha256") -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), getattr(hashlib, h)).digest()
        out += t
        i += 1
    return out[:n]


def _rekeyed(events: list[InfoEvent]) -> ChildSaResult:
    (child,) = [e.child for e in events if e.kind == "child_rekeyed" and e.child is not None]
    return child


@pytest.mark.parametrize("initiator_starts", [True, False])
def test_our_child_rekey_offers_our_esp_suites_and_keys_follow_the_choice(
    initiator_starts: bool,
) -> None:
    ike = ["aes256gcm16-prfsha256-x25519"]
    # both know both suites; the responder prefers CBC + HMAC, so IKE_AUTH and rekeys take it
    ini, resp = _established(
        ike, ike, ["aes256gcm16", "aes256-sha256"], ["aes256-sha256", "aes256gcm16"]
    )
    r = resp.result
    assert r is not None and r.child.integ_id == Integ.HMAC_SHA2_256_128
    me, other = (ini, resp) if initiator_starts else (resp, ini)
    (req,) = _info(me).rekey_child(1.0)
    at_resp = sk_ciphers(r.suite, r.keys, initiator=False)[0]  # reads initiator -> responder
    at_ini = sk_ciphers(r.suite, r.keys, initiator=True)[0]
    msg = decrypt_message(req, at_resp if initiator_starts else at_ini)
    (sa,) = [p for p in msg.payloads if isinstance(p, SA)]
    # one proposal per suite of ours, in our order, no DH (no PFS configured), no KE
    encrs = [[t.transform_id for t in p.transforms if t.transform_type == 1] for p in sa.proposals]
    mine = [Encr.AES_GCM_16, Encr.AES_CBC] if initiator_starts else [Encr.AES_CBC, Encr.AES_GCM_16]
    assert encrs == [[e] for e in mine]
    assert not [p for p in msg.payloads if isinstance(p, KE)]
    (ans,) = other.receive(req, 1.0)
    follow = me.receive(ans, 1.0)  # the Delete of the old Child SA
    answer = decrypt_message(ans, at_ini if initiator_starts else at_resp)
    _run(ini, resp, follow, from_ini=initiator_starts)
    new_me, new_other = _rekeyed(me.take_events()), _rekeyed(other.take_events())
    # the answering side takes the first of its own suites that we offered
    if initiator_starts:
        want, lens = (Encr.AES_CBC, 256, Integ.HMAC_SHA2_256_128), (32, 32)
    else:
        want, lens = (Encr.AES_GCM_16, 256, 0), (36, 0)
    for c in (new_me, new_other):
        assert (c.encr_id, c.key_bits, c.integ_id, c.dh, c.mode) == (*want, 0, Mode.TUNNEL)
    assert new_me.keys == new_other.keys
    assert (new_me.spi_in, new_me.spi_out) == (new_other.spi_out, new_other.spi_in)
    # independent KEYMAT = prf+(SK_d, Ni | Nr), cut as §2.17 says for the chosen suite
    ni = next(p.data for p in msg.payloads if isinstance(p, Nonce))
    nr = next(p.data for p in answer.payloads if isinstance(p, Nonce))
    k = new_me.keys
    assert (len(k.encr_i), len(k.integ_i)) == lens
    km = _prf_plus(r.keys.sk_d, ni + nr, 2 * sum(lens))
    assert k.encr_i + k.integ_i + k.encr_r + k.integ_r == km


def test_our_child_rekey_with_pfs_retries_invalid_ke_in_the_named_group() -> None:
    ike = ["aes256gcm16-prfsha256-x25519"]
    # the initiator's first PFS group is ecp256; the responder takes x25519 only
    ini, resp = _established(
        ike, ike, ["aes128gcm16-ecp256", "aes128gcm16-x25519"], ["aes128gcm16-x25519"]
    )
    (req,) = _info(ini).rekey_child(1.0)
    r = resp.result
    assert r is not None
    i2r_in, _ = sk_ciphers(r.suite, r.keys, initiator=False)
    msg = decrypt_message(req, i2r_in)
    (ke,) = [p for p in msg.payloads if isinstance(p, KE)]
    assert ke.dh_group == 19
    (ans,) = resp.receive(req, 1.0)
    retry = ini.receive(ans, 1.0)  # INVALID_KE_PAYLOAD(31): the same rekey again in x25519
    assert resp.take_events() == [] and ini.take_events() == []
    (again,) = retry
    msg2 = decrypt_message(again, i2r_in)
    (ke2,) = [p for p in msg2.payloads if isinstance(p, KE)]
    assert ke2.dh_group == 31
    _run(ini, resp, retry, from_ini=True)
    a, b = _rekeyed(ini.take_events()), _rekeyed(resp.take_events())
    assert a.dh == b.dh == 31 and a.keys == b.keys and a.encr_id == Encr.AES_GCM_16


def test_our_child_rekey_without_a_common_pfs_group_fails_and_the_sa_lives_on() -> None:
    ike = ["aes256gcm16-prfsha256-x25519"]
    ini, resp = _established(ike, ike, ["aes128gcm16-ecp256"], ["aes128gcm16-x25519"])
    old = _info(ini).child
    _run(ini, resp, _info(ini).rekey_child(1.0), from_ini=True)
    (ev,) = ini.take_events()
    assert ev.kind == "rekey_failed" and "NO_PROPOSAL_CHOSEN" in ev.reason
    assert _info(ini).children == [old] and not _info(ini).closed


@pytest.mark.parametrize("initiator_starts", [True, False])
def test_our_child_rekey_keeps_transport_mode(initiator_starts: bool) -> None:
    ike = ["aes256gcm16-prfsha256-x25519"]
    esp = ["chacha20poly1305"]
    ini, resp = _established(ike, ike, esp, esp, Mode.TRANSPORT, V6)
    r = resp.result
    assert r is not None and r.child.mode is Mode.TRANSPORT
    me, other = (ini, resp) if initiator_starts else (resp, ini)
    (req,) = _info(me).rekey_child(1.0)
    reader = sk_ciphers(r.suite, r.keys, initiator=not initiator_starts)[0]
    msg = decrypt_message(req, reader)
    assert Notify(NotifyType.USE_TRANSPORT_MODE) in msg.payloads
    _run(ini, resp, [req], from_ini=initiator_starts)
    a, b = _rekeyed(me.take_events()), _rekeyed(other.take_events())
    assert a.mode is b.mode is Mode.TRANSPORT
    assert a.encr_id == Encr.CHACHA20_POLY1305 and a.keys == b.keys
    assert _info(me).mode_of(a.spi_in) is Mode.TRANSPORT


def test_peer_ike_rekey_is_answered_from_our_suites_and_the_new_sa_uses_them() -> None:
    x25519 = "aes256gcm16-prfsha256-x25519"
    cbc = "aes128-sha512-prfsha512-ecp384"
    ini, resp = _established([x25519, cbc], [cbc, x25519], ["aes256gcm16"], ["aes256gcm16"])
    assert _info(ini).ike_suite == _info(resp).ike_suite == parse_ike(x25519)
    # the responder rekeys: it offers its own order (CBC first, KE ecp384); the initiator
    # prefers x25519 but takes the suite in the KE's group rather than asking for another KE
    (req,) = _info(resp).rekey_ike(1.0)
    _run(ini, resp, [req], from_ini=False)
    assert [e.kind for e in resp.take_events()] == ["ike_rekeyed"]
    assert [e.kind for e in ini.take_events()] == ["ike_rekeyed"]
    assert _info(ini).ike_suite == _info(resp).ike_suite == parse_ike(cbc)
    r = resp.result
    assert r is not None
    assert _info(ini).spis == _info(resp).spis != (r.spi_i, r.spi_r)
    # the new IKE SA (AES-CBC + HMAC-SHA2-512, PRF SHA-512) carries a Child SA rekey
    _run(ini, resp, _info(ini).rekey_child(1.0), from_ini=True)
    a, b = _rekeyed(ini.take_events()), _rekeyed(resp.take_events())
    assert a.keys == b.keys and len(_info(ini).children) == 1


def test_our_ike_rekey_retries_invalid_ke_and_the_chosen_suite_is_reported() -> None:
    x25519 = "aes256gcm16-prfsha256-x25519"
    ecp = "aes256gcm16-prfsha384-ecp256"
    ini, resp = _established([x25519, ecp], [ecp], ["aes256gcm16"], ["aes256gcm16"])
    assert _info(ini).ike_suite == parse_ike(ecp)  # after the IKE_SA_INIT INVALID_KE retry
    (req,) = _info(ini).rekey_ike(1.0)
    (ans,) = resp.receive(req, 1.0)
    r = resp.result
    assert r is not None
    reader = sk_ciphers(r.suite, r.keys, initiator=True)[0]
    refusal = decrypt_message(ans, reader)
    assert refusal.payloads == (Notify(NotifyType.INVALID_KE_PAYLOAD, (19).to_bytes(2, "big")),)
    _run(ini, resp, ini.receive(ans, 1.0), from_ini=True)
    assert [e.kind for e in ini.take_events()] == ["ike_rekeyed"]
    assert _info(ini).ike_suite == _info(resp).ike_suite == parse_ike(ecp)
    _run(ini, resp, _info(resp).liveness(1.0), from_ini=False)
    assert not _info(ini).closed and not _info(resp).closed
