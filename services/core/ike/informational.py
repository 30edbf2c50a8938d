"""Sans-IO INFORMATIONAL exchanges of an ESTABLISHED IKE SA (RFC 7296 §1.4, §1.4.1, §2.1).

Shared by both roles (:mod:`services.core.ike.exchange`, :mod:`services.core.ike.responder`).
Handled peer requests: empty (liveness) -> empty response; Delete of ESP SPIs naming the peer's
outbound SPI of our Child SA -> response with a Delete of our inbound SPI and a
``child_deleted`` event; Delete of the IKE SA -> empty response, ``closed``. Requests must carry
the next message ID from the peer; a retransmit of the last one gets the cached response; others
are dropped (:class:`InfoDrop`). ``delete_ike()`` builds our Delete of the IKE SA; its response
sets ``closed`` as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.ike.constants import ExchangeType, ProtocolId
from services.core.ike.message import Delete, Message, Payload, decode_header
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message


class InfoDrop(ValueError):
    """The datagram is ignored (wrong SPI, flags, message ID or exchange)."""


@dataclass(frozen=True)
class InfoEvent:
    """What a peer request did: ``kind`` is ``liveness``, ``child_deleted`` or ``ike_deleted``;
    ``spi_in`` / ``spi_out`` name the Child SA (ours / the peer's) for ``child_deleted``."""

    kind: str
    spi_in: bytes = b""
    spi_out: bytes = b""


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
    ) -> None:
        self._spi_i = spi_i
        self._spi_r = spi_r
        self._we_initiated = we_initiated
        self._in = cin
        self._out = cout
        self.child: tuple[bytes, bytes] | None = child  # (spi_in, spi_out), None once deleted
        self._our_mid = our_next_mid
        self._peer_mid = peer_next_mid
        self._last_mid: int | None = last[0] if last else None
        self._last_exchange: int = last[1] if last else ExchangeType.INFORMATIONAL
        self._last_response: list[bytes] = list(last[2]) if last else []
        self._pending_mid: int | None = None
        self.pending: list[bytes] = []  # our outstanding request (for retransmission)
        self.closed = False
        self.events: list[InfoEvent] = []

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
        if hdr.exchange_type != ExchangeType.INFORMATIONAL:
            raise InfoDrop("only INFORMATIONAL is handled after IKE_AUTH")
        msg = decrypt_message(data, self._in)
        inner: list[Payload] = []
        event = InfoEvent("liveness")
        close = False
        for p in msg.payloads:
            if not isinstance(p, Delete):
                continue
            if p.protocol_id == ProtocolId.IKE:
                close = True
            elif p.protocol_id in (ProtocolId.ESP, ProtocolId.AH) and self.child is not None:
                spi_in, spi_out = self.child
                if spi_out in p.spis:
                    inner.append(Delete(p.protocol_id, 4, (spi_in,)))
                    event = InfoEvent("child_deleted", spi_in, spi_out)
                    self.child = None
        if close:
            inner = []
            event = InfoEvent("ike_deleted")
        resp = Message(
            self._spi_i,
            self._spi_r,
            ExchangeType.INFORMATIONAL,
            hdr.message_id,
            tuple(inner),
            initiator=self._we_initiated,
            response=True,
        )
        out = encrypt_message(resp, self._out)
        self._peer_mid = hdr.message_id + 1
        self._last_mid = hdr.message_id
        self._last_exchange = ExchangeType.INFORMATIONAL
        self._last_response = list(out)
        self.closed = close
        self.events.append(event)
        return list(out)
