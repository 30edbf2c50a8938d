"""ipsecctl against a real policyd (uvicorn in a thread, on loopback TCP and on a unix socket,
SQLite) and a fake keymgr KeyManager servicer (real gRPC server, unix socket, mutual TLS with
the development PKI).

Checks: apply (changes, then idempotent "no change"), dry run, export/apply round trip (YAML
and JSON), list/get of every object kind, delete with a concurrent change in between (412
explained), reader token refused on writes and a bad token (exit 1 with the server's message),
unreachable URL/socket (exit 3, naming it), malformed policy files (exit 2, naming the line),
an invalid document (exit 1, the server's field path), compiled SPD table, status with current
and stale components plus the SA summary, audit, config file, hostile HTTP answers (huge, not
JSON, wrong shape, escape sequences, the token echoed) and the token never in any output; SA
list/initiate/terminate/events and keymgr's errors.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import queue
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
import yaml

from services.ctl import config as ctl_config
from services.ctl import rest
from services.ctl.__main__ import main
from services.keymgr import ctl as keymgr_ctl
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.policyd.api import create_app
from services.policyd.auth import TokenStore
from services.policyd.db import make_engine, upgrade
from services.runtime import devpki, tls
from tests.unit.policyd_support import ADMIN_TOKEN, READER_TOKEN, TOKENS
from tests.unit.test_policyd_apply import DOC

SECRET_LIKE = (ADMIN_TOKEN, READER_TOKEN)


class Served:
    """policyd's app served by uvicorn in a thread on an already bound socket."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Policyd:
    def __init__(self, tmp: Path) -> None:
        self.engine = make_engine(f"sqlite:///{tmp / 'policyd.db'}")
        upgrade(self.engine)
        self.app = create_app(self.engine, TokenStore.from_mapping(TOKENS))
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{tcp.getsockname()[1]}"
        self.sock_path = tmp / "policyd.sock"
        uds = socket.socket(socket.AF_UNIX)
        uds.bind(str(self.sock_path))
        self.servers = [Served(self.app, tcp), Served(self.app, uds)]

    def http(self, token: str = ADMIN_TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"})

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.engine.dispose()


@pytest.fixture
def policyd(tmp_path: Path) -> Iterator[Policyd]:
    p = Policyd(tmp_path)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the machine: no config files, no IPSECCTL_* variables."""
    monkeypatch.setattr(ctl_config, "CONFIG_FILES", ())
    monkeypatch.setattr(ctl_config, "DEFAULT_KEYMGR_API", f"unix:{tmp_path / 'no-keymgr'}")
    for k in list(os.environ):
        if k.startswith("IPSECCTL_"):
            monkeypatch.delenv(k)


class Run:
    """ipsecctl's main() with captured output; asserts no token ever shows."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.out = self.err = ""

    def __call__(self, *argv: str) -> int:
        code = main(list(argv))
        got = self.capsys.readouterr()
        self.out, self.err = got.out, got.err
        for t in SECRET_LIKE:
            assert t not in self.out and t not in self.err, "a token was printed"
        assert "Traceback" not in self.err
        return code

    def json(self, *argv: str) -> Any:
        assert self(*argv, "-o", "json") == 0, self.err
        return json.loads(self.out)


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, policyd: Policyd
) -> Run:
    monkeypatch.setenv("IPSECCTL_POLICYD_URL", policyd.url)
    monkeypatch.setenv("IPSECCTL_TOKEN", ADMIN_TOKEN)
    return Run(capsys, monkeypatch)


def write(tmp: Path, name: str, doc: Any) -> str:
    p = tmp / name
    p.write_text(yaml.safe_dump(doc) if name.endswith((".yaml", ".yml")) else json.dumps(doc))
    return str(p)


# --- policyd ------------------------------------------------------------------------------------


