"""IKEv2 Child SA negotiation shared by every exchange: RFC 7296 §2.7 / §1.3.1 / §3.3.6 (the ESP
proposal we accept and send), §2.9 (traffic-selector narrowing)."""

from __future__ import annotations

from services.core.iana import Encr
from services.core.ike.constants import Esn, ProtocolId, TransformType
from services.core.ike.message import Proposal, TrafficSelector, Transform, TransformAttribute

ENCR_ID = Encr.AES_GCM_16
ENCR_KEY_BITS = 256


_ESP_TYPES = frozenset(
    {TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN}
)


def transforms_by_type(
    p: Proposal, allowed: frozenset[int]
) -> dict[int, list[tuple[int, int | None]]] | None:
    """A proposal's transforms as {type: [(id, key length)]}; None when it carries a transform
    type outside ``allowed`` (such a proposal is not acceptable, RFC 7296 §3.3.6)."""
    by_type: dict[int, list[tuple[int, int | None]]] = {}
    for t in p.transforms:
        by_type.setdefault(t.transform_type, []).append((t.transform_id, t.key_length))
    return by_type if set(by_type) <= allowed else None


def esp_proposal(spi: bytes) -> Proposal:
    """The ESP proposal we offer and answer with: AES-GCM-16 256, no ESN."""
    return Proposal(
        1,
        ProtocolId.ESP,
        (
            Transform(TransformType.ENCR, ENCR_ID, (TransformAttribute.key_length(ENCR_KEY_BITS),)),
            Transform(TransformType.ESN, Esn.NO_ESN),
        ),
        spi,
    )


def choose_esp_proposal(
    proposals: tuple[Proposal, ...], our_spi: bytes, ke_group: int | None = None
) -> tuple[Proposal, Proposal] | None:
    """ESP AES-GCM-16-256, no ESN, from a Child SA offer (RFC 7296 §2.7, §1.3.1, §3.3.6).

    INTEG, if offered, must include NONE and ESN must include NO_ESN. With a KE payload
    (``ke_group``, CREATE_CHILD_SA with PFS) the proposal must offer that DH group; without one
    (IKE_AUTH, or no PFS) DH, if offered, must include NONE. Returns (the offered proposal, the
    chosen one to send back: the offer's number, our transforms, ``our_spi``) or None.
    """
    for p in proposals:
        if p.protocol_id != ProtocolId.ESP or len(p.spi) != 4:
            continue
        by_type = transforms_by_type(p, _ESP_TYPES)
        if by_type is None:
            continue
        if (ENCR_ID, ENCR_KEY_BITS) not in by_type.get(TransformType.ENCR, []):
            continue
        integ = by_type.get(TransformType.INTEG)
        if integ is not None and not any(i == 0 for i, _ in integ):
            continue
        esn = by_type.get(TransformType.ESN)
        if esn is not None and not any(i == Esn.NO_ESN for i, _ in esn):
            continue
        dh = [i for i, _ in by_type.get(TransformType.DH, [])]
        if ke_group is None:
            if dh and 0 not in dh:
                continue
        elif ke_group not in dh:
            continue
        transforms = esp_proposal(our_spi).transforms
        if ke_group is not None:
            transforms = (transforms[0], Transform(TransformType.DH, ke_group), *transforms[1:])
        return p, Proposal(p.number, ProtocolId.ESP, transforms, our_spi)
    return None


def narrow(
    offered: tuple[object, ...], allowed: tuple[bytes, bytes] | None
) -> tuple[TrafficSelector, ...]:
    """Offered IPv4 selectors intersected with the ``allowed`` address range (RFC 7296 §2.9).

    Protocol and ports are kept as offered; IPv6 and other selector types are dropped; empty
    intersections vanish. ``allowed`` None allows nothing.
    """
    if allowed is None:
        return ()
    lo, hi = allowed
    out: list[TrafficSelector] = []
    for s in offered:
        if not isinstance(s, TrafficSelector) or len(s.start_address) != 4:
            continue
        start, end = max(s.start_address, lo), min(s.end_address, hi)
        if start > end or s.start_port > s.end_port:
            continue
        ts = TrafficSelector(s.ip_protocol, s.start_port, s.end_port, start, end)
        if ts not in out:
            out.append(ts)
    return tuple(out)
