"""I/O shell for the sans-IO IKEv2 responder (RFC 7296 §1.2; RFC 3948 §2.2 non-ESP marker).

Run inside a network namespace as ``python -m tests.netns.ike_responder_peer CONFIG.json``:
CONFIG (a 0600 file, since it holds the PSK as hex) gives the local address, the expected
peer identity, traffic selectors and a timeout. Binds UDP 500 and 4500 on the local address,
prints ``{"ready": true}`` once bound, then feeds every IKE datagram to the responder (on 4500
only those starting with the non-ESP marker, which is stripped) and sends the answers back to
the sender from the socket the request arrived on (re-adding the marker on 4500). When the
responder is ESTABLISHED or FAILED it lingers ``linger`` seconds (to answer retransmissions);
with ``"ping": true`` it then sends one ICMP echo request through the new Child SA in the
responder->initiator direction and checks the reply. Prints one JSON object: state, failure
reason, IKE and Child SA SPIs (hex), traffic selectors, NAT-T, echo result. Never any key.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import secrets
import select
import socket
import struct
import sys
import time
from typing import Any

from services.core.ike.exchange import NAT_T_PORT, NON_ESP_MARKER, ChildSaResult
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from tests.netns.ike_initiator_peer import _echo_request, _esp_open, _esp_seal

_DONE = (ResponderState.ESTABLISHED, ResponderState.FAILED)


def ping_from_responder(
    sock: socket.socket, remote: tuple[str, int], child: ChildSaResult, src: str, dst: str
) -> dict[str, Any]:
    """One ICMP echo request in ESP-in-UDP (RFC 3948) protected with the responder->initiator
    key to the initiator's SPI; the reply must come back under the initiator->responder key to
    our SPI. Proves both directions of the Child SA keys against the peer."""
    ident = secrets.randbelow(0xFFFF)
    payload = b"ike-responder-test"
    esp = _esp_seal(child.keys.encr_r, child.spi_out, 1, _echo_request(src, dst, ident, payload))
    sock.sendto(esp, remote)
    deadline = time.monotonic() + 5.0
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, _addr = sock.recvfrom(65535)
        if data[:4] == NON_ESP_MARKER or len(data) == 1:
            continue
        inner = _esp_open(child.keys.encr_i, child.spi_in, data)
        if inner is None or len(inner) < 28:
            continue
        ok = (
            inner[9] == 1
            and inner[12:16] == ipaddress.IPv4Address(dst).packed
            and inner[16:20] == ipaddress.IPv4Address(src).packed
            and inner[20] == 0
            and struct.unpack("!H", inner[24:26])[0] == ident
            and inner[28:] == payload
        )
        return {"echo_reply": ok}
    return {"echo_reply": False}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    config = ResponderConfig(
        local_addr=cfg["local"],
        psk=bytes.fromhex(cfg["psk_hex"]),
        ts_local=(cfg["ts_local"], cfg["ts_local"]),
        ts_remote=(cfg["ts_remote"], cfg["ts_remote"]),
        remote_id=cfg.get("remote_id"),
    )
    local_ip = ipaddress.IPv4Address(config.local_addr).packed
    s500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    received = {"500": 0, "4500": 0}
    peer4500: tuple[str, int] | None = None
    ping: dict[str, Any] = {}
    try:
        s500.bind((config.local_addr, 500))
        s4500.bind((config.local_addr, NAT_T_PORT))
        print(json.dumps({"ready": True}), flush=True)
        now = time.monotonic()
        resp = Ikev2Responder(config, now=now)
        deadline = now + float(cfg.get("timeout", 20.0))
        linger_until: float | None = None
        while True:
            now = time.monotonic()
            if now > deadline or (linger_until is not None and now > linger_until):
                break
            if linger_until is None and resp.state in _DONE:
                linger_until = now + float(cfg.get("linger", 1.0))
            end = deadline if linger_until is None else min(deadline, linger_until)
            ready, _, _ = select.select([s500, s4500], [], [], max(0.0, end - now))
            for s in ready:
                data, addr = s.recvfrom(65535)
                on4500 = s is s4500
                if on4500:
                    if data[:4] != NON_ESP_MARKER:
                        continue  # ESP in UDP or a NAT keepalive: not IKE
                    data = data[4:]
                    peer4500 = (addr[0], addr[1])
                received["4500" if on4500 else "500"] += 1
                port = NAT_T_PORT if on4500 else 500
                replies = resp.receive(
                    data,
                    time.monotonic(),
                    remote=(ipaddress.IPv4Address(addr[0]).packed, addr[1]),
                    local=(local_ip, port),
                )
                for d in replies:
                    s.sendto(NON_ESP_MARKER + d if on4500 else d, addr)
        r = resp.result
        if r is not None and cfg.get("ping") and peer4500 is not None:
            ping = ping_from_responder(s4500, peer4500, r.child, cfg["ts_local"], cfg["ts_remote"])
    finally:
        s500.close()
        s4500.close()
    out: dict[str, Any] = {
        "state": resp.state.value,
        "reason": resp.failure_reason,
        "spi_i": resp.spi_i.hex(),
        "spi_r": resp.spi_r.hex(),
        "nat_t": resp.nat_t,
        "received": received,
        "dropped": resp.dropped,
        **ping,
    }
    if r is not None:
        out.update(
            child_spi_in=r.child.spi_in.hex(),
            child_spi_out=r.child.spi_out.hex(),
            child_encr_key_lens=[len(r.child.keys.encr_i), len(r.child.keys.encr_r)],
            ts_i=[str(ipaddress.IPv4Address(s.start_address)) for s in r.child.ts_i],
            ts_r=[str(ipaddress.IPv4Address(s.start_address)) for s in r.child.ts_r],
        )
    return out


def main() -> int:
    cfg = json.loads(pathlib.Path(sys.argv[1]).read_text())
    print(json.dumps(run(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
