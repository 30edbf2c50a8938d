"""INFORMATIONAL exchanges after ESTABLISHED (RFC 7296 §1.4, §1.4.1, §2.1), both roles in memory.

Our initiator and responder are paired (tests/unit/test_ike_responder.py's helpers); the peer's
requests are built by hand with the IKE SA keys, so each role is tested as the receiver.
"""

from __future__ import annotations

from services.core.ike.constants import ExchangeType, ProtocolId
from services.core.ike.exchange import IkeSaResult, Ikev2Initiator, State
from services.core.ike.informational import InfoEvent
from services.core.ike.message import Delete, Message, Payload
from services.core.ike.responder import Ikev2Responder, ResponderState
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message
from tests.unit.test_ike_responder import _pair, _run

GCM = 20


def _established() -> tuple[Ikev2Initiator, Ikev2Responder, IkeSaResult]:
    ini, resp = _pair()
    _run(ini, resp)
    assert ini.state is State.ESTABLISHED and resp.state is ResponderState.ESTABLISHED
    r = resp.result
    assert r is not None
    return ini, resp, r


def _ciphers(r: IkeSaResult) -> tuple[SkCipher, SkCipher]:
    """(initiator -> responder, responder -> initiator)."""
    return SkCipher(GCM, r.keys.sk_ei, key_bits=256), SkCipher(GCM, r.keys.sk_er, key_bits=256)


def _req(
    r: IkeSaResult,
    cipher: SkCipher,
    mid: int,
    payloads: tuple[Payload, ...] = (),
    *,
    from_initiator: bool,
) -> bytes:
    msg = Message(
        r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, mid, payloads, initiator=from_initiator
    )
    (d,) = encrypt_message(msg, cipher)
    return d


# -- the responder receives the initiator's requests ------------------------------------------


def test_responder_liveness_and_child_delete() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    (live,) = resp.receive(_req(r, i2r, 2, from_initiator=True), 0.0)
    ans = decrypt_message(live, r2i)
    assert ans.response and not ans.initiator and ans.message_id == 2 and ans.payloads == ()
    assert resp.take_events() == [InfoEvent("liveness")]
    # the initiator deletes its inbound SPI, which is our outbound one (child.spi_out)
    d = Delete(ProtocolId.ESP, 4, (r.child.spi_out,))
    (out,) = resp.receive(_req(r, i2r, 3, (d,), from_initiator=True), 0.0)
    ans = decrypt_message(out, r2i)
    assert ans.message_id == 3
    assert ans.payloads == (Delete(ProtocolId.ESP, 4, (r.child.spi_in,)),)
    assert resp.take_events() == [InfoEvent("child_deleted", r.child.spi_in, r.child.spi_out)]
    assert resp.state is ResponderState.ESTABLISHED
    # retransmitted child delete: cached response, no second event
    assert resp.receive(_req(r, i2r, 3, (d,), from_initiator=True), 0.0) == [out]
    assert resp.take_events() == []


def test_responder_ignores_out_of_window_and_wrong_flags() -> None:
    _ini, resp, r = _established()
    i2r, _ = _ciphers(r)
    # mid 1 is IKE_AUTH's (its retransmits get the cached IKE_AUTH response, not this one)
    for mid in (0, 1, 3, 100):
        assert resp.receive(_req(r, i2r, mid, from_initiator=True), 0.0) == []
    assert resp.receive(_req(r, i2r, 2, from_initiator=False), 0.0) == []  # wrong I flag
    assert resp.take_events() == []
    assert resp.receive(_req(r, i2r, 2, from_initiator=True), 0.0) != []


def test_responder_ike_delete_and_retransmit() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    req = _req(r, i2r, 2, (Delete(ProtocolId.IKE),), from_initiator=True)
    (out,) = resp.receive(req, 0.0)
    assert decrypt_message(out, r2i).payloads == ()
    assert resp.state is ResponderState.CLOSED
    assert resp.take_events() == [InfoEvent("ike_deleted")]


# -- the initiator receives the responder's requests ------------------------------------------


def test_initiator_liveness_child_delete_retransmit_and_window() -> None:
    ini, _resp, _ = _established()
    r = ini.result
    assert r is not None
    i2r, r2i = _ciphers(r)
    assert ini.receive(_req(r, r2i, 1, from_initiator=False), 0.0) == []  # expects mid 0
    (live,) = ini.receive(_req(r, r2i, 0, from_initiator=False), 0.0)
    ans = decrypt_message(live, i2r)
    assert ans.response and ans.initiator and ans.message_id == 0 and ans.payloads == ()
    assert ini.take_events() == [InfoEvent("liveness")]
    d = Delete(ProtocolId.ESP, 4, (r.child.spi_out,))
    (out,) = ini.receive(_req(r, r2i, 1, (d,), from_initiator=False), 0.0)
    assert decrypt_message(out, i2r).payloads == (Delete(ProtocolId.ESP, 4, (r.child.spi_in,)),)
    assert ini.take_events() == [InfoEvent("child_deleted", r.child.spi_in, r.child.spi_out)]
    assert ini.receive(_req(r, r2i, 1, (d,), from_initiator=False), 0.0) == [out]
    assert ini.receive(_req(r, r2i, 5, from_initiator=False), 0.0) == []
    assert ini.take_events() == []
    (bye,) = ini.receive(_req(r, r2i, 2, (Delete(ProtocolId.IKE),), from_initiator=False), 0.0)
    assert decrypt_message(bye, i2r).payloads == ()
    assert ini.state is State.CLOSED
    assert ini.take_events() == [InfoEvent("ike_deleted")]


def test_unknown_child_spi_gets_empty_response() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    d = Delete(ProtocolId.ESP, 4, (b"\x01\x02\x03\x04",))
    (out,) = resp.receive(_req(r, i2r, 2, (d,), from_initiator=True), 0.0)
    assert decrypt_message(out, r2i).payloads == ()
    assert resp.take_events() == [InfoEvent("liveness")]


# -- our own Delete of the IKE SA --------------------------------------------------------------


def test_initiator_delete_ike_is_answered_by_responder() -> None:
    ini, resp, _ = _established()
    (req,) = ini.delete_ike(1.0)
    assert ini.delete_ike(1.0) == [req]  # still outstanding: same request again
    (ans,) = resp.receive(req, 1.0)
    assert resp.state is ResponderState.CLOSED
    assert resp.receive(req, 1.0) == []  # closed: nothing more
    assert ini.receive(ans, 1.0) == []
    assert ini.state is State.CLOSED
    assert ini.take_events() == [InfoEvent("ike_deleted")]
    assert ini.delete_ike(2.0) == []


def test_responder_delete_ike_is_answered_by_initiator() -> None:
    ini, resp, _ = _established()
    (req,) = resp.delete_ike(1.0)
    (ans,) = ini.receive(req, 1.0)
    assert ini.state is State.CLOSED
    assert ini.take_events() == [InfoEvent("ike_deleted")]
    assert resp.receive(ans, 1.0) == []
    assert resp.state is ResponderState.CLOSED


def test_response_of_another_ike_sa_is_dropped() -> None:
    ini, resp, _ = _established()
    (req,) = ini.delete_ike(1.0)
    (ans,) = resp.receive(req, 1.0)
    ini2, _resp2, _ = _established()
    assert ini2.receive(ans, 1.0) == []  # answers no request of this instance
    assert ini2.state is State.ESTABLISHED


def test_delete_ike_before_established_sends_nothing() -> None:
    ini, resp = _pair()
    assert ini.delete_ike(0.0) == []
    assert resp.delete_ike(0.0) == []
