"""keymgr with certificates against strongSwan 5.9.8, both roles, end to end.

The labs of test_keymgr_strongswan.py (keymgr initiates, charon responds) and
test_keymgr_responder_strongswan.py (charon initiates, keymgr responds) are reused through their
hooks: charon gets a certificate swanctl.conf (``auth = pubkey``) and its ``x509/``,
``private/``, ``x509ca/`` directories; keymgr's connection gets ``auth: "pubkey"`` with its
certificate chain, key and CA (and CRL) files. Certificates, keys and CRLs are made by
strongSwan's ``pki``: per key kind a root CA -> intermediate CA -> end entities "moon"
(keymgr, SAN moon.example.org) and "sun" (charon, SAN sun.example.org).

Positive (each role): RSA-4096, ECDSA P-256 and Ed25519 chains establish with RFC 7427
signatures and ping flows through the tunnel. With RSA-4096 the IKE_AUTH messages exceed 1280
octets: a capture on the veth shows SKF fragments (RFC 7383) sent by both sides.

Negative (each role, keymgr judging charon): an untrusted CA, charon's certificate revoked by
keymgr's CRL, and an identity mismatch fail with AUTHENTICATION_FAILED on both sides (charon's
log shows the notify or its own refusal) and a readable reason in keymgr's log; nothing is
installed. (Wrong PSKs in both roles: test_keymgr_strongswan.py and
test_keymgr_responder_strongswan.py.)
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import bench_strongswan as bsw
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import KeymgrLab, open_lab
from tests.unit.pki_tool import PkiTool

pytestmark = pytest.mark.netns

MOON, SUN = "moon.example.org", "sun.example.org"
KINDS = ("rsa4096", "p256", "ed25519")


class Certs:
    """One hierarchy of one key kind, plus an unrelated root and a CRL revoking sun."""

    def __init__(self, d: pathlib.Path, kind: str) -> None:
        p = PkiTool(d)
        self.dir = d
        self.root = p.self_signed("root", kind, f"C=CH, O=Interop, CN=Root {kind}")
        self.inter = p.issue(
            "int", kind, f"C=CH, O=Interop, CN=Intermediate {kind}", self.root, ca=True
        )
        self.moon = p.issue("moon", kind, f"C=CH, O=Interop, CN={MOON}", self.inter, sans=(MOON,))
        self.sun = p.issue("sun", kind, f"C=CH, O=Interop, CN={SUN}", self.inter, sans=(SUN,))
        self.other = p.self_signed("other", "p256", "C=CH, O=Elsewhere, CN=Other Root")
        self.crl = p.crl("int", self.inter, (self.sun,))
        self.moon_chain = d / "moon-chain.crt"
        self.moon_chain.write_bytes(self.moon.cert.read_bytes() + self.inter.cert.read_bytes())


@pytest.fixture(scope="module")
def pki_dir() -> Iterator[pathlib.Path]:
    if not PkiTool.available():
        pytest.skip("strongSwan pki not installed")
    d = pathlib.Path(tempfile.mkdtemp(prefix="kmcert-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


_CERTS: dict[str, Certs] = {}


def certs(pki_dir: pathlib.Path, kind: str) -> Certs:
    if kind not in _CERTS:
        _CERTS[kind] = Certs(pki_dir / kind, kind)
    return _CERTS[kind]


def charon_cert_conf(local_auth: str = "pubkey") -> str:
    return f"""connections {{
    {bsw.CONN} {{
        version = 2
        local_addrs = {bsw.OUTER_B}
        remote_addrs = {bsw.OUTER_A}
        proposals = {bsw.IKE_PROPOSAL}
        local {{
            auth = {local_auth}
            certs = sun.crt
            id = @{SUN}
        }}
        remote {{
            auth = pubkey
            id = @{MOON}
        }}
        children {{
            {bsw.CONN} {{
                mode = tunnel
                local_ts = {bsw.INNER_B}/32
                remote_ts = {bsw.INNER_A}/32
                esp_proposals = {bsw.ESP_PROPOSAL}
                start_action = none
            }}
        }}
    }}
}}
"""


class CertMixin:
    """Hooks that turn a keymgr lab into a certificate lab."""

    certs: Certs
    cert_extra: dict[str, Any]  # keymgr's connection fields for certificates (start_keymgr)
    bench: bsw.StrongSwanPair
    workdir: pathlib.Path

    def use_certs(self, c: Certs, **keymgr: Any) -> None:
        self.certs = c
        self.cert_extra = {
            "auth": "pubkey",
            "psk_file": None,
            "cert_file": str(c.moon_chain),
            "key_file": str(c.moon.key),
            "ca_files": [str(c.root.cert)],
            "local_id": f"@{MOON}",
            "remote_id": f"@{SUN}",
            **keymgr,
        }

    charon_auth = "pubkey"  # charon's local auth (e.g. ike:rsa/pss-sha256)

    def charon_conf(self, psk: str) -> str:
        return charon_cert_conf(self.charon_auth)

    def charon_files(self, swanctl_dir: pathlib.Path) -> None:
        c = self.certs
        for sub, src, name in (
            ("x509", c.sun.cert, "sun.crt"),
            ("private", c.sun.key, "sun.key"),
            ("x509ca", c.root.cert, "root.crt"),
            ("x509ca", c.inter.cert, "int.crt"),
        ):
            (swanctl_dir / sub).mkdir(exist_ok=True)
            shutil.copyfile(src, swanctl_dir / sub / name)

    def capture(self) -> subprocess.Popen[bytes]:
        pcap = self.workdir / "ike.pcap"
        cmd = [
            "ip",
            "netns",
            "exec",
            self.bench.ns_b,
            "tcpdump",
            "-i",
            "veth0",
            "-U",
            "-n",
            "--immediate-mode",
        ]
        cmd += ["--immediate-mode"]  # deliver each packet at once (no block timeout)
        cmd += ["-w", str(pcap), "udp port 500 or udp port 4500"]
        err = self.workdir / "tcpdump.err"
        with err.open("wb") as f:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True
            )
        self.bench.procs.append(proc)
        deadline = time.monotonic() + 10
        while b"listening on" not in err.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        return proc

    def fragments(self, proc: subprocess.Popen[bytes]) -> dict[str, int]:
        """SKF (next payload 53) IKE messages in the capture, per sender address."""
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        argv = ["tshark", "-n", "-r", str(self.workdir / "ike.pcap"), "-T", "fields"]
        argv += ["-e", "ip.src", "-e", "isakmp.nextpayload", "-Y", "isakmp"]
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        counts = {bsw.OUTER_A: 0, bsw.OUTER_B: 0}
        for line in out.splitlines():
            src, _, nxt = line.partition("\t")
            if nxt.split(",")[0] == "53":
                counts[src] = counts.get(src, 0) + 1
        err = (self.workdir / "tcpdump.err").read_text(errors="replace")
        assert out.strip(), f"the capture holds no IKE message: {err}"
        return counts


class CertInitiatorLab(CertMixin, KeymgrLab):
    pass


class CertResponderLab(CertMixin, ResponderLab):
    pass


@pytest.fixture
def ilab() -> Iterator[CertInitiatorLab]:
    yield from open_lab(CertInitiatorLab)


@pytest.fixture
def rlab() -> Iterator[CertResponderLab]:
    yield from open_lab(CertResponderLab)


def _wait_log(lab: KeymgrLab, proc: subprocess.Popen[bytes], pattern: str, t: float = 20) -> str:
    deadline = time.monotonic() + t
    text = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"keymgr exited {proc.returncode}\n{lab.logs()}"
        text = (lab.workdir / "keymgr.log").read_text(errors="replace")
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    pytest.fail(f"no {pattern!r} in keymgr's log\n{lab.logs()}")


def _reasons(log_text: str) -> str:
    """The "reason" fields of keymgr's JSON log lines, one per line, unescaped."""
    out = []
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "reason" in rec:
                out.append(str(rec["reason"]))
    return "\n".join(out)


