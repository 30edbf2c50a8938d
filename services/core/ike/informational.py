"""Sans-IO INFORMATIONAL exchanges of an ESTABLISHED IKE SA (RFC 7296 §1.4, §1.4.1, §2.1).

Shared by both roles (:mod:`services.core.ike.exchange`, :mod:`services.core.ike.responder`).
Handled peer requests: empty (liveness) -> empty response; Delete of ESP SPIs naming the peer's
outbound SPI of our Child SA -> response with a Delete of our inbound SPI and a
``child_deleted`` event; Delete of the IKE SA -> empty response, ``closed``. Requests must carry
the next message ID from the peer; a retransmit of the last one gets the cached response; others
are dropped (:class:`InfoDrop`). CREATE_CHILD_SA requests from the peer share that window and
cache: a rekey of one of our Child SAs (N(REKEY_SA), RFC 7296 §1.3.3, §2.8) is answered with
the first of our ESP suites the offer contains (:func:`services.core.ike.suites.choose_esp`),
with PFS when the offer carries a KE (same group; a KE in a group we do not take gets
INVALID_KE_PAYLOAD naming our group), in transport mode when the Child SA is and the request
carries USE_TRANSPORT_MODE (§1.3.1), and reported as a ``child_rekeyed`` event; a rekey of
an unknown SPI gets CHILD_SA_NOT_FOUND (§3.10.1), other CREATE_CHILD_SA requests (new Child
SA, IKE SA rekey) NO_ADDITIONAL_SAS. ``delete_ike()`` builds our Delete of the IKE SA; its
response sets ``closed`` as well.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.core.ike.child import narrow
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from services.core.ike.dh import group
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
from services.core.ike.suites import DEFAULT_ESP, DEFAULT_IKE, EspSuite, choose_esp, esp_ke_hint
from services.core.sa import Mode

if TYPE_CHECKING:
    from services.core.ike.exchange import ChildSaResult

_NONCE_LEN = 32


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
    """The address range spanning the selectors of the first one's family (IPv4 or IPv6)."""
    if not sels:
        return None
    n = len(sels[0].start_address)
    same = [s for s in sels if len(s.start_address) == n]
    return min(s.start_address for s in same), max(s.end_address for s in same)


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
        prf_id: int = DEFAULT_IKE.prf,
        esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,),
        mode: Mode = Mode.TUNNEL,
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
        self._prf_id = prf_id  # the IKE SA's PRF (KEYMAT, RFC 7296 §2.17)
        self._esp_suites = esp_suites
        self._mode = mode  # of our Child SA; a rekey keeps it (§1.3.1)
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
        transport = False
        sa = ke = nonce = tsi = tsr = None
        for p in payloads:
            if isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE:
                transport = True
            elif isinstance(p, Notify) and p.notify_type == NotifyType.REKEY_SA:
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
        picked = choose_esp(
            sa.proposals,
            self._esp_suites,
            our_spi,
            ke.dh_group if ke is not None else None,
            create_child=True,
        )
        if picked is None:
            hint = esp_ke_hint(sa.proposals, self._esp_suites) if ke is not None else None
            if hint is not None and ke is not None and hint != ke.dh_group:
                # §1.3: the KE is in a group we do not take, but one we take is offered
                return [Notify(NotifyType.INVALID_KE_PAYLOAD, hint.to_bytes(2, "big"))], []
            return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], []
        # §1.3.1: a rekey of a transport-mode Child SA asks for transport again; we keep the
        # mode of the Child SA (tunnel when the request does not ask for transport).
        mode = Mode.TRANSPORT if transport and self._mode is Mode.TRANSPORT else Mode.TUNNEL
        ts_i = narrow(tsi.selectors, self._peer_ts)
        ts_r = narrow(tsr.selectors, self._our_ts)
        if not ts_i or not ts_r:
            return [Notify(NotifyType.TS_UNACCEPTABLE)], []
        g_ir: bytes | None = None
        inner: list[Payload] = [SA((picked.answer,))]
        if mode is Mode.TRANSPORT:
            inner.insert(0, Notify(NotifyType.USE_TRANSPORT_MODE))
        nr = self._rand(_NONCE_LEN)
        inner.append(Nonce(nr))
        if ke is not None:
            dh = group(ke.dh_group).generate(self._rand)
            g_ir = dh.shared(ke.data)  # InvalidKeyExchange (ValueError) -> dropped
            inner.append(KE(ke.dh_group, dh.public_bytes()))
        inner += [TSi(ts_i), TSr(ts_r)]
        keys = child_keys(
            self._prf_id,
            self._sk_d,
            nonce.data,
            nr,
            encr_key_len=picked.suite.encr_key_len,
            integ_key_len=picked.suite.integ_key_len,
            g_ir_new=g_ir,
        )
        from services.core.ike.exchange import ChildSaResult  # import cycle: exchange -> here

        new = ChildSaResult(
            spi_in=our_spi,
            spi_out=picked.offered.spi,
            encr_id=picked.suite.encr,
            key_bits=picked.suite.key_bits,
            esn=picked.suite.esn,
            keys=keys,
            ts_i=ts_i,
            ts_r=ts_r,
            integ_id=picked.suite.integ,
            mode=mode,
            dh=picked.dh,
        )
        self.children.append((new.spi_in, new.spi_out))
        return inner, [InfoEvent("child_rekeyed", old[0], old[1], new)]
