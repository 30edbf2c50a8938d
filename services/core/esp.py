"""ESP packet processing: RFC 4303 §2 (format, padding §2.4, TFC §2.7), §3.1 (transport and
tunnel placement, IPv6 extension headers §3.1.1), §3.3 (outbound), §3.4 (inbound, replay
§3.4.3), §2.2.1 (64-bit ESN); combined-mode AAD per RFC 4106 §5 / RFC 7634 §3 / RFC 4543 §3;
UDP encapsulation per RFC 3948 §2.1."""

from __future__ import annotations

import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from services.core.algorithms import (
    Aead,
    AlgorithmError,
    AuthenticationFailed,
    BlockCipher,
    Mac,
    _AeadBase,
    encr_algorithm,
    make_aead,
    make_block_cipher,
    make_mac,
)
from services.core.events import Drop, DropReason
from services.core.iana import IpProto
from services.core.packet import (
    IpInfo,
    MalformedPacket,
    build_ipv4,
    build_ipv6,
    checksum,
    fold,
    ones_sum,
    parse_ip,
)
from services.core.replay import ReplayError
from services.core.sa import ConfigError, Direction, Emit, Mode, SaBase, SaConfig

_U32 = struct.Struct("!I")
_V4_OUTER = struct.Struct("!BBHHHBBH4s4s")
_III = struct.Struct("!III")
_UDP = struct.Struct("!HHHH")
_PAD = bytes(range(1, 256))  # RFC 4303 §2.4 default padding contents 1, 2, 3, ...
_M32 = 0xFFFFFFFF
NAT_KEEPALIVE = b"\xff"  # RFC 3948 §2.3

IvSource = Callable[[int], bytes]  # seq -> explicit IV; for published-vector tests