def _charon_log(lab: KeymgrLab) -> str:
    return (lab.workdir / "charon-b.log").read_text(errors="replace")


def _assert_no_secret(lab: CertMixin, log_text: str) -> None:
    key_lines = lab.certs.moon.key.read_text().splitlines()[1:-1]
    assert all(line not in log_text for line in key_lines if len(line) > 16)


# -- positive -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keymgr_initiates_with_certificates(
    ilab: CertInitiatorLab, pki_dir: pathlib.Path, kind: str
) -> None:
    ilab.use_certs(certs(pki_dir, kind))
    ilab.start_responder()
    ilab.start_worker()
    cap = ilab.capture() if kind == "rsa4096" else None
    keymgr = ilab.start_keymgr(ilab.cert_extra)
    log_text = _wait_log(ilab, keymgr, r"child installed|ike failed")
    assert "child installed" in log_text, ilab.logs()
    sas = ilab.list_sas_b()
    print(sas)
    assert re.search(r"ESTABLISHED, IKEv2, [0-9a-f]{16}_i [0-9a-f]{16}_r\*", sas), sas
    assert f"remote '{MOON}'" in sas and f"local  '{SUN}'" in sas, sas
    ping = ilab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{ilab.logs()}"
    assert "3 packets transmitted, 3 received" in ping.stdout, ping.stdout
    charon = _charon_log(ilab)
    # RFC 7427: charon verified our signature as such
    assert re.search(rf"authentication of '{MOON}' with .*successful", charon), charon[-3000:]
    if cap is not None:
        frags = ilab.fragments(cap)
        print(f"SKF messages per sender: {frags}")
        assert frags[bsw.OUTER_A] >= 2 and frags[bsw.OUTER_B] >= 2, frags
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, ilab.logs()
    _assert_no_secret(ilab, (ilab.workdir / "keymgr.log").read_text(errors="replace"))


