"""Fuzz services.dataplane.convert with hypothesis: random, mutated and random-bytes protobuf
messages either convert or raise ConversionError — never any other exception — and whatever
converts is accepted by the core or refused with ConfigError."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.engine import Dataplane
from services.core.sa import ConfigError, Direction, Lifetime, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.dataplane import convert
from services.dataplane.convert import ConversionError
from services.dataplane.grpc_api import DataplaneService
from services.dataplane.worker import EngineHost
from services.pb.ipsec.v1 import dataplane_pb2 as pb

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
ADDR = st.one_of(
    V4,
    V6,
    st.sampled_from(
        [
            "",
            "0.0.0.0",
            "::",
            "fe80::1%eth0",
            "1.2.3",
            "::ffff:1.2.3.4",
            "256.1.1.1",
            "10.0.0.1/24",
            "\x00",
            "a" * 200,
        ]
    ),
    st.text(max_size=40),
)
PREFIX = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", V4, st.integers(0, 40)),
    st.builds(lambda a, n: f"{a}/{n}", V6, st.integers(0, 140)),
    ADDR,
)
ENUM = st.one_of(st.sampled_from([0, 1, 2, 3, 50, 51]), I32)
ENCR = st.one_of(st.sampled_from([0, 3, 11, 12, 13, 20, 21, 28]), U32)
INTEG = st.one_of(st.sampled_from([0, 1, 2, 5, 12, 13, 14]), U32)
KEY = st.one_of(
    st.binary(max_size=80), st.sampled_from([bytes(n) for n in (16, 20, 32, 36, 48, 64)])
)
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0]))
PORT = st.one_of(st.sampled_from([0, 1, 500, 4500, 65535, 65536]), U32)


def selectors() -> st.SearchStrategy[pb.TrafficSelector]:
    return st.builds(
        pb.TrafficSelector,
        src=PREFIX,
        dst=PREFIX,
        proto=st.one_of(st.integers(0, 300), U32),
        sport_lo=PORT,
        sport_hi=PORT,
        dport_lo=PORT,
        dport_hi=PORT,
    )


def sa_ids() -> st.SearchStrategy[pb.SAId]:
    return st.builds(
        pb.SAId, spi=st.one_of(st.integers(0, 300), U32), dst=ADDR, protocol=ENUM, direction=ENUM
    )


def lifetimes() -> st.SearchStrategy[pb.Lifetime]:
    return st.builds(
        pb.Lifetime,
        soft_seconds=FLOAT,
        hard_seconds=FLOAT,
        soft_bytes=U64,
        hard_bytes=U64,
        soft_packets=U64,
        hard_packets=U64,
    )


@st.composite
def sa_configs(draw: st.DrawFn) -> pb.SAConfig:
    m = pb.SAConfig(
        mode=draw(ENUM),
        src=draw(ADDR),
        encr_id=draw(ENCR),
        encr_key=draw(KEY),
        integ_id=draw(INTEG),
        integ_key=draw(KEY),
        esn=draw(st.booleans()),
        replay_window=draw(st.one_of(st.integers(0, 70000), U32)),
        seq_lease_start=draw(U64),
        seq_lease_end=draw(U64),
        tfc_pad_to=draw(st.one_of(st.integers(0, 70000), U32)),
        reqid=draw(U32),
        allow_legacy=draw(st.booleans()),
    )
    if draw(st.booleans()):
        m.id.CopyFrom(draw(sa_ids()))
    if draw(st.booleans()):
        m.encap.CopyFrom(pb.UdpEncap(sport=draw(PORT), dport=draw(PORT)))
    if draw(st.booleans()):
        m.lifetime.CopyFrom(draw(lifetimes()))
    m.selectors.extend(draw(st.lists(selectors(), max_size=3)))
    return m


ESP_SUITES = [
    (20, 20, 0, 0),
    (20, 36, 0, 0),
    (28, 36, 0, 0),
    (21, 20, 0, 0),
    (12, 16, 12, 32),
    (12, 32, 14, 64),
    (11, 0, 13, 48),
    (3, 24, 2, 20),
]
AH_SUITES = [(0, 0, 12, 32), (0, 0, 13, 48), (0, 0, 14, 64), (0, 0, 2, 20)]


@st.composite
def plausible_sa_configs(draw: st.DrawFn) -> pb.SAConfig:
    """Mostly-valid configs (coherent algorithm suites, occasionally perturbed), so that the
    deeper checks and successful installs are reached too."""
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).filter(lambda a: not a.is_unspecified).map(str)
    esp = draw(st.booleans())
    encr_id, encr_len, integ_id, integ_len = draw(st.sampled_from(ESP_SUITES if esp else AH_SUITES))
    if draw(st.integers(0, 9)) == 0:
        encr_len += draw(st.integers(-4, 4))
    if draw(st.integers(0, 9)) == 0:
        integ_len += draw(st.integers(-4, 4))
    m = pb.SAConfig(
        id=pb.SAId(
            spi=draw(st.integers(256, 2**32 - 1)),
            dst=draw(addr),
            protocol=pb.PROTOCOL_ESP if esp else pb.PROTOCOL_AH,
            direction=draw(st.sampled_from([1, 2])),
        ),
        mode=draw(st.sampled_from([1, 2])),
        src=draw(addr),
        encr_id=encr_id,
        encr_key=bytes(max(encr_len, 0)),
        integ_id=integ_id,
        integ_key=bytes(max(integ_len, 0)),
        esn=draw(st.booleans()),
        replay_window=draw(st.sampled_from([0, 32, 64, 4096])),
        allow_legacy=draw(st.booleans()),
        reqid=draw(st.integers(0, 5)),
        seq_lease_start=draw(st.sampled_from([0, 1, 1000])),
        seq_lease_end=draw(st.sampled_from([0, 1000, 2000, 2**40])),
        tfc_pad_to=draw(st.sampled_from([0, 1500])),
    )
    if esp and draw(st.booleans()):
        m.encap.CopyFrom(pb.UdpEncap(sport=draw(st.sampled_from([0, 4500])), dport=4500))
    if draw(st.booleans()):
        m.lifetime.CopyFrom(
            pb.Lifetime(
                soft_seconds=draw(st.sampled_from([0.0, 5.0, 50.0])),
                hard_seconds=draw(st.sampled_from([0.0, 10.0])),
            )
        )
    fam = "::/0" if v6 else "0.0.0.0/0"
    if draw(st.booleans()):
        m.selectors.add(src=fam, dst=fam, proto=draw(st.sampled_from([0, 6, 17])))
    return m


def _check_install(m: pb.SAConfig) -> None:
    try:
        cfg = convert.sa_config_from_pb(m)
    except ConversionError as e:
        assert str(e)
        return
    assert isinstance(cfg, SaConfig)
    try:
        Dataplane().install_sa(cfg, 0.0)
    except ConfigError:
        pass


def _only_conversion_error(fn: Callable[[Any], object], msg: Message) -> None:
    try:
        fn(msg)
    except ConversionError:
        pass


@FUZZ
@given(sa_configs())
def test_random_sa_configs(m: pb.SAConfig) -> None:
    _check_install(m)


@FUZZ
@given(plausible_sa_configs())
def test_plausible_sa_configs(m: pb.SAConfig) -> None:
    _check_install(m)


@FUZZ
@given(
    plausible_sa_configs(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_serialized_sa_configs(m: pb.SAConfig, flips: list[tuple[int, int]]) -> None:
    data = bytearray(m.SerializeToString())
    for pos, val in flips:
        data[pos % len(data)] = val
    try:
        mutated = pb.SAConfig.FromString(bytes(data))
    except DecodeError:
        return
    _check_install(mutated)


PARSERS: list[tuple[type[Message], Callable[[Any], object]]] = [
    (pb.InstallSARequest, convert.install_from_pb),
    (pb.SAConfig, convert.sa_config_from_pb),
    (pb.UpdateSARequest, convert.update_from_pb),
    (pb.DeleteSARequest, convert.delete_from_pb),
    (pb.ReplaceSPDRequest, convert.spd_from_pb),
    (pb.IkeDatagram, convert.ike_from_pb),
    (pb.Event, convert.event_from_pb),
    (pb.SAInfo, convert.sa_info_from_pb),
    (pb.GetStatsResponse, convert.stats_from_pb),
    (pb.TrafficSelector, convert.selector_from_pb),
    (pb.Lifetime, convert.lifetime_from_pb),
]


@pytest.mark.parametrize(("cls", "fn"), PARSERS, ids=[c.__name__ for c, _ in PARSERS])
@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_messages(
    cls: type[Message], fn: Callable[[Any], object], data: bytes
) -> None:
    try:
        msg = cls.FromString(data)
    except DecodeError:
        return
    _only_conversion_error(fn, msg)


@FUZZ
@given(st.builds(pb.UpdateSARequest, id=sa_ids(), seq_lease_end=U64, lifetime=lifetimes()))
def test_random_updates(m: pb.UpdateSARequest) -> None:
    try:
        upd = convert.update_from_pb(m)
    except ConversionError:
        return
    if upd.lifetime is not None:
        assert all(
            math.isfinite(x) and x >= 0
            for x in (upd.lifetime.soft_seconds, upd.lifetime.hard_seconds)
        )


@FUZZ
@given(
    st.builds(
        pb.ReplaceSPDRequest,
        revision=U64,
        entries=st.lists(
            st.builds(
                pb.SPDEntry,
                policy_id=st.integers(0, 3),
                priority=I32,
                action=ENUM,
                selector=selectors(),
                reqid=U32,
                protocols=st.lists(ENUM, max_size=3),
            ),
            max_size=4,
        ),
    )
)
def test_random_spds(m: pb.ReplaceSPDRequest) -> None:
    try:
        entries, rev = convert.spd_from_pb(m)
    except ConversionError:
        return
    Dataplane().replace_spd(entries, rev)  # the core accepts whatever converted


@FUZZ
@given(
    st.builds(
        pb.IkeDatagram,
        local_addr=ADDR,
        local_port=PORT,
        remote_addr=ADDR,
        remote_port=PORT,
        data=st.binary(max_size=64),
    )
)
def test_random_ike(m: pb.IkeDatagram) -> None:
    try:
        d = convert.ike_from_pb(m)
    except ConversionError:
        return
    assert convert.ike_from_pb(convert.ike_to_pb(d)) == d


# --- round trips of valid values ---------------------------------------------------------------


@st.composite
def core_sa_configs(draw: st.DrawFn) -> SaConfig:
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).filter(lambda a: not a.is_unspecified)
    fam = "::/0" if v6 else "0.0.0.0/0"
    esp = draw(st.booleans())
    lo = draw(st.integers(0, 65535))
    hi = draw(st.integers(max(lo, 1), 65535))  # (0, 0) means "any" on the wire, see below
    return SaConfig(
        spi=draw(st.integers(256, 2**32 - 1)),
        protocol=50 if esp else 51,
        direction=draw(st.sampled_from(Direction)),
        mode=draw(st.sampled_from(Mode)),
        src=draw(addr).packed,
        dst=draw(addr).packed,
        encr_id=20 if esp else 0,
        encr_key=draw(st.binary(min_size=20, max_size=20)) if esp else b"",
        integ_id=0 if esp else 12,
        integ_key=b"" if esp else draw(st.binary(min_size=32, max_size=32)),
        esn=draw(st.booleans()),
        replay_window=draw(st.integers(0, 65536)),
        encap=UdpEncap(draw(st.integers(1, 65535)), draw(st.integers(1, 65535)))
        if esp and draw(st.booleans())
        else None,
        lifetime=Lifetime(
            draw(st.sampled_from([0.0, 1.5])),
            draw(st.sampled_from([0.0, 2.0])),
            draw(st.integers(0, 10)),
            draw(st.sampled_from([0, 10, 2**64 - 1])),
        ),
        seq_lease_start=draw(st.integers(1, 100)),
        seq_lease_end=draw(st.integers(100, 2**32)),
        tfc_pad_to=draw(st.integers(0, 65535)),
        reqid=draw(st.integers(0, 2**32 - 1)),
        selectors=(Selector.make(fam, fam, draw(st.integers(0, 255)), (lo, hi)),),
        allow_legacy=draw(st.booleans()),
    )


@FUZZ
@given(core_sa_configs())
def test_sa_config_round_trip(cfg: SaConfig) -> None:
    assert convert.sa_config_from_pb(convert.sa_config_to_pb(cfg)) == cfg


# --- the servicer never answers INTERNAL to bad input ------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


class FakeContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code)


_HOST = EngineHost("fuzz")
_SERVICE = DataplaneService(_HOST)


@FUZZ
@given(st.one_of(sa_configs(), plausible_sa_configs()))
def test_servicer_install_never_internal(m: pb.SAConfig) -> None:
    try:
        _SERVICE.InstallSA(pb.InstallSARequest(sa=m), FakeContext())  # type: ignore[arg-type]
    except Aborted as a:
        assert a.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
    assert _HOST.io.internal_errors == 0


@FUZZ
@given(st.builds(pb.UpdateSARequest, id=sa_ids(), seq_lease_end=U64, lifetime=lifetimes()))
def test_servicer_update_never_internal(m: pb.UpdateSARequest) -> None:
    try:
        _SERVICE.UpdateSA(m, FakeContext())  # type: ignore[arg-type]
    except Aborted as a:
        assert a.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert _HOST.io.internal_errors == 0


def test_port_range_zero_zero_means_any() -> None:
    """Known limit of the proto: (lo, hi) = (0, 0) is "any", so an exact port 0 (e.g. ICMP
    type 0, echo reply, carried in the port field) cannot be expressed."""
    sel = convert.selector_from_pb(pb.TrafficSelector(src="10.0.0.0/8", dst="10.0.0.0/8"))
    assert (sel.sport_lo, sel.sport_hi, sel.dport_lo, sel.dport_hi) == (0, 65535, 0, 65535)
    exact = Selector.make("10.0.0.0/8", "10.0.0.0/8", 1, (0, 0))
    assert convert.selector_from_pb(convert.selector_to_pb(exact)) != exact
