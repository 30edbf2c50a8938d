"""keymgr responder with two IKE SAs of one connection (RFC 7296 §1.4.1 Delete of one of them):
the connection's SPD entry stays while the other IKE SA's Child SA is installed, and is
withdrawn (replace_spd with a higher revision) when the last one goes.
"""

from __future__ import annotations

import pathlib
import secrets

from services.core.ike.exchange import State
from tests.unit.test_keymgr_lifecycle import DeletingClient, _to_km
from tests.unit.test_keymgr_responder import _initiator, _keymgr, _run_exchange


def test_spd_entry_kept_until_last_ike_sa_of_connection_is_deleted(
    tmp_path: pathlib.Path,
) -> None:
    psk = secrets.token_bytes(32)
    km, _, stream = _keymgr(tmp_path, psk)
    client = DeletingClient()
    km.client = client  # type: ignore[assignment]
    first, second = _initiator(psk), _initiator(psk)
    for ini in (first, second):
        _run_exchange(km, stream, ini)
        assert ini.state is State.ESTABLISHED
    # the second IKE SA finds the entry installed and unchanged: no new revision
    assert len(client.sas) == 4 and [r for _, r in client.spd] == [1]
    entry = client.spd[-1][0]
    assert len(entry) == 1

    (req,) = first.delete_ike(1.0)
    (ans,) = _to_km(km, stream, req)
    first.receive(ans, 1.0)
    assert first.state is State.CLOSED
    assert len(client.deleted) == 2  # the first IKE SA's pair only
    assert [r for _, r in client.spd] == [1]  # entry still protects the second's traffic
    assert first.spi_i not in km.responders and second.spi_i in km.responders

    (req,) = second.delete_ike(1.0)
    (ans,) = _to_km(km, stream, req)
    second.receive(ans, 1.0)
    assert second.state is State.CLOSED
    assert sorted(x[0] for x in client.deleted) == sorted(s.spi for s in client.sas)
    assert client.spd[-1] == ([], 2)
    # each removal was one ApplySAs call: the pair, and with the last one the SPD withdrawal
    removals = [(d, spd) for i, d, spd in client.applies if d]
    assert [len(d) for d, _ in removals] == [2, 2]
    assert removals[0][1] is None and removals[1][1] == ([], 2)
