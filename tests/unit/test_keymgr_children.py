"""keymgr with several Child SAs per connection (RFC 7296 §1.3.1), in process: the real
Keymgr main loop and operator API (mTLS on a unix socket) over the fake worker of
tests/unit/test_keymgr_api.py, with our own core as the peer.

Responder connection: the peer creates child "net2" after IKE_AUTH; keymgr installs it with
its own reqid and SPD entry, lists both children by name, terminates "net2" alone through the
API (the peer sees an INFORMATIONAL Delete of exactly that Child SA; the IKE SA and "net1"
stay), then creates "net2" again itself on the operator's Initiate. Initiator connection:
keymgr creates its start child right after IKE_AUTH. Unknown children get NOT_FOUND.
"""

from __future__ import annotations

import pathlib
import queue
import secrets
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from services.core.ike.child import ChildPolicy
from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, InitiatorConfig, State
from services.core.ike.informational import InfoSession
from services.core.ike.message import decode_header
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.sa import Direction
from services.dataplane.client import IkeDatagram
from services.keymgr import ctl
from services.keymgr.api import ApiServer
from services.keymgr.config import ChildConfig, Connection
from services.keymgr.daemon import Keymgr
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import tls
from tests.unit.test_keymgr_api import WAIT, FakeClient, Watcher, pki, wait_for

__all__ = ["pki"]  # the module-scoped PKI fixture

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.9"
NET1 = ("10.1.0.0/24", "10.2.0.0/24")  # keymgr's side, the peer's side
NET2 = ("10.3.0.0/24", "10.4.0.0/24")
CHILDREN = (
    ChildConfig("net1", local_ts=NET1[0], remote_ts=NET1[1]),
    ChildConfig("net2", local_ts=NET2[0], remote_ts=NET2[1], start_action="start"),
)


def _peer_policies() -> tuple[ChildPolicy, ...]:
    return (
        ChildPolicy.of_ranges("net1", ("10.2.0.0", "10.2.0.255"), ("10.1.0.0", "10.1.0.255")),
        ChildPolicy.of_ranges("net2", ("10.4.0.0", "10.4.0.255"), ("10.3.0.0", "10.3.0.255")),
    )


class Lab:
    def __init__(self, tmp: pathlib.Path, pki: pathlib.Path) -> None:
        self.psk = secrets.token_bytes(32)
        f = tmp / "psk"
        f.write_bytes(b"0x" + self.psk.hex().encode())
        conns = (
            Connection(
                "dial", A, C, f, NET1[0], NET1[1], start_action="start", children=CHILDREN
            ),
            Connection(
                "resp", A, B, f, NET1[0], NET1[1], remote_id=B, start_action="respond",
                children=CHILDREN,
            ),
        )  # fmt: skip
        self.client = FakeClient()
        self.km = Keymgr(self.client, conns)  # type: ignore[arg-type]
        self.sock = tmp / "api.sock"
        self.server = ApiServer.with_tls(self.km, f"unix:{self.sock}", pki, "keymgr")
        self.server.start()
        self.thread = threading.Thread(target=self.km.run, daemon=True)
        self.thread.start()
        self.channel = tls.secure_channel(
            f"unix:{self.sock}", pki, server_name="keymgr", client_name="admin"
        )
        self.stub = pb_grpc.KeyManagerStub(self.channel)
        self.punt = self.client.punt_stream

    def close(self) -> None:
        self.km.stop()
        self.thread.join(timeout=10)
        self.server.stop()
        self.channel.close()

    def shuttle(self, x: Ikev2Initiator | Ikev2Responder, remote: str, out: list[bytes]) -> int:
        """Carry the peer's datagrams to keymgr and keymgr's (to ``remote``) back until both
        are quiet; returns how many datagrams keymgr sent."""
        sent = 0
        for _ in range(8):
            port = NAT_T_PORT if _floated(x) else 500
            for data in out:
                self.punt.inbox.put(IkeDatagram(A, port, remote, port, data))
            out = []
            try:
                while True:
                    r = self.punt.out.get(timeout=0.5)
                    if r.remote_addr != remote:
                        continue
                    sent += 1
                    if isinstance(x, Ikev2Initiator):
                        out += x.receive(r.data, time.monotonic())
                    else:
                        rp = (bytes(4), r.local_port)
                        out += x.receive(r.data, time.monotonic(), remote=rp, local=rp)
            except queue.Empty:
                pass
            if not out:
                return sent
        return sent


