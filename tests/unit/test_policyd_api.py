"""policyd REST API: CRUD of every object, errors, ETag/If-Match, revisions, audit, auth.

Every test runs twice: on SQLite and on a PostgreSQL server started by the tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.policyd.api import create_app
from services.policyd.auth import TokenStore
from services.policyd.db import make_engine
from tests.unit.policyd_support import ADMIN, READER, TOKENS, api, db_url, engine, pg_server  # noqa: F401 - fixtures

FL = {
    "name": "web",
    "description": "web servers",
    "filters": [
        {
            "source": "me",
            "destination": "198.51.100.0/24",
            "protocol": "tcp",
            "destination_port": 443,
        }
    ],
}
FA = {"name": "require", "action": "negotiate", "security_methods": [{"esp": "aes128gcm16"}]}
POLICY = {"name": "site", "main_mode": {"proposals": ["aes256gcm16-prfsha384-ecp384"]}}
RULE = {
    "name": "web-esp",
    "filter_list": "web",
    "filter_action": "require",
    "auth_methods": [{"method": "certificate", "ca": "CN=Lab CA"}, {"method": "kerberos"}],
}


def make_base(api: TestClient) -> None:
    for path, body in (
        ("/v1/filter-lists", FL),
        ("/v1/filter-actions", FA),
        ("/v1/policies", POLICY),
        ("/v1/policies/site/rules", RULE),
    ):
        r = api.post(path, json=body, headers=ADMIN)
        assert r.status_code == 201, r.text


def revision(api: TestClient) -> int:
    r = api.get("/v1/revision", headers=READER)
    assert r.status_code == 200
    assert r.headers["ETag"] == f'"r{r.json()["revision"]}"'
    return int(r.json()["revision"])


def errors_of(r: Any) -> dict[str, str]:
    return {e["field"]: e["message"] for e in r.json()["errors"]}


# (collection, item, create body, changed body) for every object kind
KINDS = [
    ("/v1/filter-lists", "/v1/filter-lists/extra", {**FL, "name": "extra"}, {"description": "x"}),
    (
        "/v1/filter-actions",
        "/v1/filter-actions/extra",
        {**FA, "name": "extra"},
        {"action": "block", "security_methods": []},
    ),
    ("/v1/policies", "/v1/policies/extra", {**POLICY, "name": "extra"}, {"assigned_to": ["w1"]}),
    (
        "/v1/policies/site/rules",
        "/v1/policies/site/rules/extra",
        {**RULE, "name": "extra"},
        {"enabled": False},
    ),
]


@pytest.mark.parametrize(("coll", "item", "body", "change"), KINDS)
def test_crud_every_kind(
    api: TestClient, coll: str, item: str, body: dict[str, Any], change: dict[str, Any]
) -> None:
    make_base(api)
    rev0 = revision(api)
    r = api.post(coll, json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == item
    assert r.headers["ETag"] == f'"r{rev0 + 1}"'
    assert r.json()["revision"] == rev0 + 1
    assert api.post(coll, json=body, headers=ADMIN).status_code == 409
    got = api.get(item, headers=READER)
    assert got.status_code == 200
    assert got.json() == r.json()
    tag = got.headers["ETag"]

    new = {**body, **change}
    assert api.put(item, json=new, headers=ADMIN).status_code == 428
    assert api.put(item, json=new, headers={**ADMIN, "If-Match": '"r999"'}).status_code == 412
    r = api.put(item, json=new, headers={**ADMIN, "If-Match": tag})
    assert r.status_code == 200, r.text
    assert r.json()["revision"] == rev0 + 2
    for k, v in change.items():
        assert r.json()[k] == v
    # the same PUT again changes nothing: same ETag, no new revision
    again = api.put(item, json=new, headers={**ADMIN, "If-Match": r.headers["ETag"]})
    assert again.status_code == 200
    assert again.headers["ETag"] == r.headers["ETag"]
    assert revision(api) == rev0 + 2
    # the old ETag is stale now
    assert api.delete(item, headers={**ADMIN, "If-Match": tag}).status_code == 412
    assert api.delete(item, headers=ADMIN).status_code == 428
    assert api.delete(item, headers={**ADMIN, "If-Match": r.headers["ETag"]}).status_code == 204
    assert api.get(item, headers=READER).status_code == 404
    assert api.put(item, json=new, headers={**ADMIN, "If-Match": "*"}).status_code == 404
    assert api.delete(item, headers={**ADMIN, "If-Match": "*"}).status_code == 404
    assert revision(api) == rev0 + 3


@pytest.mark.parametrize("coll", [k[0] for k in KINDS])
def test_pagination(api: TestClient, coll: str) -> None:
    make_base(api)
    base_body = {k[0]: k[2] for k in KINDS}[coll]
    for i in range(5):
        body = {**base_body, "name": f"p{i}"}
        assert api.post(coll, json=body, headers=ADMIN).status_code == 201
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        r = api.get(coll, params=params, headers=READER)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [x["name"] for x in page["items"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(seen)
    assert {f"p{i}" for i in range(5)} <= set(seen)
    assert len(seen) == len(set(seen))
    assert pages == (len(seen) + 1) // 2
    assert api.get(coll, params={"limit": 0}, headers=READER).status_code == 422
    assert api.get(coll, params={"limit": 501}, headers=READER).status_code == 422


def test_auth_roles(api: TestClient) -> None:
    assert api.get("/healthz").status_code == 200
    assert api.get("/openapi.json").status_code == 200
    for method, path, body in (
        ("GET", "/v1/policies", None),
        ("GET", "/v1/document", None),
        ("GET", "/v1/audit", None),
        ("POST", "/v1/policies", POLICY),
        ("POST", "/v1/apply", {}),
        ("POST", "/v1/templates/isolation", {}),
    ):
        r = api.request(method, path, json=body)
        assert r.status_code == 401, (method, path)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer not-a-token-of-ours"}
        assert api.request(method, path, json=body, headers=bad).status_code == 401
        basic = {"Authorization": "Basic YWxpY2U6eA=="}
        assert api.request(method, path, json=body, headers=basic).status_code == 401
        r = api.request(method, path, json=body, headers=READER)
        assert r.status_code == (200 if method == "GET" else 403), (method, path)
    assert revision(api) == 0
    assert api.post("/v1/policies", json=POLICY, headers=ADMIN).status_code == 201


def test_references_between_objects(api: TestClient) -> None:
    make_base(api)
    r = api.post(
        "/v1/policies/site/rules", json={**RULE, "name": "x", "filter_list": "nope"}, headers=ADMIN
    )
    assert r.status_code == 422
    assert "no filter list named nope" in errors_of(r)["filter_list"]
    assert api.post("/v1/policies/none/rules", json=RULE, headers=ADMIN).status_code == 404
    tag = api.get("/v1/filter-lists/web", headers=READER).headers["ETag"]
    r = api.delete("/v1/filter-lists/web", headers={**ADMIN, "If-Match": tag})
    assert r.status_code == 409
    assert "site/web-esp" in r.json()["detail"]
    tag = api.get("/v1/filter-actions/require", headers=READER).headers["ETag"]
    assert (
        api.delete("/v1/filter-actions/require", headers={**ADMIN, "If-Match": tag}).status_code
        == 409
    )
    # deleting the policy deletes its rules; then the filter list can go
    tag = api.get("/v1/policies/site", headers=READER).headers["ETag"]
    assert api.delete("/v1/policies/site", headers={**ADMIN, "If-Match": tag}).status_code == 204
    assert api.get("/v1/policies/site/rules/web-esp", headers=READER).status_code == 404
    tag = api.get("/v1/filter-lists/web", headers=READER).headers["ETag"]
    assert api.delete("/v1/filter-lists/web", headers={**ADMIN, "If-Match": tag}).status_code == 204


def test_rename_refused(api: TestClient) -> None:
    make_base(api)
    r = api.put(
        "/v1/policies/site", json={**POLICY, "name": "other"}, headers={**ADMIN, "If-Match": "*"}
    )
    assert r.status_code == 422
    assert "renaming is not supported" in errors_of(r)["name"]


@pytest.mark.parametrize(
    ("dest", "word"),
    [
        ("224.0.0.5", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("ff02::1", "multicast"),
        ("239.1.0.0/16", "multicast"),
    ],
)
def test_multicast_and_broadcast_cannot_be_secured(api: TestClient, dest: str, word: str) -> None:
    make_base(api)
    bad = {"name": "mc", "filters": [{"source": "me", "destination": dest}]}
    assert api.post("/v1/filter-lists", json=bad, headers=ADMIN).status_code == 201
    # a negotiate rule over it is refused, naming the field and the fix
    r = api.post(
        "/v1/policies/site/rules", json={**RULE, "name": "mc", "filter_list": "mc"}, headers=ADMIN
    )
    assert r.status_code == 422
    msg = errors_of(r)["filter_list"]
    assert word in msg and "cannot be secured" in msg and "permit or block" in msg
    # permitting or blocking it is fine
    assert (
        api.post(
            "/v1/filter-actions", json={"name": "blk", "action": "block"}, headers=ADMIN
        ).status_code
        == 201
    )
    r = api.post(
        "/v1/policies/site/rules",
        json={"name": "mc", "filter_list": "mc", "filter_action": "blk"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    # and changing the shared filter list under a negotiate rule is refused too
    tag = api.get("/v1/filter-lists/web", headers=READER).headers["ETag"]
    rev = revision(api)
    r = api.put(
        "/v1/filter-lists/web", json=bad | {"name": "web"}, headers={**ADMIN, "If-Match": tag}
    )
    assert r.status_code == 422
    assert "cannot be secured" in r.json()["detail"]
    assert revision(api) == rev
    # so is turning the block action into a negotiate one
    tag = api.get("/v1/filter-actions/blk", headers=READER).headers["ETag"]
    r = api.put(
        "/v1/filter-actions/blk", json={**FA, "name": "blk"}, headers={**ADMIN, "If-Match": tag}
    )
    assert r.status_code == 422


BAD_BODIES = [
    ("/v1/filter-lists", {**FL, "colour": "red"}, "colour", "unknown field"),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"destination": "10.0.0.1/8"}]},
        "filters[0].destination",
        "write 10.0.0.0/8",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"destination": "10.0.0.9-10.0.0.1"}]},
        "filters[0].destination",
        "write 10.0.0.1-10.0.0.9",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"destination": "example.org"}]},
        "filters[0].destination",
        "expected any, me",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"destination_port": 80}]},
        "filters[0]",
        "ports need protocol tcp, udp or sctp",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"protocol": 256}]},
        "filters[0].protocol",
        "0 to 255",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"protocol": "tcp", "source_port": 70000}]},
        "filters[0].source_port",
        "0 to 65535",
    ),
    (
        "/v1/filter-lists",
        {"name": "x", "filters": [{"source": "10.0.0.1", "destination": "::1"}]},
        "filters[0]",
        "different IP versions",
    ),
    ("/v1/filter-lists", {"name": "bad name!"}, "name", "pattern"),
    ("/v1/filter-lists", {"name": "x" * 65}, "name", "pattern"),
    ("/v1/filter-lists", {"name": "x", "description": "a\x00b"}, "description", "pattern"),
    ("/v1/filter-lists", {"name": "x", "description": "d" * 5000}, "description", "at most"),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate"},
        "body",
        "at least one security method",
    ),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "permit", "accept_unsecured": True},
        "body",
        "use action negotiate",
    ),
    ("/v1/filter-actions", {"name": "x", "action": "explode"}, "action", "permit"),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate", "security_methods": [{"esp": "des-md5"}]},
        "security_methods[0]",
        "unknown algorithm 'des'",
    ),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate", "security_methods": [{"esp": "aes128gcm16-x25519"}]},
        "security_methods[0]",
        "pfs_group",
    ),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate", "security_methods": [{"protocol": "ah", "ah": "md5"}]},
        "security_methods[0]",
        "sha256",
    ),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate", "security_methods": [{"lifetime_kilobytes": 2**80}]},
        "security_methods[0].lifetime_kilobytes",
        "less than or equal",
    ),
    (
        "/v1/filter-actions",
        {"name": "x", "action": "negotiate", "security_methods": [{}], "pfs_group": "modp9"},
        "pfs_group",
        "unknown DH group",
    ),
    (
        "/v1/policies",
        {"name": "x", "main_mode": {"proposals": ["aes256gcm16-x25519"]}},
        "main_mode.proposals",
        "PRF",
    ),
    (
        "/v1/policies",
        {"name": "x", "main_mode": {"proposals": []}},
        "main_mode.proposals",
        "at least 1",
    ),
    (
        "/v1/policies",
        {"name": "x", "main_mode": {"lifetime_minutes": 10**30}},
        "main_mode.lifetime_minutes",
        "less than or equal",
    ),
    ("/v1/policies", {"name": "x", "assigned_to": ["w1", "w1"]}, "assigned_to", "twice"),
    ("/v1/policies", {"name": 5}, "name", "string"),
    ("/v1/policies", [], "body", "object"),
    (
        "/v1/policies/site/rules",
        {**RULE, "auth_methods": [{"method": "psk"}]},
        "auth_methods[0]",
        "psk_ref",
    ),
    (
        "/v1/policies/site/rules",
        {**RULE, "auth_methods": [{"method": "certificate"}]},
        "auth_methods[0]",
        "ca",
    ),
    (
        "/v1/policies/site/rules",
        {**RULE, "tunnel_endpoint": "gw.example"},
        "tunnel_endpoint",
        "IP address",
    ),
    (
        "/v1/policies/site/rules",
        {**RULE, "local_tunnel_endpoint": "192.0.2.1"},
        "body",
        "needs tunnel_endpoint",
    ),
    (
        "/v1/policies/site/rules",
        {**RULE, "name": "r2", "auth_methods": []},
        "auth_methods",
        "at least one authentication method",
    ),
]


@pytest.mark.parametrize(("path", "body", "field", "words"), BAD_BODIES)
def test_validation_errors_name_field_and_fix(
    api: TestClient, path: str, body: Any, field: str, words: str
) -> None:
    make_base(api)
    rev = revision(api)
    r = api.post(path, json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    errs = errors_of(r)
    assert field in errs, errs
    assert words in errs[field], errs
    assert revision(api) == rev


def test_secrets_never_echoed(api: TestClient) -> None:
    make_base(api)
    secret = "correct-horse-battery-staple-42"
    for auth in (
        {"method": "psk", "psk": secret},
        {"method": "psk", "psk_ref": "site-b", "secret": secret},
        {"method": "psk", "psk_ref": secret + " not a name"},
    ):
        r = api.post(
            "/v1/policies/site/rules",
            json={**RULE, "name": "s", "auth_methods": [auth]},
            headers=ADMIN,
        )
        assert r.status_code == 422
        assert secret not in r.text
    r = api.post(
        "/v1/policies/site/rules",
        json={**RULE, "name": "s", "auth_methods": [{"method": "psk", "psk": secret}]},
        headers=ADMIN,
    )
    assert "never stores secrets" in errors_of(r)["auth_methods[0].psk"]
    for path in ("/v1/document", "/v1/audit", "/v1/policies/site/rules"):
        assert secret not in api.get(path, headers=READER).text


def test_malformed_bodies_are_4xx(api: TestClient) -> None:
    h = {**ADMIN, "Content-Type": "application/json"}
    assert api.post("/v1/policies", content=b"{not json", headers=h).status_code == 400
    assert api.post("/v1/policies", content=b"\xff\xfe", headers=h).status_code == 400
    assert api.post("/v1/policies", content=b"[" * 100000, headers=h).status_code in (400, 422)
    big = b'{"name": "x", "description": "' + b"a" * (5 << 20) + b'"}'
    r = api.post("/v1/policies", content=big, headers=h)
    assert r.status_code == 413
    r = api.post(
        "/v1/policies", content=b"name: x\n", headers={**ADMIN, "Content-Type": "text/plain"}
    )
    assert 400 <= r.status_code < 500
    assert api.get("/v1/policies/bad%00name", headers=READER).status_code == 422
    assert api.get("/v1/policies", params={"after": "\x00"}, headers=READER).status_code == 422
    assert api.get("/v1/audit", params={"after": "9" * 40}, headers=READER).status_code == 422
    r = api.put("/v1/policies/site", json=POLICY, headers={**ADMIN, "If-Match": "x" * 5000})
    assert 400 <= r.status_code < 500
    assert revision(api) == 0


def test_revision_and_audit(api: TestClient) -> None:
    assert revision(api) == 0
    make_base(api)
    assert revision(api) == 4
    # refused writes move nothing
    assert api.post("/v1/policies", json=POLICY, headers=ADMIN).status_code == 409
    assert api.post("/v1/policies", json=POLICY, headers=READER).status_code == 403
    assert revision(api) == 4
    tag = api.get("/v1/policies/site", headers=READER).headers["ETag"]
    r = api.put(
        "/v1/policies/site",
        json={**POLICY, "description": "HQ"},
        headers={**ADMIN, "If-Match": tag},
    )
    assert r.status_code == 200
    assert revision(api) == 5
    audit = api.get("/v1/audit", headers=READER).json()["items"]
    assert [a["revision"] for a in audit] == [1, 2, 3, 4, 5]
    assert [(a["operation"], a["kind"], a["name"]) for a in audit] == [
        ("create", "filter_list", "web"),
        ("create", "filter_action", "require"),
        ("create", "policy", "site"),
        ("create", "rule", "site/web-esp"),
        ("update", "policy", "site"),
    ]
    last = audit[-1]
    assert last["actor"] == "alice"
    assert last["via"] == "PUT /v1/policies/site"
    assert last["detail"]["before"]["description"] == ""
    assert last["detail"]["after"]["description"] == "HQ"
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", last["at"])
    since = api.get("/v1/audit", params={"since_revision": 4}, headers=READER).json()["items"]
    assert [a["revision"] for a in since] == [5]
    # audit pages
    first = api.get("/v1/audit", params={"limit": 2}, headers=READER).json()
    second = api.get("/v1/audit", params={"limit": 2, "after": first["next"]}, headers=READER)
    assert [a["revision"] for a in second.json()["items"]] == [3, 4]
    # deleting a policy records the rules it took with it, in one revision
    tag = api.get("/v1/policies/site", headers=READER).headers["ETag"]
    assert api.delete("/v1/policies/site", headers={**ADMIN, "If-Match": tag}).status_code == 204
    tail = api.get("/v1/audit", params={"since_revision": 5}, headers=READER).json()["items"]
    assert [(a["operation"], a["name"], a["revision"]) for a in tail] == [
        ("delete", "site/web-esp", 6),
        ("delete", "site", 6),
    ]


def test_concurrent_writers_with_one_etag(api: TestClient) -> None:
    """Two administrators read the same version; only the first write wins."""
    make_base(api)
    tag = api.get("/v1/policies/site", headers=READER).headers["ETag"]
    a = api.put(
        "/v1/policies/site", json={**POLICY, "description": "a"}, headers={**ADMIN, "If-Match": tag}
    )
    b = api.put(
        "/v1/policies/site", json={**POLICY, "description": "b"}, headers={**ADMIN, "If-Match": tag}
    )
    assert (a.status_code, b.status_code) == (200, 412)
    assert a.json()["revision"] == 5
    assert api.get("/v1/policies/site", headers=READER).json()["description"] == "a"
    assert "ETag is now" in b.json()["detail"]


def test_openapi_published(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/v1/filter-lists/{name}",
        "/v1/filter-actions/{name}",
        "/v1/policies/{name}",
        "/v1/policies/{policy}/rules/{name}",
        "/v1/apply",
        "/v1/document",
        "/v1/audit",
        "/v1/templates/{template}",
        "/v1/revision",
    ):
        assert p in paths
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    body = paths["/v1/apply"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/yaml"} <= set(body)


def test_database_unavailable_is_503(tmp_path: Path) -> None:
    """A database without the schema (or gone) answers 503, never 500, and changes nothing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    app = create_app(engine, TokenStore.from_mapping(TOKENS))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/policies", headers=READER).status_code == 503
        r = client.post("/v1/policies", json=POLICY, headers=ADMIN)
        assert r.status_code == 503
        assert "retry later" in r.json()["detail"]
    engine.dispose()
