"""keymgr (responder, behind our worker) attacked with malformed IKE from the peer's namespace.

RFC 7296 §2.5 (versions, critical bit), §3.1/§3.2 (header and payload lengths), §2.21 (error
handling), §1.4.1 (Delete); RFC 3948 §2.2 (non-ESP marker on UDP 4500); RFC 8031 §2.2
(all-zero X25519 secret).

The lab is the one of tests/netns/test_keymgr_responder_strongswan.py (namespaces 'kmr...',
worker in A, keymgr on the host answering for B). Before strongSwan starts, this module runs
itself inside namespace B as a peer (``python -m tests.netns.test_keymgr_malformed CONFIG``)
and sends, to UDP 500 and (with the non-ESP marker) to UDP 4500 of our worker: empty, short
and truncated datagrams, bad header and payload lengths, an unknown critical payload, an IKEv1
Main Mode message, IKEv1 payload types in an IKEv2 message (non-critical and critical), KE in
unsupported groups, invalid X25519 points, random bytes, responses nobody asked for, and
datagrams up to the largest UDP payload; on 4500 also garbage without the marker (ESP with
unknown SPIs). Then a valid IKE_SA_INIT followed by garbage IKE_AUTH (truncated, bit-flipped,
wrong key), then the genuine IKE_AUTH (the half-open SA must not be stalled by the garbage), and
once that IKE SA is up: repeated INFORMATIONAL Deletes (unknown SPIs, the Child SA twice, the IKE
SA three times, each also retransmitted) and forged encrypted messages.

Asserts: exactly the datagrams that deserve an answer get one (INVALID_KE_PAYLOAD naming group
31 for a KE in another group; an IKE_SA_INIT response where the IKEv1 payload types are not
critical), the Deletes are answered as RFC 7296 §1.4.1 says, keymgr and the worker are alive,
the worker counted no internal error and dropped the marker-less garbage as ESP, keymgr's log
shows the drops; finally strongSwan initiates to keymgr, its Child SA is installed and ping
works through the tunnel. Everything is cleaned up also on failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import bench_strongswan as bsw
from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId
from services.core.ike.exchange import (
    NAT_T_PORT,
    NON_ESP_MARKER,
    Ikev2Initiator,
    InitiatorConfig,
    State,
)
from services.core.ike.message import (
    KE,
    Delete,
    IkeDecodeError,
    Message,
    Notify,
    UnknownPayload,
    decode_message,
    encode_message,
)
from services.core.ike.sk import SkCipher, SkError, decrypt_message, encrypt_message
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import REPO, _env, open_lab

GCM = 20
_MAX_UDP = 65507  # largest UDP payload over IPv4

# What keymgr must answer (label -> notify type of the answer, or "sa_init" for a real
# IKE_SA_INIT response); every other label must get nothing back.
ANSWERED: dict[str, NotifyType | str] = {
    "ke_unsupported_group": NotifyType.INVALID_KE_PAYLOAD,
    "ke_ecp_group_invalid_point": NotifyType.INVALID_KE_PAYLOAD,
    "ikev1_types_not_critical": "sa_init",
    # RFC 7296 §2.5: the critical bit on a type we do not know -> UNSUPPORTED_CRITICAL_PAYLOAD
    # naming the type; a higher major version -> INVALID_MAJOR_VERSION (version 2.0 in the
    # answer's header)
    "unknown_critical_payload": NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
    "ikev1_types_critical": NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
    "ikev3_header": NotifyType.INVALID_MAJOR_VERSION,
}
# Notification Data of those answers (hex): the payload type, or nothing
ANSWER_DATA = {
    "ke_unsupported_group": ["001f"],
    "ke_ecp_group_invalid_point": ["001f"],
    "unknown_critical_payload": ["c8"],
    "ikev1_types_critical": ["04"],
    "ikev3_header": [""],
}
# Labels whose IKE header itself is malformed (keymgr logs "malformed IKE datagram dropped").
BAD_HEADER = {"short", "truncated_1", "truncated_27", "ikev1_main_mode", "ikev3_header"}


# -- the peer (runs inside namespace B) ---------------------------------------------------------


def _garbage(sa_init: bytes) -> list[tuple[str, bytes]]:
    """Malformed IKE datagrams derived from a genuine IKE_SA_INIT; each has its own SPIi."""
    msg = decode_message(sa_init)

    def spi() -> bytes:
        return secrets.token_bytes(8)

    def variant(**kw: Any) -> bytes:
        return encode_message(dataclasses.replace(msg, spi_i=spi(), **kw))

    def with_ke(ke: KE) -> bytes:
        return variant(payloads=tuple(ke if isinstance(p, KE) else p for p in msg.payloads))

    def raw(mutate: Any) -> bytes:
        d = bytearray(spi() + sa_init[8:])
        mutate(d)
        return bytes(d)

    out: list[tuple[str, bytes]] = [
        ("short", b"\x00" * 10),
        ("truncated_1", spi()[:1]),
        ("truncated_27", raw(lambda d: d.__delitem__(slice(27, None)))),
        ("truncated_29", raw(lambda d: d.__delitem__(slice(29, None)))),
        ("truncated_half", raw(lambda d: d.__delitem__(slice(len(d) // 2, None)))),
        ("truncated_last_octet", raw(lambda d: d.__delitem__(slice(-1, None)))),
        ("header_length_huge", raw(lambda d: struct.pack_into("!I", d, 24, 0xFFFFFFFF))),
        ("header_length_short", raw(lambda d: struct.pack_into("!I", d, 24, 28))),
        ("payload_length_huge", raw(lambda d: struct.pack_into("!H", d, 30, 0xFFFF))),
        ("payload_length_zero", raw(lambda d: struct.pack_into("!H", d, 30, 0))),
        ("payload_length_3", raw(lambda d: struct.pack_into("!H", d, 30, 3))),
        ("trailing_junk", raw(lambda d: d.extend(b"junk"))),
        (
            "unknown_critical_payload",
            variant(payloads=(*msg.payloads, UnknownPayload(200, True, b"must understand"))),
        ),
        (
            "ikev1_main_mode",
            spi()
            + bytes(8)
            + bytes((1, 0x10, 2, 0))
            + struct.pack("!II", 0, 60)
            + struct.pack("!BBH", 13, 0, 12)
            + bytes(8)
            + struct.pack("!BBH", 0, 0, 20)
            + bytes(16),
        ),
        ("ikev3_header", raw(lambda d: d.__setitem__(17, 0x30))),
        (
            "ikev1_types_not_critical",
            variant(
                payloads=(
                    UnknownPayload(1, False, bytes(8)),
                    *msg.payloads,
                    UnknownPayload(13, False, b"ikev1 vendor id"),
                )
            ),
        ),
        (
            "ikev1_types_critical",
            variant(payloads=(*msg.payloads, UnknownPayload(4, True, bytes(36)))),
        ),
        ("ke_unsupported_group", with_ke(KE(0xFFFF, b"\x01" * 32))),
        ("ke_ecp_group_invalid_point", with_ke(KE(19, bytes(64)))),
        ("ke_x25519_zero_point", with_ke(KE(31, bytes(32)))),
        ("ke_x25519_low_order_point", with_ke(KE(31, (1).to_bytes(32, "little")))),
        ("ke_x25519_short", with_ke(KE(31, bytes(16)))),
        ("response_flag", variant(response=True, initiator=False)),
        ("oversized_valid_header", raw(lambda d: _grow(d, _MAX_UDP - 4))),
        ("oversized_random", secrets.token_bytes(_MAX_UDP - 4)),
    ]
    for i in range(12):
        out.append((f"random_{i}", secrets.token_bytes(1 + secrets.randbelow(1400))))
    return out


def _grow(d: bytearray, size: int) -> None:
    d.extend(secrets.token_bytes(size - len(d)))
    struct.pack_into("!I", d, 24, len(d))


class _Peer:
    def __init__(self, local: str, remote: str) -> None:
        self.remote = remote
        self.s500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s4500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s500.bind((local, 500))
        self.s4500.bind((local, NAT_T_PORT))

    def send(self, port: int, data: bytes, *, marker: bool = True) -> None:
        if port == NAT_T_PORT:
            self.s4500.sendto((NON_ESP_MARKER if marker else b"") + data, (self.remote, port))
        else:
            self.s500.sendto(data, (self.remote, port))

    def recv(self, quiet: float = 1.0, limit: float = 10.0) -> list[tuple[int, bytes]]:
        """IKE datagrams received until ``quiet`` seconds pass without one."""
        out: list[tuple[int, bytes]] = []
        end = time.monotonic() + limit
        while time.monotonic() < end:
            ready, _, _ = select.select([self.s500, self.s4500], [], [], quiet)
            if not ready:
                break
            for s in ready:
                data = s.recv(65535)
                if s is self.s4500:
                    if data[:4] != NON_ESP_MARKER:
                        continue
                    data = data[4:]
                out.append((500 if s is self.s500 else NAT_T_PORT, data))
        return out

    def close(self) -> None:
        self.s500.close()
        self.s4500.close()


def _establish(peer: _Peer, cfg: InitiatorConfig, result: dict[str, Any]) -> Ikev2Initiator:
    """A genuine IKE_SA_INIT, garbage IKE_AUTHs, then the genuine IKE_AUTH."""
    ini = Ikev2Initiator(cfg, now=time.monotonic())
    for d in ini.start(time.monotonic()):
        peer.send(500, d)
    auth: list[bytes] = []
    for _, d in peer.recv(quiet=3.0):
        auth += ini.receive(d, time.monotonic())
    assert ini.state is State.AUTH_SENT and ini.port_float and len(auth) == 1, ini
    (a,) = auth
    assert ini.result is None and ini._keys is not None
    wrong = SkCipher(GCM, secrets.token_bytes(36), key_bits=256)
    forged = encrypt_message(
        decrypt_message(a, SkCipher(GCM, ini._keys.sk_ei, key_bits=256)), wrong
    )
    bad_auth = [
        a[:-1],
        a[:40],
        a[:-5] + bytes((a[-5] ^ 0x40,)) + a[-4:],
        a + b"\x00" * 16,
        a[:28] + struct.pack("!BBH", 46, 0x80, len(a) - 28) + a[32:],
        *forged,
        a[:24] + struct.pack("!I", len(a) + 200) + a[28:] + secrets.token_bytes(200),
    ]
    for d in bad_auth:
        peer.send(NAT_T_PORT, d)
    result["garbage_auth_answers"] = len(peer.recv(quiet=1.5))
    peer.send(NAT_T_PORT, a)
    for _, d in peer.recv(quiet=2.0):
        ini.receive(d, time.monotonic())
    result["established"] = ini.state is State.ESTABLISHED
    return ini


def _deletes(peer: _Peer, ini: Ikev2Initiator, result: dict[str, Any]) -> None:
    """Repeated INFORMATIONAL Deletes (and forgeries) on the established IKE SA."""
    r = ini.result
    assert r is not None
    i2r = SkCipher(GCM, r.keys.sk_ei, key_bits=256)
    r2i = SkCipher(GCM, r.keys.sk_er, key_bits=256)
    answers: list[dict[str, Any]] = []

    def request(mid: int, payloads: tuple[Delete, ...], *, repeat: int = 2) -> None:
        msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, mid, payloads, initiator=True)
        (d,) = encrypt_message(msg, i2r)
        got: list[list[Any]] = []
        for _ in range(repeat):  # the second is a retransmission (RFC 7296 §2.1)
            peer.send(NAT_T_PORT, d)
            for _, a in peer.recv(quiet=0.7):
                try:
                    m = decrypt_message(a, r2i)
                except (SkError, IkeDecodeError):
                    got.append(["undecryptable"])
                    continue
                got.append(
                    [
                        m.message_id,
                        [
                            [p.protocol_id, [s.hex() for s in p.spis]]
                            for p in m.payloads
                            if isinstance(p, Delete)
                        ],
                    ]
                )
        answers.append({"mid": mid, "answers": got})

    mid = 2
    for _ in range(5):  # Deletes of SPIs keymgr never had
        bogus = tuple(secrets.token_bytes(4) for _ in range(50))
        request(mid, (Delete(ProtocolId.ESP, 4, bogus), Delete(ProtocolId.AH, 4, bogus[:3])))
        mid += 1
    for _ in range(2):  # the Child SA (the initiator's inbound SPI), twice
        request(mid, (Delete(ProtocolId.ESP, 4, (r.child.spi_in,)),))
        mid += 1
    # forgeries: wrong key, a flipped ICV octet, a message ID far ahead
    wrong = SkCipher(GCM, secrets.token_bytes(36), key_bits=256)
    forged = Message(
        r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, mid, (Delete(1),), initiator=True
    )
    (f1,) = encrypt_message(forged, wrong)
    (f2,) = encrypt_message(forged, i2r)
    (f3,) = encrypt_message(dataclasses.replace(forged, message_id=mid + 1000), i2r)
    for d in (f1, f2[:-1] + bytes((f2[-1] ^ 1,)), f3):
        peer.send(NAT_T_PORT, d)
    result["forged_info_answers"] = len(peer.recv(quiet=1.0))
    for _ in range(3):  # the IKE SA, three times (the first closes it)
        request(mid, (Delete(ProtocolId.IKE),))
        mid += 1
    result["deletes"] = answers
    result["child_spi_in"] = r.child.spi_in.hex()
    result["child_spi_out"] = r.child.spi_out.hex()


def peer_main(cfg: dict[str, Any]) -> dict[str, Any]:
    config = InitiatorConfig(
        local_addr=cfg["local"],
        remote_addr=cfg["remote"],
        psk=bytes.fromhex(cfg["psk_hex"]),
        ts_local=(cfg["ts_local"], cfg["ts_local"]),
        ts_remote=(cfg["ts_remote"], cfg["ts_remote"]),
    )
    peer = _Peer(config.local_addr, config.remote_addr)
    result: dict[str, Any] = {}
    try:
        (sa_init,) = Ikev2Initiator(config, now=0.0).start(0.0)
        garbage = _garbage(sa_init)
        labels: dict[str, str] = {}
        for port in (500, NAT_T_PORT):
            for label, d in _garbage(sa_init) if port == NAT_T_PORT else garbage:
                labels[d[:8].hex()] = label
                peer.send(port, d)
                time.sleep(0.01)
        # UDP 4500 without the non-ESP marker: ESP with SPIs nobody has, and a NAT keepalive
        for d in (b"\xff", b"\x00\x00\x00\x01", secrets.token_bytes(100), b"\x01\x02\x03\x04" * 9):
            peer.send(NAT_T_PORT, d, marker=False)
        answers: list[dict[str, Any]] = []
        for port, d in peer.recv(quiet=2.0):
            entry: dict[str, Any] = {"port": port, "label": labels.get(d[:8].hex(), "?")}
            try:
                m = decode_message(d)
                entry["types"] = [
                    p.notify_type if isinstance(p, Notify) else type(p).__name__ for p in m.payloads
                ]
                entry["data"] = [p.data.hex() for p in m.payloads if isinstance(p, Notify)]
                entry["version"] = d[17]
                entry["response"] = m.response
            except IkeDecodeError as e:
                entry["error"] = str(e)
            answers.append(entry)
        result["garbage_sent"] = len(garbage) * 2
        result["garbage_answers"] = answers
        ini = _establish(peer, config, result)
        if result["established"]:
            _deletes(peer, ini, result)
    finally:
        peer.close()
    return result


# -- the test -----------------------------------------------------------------------------------


@pytest.fixture
def mlab() -> Iterator[ResponderLab]:
    yield from open_lab(ResponderLab)


def _run_peer(lab: ResponderLab) -> dict[str, Any]:
    cfg = {
        "local": bsw.OUTER_B,
        "remote": bsw.OUTER_A,
        "psk_hex": lab.psk,
        "ts_local": bsw.INNER_B,
        "ts_remote": bsw.INNER_A,
    }
    path = lab.workdir / "peer.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    cmd = ["ip", "netns", "exec", lab.bench.ns_b, sys.executable, "-m", __spec__.name, str(path)]
    p = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{lab.logs()}"
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.netns
def test_keymgr_survives_malformed_ike_and_still_serves_strongswan(mlab: ResponderLab) -> None:
    mlab.start_worker()
    keymgr = mlab.start_responder_keymgr()
    mlab.wait_punt_connected(keymgr)
    assert mlab.client is not None

    with mlab.ike_garbage():  # the peer's garbage is not for the capture check
        res = _run_peer(mlab)
    print(json.dumps(res, indent=1)[:6000])

    # 1. exactly the datagrams that deserve an answer got one, on both ports
    got: dict[tuple[str, int], list[Any]] = {}
    for a in res["garbage_answers"]:
        assert "error" not in a, a
        got.setdefault((a["label"], a["port"]), []).append(a)
    want_keys = {(label, port) for label in ANSWERED for port in (500, NAT_T_PORT)}
    assert set(got) == want_keys, sorted(got)
    for (label, _port), answers in got.items():
        assert len(answers) == 1, answers
        (a,) = answers
        assert a["response"] is True and a["version"] == 0x20, a
        want = ANSWERED[label]
        if want == "sa_init":
            assert a["types"][:3] == ["SA", "KE", "Nonce"], a
        else:
            assert a["types"] == [int(want)] and a["data"] == ANSWER_DATA[label], a

    # 2. garbage IKE_AUTH was dropped, the genuine one still established the IKE SA
    assert res["garbage_auth_answers"] == 0, res
    assert res["established"] is True, f"{res}\n{mlab.logs()}"

    # 3. Deletes (RFC 7296 §1.4.1): each request answered once per transmission (the
    # retransmission gets the cached answer); only the first Delete of our Child SA names
    # keymgr's inbound SPI; after the first Delete of the IKE SA nothing is answered.
    assert res["forged_info_answers"] == 0, res
    deletes = res["deletes"]
    assert len(deletes) == 10, deletes
    for i, d in enumerate(deletes[:7]):
        assert len(d["answers"]) == 2 and d["answers"][0] == d["answers"][1], d
        mid, dels = d["answers"][0]
        assert mid == d["mid"], d
        if i == 5:
            assert dels == [[ProtocolId.ESP, [res["child_spi_out"]]]], d
        else:
            assert dels == [], d
    # the first Delete of the IKE SA is answered (empty) and the IKE SA is gone at once, so
    # neither its retransmission nor the later Deletes get an answer
    assert deletes[7]["answers"] == [[deletes[7]["mid"], []]], deletes[7]
    assert deletes[8]["answers"] == [] and deletes[9]["answers"] == [], deletes

    # 4. keymgr and the worker are alive; the worker counted no internal error
    assert keymgr.poll() is None, mlab.logs()
    assert all(p.poll() is None for p in mlab.bench.procs), mlab.logs()  # worker, keymgr
    stats = mlab.client.stats()
    print(f"worker drops: {stats.drops}, internal errors: {stats.internal_errors}")
    assert stats.internal_errors == 0, stats
    # marker-less garbage on UDP 4500 is ESP to SPIs nobody has (one is too short for ESP);
    # the lone 0xff is a NAT keepalive (RFC 3948 §2.3)
    assert stats.drops.get("no_sa", 0) >= 2 and sum(stats.drops.values()) >= 3, stats.drops
    assert stats.keepalives >= 1, stats
    assert mlab.client.list_sas() == [], "the peer's Delete of the IKE SA removed its SAs"

    log_text = (mlab.workdir / "keymgr.log").read_text(errors="replace")
    assert log_text.count("malformed IKE datagram dropped") >= 2 * len(BAD_HEADER), log_text
    assert "IKE datagram for no IKE SA" in log_text, log_text
    assert "child deleted by peer" in log_text and "ike deleted" in log_text, log_text
    assert "Traceback" not in log_text, log_text

    # 5. no stall: strongSwan initiates, its Child SA is installed, ping goes through
    mlab.start_initiator_charon()
    init = mlab.initiate()
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{mlab.logs()}"
    sas = mlab.list_sas_b()
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, sas
    ping = mlab.ping_from_b()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{mlab.logs()}"
    assert "3 received" in ping.stdout, ping.stdout
    assert keymgr.poll() is None and mlab.client.stats().internal_errors == 0

    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, mlab.logs()
    assert mlab.psk not in (mlab.workdir / "keymgr.log").read_text(errors="replace").lower()


# -- keymgr's own accounting of drops (no namespaces needed) ------------------------------------


def test_keymgr_logs_every_datagram_its_responders_drop(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    from services.dataplane.client import IkeDatagram
    from tests.unit.test_keymgr_responder import A, B, _initiator, _keymgr, _run_exchange

    psk = secrets.token_bytes(32)
    km, _client, stream = _keymgr(tmp_path, psk)
    ini = _initiator(psk)
    (sa_init,) = _initiator(psk).start(0.0)
    msg = decode_message(sa_init)
    bad = dataclasses.replace(msg, payloads=(*msg.payloads, UnknownPayload(200, True, b"x")))
    with caplog.at_level("DEBUG", logger="keymgr"):
        caplog.clear()
        km._dispatch(IkeDatagram(A, 500, B, 500, encode_message(bad)), 0.0)
        malformed_init = list(caplog.records)
        _run_exchange(km, stream, ini)
        assert ini.state is State.ESTABLISHED and ini.result is not None
        r = ini.result
        forged = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 2, (), initiator=True)
        (d,) = encrypt_message(forged, SkCipher(GCM, secrets.token_bytes(36), key_bits=256))
        caplog.clear()
        km._dispatch(IkeDatagram(A, NAT_T_PORT, B, NAT_T_PORT, d), 0.0)
        forged_info = list(caplog.records)
    assert malformed_init, "nothing logged for a refused malformed IKE_SA_INIT"
    assert forged_info, "nothing logged for a forged message on an established IKE SA"
    # RFC 7296 §2.5: the IKE_SA_INIT is refused with UNSUPPORTED_CRITICAL_PAYLOAD (counted as
    # an error answer); the forged message fails integrity and is a counted drop, both at debug
    refused = [r for r in malformed_init if r.getMessage().startswith("IKE request refused")]
    drops = [r for r in forged_info if r.getMessage() == "IKE datagram dropped by the responder"]
    assert len(refused) == 1 and refused[0].levelname == "DEBUG", malformed_init
    assert len(drops) == 1 and drops[0].levelname == "DEBUG", forged_info
    assert list(km.responder_error_answers.values()) == [1], km.responder_error_answers
    assert list(km.responder_drops.values()) == [1], km.responder_drops


if __name__ == "__main__":
    print(json.dumps(peer_main(json.loads(pathlib.Path(sys.argv[1]).read_text()))), flush=True)
