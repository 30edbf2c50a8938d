"""Wycheproof AES-GCM and ChaCha20-Poly1305 vectors through our ESP AEAD path.

Every case runs through services.core.algorithms.make_aead with the registry record of the
ESP transform (AES-GCM-16 = 20, ChaCha20-Poly1305 = 28). ESP builds the 12-octet nonce from
the SA's 4-octet salt and the packet's 8-octet explicit IV (RFC 4106 §4, RFC 7634 §2), so a
Wycheproof IV maps to keying material = key || iv[:4] and explicit IV = iv[4:].

* "invalid" cases must be rejected: either the size is one ESP cannot express with our
  registry (nonce != salt + explicit IV = 12 octets, tag != 16 octets, AES key not 128/256 bits,
  refused by make_aead with AlgorithmError), or open() raises AuthenticationFailed.
* "valid" cases with supported sizes must open to the expected message, and sealing the
  message must give exactly ct || tag.
* "valid" cases with unsupported sizes are refused the same way (counted separately).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from services.core.algorithms import (
    ENCR,
    Aead,
    AlgorithmError,
    AuthenticationFailed,
    EncrAlgorithm,
    make_aead,
)
from services.core.iana import Encr

WYCHEPROOF = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors" / "wycheproof"

FILES = {
    "aes_gcm_test.json": Encr.AES_GCM_16,
    "chacha20_poly1305_test.json": Encr.CHACHA20_POLY1305,
}


class Unsupported(Exception):
    """A size the ESP transform cannot express (so the case is refused before any crypto)."""


def _load(name: str) -> dict[str, Any]:
    path = WYCHEPROOF / name
    if not path.is_file():
        pytest.skip(f"Wycheproof file {path} is absent (expected beside the repository)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _esp_aead(alg: EncrAlgorithm, key: bytes, iv: bytes, tag_len: int) -> tuple[Aead, bytes]:
    """Our keyed AEAD for this case and the explicit IV, or Unsupported / AlgorithmError."""
    if len(iv) != alg.salt_len + alg.iv_len:
        raise Unsupported(f"{len(iv)}-octet nonce (ESP: {alg.salt_len} salt + {alg.iv_len} IV)")
    if tag_len != alg.icv_len:
        raise Unsupported(f"{tag_len}-octet tag (ESP: {alg.icv_len})")
    return make_aead(alg, key + iv[: alg.salt_len]), iv[alg.salt_len :]


def _run_file(name: str) -> Counter[str]:
    data = _load(name)
    alg = ENCR[FILES[name]]
    counts: Counter[str] = Counter()
    failures: list[str] = []
    for group in data["testGroups"]:
        for t in group["tests"]:
            tc = f"{name}#{t['tcId']}"
            key, iv = bytes.fromhex(t["key"]), bytes.fromhex(t["iv"])
            aad, msg = bytes.fromhex(t["aad"]), bytes.fromhex(t["msg"])
            ct, tag = bytes.fromhex(t["ct"]), bytes.fromhex(t["tag"])
            result = t["result"]
            assert result in ("valid", "invalid"), f"{tc}: unexpected result {result!r}"
            counts[result] += 1
            try:
                aead, explicit_iv = _esp_aead(alg, key, iv, len(tag))
            except (Unsupported, AlgorithmError):
                counts[f"{result}: refused by size"] += 1
                continue
            try:
                opened = aead.open(explicit_iv, aad, ct + tag)
            except AuthenticationFailed:
                if result == "valid":
                    failures.append(f"{tc}: valid case failed to authenticate")
                else:
                    counts["invalid: rejected by open()"] += 1
                continue
            if result == "invalid":
                failures.append(f"{tc}: invalid case was accepted ({t['comment']})")
            elif opened != msg:
                failures.append(f"{tc}: decrypted to the wrong message")
            elif aead.seal(explicit_iv, aad, msg) != ct + tag:
                failures.append(f"{tc}: seal did not reproduce ct || tag")
            else:
                counts["valid: decrypted and re-sealed"] += 1
    assert not failures, "\n".join(failures[:20])
    return counts


def test_wycheproof_aes_gcm_through_the_esp_aead() -> None:
    c = _run_file("aes_gcm_test.json")
    print(dict(c))
    assert c["valid"] + c["invalid"] == _load("aes_gcm_test.json")["numberOfTests"]
    assert c["invalid"] == c["invalid: refused by size"] + c["invalid: rejected by open()"]
    assert c["valid"] == c["valid: refused by size"] + c["valid: decrypted and re-sealed"]
    # the run is not vacuous: 96-bit-nonce cases with 128/256-bit keys went through the AEAD
    assert c["valid: decrypted and re-sealed"] >= 70
    assert c["invalid: rejected by open()"] >= 50


def test_wycheproof_chacha20_poly1305_through_the_esp_aead() -> None:
    c = _run_file("chacha20_poly1305_test.json")
    print(dict(c))
    assert c["valid"] + c["invalid"] == _load("chacha20_poly1305_test.json")["numberOfTests"]
    assert c["invalid"] == c["invalid: refused by size"] + c["invalid: rejected by open()"]
    assert c["valid"] == c["valid: decrypted and re-sealed"], "all valid cases are 96-bit"
    assert c["valid: decrypted and re-sealed"] >= 250
    assert c["invalid: rejected by open()"] >= 50


def test_size_refusals_come_from_the_registry() -> None:
    """The refusals above are not test-side inventions: the registry offers only 12-octet
    nonces (4 salt + 8 IV), 16-octet ICVs, and make_aead refuses a 192-bit AES key."""
    gcm, chacha = ENCR[Encr.AES_GCM_16], ENCR[Encr.CHACHA20_POLY1305]
    for alg in (gcm, chacha):
        assert (alg.salt_len, alg.iv_len, alg.icv_len) == (4, 8, 16)
    assert gcm.key_bits == (128, 256) and chacha.key_bits == (256,)
    with pytest.raises(AlgorithmError):
        make_aead(gcm, bytes(24 + 4))
    with pytest.raises(AlgorithmError):
        make_aead(chacha, bytes(16 + 4))
