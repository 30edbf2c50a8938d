"""keymgr's operator API from the command line: ``ipsecctl sa ...`` (proto/ipsec/v1/keymgr.proto,
docs/keymgr.md "Operator API"): list IKE and Child SAs (state, algorithms, lifetimes,
counters; the API carries no keys), initiate and terminate connections and children, stream SA
events. The one implementation behind ``ipsecctl sa`` and ``python -m services.keymgr.ctl``.

Over mutual TLS (services/runtime/tls.py): the client's certificate ``<client-name>.pem`` from
``tls_dir`` must chain to keymgr's ``ca.pem``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from services.ctl.errors import ConnectError, CtlError, ServerError, UsageError
from services.ctl.output import clean
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import tls

KIND_NAMES = {v: k for k, v in pb.KeymgrEventKind.items()}


def _when(t: float) -> str:
    if not t:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "?"


def _in(t: float, now: float) -> str:
    if not t:
        return "-"
    left = t - now
    return f"in {left:.0f}s" if left >= 0 else f"{-left:.0f}s ago"


def format_sas(
    ike: Sequence[pb.IkeSaInfo], children: Sequence[pb.ChildSaInfo], now: float | None = None
) -> str:
    """swanctl-like text for ListIkeSas + ListChildSas."""
    now = time.time() if now is None else now
    lines: list[str] = []
    c_ = clean
    for s in ike:
        lines.append(
            f"{c_(s.connection)}: #{s.id}, {c_(s.state.upper())}, IKEv2, {c_(s.spi_i)}_i "
            f"{c_(s.spi_r)}_r" + (" (NAT-T)" if s.nat_t else "")
        )
        lines.append(
            f"  local  {c_(s.local_addr)}[{s.local_port}]  remote {c_(s.remote_addr)}"
            f"[{s.remote_port}]  role {c_(s.role)}"
        )
        lines.append(f"  {c_(s.encryption)}/{c_(s.integrity)}/{c_(s.prf)}/{c_(s.dh_group)}")
        if s.established_time:
            lines.append(f"  established {_when(s.established_time)}")
        if s.rekey_time or s.expire_time:
            lines.append(f"  rekey {_in(s.rekey_time, now)}, expires {_in(s.expire_time, now)}")
        if s.failure_reason:
            lines.append(f"  failed: {c_(s.failure_reason)}")
        for c in children:
            if c.ike_sa_id != s.id or not s.id:
                continue
            lines.append(
                f"  {c_(c.name or c.connection)}: {c_(c.state.upper())}, {c_(c.mode.upper())}"
                f"{'-in-UDP' if c.udp_encap else ''}, reqid {c.reqid}, "
                f"{c_(c.protocol.upper())}:"
                + "/".join(
                    c_(x) for x in (c.encryption, c.integrity if c.integrity != "NONE" else "") if x
                )
                + (", ESN" if c.esn else "")
            )
            counters = (
                f"{c.bytes_in} bytes_i ({c.packets_in} pkts), "
                f"{c.bytes_out} bytes_o ({c.packets_out} pkts)"
                if c.counters_known
                else "counters unavailable"
            )
            lines.append(f"    installed {_when(c.install_time)}")
            lines.append(f"    in  {c_(c.spi_in)},  out {c_(c.spi_out)}; {counters}")
            lines.append(f"    local  {c_(' '.join(c.local_ts))}")
            lines.append(f"    remote {c_(' '.join(c.remote_ts))}")
    orphans = [c for c in children if c.ike_sa_id not in {s.id for s in ike if s.id}]
    for c in orphans:
        lines.append(
            f"{c_(c.connection)}: child {c_(c.name) + ' ' if c.name else ''}"
            f"{c_(c.spi_in)}/{c_(c.spi_out)} {c_(c.state.upper())}"
        )
    return "\n".join(lines) if lines else "no SAs"


def format_event(e: pb.KeymgrEvent) -> str:
    kind = KIND_NAMES.get(e.kind, str(e.kind)).removeprefix("KEYMGR_EVENT_KIND_").lower()
    parts = [_when(e.time), kind, clean(e.connection)]
    if e.ike_sa_id:
        parts.append(f"#{e.ike_sa_id}")
    if e.spi_i:
        parts.append(f"ike {clean(e.spi_i)}_i {clean(e.spi_r)}_r")
    if e.child:
        parts.append(f"child {clean(e.child)}")
    if e.spi_in:
        parts.append(f"child in {clean(e.spi_in)} out {clean(e.spi_out)}")
    if e.old_spi_in:
        parts.append(f"replaces in {clean(e.old_spi_in)} out {clean(e.old_spi_out)}")
    if e.reason:
        parts.append(f"- {clean(e.reason)}")
    return " ".join(parts)


def summary(ike: Sequence[pb.IkeSaInfo], children: Sequence[pb.ChildSaInfo]) -> str:
    """One line: IKE SAs by state and Child SAs installed."""
    states: dict[str, int] = {}
    for s in ike:
        states[s.state] = states.get(s.state, 0) + 1
    by = ", ".join(f"{n} {clean(k)}" for k, n in sorted(states.items())) or "none"
    installed = sum(1 for c in children if c.state == "installed")
    return f"IKE SAs: {len(ike)} ({by}); Child SAs: {len(children)} ({installed} installed)"


class Keymgr:
    """keymgr's KeyManager API at ``target`` (``unix:/path`` or ``HOST:PORT``), mTLS."""

    def __init__(
        self, target: str, tls_dir: Path, *, server_name: str, client_name: str, timeout: float
    ) -> None:
        self.target = target
        self.timeout = timeout
        try:
            self._channel = tls.secure_channel(
                target, tls_dir, server_name=server_name, client_name=client_name
            )
        except tls.TlsConfigError as e:
            raise UsageError(f"keymgr TLS: {e} (--tls-dir/IPSECCTL_TLS_DIR)") from None
        self.stub = pb_grpc.KeyManagerStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Keymgr:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _rpc(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except grpc.RpcError as e:
            raise self.error(e) from None

    def error(self, e: grpc.RpcError) -> CtlError:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else ""
        name = code.name if code is not None else "UNKNOWN"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ConnectError(
                f"cannot reach keymgr at {self.target}: {name}: {clean(details or '', 500)}; "
                "check --keymgr-api/IPSECCTL_KEYMGR_API, the TLS directory and names"
            )
        return ServerError(f"keymgr: {name}: {clean(details or '', 2000)}")

    def list(self, connection: str = "") -> tuple[Sequence[pb.IkeSaInfo], Sequence[pb.ChildSaInfo]]:
        t = self.timeout
        ike = self._rpc(
            lambda: self.stub.ListIkeSas(pb.ListIkeSasRequest(connection=connection), timeout=t)
        ).ike_sas
        children = self._rpc(
            lambda: self.stub.ListChildSas(pb.ListChildSasRequest(connection=connection), timeout=t)
        ).child_sas
        return ike, children

    def initiate(self, connection: str, child: str = "") -> pb.InitiateResponse:
        req = pb.InitiateRequest(connection=connection, child=child)
        return self._rpc(lambda: self.stub.Initiate(req, timeout=self.timeout))  # type: ignore[no-any-return]

    def terminate(
        self, connection: str = "", child: str = "", ike_sa_id: int = 0
    ) -> pb.TerminateResponse:
        if ike_sa_id:
            req = pb.TerminateRequest(ike_sa_id=ike_sa_id)
        elif child:
            req = pb.TerminateRequest(child_sa=pb.ChildSaRef(connection=connection, child=child))
        else:
            req = pb.TerminateRequest(connection=connection)
        return self._rpc(lambda: self.stub.Terminate(req, timeout=self.timeout))  # type: ignore[no-any-return]

    def events(self) -> Generator[pb.KeymgrEvent, None, None]:
        stream = self.stub.WatchEvents(pb.WatchEventsKeymgrRequest())
        try:
            yield from stream
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise self.error(e) from None
        finally:
            stream.cancel()


def sa_dicts(
    ike: Sequence[pb.IkeSaInfo], children: Sequence[pb.ChildSaInfo]
) -> dict[str, list[dict[str, Any]]]:
    """The listing as plain data for ``-o json`` (field names as in keymgr.proto)."""
    opts: dict[str, Any] = {
        "preserving_proto_field_name": True,
        "always_print_fields_with_no_presence": True,
    }
    try:
        return {
            "ike_sas": [MessageToDict(s, **opts) for s in ike],
            "child_sas": [MessageToDict(c, **opts) for c in children],
        }
    except TypeError:  # protobuf < 5.26 names the option differently
        opts = {"preserving_proto_field_name": True, "including_default_value_fields": True}
        return {
            "ike_sas": [MessageToDict(s, **opts) for s in ike],
            "child_sas": [MessageToDict(c, **opts) for c in children],
        }


def event_dict(e: pb.KeymgrEvent) -> dict[str, Any]:
    d: dict[str, Any] = MessageToDict(e, preserving_proto_field_name=True)
    d["kind"] = KIND_NAMES.get(e.kind, str(e.kind)).removeprefix("KEYMGR_EVENT_KIND_").lower()
    return d