def test_apply_twice_then_no_change_and_dry_run(run: Run, tmp_path: Path) -> None:
    f = write(tmp_path, "doc.yaml", DOC)
    assert run("policy", "apply", f, "--dry-run") == 0
    assert ["create", "filter_list", "ike"] in [ln.split() for ln in run.out.splitlines()]
    assert "dry run: 10 change(s) would be made; revision stays 0" in run.out
    assert run("revision") == 0 and run.out.strip() == "0"  # the dry run changed nothing
    assert run("policy", "apply", f) == 0
    assert "applied 10 change(s); revision 1" in run.out, run.out
    assert ["create", "rule", "gw-a/tunnel"] in [ln.split() for ln in run.out.splitlines()]
    assert run("policy", "apply", f) == 0
    assert run.out.strip() == "no change; revision 1"
    res = run.json("policy", "apply", f)
    assert res == {"revision": 1, "changed": False, "changes": []}
    assert run("revision") == 0 and run.out.strip() == "1"


def test_apply_from_stdin_and_prune(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(yaml.safe_dump(DOC).encode())))
    assert run("policy", "apply", "-") == 0 and "revision 1" in run.out
    empty = write(tmp_path, "empty.json", {"policies": []})
    assert run("policy", "apply", empty) == 0 and run.out.strip() == "no change; revision 1"
    assert run("policy", "apply", empty, "--prune", "--dry-run") == 0
    assert ["delete", "policy", "gw-a"] in [ln.split() for ln in run.out.splitlines()]
    assert run("policy", "apply", empty, "--prune") == 0 and "revision 2" in run.out
    assert run("policy", "list") == 0 and run.out.strip() == "no policies"
    assert run("policy", "apply", empty, "--if-revision", "1") == 1 and "412" in run.err


def test_export_round_trips_and_every_object_is_listed(
    run: Run, policyd: Policyd, tmp_path: Path
) -> None:
    assert run("policy", "apply", write(tmp_path, "doc.json", DOC)) == 0
    out = tmp_path / "export.yaml"
    assert run("policy", "export", "-f", str(out)) == 0
    assert out.read_text().startswith("# policyd revision 1\n")
    assert run("policy", "apply", str(out)) == 0 and run.out.strip() == "no change; revision 1"
    assert run("policy", "export", "-o", "json") == 0
    (tmp_path / "export.json").write_text(run.out)
    assert json.loads(run.out)["policies"][0]["name"] == "gw-a"
    assert run("policy", "apply", str(tmp_path / "export.json")) == 0
    assert run.out.strip() == "no change; revision 1"
    # a saved GET /v1/document (with its revision) applies too
    with policyd.http() as c:
        raw = c.get("/v1/document").json()
    assert raw["revision"] == 1
    assert run("policy", "apply", write(tmp_path, "raw.json", raw)) == 0
    assert "no change" in run.out

    assert run("policy", "list") == 0
    assert run.out.splitlines()[0].split()[:2] == ["NAME", "ASSIGNED_TO"]
    assert "gw-a" in run.out and "worker-1,worker-2" in run.out
    got = run.json("policy", "get", "gw-a")
    assert [r["name"] for r in got["rules"]] == ["dns", "ike", "tunnel"]
    assert run("policy", "get", "gw-a") == 0 and "psk(site-b-psk)" in run.out
    assert run("policy", "get") == 0 and "192.0.2.2" in run.out
    assert run("policy", "get", "-o", "yaml") == 0 and yaml.safe_load(run.out)[0]["name"] == "gw-a"
    assert run("rule", "list", "gw-a") == 0 and "branch" in run.out
    assert run.json("rule", "get", "gw-a", "tunnel")["tunnel_endpoint"] == "192.0.2.2"
    assert run("filter-list", "list") == 0 and "branch" in run.out and "dns" in run.out
    assert run("filter-list", "get", "dns") == 0
    assert "10.2.0.10-10.2.0.20" in run.out and "1000-2000" in run.out
    assert run("filter-action", "list") == 0
    assert "esp:aes256gcm16/1800s" in run.out and "pfs:ecp256" in run.out
    assert run.json("filter-action", "get", "require")["pfs_group"] == "ecp256"
    assert run("template", "list") == 0 and "tunnel" in run.out and "remote_subnet*" in run.out
    assert run("audit", "--limit", "2") == 0 and len(run.out.splitlines()) == 3
    assert len(run.json("audit")) == 10
    assert run("policy", "get", "nope") == 1 and "404" in run.err


