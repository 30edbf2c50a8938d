"""keymgr on a CHILD SA rekey started by the peer (RFC 7296 §2.8), without a worker.

Keymgr's responder role against our Ikev2Initiator as the peer (fakes of
tests/unit/test_keymgr_lifecycle.py). The peer sends CREATE_CHILD_SA { N(REKEY_SA), SA, Ni,
TSi, TSr }: keymgr installs the new inbound and outbound SAs under the same reqid, keyed per
§2.17 with the peer as initiator (checked against an independent prf+), keeps the old pair and
the SPD entry; the peer's Delete of the old child then removes exactly the old pair.
"""

from __future__ import annotations

import pathlib

from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId
from services.core.ike.message import SA, Delete, Message, Nonce, Notify, TSi, TSr
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message
from services.core.sa import Direction
from tests.unit.test_ike_rekey import NI, PEER_SPI, _offer, _prf_plus
from tests.unit.test_keymgr_lifecycle import _setup, _to_km


def test_rekey_installs_new_pair_then_delete_removes_old(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _setup(tmp_path)
    r = ini.result
    assert r is not None
    i2r = SkCipher(20, r.keys.sk_ei, key_bits=256)
    r2i = SkCipher(20, r.keys.sk_er, key_bits=256)
    old_in, old_out = client.sas[0], client.sas[1]
    assert old_in.direction is Direction.INBOUND and old_out.direction is Direction.OUTBOUND
    spd_before = client.spd[-1]
    # the peer (ini) rekeys: REKEY_SA names its inbound SPI = keymgr's outbound
    payloads = (
        Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, r.child.spi_in),
        SA((_offer(None),)),
        Nonce(NI),
        TSi(r.child.ts_i),
        TSr(r.child.ts_r),
    )
    msg = Message(r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, 2, payloads, initiator=True)
    (ans,) = _to_km(km, stream, encrypt_message(msg, i2r)[0])
    resp = decrypt_message(ans, r2i)
    sa = next(p for p in resp.payloads if isinstance(p, SA))
    nr = next(p for p in resp.payloads if isinstance(p, Nonce)).data
    new_spi = int.from_bytes(sa.proposals[0].spi, "big")
    assert len(client.sas) == 4 and client.deleted == []
    new_in, new_out = client.sas[2], client.sas[3]
    assert new_in.direction is Direction.INBOUND and new_in.spi == new_spi
    assert new_out.direction is Direction.OUTBOUND
    assert new_out.spi == int.from_bytes(PEER_SPI, "big")
    assert new_in.reqid == new_out.reqid == old_in.reqid
    assert new_in.encap == old_in.encap and new_in.selectors == old_in.selectors
    km_ = _prf_plus(r.keys.sk_d, NI + nr, 72)
    assert new_in.encr_key == km_[:36]  # peer -> keymgr: the exchange initiator's key
    assert new_out.encr_key == km_[36:]
    assert client.spd[-1] == spd_before  # SPD untouched
    # the peer deletes the old child (its inbound SPI of the old pair)
    d = Delete(ProtocolId.ESP, 4, (r.child.spi_in,))
    msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 3, (d,), initiator=True)
    (ans,) = _to_km(km, stream, encrypt_message(msg, i2r)[0])
    assert decrypt_message(ans, r2i).payloads == (Delete(ProtocolId.ESP, 4, (r.child.spi_out,)),)
    assert sorted(x[0] for x in client.deleted) == sorted([old_in.spi, old_out.spi])
    assert client.spd[-1] == spd_before  # the new pair keeps the SPD entry
    # a later Delete of the new child removes it and withdraws the SPD entry
    d = Delete(ProtocolId.ESP, 4, (PEER_SPI,))
    msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 4, (d,), initiator=True)
    _to_km(km, stream, encrypt_message(msg, i2r)[0])
    assert sorted(x[0] for x in client.deleted[2:]) == sorted([new_in.spi, new_out.spi])
    assert client.spd[-1][0] == []
