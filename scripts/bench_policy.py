"""REST-change-to-enforced latency: how long after an administrator's change over REST every
dataplane worker and keymgr enforce it.

Setup (network namespaces, all removed at the end): policyd (SQLite, REST on loopback, watch
stream on a unix socket, mTLS), eight dataplane workers, each in its own namespace with one
outer address and its own node name, and one keymgr driving all eight (policy mode). The
policy: one policy assigned to all eight nodes with ``RULES`` permit/block rules on distinct
port filters and one negotiate rule (so keymgr has a connection per node).

One sample: toggle one rule's filter action (permit <-> block) with ``PUT`` (If-Match), note
the wall-clock time just before the request, then wait until each worker, and keymgr for each
node, reports the new revision (``GET /v1/enforced``); the sample's latency is the latest
``reported_at`` minus that time — the time from the administrator's request to the last
component's report that it enforces the change (the report is sent after the worker swapped
its SPD layer and keymgr reconfigured). p50, p99 and the maximum over ``SAMPLES`` samples.

Run alone: ``python scripts/bench_policy.py``; ``make bench`` (BENCH_ONLY=policy) writes the
section into docs/benchmarks.md. Needs root.
"""

from __future__ import annotations

import datetime
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.demo import Demo, _run, _wait  # noqa: E402
from services.runtime import devpki  # noqa: E402

WORKERS = 8
RULES = 50
SAMPLES = 60
PSK_REF = "bench"


def _document(nodes: list[str]) -> dict[str, object]:
    lists = [
        {
            "name": f"port-{i}",
            "filters": [
                {
                    "source": "10.1.0.0/16",
                    "destination": "10.2.0.0/16",
                    "protocol": "tcp",
                    "destination_port": 1000 + i,
                }
            ],
        }
        for i in range(RULES)
    ]
    lists.append(
        {"name": "vpn", "filters": [{"source": "10.1.0.0/16", "destination": "10.2.0.0/16"}]}
    )
    rules: list[dict[str, object]] = [
        {
            "name": f"r{i}",
            "filter_list": f"port-{i}",
            "filter_action": "permit" if i % 2 else "block",
        }
        for i in range(RULES)
    ]
    rules.append(
        {
            "name": "vpn",
            "filter_list": "vpn",
            "filter_action": "esp",
            "auth_methods": [{"method": "psk", "psk_ref": PSK_REF}],
            "tunnel_endpoint": "192.0.2.254",
        }
    )
    return {
        "filter_lists": lists,
        "filter_actions": [
            {"name": "permit", "action": "permit"},
            {"name": "block", "action": "block"},
            {
                "name": "esp",
                "action": "negotiate",
                "security_methods": [{"protocol": "esp", "esp": "aes256gcm16"}],
            },
        ],
        "policies": [{"name": "bench", "assigned_to": nodes, "rules": rules}],
    }


def _when(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def measure(samples: int = SAMPLES) -> tuple[list[float], int]:
    """Latencies in seconds, and the number of components that reported each sample."""
    d = Demo(pathlib.Path(tempfile.mkdtemp(prefix="bench-policy-")))
    nodes = [f"w{i}" for i in range(WORKERS)]
    try:
        for i, n in enumerate(nodes):
            _run(["ip", "netns", "add", d.ns(n)])
            d.namespaces.append(d.ns(n))
            ip = ["ip", "-n", d.ns(n)]
            _run([*ip, "link", "set", "lo", "up"])
            # a veth pair inside the namespace gives the worker an outer address (no dummy
            # interfaces on every kernel); nothing is sent
            _run([*ip, "link", "add", "wan0", "type", "veth", "peer", "name", "wan1"])
            _run([*ip, "addr", "add", f"192.0.2.{i + 1}/24", "dev", "wan0"])
            _run([*ip, "link", "set", "wan0", "up"])
            _run([*ip, "link", "set", "wan1", "up"])
        devpki.create(d.pki, ["policyd", "dataplane", "keymgr", "admin"])
        (d.workdir / "secrets").mkdir(mode=0o700)
        (d.workdir / "secrets" / PSK_REF).write_text("bench-psk-not-used-for-traffic")
        d.start_policyd()
        for i, n in enumerate(nodes):
            d.start_worker(n, f"192.0.2.{i + 1}", routes=("10.2.0.0/16",))
        d.start_keymgr(nodes)
        res = d.rest("POST", "/v1/apply", _document(nodes))
        want = {(n, c) for n in nodes for c in (n, "keymgr")}

        def everyone(revision: int) -> dict[tuple[str, str], tuple[int, str]]:
            got = d.enforced()
            return {k: v for k, v in got.items() if k in want and v[0] >= revision}

        _wait(
            "all components on the first revision",
            lambda: len(everyone(res["revision"])) == len(want),
            60,
        )
        latencies: list[float] = []
        path = "/v1/policies/bench/rules/r0"
        for k in range(samples):
            rule = d.rest("GET", path)
            body = {x: v for x, v in rule.items() if x not in ("revision", "policy")}
            body["filter_action"] = "permit" if body["filter_action"] == "block" else "block"
            t0 = time.time()
            out = d.rest("PUT", path, body, if_match=f'"r{rule["revision"]}"')
            revision = int(out["revision"])
            seen: dict[tuple[str, str], tuple[int, str]] = {}

            def done(
                revision: int = revision, seen: dict[tuple[str, str], tuple[int, str]] = seen
            ) -> bool:
                seen.update(everyone(revision))
                return len(seen) == len(want)

            _wait(f"sample {k}: all components on revision {revision}", done, 30, step=0.02)
            latencies.append(max(_when(at) for _rev, at in seen.values()) - t0)
        return latencies, len(want)
    finally:
        d.cleanup()
        shutil.rmtree(d.workdir, ignore_errors=True)


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def policy_section(
    latencies: list[float] | None = None, components: int = 2 * WORKERS
) -> list[str]:
    if latencies is None:
        latencies, components = measure()
    ms = [x * 1000 for x in latencies]
    return [
        "## Policy change to enforcement (REST to every worker and keymgr)",
        "",
        f"policyd (SQLite), {WORKERS} dataplane workers (one namespace and node each) and one "
        f"keymgr driving all {WORKERS}; a policy of {RULES + 1} rules assigned to every node "
        f"(scripts/bench_policy.py). Each of {len(ms)} samples toggles one rule's action with "
        f"PUT + If-Match and waits until all {components} reports are in (each worker, and "
        "keymgr for each node) with the new revision; latency = "
        "the last component's report time minus the time the PUT was sent (policyd commits, "
        "compiles per node, streams a delta; each worker rebuilds its SPD policy layer and "
        "inbound filter, keymgr reconfigures, each reports).",
        "",
        "| samples | p50 (ms) | p99 (ms) | max (ms) | mean (ms) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(ms)} | {_pct(ms, 50):.0f} | {_pct(ms, 99):.0f} | {max(ms):.0f} | "
        f"{statistics.fmean(ms):.0f} |",
    ]


if __name__ == "__main__":
    print("\n".join(policy_section()))
