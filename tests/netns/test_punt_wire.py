"""IKE punt/inject over the real wire (RFC 7296 §2 UDP 500, RFC 3948 §2.2 non-ESP marker on
4500): what keymgr injects through worker A arrives at worker B's sockets and is punted to B's
client with the marker stripped."""

from __future__ import annotations

import queue
import secrets
import threading

import pytest

from services.dataplane.convert import IkeDatagram
from services.dataplane.lab import SIDE_A, SIDE_B, Lab

pytestmark = pytest.mark.netns


def _collect(stream: object, out: queue.Queue[IkeDatagram]) -> None:
    try:
        for d in stream:  # type: ignore[attr-defined]
            out.put(d)
    except Exception:  # the stream is cancelled at the end of the test
        return


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port", [500, 4500])
def test_injected_ike_is_punted_by_the_peer(netns_lab: Lab, family: int, port: int) -> None:
    a, b = netns_lab.nodes
    src, dst = SIDE_A.outer(family), SIDE_B.outer(family)
    rx: queue.Queue[IkeDatagram] = queue.Queue()
    b_stream = b.dp().punt()
    b_stream.wait_connected()
    t = threading.Thread(target=_collect, args=(b_stream, rx), daemon=True)
    t.start()
    a_stream = a.dp().punt()
    try:
        a_stream.wait_connected()
        payload = secrets.token_bytes(8) + bytes(20) + b"IKE test"  # an IKE-sized header
        a_stream.send(IkeDatagram(src, port, dst, port, payload))
        got = rx.get(timeout=10)
        assert got.data == payload  # on 4500 the non-ESP marker went on the wire and came off
        assert (got.local_addr, got.local_port) == (dst, port)
        assert (got.remote_addr, got.remote_port) == (src, port)
    finally:
        a_stream.cancel()
        b_stream.cancel()
        t.join(timeout=5)
    assert b.dp().stats().internal_errors == 0
