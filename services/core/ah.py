"""AH packet processing: RFC 4302 §2 (format, ICV padding to 32/64 bits), §3.1 (transport and
tunnel placement), §3.3.3 / Appendix A (ICV over the IP header with mutable fields and options
zeroed, ESN high bits appended), §3.4 (inbound, replay per RFC 4303 §3.4.3)."""

from __future__ import annotations

import struct

from services.core.algorithms import AlgorithmError, make_mac
from services.core.esp import rebuild_header, trim_inner
from services.core.events import Drop, DropReason
from services.core.iana import IpProto
from services.core.packet import IpInfo, MalformedPacket, build_ipv4, build_ipv6, parse_ip
from services.core.replay import ReplayError
from services.core.sa import ConfigError, Emit, Mode, SaBase, SaConfig

_AH = struct.Struct("!BBHII")
_M32 = 0xFFFFFFFF
# RFC 4302 Appendix A.1: IPv4 options whose value does not change in transit
_IMMUTABLE_V4_OPTIONS = frozenset({0, 1, 130, 133, 134, 148, 149})


def zero_mutable_v4(hdr: bytes | memoryview) -> bytearray:
    """IPv4 header as used in the ICV: TOS, flags, offset, TTL, checksum and mutable options
    zeroed (RFC 4302 §3.3.3.1.1)."""
    b = bytearray(hdr)
    b[1] = 0
    b[6] = b[7] = b[8] = 0
    b[10] = b[11] = 0
    ihl = (b[0] & 0x0F) * 4
    i = 20
    while i < ihl:
        t = b[i]
        if t == 0:  # end of option list: the rest is padding
            break
        if t == 1:
            i += 1
            continue
        if i + 1 >= ihl or b[i + 1] < 2 or i + b[i + 1] > ihl:
            raise Drop(DropReason.MALFORMED)
        olen = b[i + 1]
        if t not in _IMMUTABLE_V4_OPTIONS:
            b[i : i + olen] = bytes(olen)
        i += olen
    return b


def zero_mutable_v6(hdr: bytes | memoryview) -> bytearray:
    """IPv6 header and the extension headers before AH as used in the ICV: traffic class, flow
    label, hop limit zeroed; options with the change-en-route bit have their data zeroed
    (RFC 4302 §3.3.3.1.2, RFC 8200 §4.2)."""
    b = bytearray(hdr)
    b[0] &= 0xF0
    b[1] = b[2] = b[3] = 0
    b[7] = 0
    nh = b[6]
    off = 40
    end = len(b)
    while off < end:
        if off + 2 > end:
            raise Drop(DropReason.MALFORMED)
        if nh in (IpProto.HOPOPT, IpProto.IPV6_OPTS):
            hlen = (b[off + 1] + 1) * 8
            if off + hlen > end:
                raise Drop(DropReason.MALFORMED)
            i = off + 2
            while i < off + hlen:
                t = b[i]
                if t == 0:  # Pad1
                    i += 1
                    continue
                if i + 1 >= off + hlen or i + 2 + b[i + 1] > off + hlen:
                    raise Drop(DropReason.MALFORMED)
                olen = b[i + 1]
                if t & 0x20:
                    b[i + 2 : i + 2 + olen] = bytes(olen)
                i += 2 + olen
        elif nh == IpProto.IPV6_ROUTE:
            hlen = (b[off + 1] + 1) * 8
            if off + hlen > end or off + 4 > end:
                raise Drop(DropReason.MALFORMED)
            if b[off + 3] != 0:  # segments left: would need the final-destination rewrite
                raise Drop(DropReason.UNSUPPORTED)
        elif nh == IpProto.IPV6_FRAG:
            hlen = 8
        else:
            raise Drop(DropReason.MALFORMED)
        nh = b[off]
        off += hlen
    return b


def _zeroed(hdr: bytes | memoryview, version: int) -> bytearray:
    return zero_mutable_v4(hdr) if version == 4 else zero_mutable_v6(hdr)


