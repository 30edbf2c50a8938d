"""I/O shell for the sans-IO IKEv2 initiator (RFC 7296 §1.2; RFC 3948 §2.2 non-ESP marker).

Run inside a network namespace as ``python -m tests.netns.ike_initiator_peer CONFIG.json``:
CONFIG (a 0600 file, since it holds the PSK as hex) gives local/remote addresses, traffic
selectors and a timeout. Sends IKE_SA_INIT from UDP 500 to the peer's 500; once the initiator
says ``port_float``, sends from UDP 4500 to the peer's 4500 with the 4-octet non-ESP marker and
strips it from what arrives there. With ``"ping": true`` it then sends one ICMP echo request
through the new Child SA (ESP in UDP 4500, RFC 3948) and checks the echo reply. Prints one
JSON object: state, failure reason, IKE and Child SA SPIs (hex), traffic selectors, echo
result. No key is ever printed.
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

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core.ike.exchange import (
    NAT_T_PORT,
    NON_ESP_MARKER,
    ChildSaResult,
    Ikev2Initiator,
    InitiatorConfig,
    State,
)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(src: str, dst: str, ident: int, payload: bytes) -> bytes:
    """IPv4 ICMP echo request (RFC 792) from ``src`` to ``dst``."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        ident,
        0,
        64,
        1,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + icmp


def _esp_seal(key: bytes, spi: bytes, seq: int, inner: bytes) -> bytes:
    """RFC 4303 + RFC 4106 ESP (tunnel mode, Next Header 4), written here from the RFCs."""
    pad = (-(len(inner) + 2)) % 4
    pt = inner + bytes(range(1, pad + 1)) + bytes((pad, 4))
    iv = secrets.token_bytes(8)
    head = spi + struct.pack("!I", seq)
    return head + iv + AESGCM(key[:-4]).encrypt(key[-4:] + iv, pt, head)


def _esp_open(key: bytes, spi: bytes, packet: bytes) -> bytes | None:
    if len(packet) < 8 + 8 + 16 or packet[:4] != spi:
        return None
    iv = packet[8:16]
    try:
        pt = AESGCM(key[:-4]).decrypt(key[-4:] + iv, packet[16:], packet[:8])
    except Exception:
        return None
    pad, nxt = pt[-2], pt[-1]
    return pt[: len(pt) - 2 - pad] if nxt == 4 else None


def ping_through_tunnel(
    sock: socket.socket, remote: str, child: ChildSaResult, src: str, dst: str
) -> dict[str, Any]:
    """Send one ICMP echo request in ESP-in-UDP (RFC 3948) with the Child SA's
    initiator->responder key/SPI; wait for the echo reply under the responder->initiator
    key/SPI. Proves both directions of the derived Child SA keys against the peer."""
    ident = secrets.randbelow(0xFFFF)
    payload = b"ike-exchange-test"
    esp = _esp_seal(child.keys.encr_i, child.spi_out, 1, _echo_request(src, dst, ident, payload))
    sock.sendto(esp, (remote, NAT_T_PORT))
    deadline = time.monotonic() + 5.0
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, _addr = sock.recvfrom(65535)
        if data[:4] == NON_ESP_MARKER or len(data) == 1:
            continue
        inner = _esp_open(child.keys.encr_r, child.spi_in, data)
        if inner is None or len(inner) < 28:
            continue
        ok = (
            inner[9] == 1
            and inner[12:16] == ipaddress.IPv4Address(dst).packed
            and inner[16:20] == ipaddress.IPv4Address(src).packed
            and inner[20] == 0  # echo reply
            and struct.unpack("!H", inner[24:26])[0] == ident
            and inner[28:] == payload
        )
        return {"echo_reply": ok}
    return {"echo_reply": False}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    config = InitiatorConfig(
        local_addr=cfg["local"],
        remote_addr=cfg["remote"],
        psk=bytes.fromhex(cfg["psk_hex"]),
        ts_local=(cfg["ts_local"], cfg["ts_local"]),
        ts_remote=(cfg["ts_remote"], cfg["ts_remote"]),
    )
    s500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s500.bind((config.local_addr, config.local_port))
    s4500.bind((config.local_addr, NAT_T_PORT))
    sent = {"500": 0, "4500": 0}

    def send(ini: Ikev2Initiator, datagrams: list[bytes]) -> None:
        for d in datagrams:
            if ini.port_float:
                s4500.sendto(NON_ESP_MARKER + d, (config.remote_addr, NAT_T_PORT))
                sent["4500"] += 1
            else:
                s500.sendto(d, (config.remote_addr, config.remote_port))
                sent["500"] += 1

    try:
        now = time.monotonic()
        ini = Ikev2Initiator(config, now=now)
        send(ini, ini.start(now))
        deadline = now + float(cfg.get("timeout", 20.0))
        while ini.state in (State.SA_INIT_SENT, State.AUTH_SENT):
            now = time.monotonic()
            if now > deadline:
                break
            nxt = ini.next_timeout
            wait = min(deadline - now, max(0.0, (nxt if nxt is not None else deadline) - now))
            ready, _, _ = select.select([s500, s4500], [], [], wait)
            for s in ready:
                data, _addr = s.recvfrom(65535)
                if s is s4500:
                    if data[:4] != NON_ESP_MARKER:
                        continue  # ESP in UDP: not ours to handle here
                    data = data[4:]
                send(ini, ini.receive(data, time.monotonic()))
            send(ini, ini.on_timer(time.monotonic()))
        ping: dict[str, Any] = {}
        if ini.result is not None and cfg.get("ping"):
            ping = ping_through_tunnel(
                s4500, config.remote_addr, ini.result.child, cfg["ts_local"], cfg["ts_remote"]
            )
    finally:
        s500.close()
        s4500.close()
    out: dict[str, Any] = {
        "state": ini.state.value,
        "reason": ini.failure_reason,
        "spi_i": ini.spi_i.hex(),
        "port_float": ini.port_float,
        "sent": sent,
        **ping,
    }
    r = ini.result
    if r is not None:
        out.update(
            spi_r=r.spi_r.hex(),
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
