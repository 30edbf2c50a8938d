"""Sans-IO INFORMATIONAL exchanges of an ESTABLISHED IKE SA (RFC 7296 §1.4, §1.4.1, §2.1).

Shared by both roles (:mod:`services.core.ike.exchange`, :mod:`services.core.ike.responder`).
Handled peer requests: empty (liveness) -> empty response; Delete of ESP SPIs naming the peer's
outbound SPI of our Child SA -> response with a Delete of our inbound SPI and a
``child_deleted`` event; Delete of the IKE SA -> empty response, ``closed``. Requests must carry
the next message ID from the peer; a retransmit of the last one gets the cached response; others
are dropped (:class:`InfoDrop`). CREATE_CHILD_SA requests from the peer share that window and
cache: a rekey of one of our Child SAs (N(REKEY_SA), RFC 7296 §1.3.3, §2.8) is answered with
ESP AES-GCM-16-256 / no ESN, with PFS when the offer carries a KE (same group), and reported as
a ``child_rekeyed`` event; a rekey of an unknown SPI gets CHILD_SA_NOT_FOUND (§3.10.1), other
CREATE_CHILD_SA requests (new Child SA, IKE SA rekey) NO_ADDITIONAL_SAS. ``delete_ike()``
builds our Delete of the IKE SA; its response sets ``closed`` as well.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.core.ike.child import ENCR_ID, ENCR_KEY_BITS, choose_esp_proposal, narrow
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from services.core.ike.dh import GROUPS, group
from services.core.ike.keys import child_keys
from services.core.ike.message import (
    KE,
    SA,
    Delete,
    Message,
    Nonce,
    Notify,
    Payload,
    TrafficSelector,
    TSi,
    TSr,
    decode_header,
)
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message

if TYPE_CHECKING:
    from services.core.ike.exchange import ChildSaResult

_NONCE_LEN = 32
_ESP_KEY_LEN = ENCR_KEY_BITS // 8 + 4  # AES key + GCM salt (RFC 4106 §8.1)
_PRF_ID = 5  # PRF_HMAC_SHA2_256, the IKE SA's PRF (exchange.PRF_ID)
_PFS_GROUP = 31  # Curve25519, the group we ask for in INVALID_KE_PAYLOAD
_PFS_GROUPS = frozenset(k for k, g in GROUPS.items() if not g.legacy)  # MODP 2048+, ECP, 25519/448


class InfoDrop(ValueError):
    """The datagram is ignored (wrong SPI, flags, message ID or exchange)."""


@dataclass(frozen=True)
class InfoEvent:
    """What a peer request did: ``kind`` is ``liveness``, ``child_deleted`` or ``ike_deleted``;
    ``spi_in`` / ``spi_out`` name the Child SA (ours / the peer's) for ``child_deleted``, and
    the OLD Child SA for ``child_rekeyed``, whose ``child`` is the new one. The new child's
    keys follow RFC 7296 §2.17 with the peer as initiator (it started the CREATE_CHILD_SA):
    ``keys.encr_i`` protects peer→us traffic (our ``spi_in``), ``keys.encr_r`` us→peer;
    ``ts_i`` is the peer's side, ``ts_r`` ours."""

    kind: str
    spi_in: bytes = b""
    spi_out: bytes = b""
    child: ChildSaResult | None = None


def _hull(sels: tuple[TrafficSelector, ...]) -> tuple[bytes, bytes] | None:
    v4 = [s for s in sels if len(s.start_address) == 4]
    if not v4:
        return None
    return min(s.start_address for s in v4), max(s.end_address for s in v4)


class InfoSession:
    """Post-ESTABLISHED message handling for one IKE SA.

    ``we_initiated``: we are the original initiator (our I flag). ``peer_next_mid``: the message
    ID the peer's next request must carry; ``last``: (message ID, exchange type, cached
    response) of the last peer request answered, for retransmits.
    """

    def __init__(
        self,
        *,
        spi_i: bytes,
        spi_r: bytes,
        we_initiated: bool,
        cin: SkCipher,
        cout: SkCipher,
        child: tuple[bytes, bytes],
        our_next_mid: int,
        peer_next_mid: int,
        last: tuple[int, int, list[bytes]] | None = None,
        sk_d: bytes = b"",
        peer_ts: tuple[TrafficSelector, ...] = (),
        our_ts: tuple[TrafficSelector, ...] = (),
        rand: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._spi_i = spi_i
        self._spi_r = spi_r
        self._we_initiated = we_initiated
        self._in = cin
        self._out = cout
        # (spi_in, spi_out) of our live Child SAs, newest last (a rekey adds one; Delete drops)
        self.children: list[tuple[bytes, bytes]] = [child]
        self._sk_d = sk_d  # empty: CREATE_CHILD_SA is refused (NO_ADDITIONAL_SAS)
        self._peer_ts = _hull(peer_ts)
        self._our_ts = _hull(our_ts)
        self._rand = rand
        self._our_mid = our_next_mid
        self._peer_mid = peer_next_mid
        self._last_mid: int | None = last[0] if last else None
        self._last_exchange: int = last[1] if last else ExchangeType.INFORMATIONAL
        self._last_response: list[bytes] = list(last[2]) if last else []
        self._pending_mid: int | None = None
        self.pending: list[bytes] = []  # our outstanding request (for retransmission)
        self.closed = False
        self.events: list[InfoEvent] = []

    @property
    def child(self) -> tuple[bytes, bytes] | None:
        """The newest live Child SA (spi_in, spi_out), None once all are deleted."""
        return self.children[-1] if self.children else None

    def take_events(self) -> list[InfoEvent]:
        out, self.events = self.events, []
        return out

    def delete_ike(self) -> list[bytes]:
        """Our INFORMATIONAL request with a Delete of the IKE SA (§1.4.1)."""
        if self.closed:
            return []
        if self._pending_mid is not None:
            return list(self.pending)
        mid = self._our_mid
        self._our_mid += 1
        msg = Message(
            self._spi_i,
            self._spi_r,
            ExchangeType.INFORMATIONAL,
            mid,
            (Delete(ProtocolId.IKE),),
            initiator=self._we_initiated,
        )
        self._pending_mid = mid
        self.pending = encrypt_message(msg, self._out)
        return list(self.pending)

    def handle(self, data: bytes) -> list[bytes]:
        """One received message of this IKE SA; raises InfoDrop / SkError / IkeDecodeError."""
        if self.closed:
            raise InfoDrop("IKE SA closed")
        hdr = decode_header(data)
        if hdr.spi_i != self._spi_i or hdr.spi_r != self._spi_r:
            raise InfoDrop("other IKE SA")
        if hdr.initiator == self._we_initiated:
            raise InfoDrop("our own I flag")  # the peer's messages carry the other I flag
        if hdr.response:
            if hdr.message_id != self._pending_mid or hdr.exchange_type != (
                ExchangeType.INFORMATIONAL
            ):
                raise InfoDrop("not a response to our request")
            decrypt_message(data, self._in)
            self._pending_mid = None
            self.pending = []
            self.closed = True  # the only request we send is the Delete of the IKE SA
            self.events.append(InfoEvent("ike_deleted"))
            return []
        if self._last_mid is not None and hdr.message_id == self._last_mid:
            if hdr.exchange_type != self._last_exchange:
                raise InfoDrop("retransmit with another exchange type")
            decrypt_message(data, self._in)  # forged "retransmissions" are dropped
            return list(self._last_response)
        if hdr.message_id != self._peer_mid:
            raise InfoDrop("message ID outside the window")
        if hdr.exchange_type not in (ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA):
            raise InfoDrop("only INFORMATIONAL and CREATE_CHILD_SA are handled after IKE_AUTH")
        msg = decrypt_message(data, self._in)
        close = False
        if hdr.exchange_type == ExchangeType.CREATE_CHILD_SA:
            inner, events = self._create_child_sa(msg.payloads)
        else:
            inner, events, close = self._informational(msg.payloads)
        resp = Message(
            self._spi_i,
            self._spi_r,
            hdr.exchange_type,
            hdr.message_id,
            tuple(inner),
            initiator=self._we_initiated,
            response=True,
        )
        out = encrypt_message(resp, self._out)
        self._peer_mid = hdr.message_id + 1
        self._last_mid = hdr.message_id
        self._last_exchange = hdr.exchange_type
        self._last_response = list(out)
        self.closed = close
        self.events.extend(events)
        return list(out)

    def _informational(
        self, payloads: tuple[Payload, ...]
    ) -> tuple[list[Payload], list[InfoEvent], bool]:
        inner: list[Payload] = []
        events: list[InfoEvent] = []
        for p in payloads:
            if not isinstance(p, Delete):
                continue
            if p.protocol_id == ProtocolId.IKE:
                return [], [InfoEvent("ike_deleted")], True
            if p.protocol_id in (ProtocolId.ESP, ProtocolId.AH):
                for spi_in, spi_out in list(self.children):
                    if spi_out in p.spis:
                        inner.append(Delete(p.protocol_id, 4, (spi_in,)))
                        events.append(InfoEvent("child_deleted", spi_in, spi_out))
                        self.children.remove((spi_in, spi_out))
        return inner, events or [InfoEvent("liveness")], False

    def _create_child_sa(
        self, payloads: tuple[Payload, ...]
    ) -> tuple[list[Payload], list[InfoEvent]]:
        """The peer's CREATE_CHILD_SA request (RFC 7296 §1.3): only Child SA rekeys."""
        rekey: Notify | None = None
        sa = ke = nonce = tsi = tsr = None
        for p in payloads:
            if isinstance(p, Notify) and p.notify_type == NotifyType.REKEY_SA:
                rekey = p
            elif isinstance(p, SA):
                sa = p
            elif isinstance(p, KE):
                ke = p
            elif isinstance(p, Nonce):
                nonce = p
            elif isinstance(p, TSi):
                tsi = p
            elif isinstance(p, TSr):
                tsr = p
        if rekey is None or not self._sk_d:
            return [Notify(NotifyType.NO_ADDITIONAL_SAS)], []
        if sa is None or nonce is None or tsi is None or tsr is None:
            return [Notify(NotifyType.INVALID_SYNTAX)], []
        # §1.3.3: REKEY_SA carries the SPI the request's sender expects inbound, i.e. the
        # peer's inbound SPI of the old Child SA = our outbound one.
        old = next((c for c in self.children if c[1] == rekey.spi), None)
        if old is None or rekey.protocol_id != ProtocolId.ESP:
            return [Notify(NotifyType.CHILD_SA_NOT_FOUND, b"", rekey.protocol_id, rekey.spi)], []
        our_spi = b""
        ours = {c[0] for c in self.children}
        while int.from_bytes(our_spi, "big") < 256 or our_spi in ours:  # RFC 4303 §2.1
            our_spi = self._rand(4)
            if len(our_spi) != 4:
                raise ValueError("rand returned the wrong number of octets")
        picked = None
        if ke is None or ke.dh_group in _PFS_GROUPS:
            picked = choose_esp_proposal(
                sa.proposals, our_spi, ke.dh_group if ke is not None else None
            )
        if picked is None:
            if ke is not None and choose_esp_proposal(sa.proposals, our_spi, _PFS_GROUP):
                # §1.3: the KE is in a group we do not take, but X25519 is offered
                return [Notify(NotifyType.INVALID_KE_PAYLOAD, _PFS_GROUP.to_bytes(2, "big"))], []
            return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], []
        ts_i = narrow(tsi.selectors, self._peer_ts)
        ts_r = narrow(tsr.selectors, self._our_ts)
        if not ts_i or not ts_r:
            return [Notify(NotifyType.TS_UNACCEPTABLE)], []
        g_ir: bytes | None = None
        inner: list[Payload] = [SA((picked[1],))]
        nr = self._rand(_NONCE_LEN)
        inner.append(Nonce(nr))
        if ke is not None:
            dh = group(ke.dh_group).generate(self._rand)
            g_ir = dh.shared(ke.data)  # InvalidKeyExchange (ValueError) -> dropped
            inner.append(KE(ke.dh_group, dh.public_bytes()))
        inner += [TSi(ts_i), TSr(ts_r)]
        keys = child_keys(
            _PRF_ID,
            self._sk_d,
            nonce.data,
            nr,
            encr_key_len=_ESP_KEY_LEN,
            integ_key_len=0,
            g_ir_new=g_ir,
        )
        from services.core.ike.exchange import ChildSaResult  # import cycle: exchange -> here

        new = ChildSaResult(
            spi_in=our_spi,
            spi_out=picked[0].spi,
            encr_id=ENCR_ID,
            key_bits=ENCR_KEY_BITS,
            esn=False,
            keys=keys,
            ts_i=ts_i,
            ts_r=ts_r,
        )
        self.children.append((new.spi_in, new.spi_out))
        return inner, [InfoEvent("child_rekeyed", old[0], old[1], new)]
