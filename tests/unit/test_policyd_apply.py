"""policyd declarative apply (JSON and YAML) and built-in templates, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from services.policyd.templates import TEMPLATES
from tests.unit.policyd_support import ADMIN, READER, api, db_url, engine, pg_server  # noqa: F401 - fixtures

DOC: dict[str, Any] = {
    "filter_lists": [
        {
            "name": "ike",
            "filters": [
                {"source": "me", "destination": "any", "protocol": "udp", "destination_port": p}
                for p in (500, 4500)
            ],
        },
        {
            "name": "branch",
            "filters": [{"source": "10.1.0.0/16", "destination": "10.2.0.0/16"}],
        },
        {
            "name": "dns",
            "filters": [
                {
                    "source": "me",
                    "destination": "10.2.0.53",
                    "protocol": 17,
                    "destination_port": "53",
                },
                {
                    "source": "me",
                    "destination": "10.2.0.10-10.2.0.20",
                    "protocol": "tcp",
                    "destination_port": "1000-2000",
                    "mirrored": False,
                },
            ],
        },
    ],
    "filter_actions": [
        {"name": "permit", "action": "permit"},
        {"name": "block", "action": "block"},
        {
            "name": "require",
            "action": "negotiate",
            "security_methods": [
                {
                    "protocol": "esp",
                    "esp": "aes256gcm16",
                    "lifetime_seconds": 1800,
                    "lifetime_kilobytes": 100000,
                },
                {"protocol": "esp+ah", "esp": "aes256-sha256", "ah": "sha384"},
            ],
            "session_key_pfs": True,
            "pfs_group": "ecp256",
        },
    ],
    "policies": [
        {
            "name": "gw-a",
            "description": "site A gateway",
            "main_mode": {
                "proposals": ["aes256gcm16-prfsha256-x25519", "aes256-sha256-modp3072"],
                "lifetime_minutes": 240,
                "lifetime_sessions": 10,
                "pfs": True,
            },
            "assigned_to": ["worker-1", "worker-2"],
            "rules": [
                {"name": "ike", "filter_list": "ike", "filter_action": "permit"},
                {"name": "dns", "filter_list": "dns", "filter_action": "block"},
                {
                    "name": "tunnel",
                    "filter_list": "branch",
                    "filter_action": "require",
                    "auth_methods": [{"method": "psk", "psk_ref": "site-b-psk"}],
                    "tunnel_endpoint": "192.0.2.2",
                    "local_tunnel_endpoint": "192.0.2.1",
                },
            ],
        }
    ],
}


def apply(api: TestClient, doc: Any, **params: Any) -> Any:
    r = api.post("/v1/apply", json=doc, params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def document(api: TestClient) -> dict[str, Any]:
    r = api.get("/v1/document", headers=READER)
    assert r.status_code == 200
    doc = r.json()
    assert r.headers["ETag"] == f'"r{doc["revision"]}"'
    return doc


def test_apply_is_idempotent(api: TestClient) -> None:
    first = apply(api, DOC)
    assert first["changed"] is True
    assert first["revision"] == 1  # the whole document is one revision
    kinds = sorted((c["operation"], c["kind"]) for c in first["changes"])
    assert kinds.count(("create", "filter_list")) == 3
    assert kinds.count(("create", "rule")) == 3
    again = apply(api, DOC)
    assert again == {"revision": 1, "changed": False, "changes": []}
    # the exported document applies as a no-op too (round trip)
    exported = document(api)
    exported.pop("revision")
    assert apply(api, exported) == {"revision": 1, "changed": False, "changes": []}
    # canonical forms: protocol names become numbers, "53" a port, ranges kept
    dns = next(f for f in exported["filter_lists"] if f["name"] == "dns")
    assert dns["filters"][0]["protocol"] == 17
    assert dns["filters"][0]["destination_port"] == 53
    assert dns["filters"][1]["destination_port"] == "1000-2000"
    assert dns["filters"][1]["mirrored"] is False
    audit = api.get("/v1/audit", headers=READER).json()["items"]
    assert {a["revision"] for a in audit} == {1}
    assert len(audit) == len(first["changes"])


def test_apply_changes_only_what_differs(api: TestClient) -> None:
    apply(api, DOC)
    tags = {
        p: api.get(p, headers=READER).headers["ETag"]
        for p in ("/v1/filter-lists/branch", "/v1/filter-lists/dns", "/v1/policies/gw-a")
    }
    doc = copy.deepcopy(DOC)
    doc["filter_lists"][1]["filters"][0]["destination"] = "10.3.0.0/16"
    doc["policies"][0]["rules"].pop(1)  # the dns rule goes away
    res = apply(api, doc)
    assert res["revision"] == 2
    assert sorted((c["operation"], c["kind"], c["name"]) for c in res["changes"]) == [
        ("delete", "rule", "gw-a/dns"),
        ("update", "filter_list", "branch"),
    ]
    assert api.get("/v1/filter-lists/branch", headers=READER).headers["ETag"] == '"r2"'
    assert (
        api.get("/v1/filter-lists/dns", headers=READER).headers["ETag"]
        == tags["/v1/filter-lists/dns"]
    )
    assert api.get("/v1/policies/gw-a", headers=READER).headers["ETag"] == tags["/v1/policies/gw-a"]
    # without prune the now unused filter list stays; with prune it goes
    assert api.get("/v1/filter-lists/dns", headers=READER).status_code == 200
    res = apply(api, {**doc, "filter_lists": doc["filter_lists"][:2]}, prune="true")
    assert [(c["operation"], c["name"]) for c in res["changes"]] == [("delete", "dns")]
    assert api.get("/v1/filter-lists/dns", headers=READER).status_code == 404


def test_apply_yaml_equals_json(api: TestClient) -> None:
    text = yaml.safe_dump(DOC)
    r = api.post("/v1/apply", content=text, headers={**ADMIN, "Content-Type": "application/yaml"})
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is True
    assert apply(api, DOC)["changed"] is False
    y = api.get("/v1/document", params={"format": "yaml"}, headers=READER)
    assert y.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(y.text) == document(api)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("a: &x [1, 2]\nb: *x\n", 400, "aliases"),
        ("filter_lists: [\n", 400, "not valid YAML at line"),
        ("filter_lists: 2024-01-01\n", 400, "JSON cannot carry"),
        ("filter_lists: 5\n", 422, "filter_lists"),
        ("- 1\n- 2\n", 422, "body"),
    ],
)
def test_apply_bad_yaml(api: TestClient, body: str, status: int, words: str) -> None:
    r = api.post("/v1/apply", content=body, headers={**ADMIN, "Content-Type": "text/yaml"})
    assert r.status_code == status, r.text
    assert words in r.text


def test_apply_is_all_or_nothing(api: TestClient) -> None:
    apply(api, DOC)
    doc = copy.deepcopy(DOC)
    doc["filter_lists"][1]["filters"].append({"source": "me", "destination": "224.0.0.251"})
    doc["policies"][0]["description"] = "changed"
    r = api.post("/v1/apply", json=doc, headers=ADMIN)
    assert r.status_code == 422
    assert "cannot be secured" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "filter_list"
    assert document(api)["revision"] == 1
    assert api.get("/v1/policies/gw-a", headers=READER).json()["description"] == "site A gateway"
    # a bad reference names its place in the document
    doc = copy.deepcopy(DOC)
    doc["policies"][0]["rules"][0]["filter_list"] = "nope"
    r = api.post("/v1/apply", json=doc, headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "policies[0].rules[0].filter_list"
    # duplicate names are refused before anything is written
    doc = copy.deepcopy(DOC)
    doc["filter_actions"].append({"name": "block", "action": "permit"})
    r = api.post("/v1/apply", json=doc, headers=ADMIN)
    assert r.status_code == 422
    assert "named block" in r.text


def test_apply_order_inside_the_document_does_not_matter(api: TestClient) -> None:
    """Changing a filter list and the rule using it in one apply is checked at the end."""
    apply(api, DOC)
    doc = copy.deepcopy(DOC)
    # the branch list gains a multicast filter, and its rule becomes a block rule: valid
    doc["filter_lists"][1]["filters"].append({"source": "me", "destination": "224.0.0.251"})
    rule = doc["policies"][0]["rules"][2]
    rule.update(filter_action="block", tunnel_endpoint=None, local_tunnel_endpoint=None)
    res = apply(api, doc)
    assert res["changed"] is True


def test_apply_dry_run_and_if_match(api: TestClient) -> None:
    res = api.post("/v1/apply", json=DOC, params={"dry_run": "true"}, headers=ADMIN).json()
    assert res["changed"] is True and res["revision"] == 0
    assert document(api)["revision"] == 0
    assert document(api)["policies"] == []
    r = api.post("/v1/apply", json=DOC, headers={**ADMIN, "If-Match": '"r0"'})
    assert r.status_code == 200
    r = api.post("/v1/apply", json=DOC, headers={**ADMIN, "If-Match": '"r0"'})
    assert r.status_code == 412


def test_apply_needs_admin(api: TestClient) -> None:
    assert api.post("/v1/apply", json=DOC, headers=READER).status_code == 403
    assert api.post("/v1/apply", json=DOC).status_code == 401
    assert document(api)["revision"] == 0


TEMPLATE_PARAMS: dict[str, dict[str, Any]] = {
    "client-respond-only": {},
    "server-request-security": {},
    "secure-server-require-security": {},
    "isolation": {"requirement": "require", "exempt": ["192.0.2.53", "192.0.2.0/28"]},
    "server-to-server": {
        "endpoints1": ["192.0.2.10"],
        "endpoints2": ["198.51.100.0/24", "198.51.100.200"],
        "auth": [{"method": "certificate", "ca": "CN=Lab Root"}],
    },
    "tunnel": {
        "local_subnet": "10.1.0.0/16",
        "remote_subnet": "10.2.0.0/16",
        "local_gateway": "192.0.2.1",
        "remote_gateway": "192.0.2.2",
        "auth": [{"method": "psk", "psk_ref": "tunnel-psk"}],
    },
    "authentication-exemption": {"addresses": ["192.0.2.53"]},
}


def test_every_template_is_listed() -> None:
    assert set(TEMPLATE_PARAMS) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATE_PARAMS))
def test_templates(api: TestClient, name: str) -> None:
    listed = {t["name"]: t for t in api.get("/v1/templates", headers=READER).json()}
    assert "properties" in listed[name]["parameters"]
    params = TEMPLATE_PARAMS[name]
    r = api.post(f"/v1/templates/{name}", json=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is True and r.json()["revision"] == 1
    doc = document(api)
    (policy,) = doc["policies"]
    actions = {a["name"]: a for a in doc["filter_actions"]}
    lists = {f["name"]: f for f in doc["filter_lists"]}
    rules = {r["name"]: r for r in policy["rules"]}
    if name != "authentication-exemption":
        # IKE is exempted: UDP 500 and 4500, both port directions, permitted
        ike = lists[rules["ike-exemption"]["filter_list"]]["filters"]
        assert {(f["protocol"], f["source_port"], f["destination_port"]) for f in ike} == {
            (17, 500, None),
            (17, None, 500),
            (17, 4500, None),
            (17, None, 4500),
        }
        assert actions[rules["ike-exemption"]["filter_action"]]["action"] == "permit"
        negotiating = [
            r for r in rules.values() if actions[r["filter_action"]]["action"] == "negotiate"
        ]
        assert len(negotiating) == 1
        neg = actions[negotiating[0]["filter_action"]]
        expect = {
            "client-respond-only": (True, True, False),
            "server-request-security": (True, True, True),
            "secure-server-require-security": (False, False, True),
            "isolation": (False, False, True),
            "server-to-server": (False, False, True),
            "tunnel": (False, False, True),
        }[name]
        assert (neg["accept_unsecured"], neg["allow_fallback"], neg["initiate"]) == expect
        if "auth" in params:
            assert negotiating[0]["auth_methods"] == [
                {"ca": None, "psk_ref": None, **a} for a in params["auth"]
            ]
        else:
            assert negotiating[0]["auth_methods"][0]["method"] == "kerberos"
    if name == "tunnel":
        assert rules["tunnel"]["tunnel_endpoint"] == "192.0.2.2"
        assert rules["tunnel"]["local_tunnel_endpoint"] == "192.0.2.1"
    if name == "server-to-server":
        assert len(lists["server-to-server-endpoints"]["filters"]) == 2
    if name.startswith("server-request") or name.startswith("secure-server"):
        icmp = lists[rules["all-icmp"]["filter_list"]]["filters"]
        assert {f["protocol"] for f in icmp} == {1, 58}
    # the same template again changes nothing
    again = api.post(f"/v1/templates/{name}", json=params, headers=ADMIN).json()
    assert again == {"revision": 1, "changed": False, "changes": []}


def test_template_never_overwrites(api: TestClient) -> None:
    assert api.post("/v1/templates/isolation", json={}, headers=ADMIN).status_code == 200
    r = api.post("/v1/templates/isolation", json={"requirement": "require"}, headers=ADMIN)
    assert r.status_code == 409
    assert "choose another name prefix" in r.json()["detail"]
    r = api.post(
        "/v1/templates/isolation", json={"requirement": "require", "prefix": "iso2"}, headers=ADMIN
    )
    assert r.status_code == 200
    assert api.post("/v1/templates/nope", json={}, headers=ADMIN).status_code == 404
    r = api.post("/v1/templates/tunnel", json={"local_subnet": "10.0.0.0/8"}, headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "remote_subnet"
    r = api.post(
        "/v1/templates/tunnel",
        json={**TEMPLATE_PARAMS["tunnel"], "remote_gateway": "10.0.0.0/8"},
        headers=ADMIN,
    )
    assert r.status_code == 422 and "one IP address" in r.text
    r = api.post("/v1/templates/isolation", json={"exempt": ["x"]}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "exempt"


def _big_doc(policies: int, rules: int) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    for i in range(policies):
        doc["policies"].append(
            {
                "name": f"p{i}",
                "rules": [
                    {"name": f"r{j}", "filter_list": "dns", "filter_action": "block"}
                    for j in range(rules)
                ],
            }
        )
    return doc


def test_export_reads_a_revision_in_a_fixed_number_of_queries(engine: Engine) -> None:
    """A compiler reads a whole revision with one query per table, whatever its size."""
    from services.policyd import store
    from services.policyd.schemas import PolicyDocument

    counts = []
    for policies, rules in ((0, 0), (5, 40)):
        with Session(engine) as s:
            w = store.Writer(s, "test", "test")
            store.apply_document(w, PolicyDocument.model_validate(_big_doc(policies, rules)))
            w.commit()
        statements: list[str] = []

        def count(*args: Any, _out: list[str] = statements) -> None:
            _out.append(str(args[2]))

        event.listen(engine, "before_cursor_execute", count)
        try:
            with Session(engine) as s, s.begin():
                _rev, doc = store.export_document(s)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert sum(len(p["rules"]) for p in doc["policies"]) == 3 + policies * rules
        counts.append(len(statements))
    assert counts[0] == counts[1] <= 12
