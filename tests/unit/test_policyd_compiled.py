"""policyd's GET /v1/compiled: the stored policy compiled for one node, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from services.core.policy import DEFAULT_SECRETS_DIR, NodeContext, compile_policy
from services.keymgr.config import connection_from_dict
from tests.unit.policyd_support import ADMIN, READER, api, db_url, engine, pg_server  # noqa: F401 - fixtures

TUNNEL = {
    "prefix": "gw",
    "local_subnet": "10.1.0.0/16",
    "remote_subnet": "10.2.0.0/16",
    "local_gateway": "192.0.2.1",
    "remote_gateway": "192.0.2.2",
    "auth": [{"method": "psk", "psk_ref": "site-b"}],
    "assigned_to": ["gw-a"],
}


def test_compiled_policy_of_a_node(api: TestClient) -> None:
    assert api.post("/v1/templates/tunnel", json=TUNNEL, headers=ADMIN).status_code == 200
    r = api.get(
        "/v1/compiled",
        params={"node": "gw-a", "addresses": "192.0.2.1,2001:db8::1"},
        headers=READER,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    doc = api.get("/v1/document", headers=READER).json()
    rev = doc.pop("revision")
    assert body["revision"] == rev and r.headers["ETag"] == f'"r{rev}"'
    # what the compiler makes of the exported document, in-process
    want = compile_policy(doc, rev, NodeContext("gw-a", ("192.0.2.1", "2001:db8::1")))
    assert body == json.loads(json.dumps(want.to_dict()))
    actions = [e["action"] for e in body["entries"]]
    assert actions[0] == "bypass" and "protect" in actions
    (conn,) = body["connections"]
    cfg = conn["config"]
    assert cfg["psk_file"] == f"{DEFAULT_SECRETS_DIR}/site-b"
    assert (cfg["remote_addr"], cfg["local_ts"], cfg["remote_ts"], cfg["mode"]) == (
        "192.0.2.2", "10.1.0.0/16", "10.2.0.0/16", "tunnel",
    )  # fmt: skip
    connection_from_dict(cfg)  # keymgr accepts it
    # the addresses may also be repeated; another node gets nothing
    r2 = api.get("/v1/compiled?node=gw-a&addresses=192.0.2.1&addresses=2001:db8::1", headers=READER)
    assert r2.json() == body
    other = api.get("/v1/compiled", params={"node": "gw-b"}, headers=READER).json()
    assert other["entries"] == [] and other["connections"] == []


def test_compiled_refuses_bad_parameters_and_anonymous_callers(api: TestClient) -> None:
    assert api.get("/v1/compiled", params={"node": "n1"}).status_code == 401
    r = api.get("/v1/compiled", params={"node": "n1", "addresses": "10.0.0.1,nope"}, headers=READER)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "addresses" and "nope" not in r.text
    assert api.get("/v1/compiled", params={"node": "bad name"}, headers=READER).status_code == 422
    assert api.get("/v1/compiled", headers=READER).status_code == 422
    many = ",".join(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(65))
    r = api.get("/v1/compiled", params={"node": "n1", "addresses": many}, headers=READER)
    assert r.status_code == 422
