"""Pure helpers of `make bench`: part selection, section splicing of docs/benchmarks.md, and
the IKE handshake benchmark's statistics, /proc parsing, table and profile summary."""

from __future__ import annotations

import pytest

from scripts import bench_ike as bi
from scripts.bench import PARTS, parse_only, splice_sections, split_sections

DOC = """# Benchmarks

Run by `make bench` on 2026-01-01; machine: X.

## ESP transform vs the bare AEAD call

old esp

## TCP throughput between two dataplane workers

| setup | throughput |
| a | 1 |
"""


def test_parse_only() -> None:
    assert parse_only("") == PARTS and parse_only("all") == PARTS
    assert parse_only("ike") == ("ike",)
    assert parse_only(" IKE , esp") == ("esp", "ike")  # document order, not the given one
    with pytest.raises(ValueError, match="unknown part ikev2"):
        parse_only("ikev2")


def test_splice_replaces_one_section_and_keeps_the_others() -> None:
    new = ["## ESP transform vs the bare AEAD call", "", "new esp"]
    out = splice_sections(DOC, [new])
    head, sections = split_sections(out)
    assert head[2] == "Run by `make bench` on 2026-01-01; machine: X."
    assert list(sections) == [
        "## ESP transform vs the bare AEAD call",
        "## TCP throughput between two dataplane workers",
    ]
    assert "new esp" in out and "old esp" not in out
    assert "| a | 1 |" in out  # untouched section kept verbatim


def test_splice_appends_a_new_section_once() -> None:
    ike = [bi.IKE_HEADING, "", "rates"]
    once = splice_sections(DOC, [ike])
    twice = splice_sections(once, [[bi.IKE_HEADING, "", "rates 2"]])
    assert once.endswith("rates\n") and twice.count(bi.IKE_HEADING) == 1
    assert "rates 2" in twice and "rates\n" not in twice
    assert twice.index("## TCP") < twice.index(bi.IKE_HEADING)
    assert "| a | 1 |\n\n" + bi.IKE_HEADING in twice  # a blank line before each heading
    with pytest.raises(ValueError):
        splice_sections(DOC, [["no heading"]])


def test_percentile_nearest_rank() -> None:
    assert bi.percentile([], 0.5) == 0.0
    vals = [float(v) for v in range(1, 101)]  # 1..100
    assert bi.percentile(vals, 0.5) == 50.0
    assert bi.percentile(vals, 0.95) == 95.0
    assert bi.percentile([3.0, 1.0, 2.0], 1.0) == 3.0
    assert bi.percentile([3.0, 1.0, 2.0], 0.0) == 1.0
    with pytest.raises(ValueError):
        bi.percentile([1.0], 1.5)


def test_cpu_share() -> None:
    assert bi.cpu_share(5.0, 10.0) == "50%"
    assert bi.cpu_share(12.0, 10.0) == "120%"  # several threads or processes
    assert bi.cpu_share(1.0, 0.0) == "-"


def test_parse_proc_stat_with_spaces_and_parentheses_in_the_name() -> None:
    # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    text = "4242 (we (ird) name) S 1 4242 4240 0 -1 4194560 10 0 0 0 150 25 0 0 20 0 3 0"
    assert bi.parse_proc_stat(text) == (4240, 175)
    with pytest.raises(ValueError):
        bi.parse_proc_stat("4242 no parens")
    with pytest.raises(ValueError):
        bi.parse_proc_stat("4242 (x) S 1 2")


def test_rate_summary_and_section() -> None:
    results = [
        bi.RunResult("keymgr + dataplane worker", 1000, 10.0, 0, 1.0, (("keymgr", 6.0),)),
        bi.RunResult("charon kernel-libipsec", 4000, 10.0, 2, 5.0, (("charon", 7.5),)),
        bi.RunResult("keymgr + dataplane worker", 1200, 10.0),
        bi.RunResult("charon kernel-libipsec", 0, 0.0, error="boom"),
        bi.RunResult("charon kernel-libipsec", 0, 0.0, error="a | b\n  c"),
    ]
    assert results[0].rate == 100.0 and results[3].rate == 0.0
    med = bi.summarize(results)
    assert med == {"keymgr + dataplane worker": 110.0, "charon kernel-libipsec": 400.0}
    lines = bi.format_section(
        results, date="2026-11-23", machine="CPU, 2 cores", window=16, warmup=3, duration=10
    )
    text = "\n".join(lines)
    assert lines[0] == bi.IKE_HEADING and "Run on 2026-11-23; machine: CPU, 2 cores." in text
    assert "| 1 | keymgr + dataplane worker | 100 | 0 |" in text
    assert "| 1 | charon kernel-libipsec | 400 | 2 |" in text and "| 50% | charon 75% |" in text
    assert "| 2 | charon kernel-libipsec | (failed: boom) |" in text
    assert "| 3 | charon kernel-libipsec | (failed: a / b c) |" in text  # one table cell
    assert "Goal keymgr >= charon: NOT met (ratio 0.28)" in text