class EspSa(SaBase):
    """One ESP SA, inbound or outbound. Cipher contexts are keyed once, here."""

    def __init__(
        self, cfg: SaConfig, now: float, emit: Emit, *, iv_source: IvSource | None = None
    ) -> None:
        super().__init__(cfg, now, emit)
        try:
            alg = encr_algorithm(cfg.encr_id, allow_legacy=cfg.allow_legacy)
        except AlgorithmError as e:
            raise ConfigError(str(e)) from None
        self.alg = alg
        self.iv_len = alg.iv_len
        self.align = max(alg.block_size, 4)
        self._iv_source = iv_source
        self._aead: Aead | None = None
        self._aead_encrypt: Callable[[bytes, bytes, bytes], bytes] | None = None
        self._aead_decrypt: Callable[[bytes, bytes, bytes], bytes] | None = None
        self._gmac: Aead | None = None
        self._salt = b""
        self._cbc: BlockCipher | None = None
        self._mac: Mac | None = None
        self._esn = cfg.esn
        self.tunnel = cfg.mode == Mode.TUNNEL
        self._trailers: dict[int, bytes] = {}
        try:
            if alg.aead:
                if cfg.integ_id:
                    raise ConfigError(f"{alg.name} is combined-mode: no integrity transform")
                self._aead = make_aead(alg, cfg.encr_key)
                self.icv_len = 16
                if isinstance(self._aead, _AeadBase):
                    # hot path: call the keyed primitive directly (nonce = salt || IV)
                    impl = self._aead.impl
                    self._aead_encrypt, self._aead_decrypt = impl.encrypt, impl.decrypt
                    self._salt = self._aead.salt
                else:  # GMAC authenticates the payload as AAD (RFC 4543 §3)
                    self._gmac = self._aead
            else:
                if alg.encrypts:
                    self._cbc = make_block_cipher(alg, cfg.encr_key)
                elif cfg.encr_key:
                    raise ConfigError("NULL encryption takes no key")
                if cfg.integ_id:
                    self._mac = make_mac(cfg.integ_id, cfg.integ_key, allow_legacy=cfg.allow_legacy)
                    self.icv_len = self._mac.icv_len
                elif not alg.encrypts:
                    raise ConfigError("ESP NULL needs an integrity algorithm (RFC 4303 §3.2)")
                elif not cfg.allow_legacy:
                    raise ConfigError("encryption without integrity is legacy and not enabled")
                else:
                    self.icv_len = 0
        except AlgorithmError as e:
            raise ConfigError(str(e)) from None
        # smallest valid ESP: header, IV, one aligned block holding pad length + next header, ICV
        self.min_len = 8 + self.iv_len + self.align + self.icv_len
        self._spi_bytes = cfg.spi.to_bytes(4, "big")
        self._v6 = len(cfg.src) == 16
        self._out_proto = IpProto.UDP if cfg.encap else IpProto.ESP
        self._ident = 0
        self.last_tx = now  # for NAT keepalives (RFC 3948 §4)
        if cfg.direction == Direction.OUTBOUND and cfg.mode == Mode.TUNNEL and not self._v6:
            # IPv4 header template; the checksum is patched per packet from a precomputed sum
            self._v4_sum = ones_sum(
                bytes([0x45, 0, 0, 0, 0, 0, cfg.ttl, self._out_proto]) + cfg.src + cfg.dst
            )

    # --- the ESP payload transform ------------------------------------------------------------

    def _trailer(self, pad_len: int, next_header: int) -> bytes:
        """Padding (1, 2, 3, ...), pad length and next header; cached per (pad, next header)."""
        key = (pad_len << 8) | next_header
        t = self._trailers.get(key)
        if t is None:
            t = self._trailers[key] = _PAD[:pad_len] + bytes((pad_len, next_header))
        return t

    def seal(self, payload: bytes, next_header: int) -> bytes:
        """SPI | Seq | IV | encrypted(payload | padding | pad length | next header) | ICV."""
        # fast path of take_seq(): inside the lease and not near its end
        seq = self.next_seq
        if seq >= self._lease_low_at or seq > self.lease_end:
            seq = self.take_seq()
        else:
            self.next_seq = seq + 1
        seq8 = seq.to_bytes(8, "big")
        hdr = self._spi_bytes + seq8[4:]
        pad_len = -(len(payload) + 2) % self.align
        key = (pad_len << 8) | next_header
        trailer = self._trailers.get(key) or self._trailer(pad_len, next_header)
        encrypt = self._aead_encrypt
        if encrypt is not None:
            aad = hdr if not self._esn else self._spi_bytes + seq8
            iv = seq8 if self._iv_source is None else self._iv_source(seq)
            return hdr + iv + encrypt(self._salt + iv, payload + trailer, aad)
        gmac = self._gmac
        if gmac is not None:  # RFC 4543 §3: clear payload, IV and payload authenticated
            aad = hdr if not self._esn else self._spi_bytes + seq8
            iv = seq8 if self._iv_source is None else self._iv_source(seq)
            return hdr + iv + gmac.seal(iv, aad, payload + trailer)
        cbc = self._cbc
        if cbc is not None:
            iv_in = None if self._iv_source is None else self._iv_source(seq)
            body = hdr + cbc.encrypt(payload + trailer, iv_in)
        else:
            body = hdr + payload + trailer
        mac = self._mac
        if mac is None:
            return body
        if self._esn:
            return body + mac.compute(body, seq8[:4])
        return body + mac.compute(body)

    def open(self, esp: bytes, now: float) -> tuple[int, bytes]:
        """Verify and decrypt one ESP payload (SPI through ICV); return (next header, payload
        without padding and trailer). The replay window moves only after the ICV verified."""
        n = len(esp)
        if n < self.min_len:
            self.other_drops += 1
            raise Drop(DropReason.MALFORMED)
        seq_low = _U32.unpack_from(esp, 4)[0]
        replay = self.replay
        if self._esn or seq_low <= replay.top or not seq_low:
            try:
                seq = replay.check(seq_low)
            except ReplayError:
                raise self.replay_failed(seq_low, now) from None
        else:  # ahead of the window: always acceptable (RFC 4303 §3.4.3)
            seq = seq_low
        decrypt = self._aead_decrypt
        if decrypt is not None or self._gmac is not None:
            iv_end = 8 + self.iv_len
            aad = esp[:8] if not self._esn else _III.pack(self.spi, seq >> 32, seq_low)
            try:
                if decrypt is not None:
                    pt = decrypt(self._salt + esp[8:iv_end], esp[iv_end:], aad)
                else:
                    pt = self._gmac.open(esp[8:iv_end], aad, esp[iv_end:])  # type: ignore[union-attr]
            except (InvalidTag, AuthenticationFailed):
                raise self.auth_failed(now) from None
        else:
            end = n - self.icv_len
            mac = self._mac
            if mac is not None:
                body = esp[:end]
                ok = (
                    mac.verify(esp[end:], body, (seq >> 32).to_bytes(4, "big"))
                    if self._esn
                    else mac.verify(esp[end:], body)
                )
                if not ok:
                    raise self.auth_failed(now)
            cbc = self._cbc
            if cbc is not None:
                if (end - 8) % cbc.block_size:
                    self.other_drops += 1
                    raise Drop(DropReason.MALFORMED)
                pt = cbc.decrypt(esp[8:end])
            else:
                pt = esp[8:end]
        pad_len = pt[-2]
        body_len = len(pt) - 2 - pad_len
        trailer = self._trailers.get((pad_len << 8) | pt[-1])
        if trailer is None:
            trailer = self._trailer(pad_len, pt[-1]) if body_len >= 0 else b"-"
        if body_len < 0 or not pt.endswith(trailer):
            self.other_drops += 1
            raise Drop(DropReason.PADDING)
        replay.update(seq)
        return pt[-1], pt[:body_len]

    # --- modes (RFC 4303 §3.1) ----------------------------------------------------------------

    def protect(self, pkt: bytes, now: float) -> bytes:
        """Protect one clear IP datagram; return the outer IP datagram to send."""
        self.check_alive()
        cfg = self.cfg
        self.last_tx = now
        if self.tunnel:
            v = pkt[0] >> 4 if pkt else 0
            if v == 4:
                nh = IpProto.IPV4
            elif v == 6:
                nh = IpProto.IPV6
            else:
                raise Drop(DropReason.MALFORMED)
            n = len(pkt)
            tfc = cfg.tfc_pad_to
            esp = self.seal(pkt + bytes(tfc - n) if tfc > n else pkt, nh)
            self.account(n)
            if cfg.encap:
                esp = self._udp(esp, cfg.src, cfg.dst)
            return self._outer(len(esp)) + esp
        try:
            info = parse_ip(pkt)
        except MalformedPacket:
            raise Drop(DropReason.MALFORMED) from None
        if info.fragment:
            raise Drop(DropReason.FRAGMENT)
        esp = self.seal(pkt[info.insert_at : info.length], info.next_proto)
        self.account(info.length - info.insert_at)
        if cfg.encap:
            esp = self._udp(esp, info.src, info.dst)
        return rebuild_header(pkt, info, self._out_proto, len(esp)) + esp

    def _outer(self, payload_len: int) -> bytes:
        cfg = self.cfg
        if self._v6:
            if payload_len > 0xFFFF:  # no jumbograms: a counted drop, not MalformedPacket
                raise Drop(DropReason.TOO_BIG)
            return build_ipv6(cfg.src, cfg.dst, self._out_proto, payload_len, hop_limit=cfg.ttl)
        total = 20 + payload_len
        if total > 0xFFFF:
            raise Drop(DropReason.TOO_BIG)
        self._ident = ident = self._ident % 0xFFFF + 1  # never 0: the stack would rewrite it
        c = ~fold(self._v4_sum + total + ident) & 0xFFFF
        return _V4_OUTER.pack(
            0x45, 0, total, ident, 0, cfg.ttl, self._out_proto, c, cfg.src, cfg.dst
        )

    def _udp(self, esp: bytes, src: bytes, dst: bytes) -> bytes:
        enc = self.cfg.encap
        assert enc is not None
        length = 8 + len(esp)
        if length > 0xFFFF:
            raise Drop(DropReason.TOO_BIG)
        csum = 0  # RFC 3948 §2.1: SHOULD be zero over IPv4
        if self._v6:  # RFC 8200 §8.1: mandatory over IPv6
            pseudo = src + dst + length.to_bytes(4, "big") + b"\x00\x00\x00\x11"
            s = fold(
                ones_sum(pseudo)
                + ones_sum(_UDP.pack(enc.sport, enc.dport, length, 0))
                + ones_sum(esp)
            )
            csum = (~s & 0xFFFF) or 0xFFFF
        return _UDP.pack(enc.sport, enc.dport, length, csum) + esp

    def keepalive(self, now: float) -> bytes | None:
        """An IP/UDP NAT-keepalive datagram (RFC 3948 §2.3) if this outbound ESP-in-UDP SA has
        been silent for its keepalive interval (§4), else None."""
        enc = self.cfg.encap
        if enc is None or not enc.keepalive_interval or self.dead:
            return None
        if now - self.last_tx < enc.keepalive_interval:
            return None
        self.last_tx = now
        cfg = self.cfg
        udp = self._udp(NAT_KEEPALIVE, cfg.src, cfg.dst)
        if self._v6:
            return build_ipv6(cfg.src, cfg.dst, IpProto.UDP, len(udp), hop_limit=cfg.ttl) + udp
        return build_ipv4(cfg.src, cfg.dst, IpProto.UDP, len(udp), ttl=cfg.ttl) + udp

    def unprotect(self, pkt: bytes, info: IpInfo, esp_off: int, now: float) -> bytes:
        """Process an inbound ESP datagram; return the clear IP datagram it carried."""
        esp = pkt[esp_off:] if info.length == len(pkt) else pkt[esp_off : info.length]
        if self.tunnel:
            return self.unprotect_tunnel(esp, now)
        self.check_alive()
        nh, payload = self.open(esp, now)
        if nh == IpProto.IPV6_NONXT:  # RFC 4303 §2.6 dummy packet
            raise Drop(DropReason.DUMMY)
        keep = esp_off - 8 if info.proto == IpProto.UDP else esp_off
        out_info = _with_proto_offset(info, keep)
        self.account(len(payload))
        return rebuild_header(pkt[:keep], out_info, nh, len(payload)) + payload

    def unprotect_tunnel(self, esp: bytes, now: float) -> bytes:
        """Tunnel mode: verify and decrypt ``esp`` (SPI through ICV); return the inner datagram."""
        if self.dead:
            self.check_alive()
        nh, payload = self.open(esp, now)
        if nh == IpProto.IPV6_NONXT:  # RFC 4303 §2.6 dummy packet
            raise Drop(DropReason.DUMMY)
        inner = trim_inner(nh, payload)
        if self.cfg.selectors:
            self.check_selectors(inner)
        self.account(len(inner))
        return inner