@pytest.mark.parametrize("kind", KINDS)
def test_strongswan_initiates_to_keymgr_with_certificates(
    rlab: CertResponderLab, pki_dir: pathlib.Path, kind: str
) -> None:
    rlab.use_certs(certs(pki_dir, kind), start_action="respond")
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr(rlab.cert_extra)
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()
    cap = rlab.capture() if kind == "rsa4096" else None
    init = rlab.initiate()
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{rlab.logs()}"
    sas = rlab.list_sas_b()
    print(sas)
    assert re.search(r"ESTABLISHED, IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r", sas), sas
    assert f"remote '{MOON}'" in sas, sas
    ping = rlab.ping_from_b()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{rlab.logs()}"
    assert "3 packets transmitted, 3 received" in ping.stdout, ping.stdout
    assert re.search(rf"authentication of '{MOON}' with .*successful", _charon_log(rlab))
    if cap is not None:
        frags = rlab.fragments(cap)
        print(f"SKF messages per sender: {frags}")
        assert frags[bsw.OUTER_A] >= 2 and frags[bsw.OUTER_B] >= 2, frags
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, rlab.logs()
    _assert_no_secret(rlab, (rlab.workdir / "keymgr.log").read_text(errors="replace"))


def test_strongswan_rsassa_pss_signature_to_keymgr(
    rlab: CertResponderLab, pki_dir: pathlib.Path
) -> None:
    """charon signs with RSASSA-PSS (RFC 7427 with RFC 4055 parameters); keymgr verifies."""
    rlab.use_certs(certs(pki_dir, "rsa4096"), start_action="respond")
    rlab.charon_auth = "ike:rsa/pss-sha256"
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr(rlab.cert_extra)
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()
    init = rlab.initiate()
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{rlab.logs()}"
    charon = _charon_log(rlab)
    assert re.search(rf"authentication of '{SUN}' \(myself\) with RSA_EMSA_PSS", charon), charon
    assert "ESTABLISHED" in rlab.list_sas_b()
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, rlab.logs()


# -- negative: keymgr refuses charon ---------------------------------------------------------------

NEGATIVE = {
    "untrusted-ca": ("ca", r'no trusted CA for issuer "C=CH, O=Interop, CN=Root p256"'),
    "revoked": ("crl", r'certificate of "C=CH, O=Interop, CN=sun.example.org" revoked by CRL of'),
    "identity": ("id", r"identity sun\.example\.org (differs from|is not) the configured mars"),
}


def _negative(c: Certs, case: str) -> dict[str, Any]:
    what = NEGATIVE[case][0]
    if what == "ca":
        return {"ca_files": [str(c.other.cert)]}
    if what == "crl":
        return {"crl_files": [str(c.crl)]}
    return {"remote_id": "@mars.example.org"}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_keymgr_initiator_refuses_strongswan(
    ilab: CertInitiatorLab, pki_dir: pathlib.Path, case: str
) -> None:
    c = certs(pki_dir, "p256")
    ilab.use_certs(c, **_negative(c, case))
    ilab.start_responder()
    ilab.start_worker()
    keymgr = ilab.start_keymgr(ilab.cert_extra)
    log_text = _wait_log(ilab, keymgr, r"ike failed")
    print(log_text[-1500:])
    reason = NEGATIVE[case][1]
    charon = _charon_log(ilab)
    if case == "identity" and "no matching peer config" in charon:
        # charon refuses our IDr (mars) before we see its identity: its AUTHENTICATION_FAILED,
        # with keymgr's hint naming the identities involved
        assert "AUTHENTICATION_FAILED" in log_text, ilab.logs()
        assert re.search(r'"hint":"the responder refused .*@mars\.example\.org', log_text)
    else:
        assert re.search(reason, _reasons(log_text)), ilab.logs()
        # our INFORMATIONAL carrying AUTHENTICATION_FAILED makes charon drop its IKE SA
        want = re.compile(
            r"parsed INFORMATIONAL request 2 \[ N\(AUTH_FAILED\) \][^\n]*\n(.*\n)*.*IKE_SA deleted"
        )
        deadline = time.monotonic() + 5
        while not want.search(charon) and time.monotonic() < deadline:
            time.sleep(0.2)
            charon = _charon_log(ilab)
        assert want.search(charon), charon[-3000:]
    time.sleep(0.5)
    assert "ESTABLISHED" not in ilab.list_sas_b(), ilab.list_sas_b()
    assert ilab.client is not None and ilab.client.list_sas() == []
    _assert_no_secret(ilab, log_text)


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_keymgr_responder_refuses_strongswan(
    rlab: CertResponderLab, pki_dir: pathlib.Path, case: str
) -> None:
    c = certs(pki_dir, "p256")
    rlab.use_certs(c, start_action="respond", **_negative(c, case))
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr(rlab.cert_extra)
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()
    init = rlab.initiate()
    assert init.returncode != 0, init.stdout[-2000:]
    log_text = _wait_log(rlab, keymgr, r"ike failed")
    print(log_text[-1500:])
    assert re.search(
        r"AUTHENTICATION_FAILED: (initiator )?" + NEGATIVE[case][1], _reasons(log_text)
    ), rlab.logs()
    charon = _charon_log(rlab)
    assert "received AUTHENTICATION_FAILED notify error" in charon, charon[-3000:]
    assert "ESTABLISHED" not in rlab.list_sas_b()
    assert rlab.client is not None and rlab.client.list_sas() == []
    _assert_no_secret(rlab, log_text)