def test_profile_summary_shares_of_run() -> None:
    daemon = "/x/services/keymgr/daemon.py"
    client = "/x/services/dataplane/client.py"
    stats = {
        (daemon, 10, "run"): (1, 1, 0.1, 10.0, {}),
        ("/usr/lib/python3.11/queue.py", 5, "get"): (50, 50, 0.2, 2.5, {}),
        (client, 7, "apply_sas_async"): (40, 40, 0.1, 4.0, {}),
        ("~", 0, "<method 'acquire' of '_thread.lock' objects>"): (9, 9, 3.0, 3.0, {}),
    }
    text = "\n".join(bi.profile_summary(stats, top=2))
    assert "| Keymgr.run (whole main loop) | 1 | 100% |" in text
    assert "| waiting for punted IKE (queue.get; idle) | 50 | 25% |" in text
    assert "| gRPC ApplySAs sent (apply_sas_async) | 40 | 40% |" in text
    assert "| `<method 'acquire' of '_thread.lock' objects>` | 9 | 30% |" in text
    assert bi.profile_summary({}) == ["(no Keymgr.run in the profile)"]


def test_profile_verdict_names_the_shares() -> None:
    daemon = "/x/services/keymgr/daemon.py"
    client = "/x/services/dataplane/client.py"
    stats = {
        (daemon, 10, "run"): (1, 1, 0.1, 10.0, {}),
        ("/usr/lib/python3.11/queue.py", 5, "get"): (50, 50, 0.2, 1.0, {}),
        (daemon, 20, "_install"): (10, 10, 0.1, 5.0, {}),
        (client, 7, "apply_sas_async"): (20, 20, 0.1, 3.0, {}),
        (daemon, 8, "_settle_op"): (5, 5, 0.1, 3.0, {}),
        ("/x/services/core/ike/responder.py", 3, "receive"): (30, 30, 0.1, 1.5, {}),
        ("/usr/lib/python3.11/logging/__init__.py", 1, "_log"): (50, 50, 0.1, 0.5, {}),
    }
    text = bi.profile_verdict(stats)
    assert "busy 90% of the time" in text
    assert "60% of it went to the worker's SA API" in text
    assert "(2.0 ApplySAs calls per handshake" in text
    assert "30% building and sending them, 30% waiting where ordering" in text
    assert "15% went to the IKE core" in text and "5% to logging" in text
    assert bi.profile_verdict({}) == ""


def test_worker_calls_from_keymgr_log() -> None:
    log = "\n".join(
        [
            '{"msg":"child installed","conn":"resp"}',
            '{"ts":"x","msg":"worker calls","apply_sas":12,"mean_ms":2.5,"max_ms":9.75}',
            "not json",
        ]
    )
    assert bi.worker_calls(log) == (12, 2.5, 9.75)
    assert bi.worker_calls('{"msg":"worker calls","apply_sas":"x"}') == (0, 0.0, 0.0)
    assert bi.worker_calls("") == (0, 0.0, 0.0)
    assert bi.worker_call_count(log) == 0  # a keymgr that did not log it
    joined = '{"msg":"worker calls","apply_sas":12,"calls":7,"mean_ms":2.5,"max_ms":9.75}'
    assert bi.worker_call_count(joined) == 7 and bi.worker_calls(joined) == (12, 2.5, 9.75)
    assert bi.worker_call_count('{"msg":"worker calls","calls":"x"}') == 0


def test_cpu_per_handshake() -> None:
    rs = [
        bi.RunResult("keymgr", 100, 10.0, resp_cpu=(("worker", 0.4), ("keymgr", 0.6))),
        bi.RunResult("keymgr", 200, 10.0, resp_cpu=(("worker", 0.4), ("keymgr", 0.6))),
        bi.RunResult("charon", 500, 10.0, resp_cpu=(("charon", 0.5),)),
        bi.RunResult("charon", 0, 0.0, error="boom"),
    ]
    text = bi.cpu_per_handshake(rs)
    assert "keymgr 7.5 ms (worker 3.0 + keymgr 4.5)" in text
    assert "charon 1.0 ms (charon 1.0)" in text
    assert bi.cpu_per_handshake([]) == ""


def test_spd_bench_policy_and_section() -> None:
    import random

    from scripts.bench_spd import BROAD, Row, flows, probes, realistic_policy, spd_section
    from services.core.spd import Spd

    entries = realistic_policy(40)
    assert len(entries) == 40 and len({e.policy_id for e in entries}) == 40
    assert {e.selector.src.version for e in entries} == {4, 6}
    ports = [(e.selector.dport_lo, e.selector.dport_hi) for e in entries]
    assert (0, 0xFFFF) in ports and any(lo == hi for lo, hi in ports)
    assert any(0 < hi - lo < 0xFFFF for lo, hi in ports)  # ranges that are not "any"
    spd = Spd()
    spd.replace(entries, 1)
    assert [str(e.selector.dst) for e in spd.entries[-len(BROAD) :]] == [b[1] for b in BROAD]
    assert probes(spd._index, flows(entries, 100, random.Random(1)))[1] == 0  # all groups small
    large = realistic_policy(3000)
    spd.replace(large, 2)
    probed, probed_large = probes(spd._index, flows(large, 500, random.Random(2)))
    assert 1 <= probed and probed_large < 1.2  # unfiltered, misses probe about 2.4 large tables

    def rows(miss_100k: float) -> list[Row]:
        return [
            Row(10, 1000.0, 100.0, 1e3, 0.0, True),
            Row(100_000, miss_100k, 100.0, 1e6, 0.2, True),
        ]

    assert any("met (1.40 x" in line and "NOT" not in line for line in spd_section(rows(1400.0)))
    assert any("NOT met (1.60 x" in line for line in spd_section(rows(1600.0)))