def _floated(x: Ikev2Initiator | Ikev2Responder) -> bool:
    return x.port_float if isinstance(x, Ikev2Initiator) else x.nat_t


@pytest.fixture
def lab(tmp_path: pathlib.Path, pki: pathlib.Path) -> Iterator[Lab]:
    a = Lab(tmp_path, pki)
    try:
        yield a
    finally:
        a.close()


def _info(x: Ikev2Initiator | Ikev2Responder) -> InfoSession:
    info = x.info
    assert info is not None
    return info


def _children(lab: Lab, conn: str) -> list[pb.ChildSaInfo]:
    req = pb.ListChildSasRequest(connection=conn)
    return list(lab.stub.ListChildSas(req, timeout=WAIT).child_sas)


def test_responder_children_created_listed_terminated_and_initiated(lab: Lab) -> None:
    w = Watcher(lab.stub)
    try:
        cfg = InitiatorConfig(
            local_addr=B,
            remote_addr=A,
            psk=lab.psk,
            ts_local=("10.2.0.0", "10.2.0.255"),
            ts_remote=("10.1.0.0", "10.1.0.255"),
        )
        peer = Ikev2Initiator(cfg, now=time.monotonic())
        lab.shuttle(peer, B, peer.start(time.monotonic()))
        assert peer.state is State.ESTABLISHED and peer.result is not None
        info = _info(peer)
        info.configure_children(_peer_policies(), first="net1")
        w.until(pb.KEYMGR_EVENT_KIND_CHILD_UP)
        # the peer creates net2 (CREATE_CHILD_SA): keymgr answers and installs it
        lab.shuttle(peer, B, info.create_child(time.monotonic(), info.policies[1]))
        (created,) = [e for e in peer.take_events() if e.kind == "child_created"]
        assert created.child is not None and created.name == "net2"
        up2 = w.until(pb.KEYMGR_EVENT_KIND_CHILD_UP)[-1]
        assert up2.child == "net2" and up2.spi_in == created.child.spi_out.hex()
        listed = _children(lab, "resp")
        assert sorted(c.name for c in listed) == ["net1", "net2"]
        by = {c.name: c for c in listed}
        assert list(by["net2"].local_ts) == [NET2[0]] and list(by["net2"].remote_ts) == [NET2[1]]
        assert list(by["net1"].local_ts) == [NET1[0]]
        assert by["net1"].reqid != by["net2"].reqid
        assert by["net1"].ike_sa_id == by["net2"].ike_sa_id != 0
        # what the worker got: two pairs, net2's under its own reqid and selectors
        sas = {(s.spi, s.direction): s for s in lab.client.sas}
        s2 = sas[(int(by["net2"].spi_in, 16), Direction.INBOUND)]
        assert s2.reqid == by["net2"].reqid and len(lab.client.sas) == 4
        text = ctl.format_sas(
            lab.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas, listed
        )
        assert "  net1: INSTALLED" in text and "  net2: INSTALLED" in text

        # terminate net2 only: an INFORMATIONAL Delete of its SPI reaches the peer
        t = lab.stub.Terminate(
            pb.TerminateRequest(child_sa=pb.ChildSaRef(connection="resp", child="net2")),
            timeout=WAIT,
        )
        assert t.child_sas == 1 and t.ike_sas == 0
        lab.shuttle(peer, B, [])
        ev = peer.take_events()
        assert [(e.kind, e.spi_out) for e in ev] == [
            ("child_deleted", bytes.fromhex(by["net2"].spi_in))
        ]
        down = w.until(pb.KEYMGR_EVENT_KIND_CHILD_DOWN)[-1]
        assert down.child == "net2"
        wait_for(lambda: [c.name for c in _children(lab, "resp")] == ["net1"], "net1 only")
        assert len(lab.client.sas) == 2 and peer.state is State.ESTABLISHED
        assert len(info.children) == 1

        # the operator creates net2 again, from keymgr's side of the responder IKE SA
        r = lab.stub.Initiate(pb.InitiateRequest(connection="resp", child="net2"), timeout=WAIT)
        assert r.started, r.detail
        lab.shuttle(peer, B, [])
        (again,) = [e for e in peer.take_events() if e.kind == "child_created"]
        assert again.name == "net2" and not again.initiated
        w.until(pb.KEYMGR_EVENT_KIND_CHILD_UP)
        wait_for(lambda: len(_children(lab, "resp")) == 2, "net2 back")
        r = lab.stub.Initiate(pb.InitiateRequest(connection="resp", child="net2"), timeout=WAIT)
        assert not r.started and "already up" in r.detail

        # unknown children: NOT_FOUND
        for req in (
            pb.TerminateRequest(child_sa=pb.ChildSaRef(connection="resp", child="net9")),
            pb.TerminateRequest(child_sa=pb.ChildSaRef(spi_in=0x1234)),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                lab.stub.Terminate(req, timeout=WAIT)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as ei:
            lab.stub.Initiate(pb.InitiateRequest(connection="resp", child="x"), timeout=WAIT)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        w.close()


def _dial_ike_auth(lab: Lab, policies: tuple[ChildPolicy, ...] | None) -> Ikev2Responder:
    """Answer keymgr's IKE_SA_INIT and IKE_AUTH of connection "dial" with our responder
    (whose children, when given, are configured as soon as its IKE SA is up) and carry on
    until keymgr is quiet."""
    cfg = ResponderConfig(
        local_addr=C,
        psk=lab.psk,
        ts_local=("10.2.0.0", "10.2.0.255"),
        ts_remote=("10.1.0.0", "10.1.0.255"),
        remote_id=A,
    )
    peer = Ikev2Responder(cfg, now=time.monotonic())
    first = lab.punt.out.get(timeout=WAIT)  # keymgr's IKE_SA_INIT towards C
    assert first.remote_addr == C and decode_header(first.data).message_id == 0
    rp = (bytes(4), 500)
    out = peer.receive(first.data, time.monotonic(), remote=rp, local=rp)
    configured = False
    for _ in range(6):
        port = NAT_T_PORT if peer.nat_t else 500
        for data in out:
            lab.punt.inbox.put(IkeDatagram(A, port, C, port, data))
        try:
            r = lab.punt.out.get(timeout=2.0)
        except queue.Empty:
            break
        out = peer.receive(r.data, time.monotonic(), remote=(bytes(4), r.local_port), local=rp)
        if peer.state is ResponderState.ESTABLISHED and not configured and policies:
            _info(peer).configure_children(policies, first="net1")
            configured = True
    assert peer.state is ResponderState.ESTABLISHED
    lab.shuttle(peer, C, out)
    return peer


def test_initiator_creates_its_start_children_after_ike_auth(lab: Lab) -> None:
    peer = _dial_ike_auth(lab, _peer_policies())
    (created,) = [e for e in peer.take_events() if e.kind == "child_created"]
    assert created.name == "net2" and created.child is not None
    wait_for(lambda: len(_children(lab, "dial")) == 2, "both children of dial")
    by = {c.name: c for c in _children(lab, "dial")}
    assert by["net2"].spi_out == created.child.spi_in.hex()
    assert list(by["net2"].remote_ts) == [NET2[1]]


def test_a_refused_child_is_reported_and_the_ike_sa_lives_on(lab: Lab) -> None:
    w = Watcher(lab.stub)
    try:
        peer = _dial_ike_auth(lab, None)  # the peer has no further children: refused
        failed = w.until(pb.KEYMGR_EVENT_KIND_NEGOTIATION_FAILED)[-1]
        assert failed.child == "net2" and failed.connection == "dial"
        assert "NO_ADDITIONAL_SAS" in failed.reason and "no further Child SA" in failed.reason
        assert [c.name for c in _children(lab, "dial")] == ["net1"]
        assert peer.state is ResponderState.ESTABLISHED and len(_info(peer).children) == 1
        sas = lab.stub.ListIkeSas(pb.ListIkeSasRequest(connection="dial"), timeout=WAIT)
        assert [s.state for s in sas.ike_sas] == ["established"]
    finally:
        w.close()