def test_template_apply(run: Run) -> None:
    args = ["template", "apply", "authentication-exemption", "-p", 'addresses=["192.0.2.7"]']
    assert run(*args) == 0 and "revision 1" in run.out
    assert run(*args) == 0 and "(no change)" in run.out
    assert run("template", "apply", "nope") == 1 and "no template named nope" in run.err


def test_delete_uses_if_match_and_explains_a_concurrent_change(
    run: Run, policyd: Policyd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("policy", "apply", write(tmp_path, "doc.json", DOC)) == 0
    real = rest.Policyd.request
    seen: list[tuple[str, str, dict[str, str]]] = []

    def between(self: rest.Policyd, method: str, path: str, **kw: Any) -> rest.Answer:
        seen.append((method, path, dict(kw.get("headers") or {})))
        a = real(self, method, path, **kw)
        if method == "GET" and path == "/v1/policies/gw-a":  # someone else changes it now
            with policyd.http() as c:
                body = c.get(path).json()
                body.pop("revision")
                body["description"] = "changed meanwhile"
                r = c.put(path, json=body, headers={"If-Match": a.etag or ""})
                assert r.status_code == 200, r.text
        return a

    monkeypatch.setattr(rest.Policyd, "request", between)
    assert run("policy", "delete", "gw-a") == 1
    assert "HTTP 412" in run.err and "changed by someone else" in run.err
    assert "policy gw-a" in run.err
    assert seen[-1][0] == "DELETE" and seen[-1][2]["If-Match"] == '"r1"'
    monkeypatch.setattr(rest.Policyd, "request", real)
    assert run.json("policy", "get", "gw-a")["description"] == "changed meanwhile"
    # --if-revision: the same check with a revision the caller holds
    assert run("policy", "delete", "gw-a", "--if-revision", "1") == 1 and "412" in run.err
    assert run("policy", "delete", "gw-a") == 0 and run.out.strip() == "deleted policy gw-a"
    assert run("policy", "get", "gw-a") == 1 and "404" in run.err
    # still used by rules: 409 with the server's message
    assert run("policy", "apply", write(tmp_path, "doc.json", DOC)) == 0
    assert run("filter-list", "delete", "branch") == 1 and "409" in run.err
    assert "tunnel" in run.err
    assert run("rule", "delete", "gw-a", "tunnel") == 0
    assert run("filter-list", "delete", "branch") == 0


def test_reader_token_refused_on_writes_and_bad_token(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(tmp_path, "doc.json", DOC)
    monkeypatch.setenv("IPSECCTL_TOKEN", READER_TOKEN)
    assert run("revision") == 0
    assert run("policy", "apply", f) == 1
    assert "HTTP 403" in run.err and "bob has role reader; this needs role admin" in run.err
    monkeypatch.delenv("IPSECCTL_TOKEN")
    tf = tmp_path / "token"
    tf.write_text("wrong-token-0123456789abcdef\n")
    monkeypatch.setenv("IPSECCTL_TOKEN_FILE", str(tf))
    assert run("policy", "list") == 1
    assert "HTTP 401" in run.err and "check the token" in run.err
    assert "wrong-token" not in run.err + run.out
    tf.write_text(ADMIN_TOKEN + "\n")
    assert run("policy", "list") == 0
    monkeypatch.delenv("IPSECCTL_TOKEN_FILE")
    assert run("policy", "list") == 1 and "401" in run.err  # no token at all
    monkeypatch.setenv("IPSECCTL_TOKEN", "has space in it 0123456789")
    assert run("policy", "list") == 2 and "printable ASCII" in run.err
    assert "space in it" not in run.err


def test_unreachable_policyd_is_exit_3(run: Run, tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    assert run("--policyd-url", url, "revision") == 3
    assert f"cannot connect to policyd at {url}" in run.err
    sock = tmp_path / "nope.sock"
    assert run("--policyd-url", f"unix:{sock}", "policy", "list") == 3
    assert str(sock) in run.err
    assert run("--policyd-url", "ftp://x", "revision") == 2 and "http://HOST:PORT" in run.err
    assert run("policy", "frobnicate") == 2


def test_unix_socket_policyd(run: Run, policyd: Policyd) -> None:
    assert run("--policyd-url", f"unix:{policyd.sock_path}", "revision") == 0
    assert run.out.strip() == "0"


def test_malformed_and_invalid_policy_files(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter_lists:\n  - name: a\n   filters: [\n")
    assert run("policy", "apply", str(bad)) == 2
    assert "not valid YAML" in run.err and "line 3" in run.err
    badj = tmp_path / "bad.json"
    badj.write_text('{"filter_lists": [}')
    assert run("policy", "apply", str(badj)) == 2
    assert "not valid JSON" in run.err and "line 1 column 19" in run.err
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n")
    assert run("policy", "apply", str(laughs)) == 2 and "anchors/aliases" in run.err
    assert run("policy", "apply", write(tmp_path, "list.json", [1, 2])) == 2
    assert "expected a document" in run.err
    assert run("policy", "apply", str(tmp_path / "missing.yaml")) == 2
    assert "cannot read policy file" in run.err
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert run("policy", "apply", str(binary)) == 2 and "not UTF-8" in run.err
    doc = json.loads(json.dumps(DOC))
    doc["filter_lists"][1]["filters"][0]["destination"] = "10.2.0.1/16"
    assert run("policy", "apply", write(tmp_path, "host.yaml", doc)) == 1
    assert "HTTP 422" in run.err
    assert "filter_lists[1].filters[0].destination: host bits are set" in run.err
    assert run("revision") == 0 and run.out.strip() == "0"


def test_compiled_table(run: Run, tmp_path: Path) -> None:
    assert run("policy", "apply", write(tmp_path, "doc.json", DOC)) == 0
    args = ["compiled", "--node", "worker-1", "--address", "192.0.2.1"]
    assert run(*args) == 0
    lines = run.out.splitlines()
    assert lines[0] == "node worker-1, revision 1"
    head = lines[2].split()
    assert head[:5] == ["#", "ACTION", "SRC", "DST", "PROTO"] and "REQID" in head
    assert any("(IKE exemption)" in ln and "bypass" in ln for ln in lines)
    tunnel = [ln for ln in lines if "gw-a/tunnel[0]" in ln]
    assert tunnel and "protect(esp)" in tunnel[0] and "10.1.0.0/16" in tunnel[0]
    assert "connections:" in run.out and "gw-a.tunnel" in run.out and "psk" in run.out
    assert "unsupported:" in run.out and "lifetime_sessions" in run.out
    c = run.json(*args)
    assert c["node"] == "worker-1" and c["entries"] and c["connections"]
    assert run("compiled", "--node", "bad name!") == 1 and "422" in run.err
    assert run("compiled") == 2  # --node is required


def test_status_marks_stale_components(run: Run, policyd: Policyd, tmp_path: Path) -> None:
    assert run("status") == 0
    assert "revision 0" in run.out and "no component has reported" in run.out
    assert run("policy", "apply", write(tmp_path, "doc.json", DOC)) == 0
    hub = policyd.app.state.watch_hub
    hub.report("worker-1", "dataplane", 1, "ab" * 32)
    hub.report("worker-2", "dataplane", 0, "cd" * 32)
    assert run("status") == 0
    rows = {ln.split()[1]: ln for ln in run.out.splitlines() if ln.startswith("worker")}
    assert rows["dataplane"]  # both rows present
    lines = run.out.splitlines()
    w1 = next(ln for ln in lines if ln.startswith("worker-1"))
    w2 = next(ln for ln in lines if ln.startswith("worker-2"))
    assert w1.split()[-1] == "current" and w2.split()[-1] == "STALE"
    assert "abababababab" in w1 and "1 current, 1 stale" in run.out
    d = run.json("status")
    assert d["policyd"]["revision"] == 1 and len(d["policyd"]["enforced"]) == 2
    assert "keymgr" not in d


def test_config_file(run: Run, policyd: Policyd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("IPSECCTL_POLICYD_URL")
    monkeypatch.delenv("IPSECCTL_TOKEN")
    tf = tmp_path / "tok"
    tf.write_text(READER_TOKEN)
    conf = tmp_path / "ipsecctl.toml"
    conf.write_text(f'policyd_url = "{policyd.url}"\ntoken_file = "{tf}"\n')
    monkeypatch.setattr(ctl_config, "CONFIG_FILES", (str(conf),))
    assert run("revision") == 0
    conf.write_text(f'policyd_url = "{policyd.url}"\ntoken = "{READER_TOKEN}"\n')
    assert run("revision") == 2 and "unknown key(s) token" in run.err and "token_file" in run.err
    conf.write_text("policyd_url = [")
    assert run("--config", str(conf), "revision") == 2 and str(conf) in run.err
    assert run("--config", str(tmp_path / "none.toml"), "revision") == 2


# --- hostile answers ---------------------------------------------------------------------------


class Hostile(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def hostile_server(answer: Callable[[str], tuple[int, bytes]]) -> tuple[Hostile, str]:
    class H(http.server.BaseHTTPRequestHandler):
        def _go(self) -> None:
            status, body = answer(self.path)
            if status == 0:  # not HTTP at all
                self.wfile.write(body)
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _go

        def log_message(self, *a: Any) -> None:
            pass

    srv = Hostile(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.mark.parametrize(
    ("status", "body", "expect"),
    [
        (200, b"x" * 5000, "over"),  # MAX_ANSWER is patched to 4096 below
        (200, b"<html>hello</html>", "is not JSON"),
        (200, b"[1, 2, 3]", "not a JSON object"),
        (200, b"[" * 2000 + b"]" * 2000, "is not JSON"),  # nested beyond the recursion limit
        (200, b'{"revision": "\\u001b[2Jgotcha"}', "\\x1b[2Jgotcha"),
        (500, b'{"detail": "\\u001b]0;title\\u0007 and ' + ADMIN_TOKEN.encode() + b'"}', "<token>"),
        (502, b"\x00\x01 garbage", "not a policyd error body"),
        (0, b"SSH-2.0-OpenSSH\r\n\r\n", "did not answer with HTTP"),
    ],
)
def test_hostile_answers_give_clear_errors(
    status: int,
    body: bytes,
    expect: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rest, "MAX_ANSWER", 4096)
    srv, url = hostile_server(lambda _p: (status, body))
    try:
        monkeypatch.setenv("IPSECCTL_TOKEN", ADMIN_TOKEN)
        r = Run(capsys, monkeypatch)
        code = r("--policyd-url", url, "revision")
        text = r.out + r.err
        assert expect in text, text
        assert "\x1b" not in text and "\x07" not in text and "\x00" not in text
        if expect == "\\x1b[2Jgotcha":
            assert code == 0  # printed, escaped
        else:
            assert code == 1, text
    finally:
        srv.shutdown()
        srv.server_close()


def test_hostile_lists_and_pages(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    answers = {
        "/v1/policies": b'{"items": [{"name": "a"}], "next": "a"}',  # the same page forever
        "/v1/filter-lists": b'{"items": 5}',
        "/v1/filter-actions": b'{"items": [1, 2]}',
        "/v1/compiled": b'{"entries": [{"origin": 3}, 7], "connections": "x", "node": {}}',
    }
    srv, url = hostile_server(lambda p: (200, answers.get(p.split("?")[0], b"{}")))
    try:
        r = Run(capsys, monkeypatch)
        base = ["--policyd-url", url]
        page_loop = r(*base, "policy", "list")
        assert page_loop == 1 and "next page marker" in r.err
        assert r(*base, "filter-list", "list") == 1 and "without an items list" in r.err
        assert r(*base, "filter-action", "list") == 1 and "not an object" in r.err
        assert r(*base, "compiled", "--node", "n") == 0  # odd shapes are shown as "?"/"-"
        assert r(*base, "status") == 0
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_trickling_answer_is_cut_off(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rest, "READ_BUDGET", 0.5)
    monkeypatch.setattr(rest, "READ_CHUNK", 1)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b" ")
                except OSError:
                    return
                time.sleep(0.05)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        r = Run(capsys, monkeypatch)
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        assert r("--policyd-url", url, "--timeout", "0.1", "revision") == 3
        assert "too slowly" in r.err
    finally:
        stop.set()
        t.join(timeout=5)
        lsock.close()


# --- keymgr -------------------------------------------------------------------------------------


class FakeKeymgr(pb_grpc.KeyManagerServicer):
    """In-memory KeyManager: one established IKE SA with one child."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.events: queue.Queue[pb.KeymgrEvent] = queue.Queue()

    def ListIkeSas(self, request: Any, context: Any) -> pb.ListIkeSasResponse:
        now = time.time()
        return pb.ListIkeSasResponse(
            ike_sas=[
                pb.IkeSaInfo(
                    id=7,
                    connection="site-b",
                    role="initiator",
                    state="established",
                    local_addr="192.0.2.1",
                    local_port=500,
                    remote_addr="192.0.2.2",
                    remote_port=500,
                    spi_i="0011223344556677",
                    spi_r="8899aabbccddeeff",
                    encryption="AES_GCM_16-256",
                    integrity="NONE",
                    prf="PRF_HMAC_SHA2_256",
                    dh_group="CURVE_25519",
                    established_time=now - 60,
                    rekey_time=now + 3000,
                    expire_time=now + 3500,
                )
            ]
        )

    def ListChildSas(self, request: Any, context: Any) -> pb.ListChildSasResponse:
        return pb.ListChildSasResponse(
            child_sas=[
                pb.ChildSaInfo(
                    ike_sa_id=7,
                    connection="site-b",
                    name="net",
                    state="installed",
                    spi_in="c0000001",
                    spi_out="c0000002",
                    protocol="esp",
                    mode="tunnel",
                    encryption="AES_GCM_16-256",
                    integrity="NONE",
                    local_ts=["10.1.0.0/16"],
                    remote_ts=["10.2.0.0/16"],
                    reqid=1,
                    install_time=time.time() - 50,
                    counters_known=True,
                    packets_in=3,
                    bytes_in=300,
                    packets_out=4,
                    bytes_out=400,
                )
            ]
        )

    def Initiate(self, request: Any, context: Any) -> pb.InitiateResponse:
        self.calls.append(request)
        if request.connection != "site-b":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no connection named {request.connection}")
        return pb.InitiateResponse(started=True, detail="IKE_SA_INIT sent")

    def Terminate(self, request: Any, context: Any) -> pb.TerminateResponse:
        self.calls.append(request)
        return pb.TerminateResponse(ike_sas=1, detail="Delete sent")

    def WatchEvents(self, request: Any, context: Any) -> Iterator[pb.KeymgrEvent]:
        while context.is_active():
            try:
                yield self.events.get(timeout=0.05)
            except queue.Empty:
                continue


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    assert devpki.main([str(d), "--names", "keymgr,admin"]) == 0
    return d


@pytest.fixture
def keymgr(pki: Path, tmp_path: Path) -> Iterator[tuple[FakeKeymgr, str]]:
    fake = FakeKeymgr()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KeyManagerServicer_to_server(fake, server)
    target = f"unix:{tmp_path / 'km.sock'}"
    assert server.add_secure_port(target, tls.server_credentials(pki, "keymgr"))
    server.start()
    try:
        yield fake, target
    finally:
        server.stop(0).wait(5)


def test_sa_commands(
    run: Run,
    keymgr: tuple[FakeKeymgr, str],
    pki: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, target = keymgr
    monkeypatch.setenv("IPSECCTL_KEYMGR_API", target)
    monkeypatch.setenv("IPSECCTL_TLS_DIR", str(pki))
    assert run("sa", "list") == 0
    assert "site-b: #7, ESTABLISHED, IKEv2, 0011223344556677_i 8899aabbccddeeff_r" in run.out
    assert "rekey in " in run.out and "expires in " in run.out
    assert "net: INSTALLED, TUNNEL, reqid 1, ESP:AES_GCM_16-256" in run.out
    assert "300 bytes_i (3 pkts), 400 bytes_o (4 pkts)" in run.out
    d = run.json("sa", "list")
    assert d["ike_sas"][0]["spi_i"] == "0011223344556677" and d["child_sas"][0]["bytes_out"]
    fields = {k for s in d["ike_sas"] + d["child_sas"] for k in s}
    assert not {k for k in fields if k.endswith(("key", "keys")) or "secret" in k}, fields
    assert run("sa", "initiate", "site-b", "--child", "net") == 0
    assert run.out.strip() == "site-b/net: IKE_SA_INIT sent"
    assert fake.calls[-1].child == "net"
    assert run("sa", "initiate", "nope") == 1 and "NOT_FOUND: no connection named nope" in run.err
    assert run("sa", "terminate", "site-b", "--child", "net") == 0
    assert fake.calls[-1].child_sa.child == "net"
    assert run("sa", "terminate", "--id", "7") == 0 and fake.calls[-1].ike_sa_id == 7
    assert run("sa", "terminate", "site-b") == 0 and fake.calls[-1].connection == "site-b"
    assert run("sa", "terminate") == 2 and "connection name or --id" in run.err
    fake.events.put(
        pb.KeymgrEvent(
            kind=pb.KEYMGR_EVENT_KIND_UP,
            time=time.time(),
            connection="site-b",
            ike_sa_id=7,
            reason="\x1b[31mred",
        )
    )
    assert run("sa", "events", "--count", "1") == 0
    assert " up site-b #7 " in run.out and "\\x1b[31mred" in run.out and "\x1b" not in run.out
    # status: policyd's part and the SA summary
    assert run("status") == 0
    assert f"keymgr {target}: IKE SAs: 1 (1 established); Child SAs: 1 (1 installed)" in run.out
    # the old command line is an alias of the same code
    base = ["--api", target, "--tls-dir", str(pki)]
    assert keymgr_ctl.main([*base, "--list-sas"]) == 0


def test_sa_errors(run: Run, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPSECCTL_TLS_DIR", str(pki))
    monkeypatch.setenv("IPSECCTL_TIMEOUT", "3")
    target = f"unix:{tmp_path / 'no-keymgr.sock'}"
    assert run("--keymgr-api", target, "sa", "list") == 3
    assert f"cannot reach keymgr at {target}" in run.err
    assert run("--keymgr-api", target, "status") == 3  # policyd fine, keymgr configured but down
    assert "revision 0" in run.out and "cannot reach keymgr" in run.out
    assert run("--keymgr-api", target, "--tls-dir", str(tmp_path), "sa", "list") == 2
    assert "keymgr TLS" in run.err
