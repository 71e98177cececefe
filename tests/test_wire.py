"""Plan messages: round trip, and every kind of damage refused loudly."""

from __future__ import annotations

import numpy as np
import pytest

from bagpipe.wire import (KIND_CREDIT, Credit, End, Error, Hello, Plan, WireError, decode_control, decode_plan,
                          encode_control, encode_plan)


def _plan(i: int = 3, rank: int = 1) -> Plan:
    return Plan.of(i, rank, read_slots=np.arange(12, dtype=np.int32).reshape(4, 3),
                   fetch_keys=np.array([5, 7], np.int64), fetch_versions=np.array([-1, 2], np.int64),
                   n_sync=9, first_fetch_id=11)


def _frames(plan: Plan, job: str = "job") -> list[bytes]:
    return [bytes(f) for f in encode_plan(plan, job)]


def test_round_trip():
    got = decode_plan(_frames(_plan()), "job", rank=1, iteration=3)
    assert np.array_equal(got.read_slots, _plan().read_slots)
    assert np.array_equal(got.fetch_versions, [-1, 2])
    assert (got.n_sync, got.first_fetch_id) == (9, 11)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.__setitem__(4, b"\x00" * len(f[4])), "checksum"),
    (lambda f: f.__setitem__(4, f[4][:-8]), "bytes"),
    (lambda f: f.__setitem__(1, b"{not json"), "JSON"),
    (lambda f: f.pop(), "frames"),
    (lambda f: f.__setitem__(1, f[1].replace(b'"version":2', b'"version":9')), "protocol version"),
])
def test_damaged_plans_are_refused(damage, message):
    frames = _frames(_plan())
    damage(frames)
    with pytest.raises(WireError, match=message):
        decode_plan(frames, "job", rank=1, iteration=3)


def test_wrong_iteration_rank_or_job_is_refused():
    frames = _frames(_plan(i=3))
    with pytest.raises(WireError, match="iteration 3 arrived when iteration 2"):
        decode_plan(frames, "job", rank=1, iteration=2)
    with pytest.raises(WireError, match="rank 1 delivered to rank 0"):
        decode_plan(frames, "job", rank=0, iteration=3)
    with pytest.raises(WireError, match="from job"):
        decode_plan(frames, "other", rank=1, iteration=3)
    with pytest.raises(WireError, match="epoch 0 arrived when epoch 1"):
        decode_plan(frames, "job", rank=1, iteration=3, epoch=1)
    later = [bytes(f) for f in encode_plan(_plan(i=3), "job", epoch=2)]
    assert decode_plan(later, "job", rank=1, iteration=3, epoch=2).iteration == 3


@pytest.mark.parametrize("msg", [Hello(rank=1, token="ab" * 32), Credit(rank=2, iteration=5, written_through=3), End(rank=0),
                                 Error(rank=1, message="disk full")])
def test_control_messages_round_trip_typed(msg):
    frames = [bytes(f) for f in encode_control(msg, "j")]
    assert decode_control(frames, "j") == msg


def test_control_messages_with_wrong_fields_are_refused():
    frames = [bytes(f) for f in encode_control(Credit(rank=2, iteration=5, written_through=3), "j")]
    frames[1] = frames[1].replace(b'"iteration":5', b'"iteration":"5"')
    with pytest.raises(WireError, match="field 'iteration' is '5'"):
        decode_control(frames, "j")
    frames = [bytes(f) for f in encode_control(Credit(rank=2, iteration=5, written_through=3), "j")]
    frames[1] = frames[1].replace(b'"rank":2,', b"")
    with pytest.raises(WireError, match="field 'rank' is None"):
        decode_control(frames, "j")
    assert frames[0] == KIND_CREDIT


def test_a_plan_is_not_a_control_message():
    with pytest.raises(WireError, match="expected a control message"):
        decode_control(_frames(_plan()), "job")


def test_long_error_messages_are_cut():
    frames = [bytes(f) for f in encode_control(Error(rank=0, message="x" * 10_000), "j")]
    assert len(decode_control(frames, "j").message) == 500
