"""RFC 7383 fragmentation after IKE_AUTH, in memory: when both sides announced
IKEV2_FRAGMENTATION_SUPPORTED, CREATE_CHILD_SA and INFORMATIONAL messages larger than the limit
go out as SKF fragments (each within the limit) and are reassembled on the other side; a
retransmitted fragmented request is answered once (on its first fragment); without the
agreement nothing is fragmented and SKF fragments are dropped.

The datagrams are read back with the core's own codec only for their outer header and payload
type; the Child SA both sides derive from the fragmented exchange must agree.
"""

from __future__ import annotations

from services.core.ike.exchange import (
    Ikev2Initiator,
    InitiatorConfig,
    fragment_limit,
)
from services.core.ike.message import SKF, decode_message
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.ike.suites import parse_esp_list
from tests.unit.test_ike_suites import PSK, _rand

I_ADDR, R_ADDR = "192.0.2.1", "192.0.2.2"
TS_I, TS_R = "198.51.100.1", "203.0.113.1"
# a PFS group with a 512-octet KE makes every CREATE_CHILD_SA message exceed 576 octets
ESP = ["aes256gcm16-modp4096"]


def _pair(frag_i: int, frag_r: int) -> tuple[Ikev2Initiator, Ikev2Responder]:
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr=I_ADDR,
            remote_addr=R_ADDR,
            psk=PSK,
            ts_local=(TS_I, TS_I),
            ts_remote=(TS_R, TS_R),
            esp_suites=parse_esp_list(ESP),
            fragment_size=frag_i,
        ),
        now=0.0,
        rand=_rand(b"fi"),
    )
    resp = Ikev2Responder(
        ResponderConfig(
            local_addr=R_ADDR,
            psk=PSK,
            ts_local=(TS_R, TS_R),
            ts_remote=(TS_I, TS_I),
            remote_id=I_ADDR,
            remote_addr=I_ADDR,
            esp_suites=parse_esp_list(ESP),
            fragment_size=frag_r,
        ),
        now=0.0,
        rand=_rand(b"fr"),
    )
    out = ini.start(0.0)
    for _ in range(6):
        back = [x for d in out for x in resp.receive(d, 0.0)]
        out = [x for d in back for x in ini.receive(d, 0.0)]
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    assert ini.info is not None and resp.info is not None
    return ini, resp


def _is_fragment(d: bytes) -> bool:
    msg = decode_message(d)
    return bool(msg.payloads) and isinstance(msg.payloads[-1], SKF)


def test_child_rekey_with_a_large_ke_is_fragmented_both_ways_and_reassembled() -> None:
    ini, resp = _pair(576, 576)
    limit = fragment_limit(576, R_ADDR, nat_t=True)  # both moved to UDP 4500 (NAT-D)
    assert limit is not None
    info_i, info_r = ini.info, resp.info
    assert info_i is not None and info_r is not None
    assert info_i.fragment_size == info_r.fragment_size == limit
    req = info_i.rekey_child(1.0)
    assert len(req) > 1 and all(_is_fragment(d) and len(d) <= limit for d in req)
    # all but the last fragment: nothing yet; the last completes the request
    for d in req[:-1]:
        assert resp.receive(d, 1.0) == []
    ans = resp.receive(req[-1], 1.0)
    assert len(ans) > 1 and all(_is_fragment(d) and len(d) <= limit for d in ans)
    follow: list[bytes] = []
    for d in ans:
        follow += ini.receive(d, 1.0)
    a = [e for e in ini.take_events() if e.kind == "child_rekeyed"]
    b = [e for e in resp.take_events() if e.kind == "child_rekeyed"]
    assert len(a) == len(b) == 1 and a[0].child is not None and b[0].child is not None
    assert a[0].child.keys == b[0].child.keys and a[0].child.dh == 16
    # the Delete of the old Child SA is small: one whole SK message
    (delete,) = follow
    assert not _is_fragment(delete)
    (ack,) = resp.receive(delete, 1.0)
    assert ini.receive(ack, 1.0) == [] and len(info_i.children) == 1


def test_retransmitted_fragmented_request_is_answered_once() -> None:
    ini, resp = _pair(576, 576)
    info_i = ini.info
    assert info_i is not None
    req = info_i.rekey_child(1.0)
    ans: list[bytes] = []
    for d in req:
        ans += resp.receive(d, 1.0)
    assert len(ans) > 1
    resp.take_events()
    again: list[list[bytes]] = [resp.receive(d, 1.0) for d in req]  # the whole set again
    assert again[0] == ans and all(x == [] for x in again[1:])
    assert resp.take_events() == []  # no second Child SA


def test_nothing_fragmented_without_the_agreement() -> None:
    ini, resp = _pair(576, 0)  # the responder does not announce fragmentation
    info_i, info_r = ini.info, resp.info
    assert info_i is not None and info_r is not None
    assert info_i.fragment_size is None and info_r.fragment_size is None
    (req,) = info_i.rekey_child(1.0)
    assert not _is_fragment(req) and len(req) > 576
    (ans,) = resp.receive(req, 1.0)
    assert not _is_fragment(ans)
    ini.receive(ans, 1.0)
    assert [e.kind for e in ini.take_events()] == ["child_rekeyed"]


def test_fragments_are_dropped_when_not_agreed() -> None:
    frag_ini, _ = _pair(576, 576)
    plain_ini, plain_resp = _pair(576, 0)
    # same seeds: the same IKE SA keys on both pairs except for the fragmentation agreement
    assert frag_ini.result is not None and plain_ini.result is not None
    assert frag_ini.result.keys == plain_ini.result.keys
    info = frag_ini.info
    assert info is not None
    req = info.rekey_child(1.0)
    assert len(req) > 1
    for d in req:
        assert plain_resp.receive(d, 1.0) == []
    assert plain_resp.take_events() == []
