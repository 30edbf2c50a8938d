"""A worker sends NAT keepalives (RFC 3948 §2.3, §4) on an idle ESP-in-UDP SA: the peer worker
counts them and tshark dissects them as NAT-keepalive."""

from __future__ import annotations

import dataclasses
import time

import pytest

from services.core.sa import Direction
from services.dataplane.lab import Encap, Lab, SaProfile, make_sa_set
from tests.netns import tshark as ts

pytestmark = pytest.mark.netns


def test_idle_udp_encapsulated_sa_sends_keepalives(netns_lab: Lab) -> None:
    sa_set = make_sa_set(SaProfile(encap=Encap.ESP_UDP))
    netns_lab.clear_sas()
    a, b = netns_lab.nodes
    for node in netns_lab.nodes:
        cfgs = [
            dataclasses.replace(c, encap=dataclasses.replace(c.encap, keepalive_interval=1.0))
            if c.direction == Direction.OUTBOUND and c.encap is not None
            else c
            for c in sa_set.for_side(node.label)
        ]
        netns_lab.install_sas(node, cfgs)
        netns_lab.replace_spd(node, list(sa_set.spd_for_side(node.label)))
    before = b.dp().stats().keepalives
    with netns_lab.capturing(a, "keepalive") as cap:
        time.sleep(3.5)
    pcap = cap.path
    after = b.dp().stats().keepalives
    assert after - before >= 2, f"peer counted {after - before} keepalives in 3.5 s"
    if ts.available():
        rows = ts.run_fields(pcap, ["udp.srcport", "udp.dstport"], display_filter="udpencap")
        ka = ts.run_fields(pcap, ["frame.number"], display_filter="udpencap.nat_keepalive")
        assert len(ka) >= 4, "tshark saw fewer keepalives than two per direction"
        assert all(r["udp.srcport"] == ["4500"] for r in rows)