class AhSa(SaBase):
    """One AH SA, inbound or outbound."""

    def __init__(self, cfg: SaConfig, now: float, emit: Emit) -> None:
        super().__init__(cfg, now, emit)
        if cfg.encr_id or cfg.encr_key:
            raise ConfigError("AH takes no encryption transform")
        if not cfg.integ_id:
            raise ConfigError("AH needs an integrity algorithm")
        try:
            self._mac = make_mac(cfg.integ_id, cfg.integ_key, allow_legacy=cfg.allow_legacy)
        except AlgorithmError as e:
            raise ConfigError(str(e)) from None
        self.icv_len = self._mac.icv_len
        self._ident = 0
        self.tunnel = cfg.mode == Mode.TUNNEL
        self._zero_icv = bytes(self.icv_len)

    def ah_len(self, version: int) -> int:
        base = 12 + self.icv_len
        return base + (-base % (8 if version == 6 else 4))

    def _esn_hi(self, seq: int) -> tuple[bytes, ...]:
        return ((seq >> 32).to_bytes(4, "big"),) if self.cfg.esn else ()

    def protect(self, pkt: bytes, now: float) -> bytes:
        self.check_alive()
        cfg = self.cfg
        if cfg.mode == Mode.TUNNEL:
            v = pkt[0] >> 4 if pkt else 0
            if v not in (4, 6):
                raise Drop(DropReason.MALFORMED)
            version = 6 if len(cfg.src) == 16 else 4
            ah_len = self.ah_len(version)
            nh: int = IpProto.IPV4 if v == 4 else IpProto.IPV6
            payload = pkt
            if version == 4:
                if 20 + ah_len + len(pkt) > 0xFFFF:
                    raise Drop(DropReason.TOO_BIG)
                # a non-zero ID: a zero one would be rewritten by the sending stack, and the ID
                # is covered by the ICV (RFC 4302 §3.3.3.1.1.1)
                self._ident = self._ident % 0xFFFF + 1
                header = build_ipv4(
                    cfg.src, cfg.dst, IpProto.AH, ah_len + len(pkt), ttl=cfg.ttl, ident=self._ident
                )
            else:
                if ah_len + len(pkt) > 0xFFFF:
                    raise Drop(DropReason.TOO_BIG)
                header = build_ipv6(
                    cfg.src, cfg.dst, IpProto.AH, ah_len + len(pkt), hop_limit=cfg.ttl
                )
        else:
            try:
                info = parse_ip(pkt)
            except MalformedPacket:
                raise Drop(DropReason.MALFORMED) from None
            if info.fragment:
                raise Drop(DropReason.FRAGMENT)
            version = info.version
            ah_len = self.ah_len(version)
            payload = pkt[info.insert_at : info.length]
            nh = info.next_proto
            header = rebuild_header(pkt, info, IpProto.AH, ah_len + len(payload))
        seq = self.take_seq()
        fixed = _AH.pack(nh, ah_len // 4 - 2, 0, self.spi, seq & _M32)
        zero_icv = bytes(ah_len - 12)
        icv = self._mac.compute(
            _zeroed(header, version), fixed, zero_icv, payload, *self._esn_hi(seq)
        )
        self.account(len(payload))
        return header + fixed + icv + zero_icv[len(icv) :] + payload

    def unprotect(self, pkt: bytes, info: IpInfo, ah_off: int, now: float) -> bytes:
        self.check_alive()
        data = memoryview(pkt)[: info.length]
        if ah_off + 12 + self.icv_len > len(data):
            self.other_drops += 1
            raise Drop(DropReason.MALFORMED)
        nh = data[ah_off]
        ah_len = (data[ah_off + 1] + 2) * 4
        if ah_len < 12 + self.icv_len or ah_off + ah_len > len(data):
            self.other_drops += 1
            raise Drop(DropReason.MALFORMED)
        seq_low = int.from_bytes(data[ah_off + 8 : ah_off + 12], "big")
        try:
            seq = self.replay.check(seq_low)
        except ReplayError:
            raise self.replay_failed(seq_low, now) from None
        icv_end = ah_off + 12 + self.icv_len
        icv = data[ah_off + 12 : icv_end]
        payload = data[ah_off + ah_len :]
        # only the ICV itself is zeroed; ICV padding is covered as sent (RFC 4302 §3.3.3.2.1)
        if not self._mac.verify(
            icv,
            _zeroed(data[:ah_off], info.version),
            data[ah_off : ah_off + 12],
            self._zero_icv,
            data[icv_end : ah_off + ah_len],
            payload,
            *self._esn_hi(seq),
        ):
            raise self.auth_failed(now)
        self.replay.update(seq)
        if self.cfg.mode == Mode.TUNNEL:
            inner = trim_inner(nh, bytes(payload))
            self.check_selectors(inner)
            self.account(len(inner))
            return inner
        out_info = info._replace(insert_at=ah_off, proto_offset=info.l4_proto_offset)
        self.account(len(payload))
        return rebuild_header(pkt, out_info, nh, len(payload)) + bytes(payload)