def trim_inner(nh: int, payload: bytes) -> bytes:
    """Validate the tunnelled datagram and drop TFC padding after it (RFC 4303 §2.7)."""
    n = len(payload)
    if nh == IpProto.IPV4:
        if n < 20 or payload[0] >> 4 != 4:
            raise Drop(DropReason.MALFORMED)
        total = (payload[2] << 8) | payload[3]
    elif nh == IpProto.IPV6:
        if n < 40 or payload[0] >> 4 != 6:
            raise Drop(DropReason.MALFORMED)
        total = 40 + ((payload[4] << 8) | payload[5])
    else:
        raise Drop(DropReason.MALFORMED)
    if total > n or total < 20:
        raise Drop(DropReason.MALFORMED)
    return payload if total == n else payload[:total]


def _with_proto_offset(info: IpInfo, keep: int) -> IpInfo:
    """Describe the received header as the part before ``keep`` whose last protocol byte is
    the one that named ESP (or UDP)."""
    return info._replace(insert_at=keep, proto_offset=info.l4_proto_offset)


def rebuild_header(pkt: bytes, info: IpInfo, proto: int, payload_len: int) -> bytes:
    """The first ``info.insert_at`` bytes of ``pkt`` with the protocol byte at
    ``info.proto_offset`` set to ``proto`` and lengths (and IPv4 checksum) fixed."""
    hdr = bytearray(pkt[: info.insert_at])
    hdr[info.proto_offset] = proto
    if info.version == 4:
        total = len(hdr) + payload_len
        if total > 0xFFFF:
            raise Drop(DropReason.TOO_BIG)
        hdr[2:4] = total.to_bytes(2, "big")
        hdr[10:12] = b"\x00\x00"
        hdr[10:12] = checksum(hdr).to_bytes(2, "big")
    else:
        plen = len(hdr) - 40 + payload_len
        if plen > 0xFFFF:
            raise Drop(DropReason.TOO_BIG)
        hdr[4:6] = plen.to_bytes(2, "big")
    return bytes(hdr)
