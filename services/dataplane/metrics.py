"""Prometheus metrics for a dataplane worker: a custom collector that reads the engine's and the
worker's counters under the engine lock at scrape time. Labels carry SPIs (hex), directions,
protocols and drop reasons — never keys or packet contents."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.core.iana import IpProto
from services.dataplane.convert import addr_text
from services.dataplane.settings import parse_host_port
from services.dataplane.worker import EngineHost

PREFIX = "ipsec_dataplane"


class WorkerCollector(Collector):
    """Collect engine + worker counters in one consistent snapshot."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        host = self.host
        w = host.worker_id
        per_sa: list[tuple[list[str], int, int, int, int, int]] = []
        with host.lock:
            eng = host.engine
            totals = {
                "rx_packets": eng.rx_packets,
                "rx_bytes": eng.rx_bytes,
                "tx_packets": eng.tx_packets,
                "tx_bytes": eng.tx_bytes,
                "bypass_packets": eng.bypass_packets,
                "keepalives": eng.keepalives,
                "keepalives_sent": eng.keepalives_sent,
            }
            drops = {r.value: n for r, n in eng.drops.items()}
            revision = eng.spd.revision
            policy_revision = eng.policy_revision
            spd_entries = len(eng.spd.entries)
            for sa in eng.all_sas():
                c = sa.cfg
                labels = [
                    w,
                    f"0x{c.spi:08x}",
                    c.direction.name.lower(),
                    "esp" if c.protocol == IpProto.ESP else "ah",
                    addr_text(c.dst),
                ]
                per_sa.append(
                    (labels, sa.packets, sa.bytes, sa.replay_drops, sa.auth_drops, sa.other_drops)
                )
        with host._io_lock:
            io = host.io.snapshot()

        for name, value in totals.items():
            m = CounterMetricFamily(
                f"{PREFIX}_{name}", f"Engine {name.replace('_', ' ')}", labels=["worker"]
            )
            m.add_metric([w], value)
            yield m
        d = CounterMetricFamily(
            f"{PREFIX}_drops", "Packets dropped, by reason", labels=["worker", "reason"]
        )
        for reason, n in sorted(drops.items()):
            d.add_metric([w, reason], n)
        yield d
        for name, value in io.items():
            m = CounterMetricFamily(
                f"{PREFIX}_{name}", f"Worker {name.replace('_', ' ')}", labels=["worker"]
            )
            m.add_metric([w], value)
            yield m
        ev = CounterMetricFamily(
            f"{PREFIX}_events_dropped",
            "Events dropped because a subscriber queue was full",
            labels=["worker"],
        )
        ev.add_metric([w], host.events.dropped)
        yield ev
        pd = CounterMetricFamily(
            f"{PREFIX}_punts_dropped",
            "Punted IKE datagrams dropped because a queue was full",
            labels=["worker"],
        )
        pd.add_metric([w], host.punts.dropped)
        yield pd

        sa_labels = ["worker", "spi", "direction", "protocol", "dst"]
        pk = CounterMetricFamily(
            f"{PREFIX}_sa_packets", "Packets processed per SA", labels=sa_labels
        )
        by = CounterMetricFamily(f"{PREFIX}_sa_bytes", "Bytes processed per SA", labels=sa_labels)
        dr = CounterMetricFamily(
            f"{PREFIX}_sa_drops", "Packets dropped per SA, by kind", labels=[*sa_labels, "kind"]
        )
        for labels, packets, nbytes, replay, auth, other in per_sa:
            pk.add_metric(labels, packets)
            by.add_metric(labels, nbytes)
            dr.add_metric([*labels, "replay"], replay)
            dr.add_metric([*labels, "auth"], auth)
            dr.add_metric([*labels, "other"], other)
        yield pk
        yield by
        yield dr

        g = GaugeMetricFamily(f"{PREFIX}_sas", "Installed SAs", labels=["worker"])
        g.add_metric([w], len(per_sa))
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_spd_revision", "keymgr layer SPD revision enforced", labels=["worker"]
        )
        g.add_metric([w], revision)
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_policy_revision",
            "policyd policy revision of the SPD's policy layer (0 = none)",
            labels=["worker"],
        )
        g.add_metric([w], policy_revision)
        yield g
        f = CounterMetricFamily(
            f"{PREFIX}_inbound_filter_packets",
            "Inbound clear packets by filter decision",
            labels=["worker", "decision"],
        )
        for decision, n in sorted(host.filter_counters().items()):
            f.add_metric([w, decision], n)
        yield f
        g = GaugeMetricFamily(f"{PREFIX}_spd_entries", "SPD entries", labels=["worker"])
        g.add_metric([w], spd_entries)
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_event_subscribers", "WatchEvents streams", labels=["worker"]
        )
        g.add_metric([w], host.events.subscribers)
        yield g


def registry_for(host: EngineHost) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WorkerCollector(host))
    return reg


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(host: EngineHost, listen: str) -> MetricsServer:
    """Serve /metrics on ``listen`` (HOST:PORT) from a background thread."""
    addr, port = parse_host_port(listen)
    server, thread = start_http_server(port, addr=addr or "0.0.0.0", registry=registry_for(host))  # noqa: S104
    return MetricsServer(server, thread)
