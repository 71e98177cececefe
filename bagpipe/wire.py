"""Every message that crosses a socket between the oracle and the trainers.

A message is a ZeroMQ multipart: frame 0 is one byte naming the kind,
frame 1 a JSON header, then one raw frame per array. The header carries the
protocol version, the job id, the iteration, the rank, each array's name,
dtype and shape, and a CRC32 of every array frame. Receivers check all of
it and raise ``WireError`` rather than train on a wrong plan. Nothing here is
ever unpickled; array sizes are checked against the header before use.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, fields

import numpy as np

PROTOCOL_VERSION = 2  # 2: plans staged ahead (no cancel_ids), epoch checked
MAX_HEADER_BYTES = 64 * 1024
# The largest message a trainer sends the oracle (control messages only: a header, no arrays);
# the oracle's socket refuses anything bigger before reading it (ZMQ_MAXMSGSIZE).
MAX_CONTROL_BYTES = MAX_HEADER_BYTES + 64
MAX_ARRAY_BYTES = 1 << 31

KIND_HELLO = b"H"  # trainer -> oracle: rank, job id
KIND_PLAN = b"P"  # oracle -> trainer: one iteration's plan
KIND_CREDIT = b"C"  # trainer -> oracle: finished an iteration (flow control)
KIND_END = b"E"  # oracle -> trainer: no more plans
KIND_ERROR = b"X"  # either way: the sender is stopping because of an error

_ALLOWED_DTYPES = {"int32", "int64", "uint8", "float32"}


class WireError(RuntimeError):
    """A message that is malformed, corrupted, out of order or from another job."""


@dataclass(frozen=True, eq=False)
class Plan:
    """What one trainer does at one iteration, in cache slots.

    Frozen: each stage that derives a plan builds a new one (``oracle.shell``
    builds the on-demand plan once its evictions are known; ``oracle.staging``
    the plan handed out, with its fetches moved ahead and its iterations
    numbered for the run), so a plan once handed on is never changed.

    Order of use on the trainer at iteration ``iteration``:
      1. issue ``fetch_*`` (store reads into staging, off the cache, for this
         or a later iteration; the row must carry at least
         ``fetch_versions``: the write-back it depends on has landed);
      2. install the staged rows of ``install_ids`` into their slots (the
         fetch ids number this trainer's fetches from 0 in issue order;
         each is installed exactly once, by the plan of its first read);
      3. look up ``read_slots`` [local batch, tables], forward, backward;
      4. all-reduce: the gradients of ``sync_slots`` at ``sync_pos`` of an
         ``n_sync``-row buffer, and the rows joined this iteration
         (``join_send`` 1: this trainer contributes the row's value, 0: it
         receives it into ``join_slots``) at ``join_pos`` of ``n_join`` rows;
      5. apply the optimizer to every row used here or synced;
      6. evict ``evict_slots`` after the step; rows with ``evict_write`` 1 are
         written back with version ``iteration``.
    """

    iteration: int
    rank: int
    read_slots: np.ndarray  # int32 [b, T]
    fetch_keys: np.ndarray  # int64 [f]
    fetch_versions: np.ndarray  # int64 [f]
    install_ids: np.ndarray  # int64 [m]
    install_slots: np.ndarray  # int32 [m]
    sync_pos: np.ndarray  # int32 [s]
    sync_slots: np.ndarray  # int32 [s]
    join_pos: np.ndarray  # int32 [j]
    join_slots: np.ndarray  # int32 [j]
    join_send: np.ndarray  # uint8 [j]
    evict_slots: np.ndarray  # int32 [e]
    evict_keys: np.ndarray  # int64 [e]
    evict_write: np.ndarray  # uint8 [e]
    n_sync: int = 0
    n_join: int = 0
    first_fetch_id: int = 0  # id of fetch_keys[0]
    slots_needed: int = 0  # the trainer's cache must hold at least this many slots

    ARRAYS = (
        ("read_slots", np.int32), ("fetch_keys", np.int64), ("fetch_versions", np.int64),
        ("install_ids", np.int64), ("install_slots", np.int32), ("sync_pos", np.int32),
        ("sync_slots", np.int32), ("join_pos", np.int32), ("join_slots", np.int32),
        ("join_send", np.uint8), ("evict_slots", np.int32), ("evict_keys", np.int64),
        ("evict_write", np.uint8),
    )
    SCALARS = ("n_sync", "n_join", "first_fetch_id", "slots_needed")

    @classmethod
    def of(cls, iteration: int, rank: int, **given) -> "Plan":
        """A plan of ``given`` fields (``read_slots`` among them); every array not given is empty."""
        arrays = {name: np.zeros(0, dtype) for name, dtype in cls.ARRAYS}
        return cls(iteration=iteration, rank=rank, **{**arrays, **given})


def _pack(kind: bytes, header: dict, arrays: list[tuple[str, np.ndarray]]) -> list:
    specs, frames = [], []
    for name, arr in arrays:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _ALLOWED_DTYPES:
            raise WireError(f"array '{name}' has unsupported dtype {arr.dtype}")
        specs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                      "crc": zlib.crc32(memoryview(arr).cast("B"))})
        frames.append(memoryview(arr).cast("B"))
    header = dict(header, version=PROTOCOL_VERSION, arrays=specs)
    return [kind, json.dumps(header, separators=(",", ":")).encode()] + frames


def _unpack(frames: list, expect_job: str) -> tuple[bytes, dict, dict[str, np.ndarray]]:
    if len(frames) < 2:
        raise WireError(f"message of {len(frames)} frame(s); expected a kind and a header")
    kind = bytes(frames[0])
    raw_header = bytes(frames[1])
    if len(raw_header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    if header.get("version") != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header.get('version')!r}, expected {PROTOCOL_VERSION}")
    if header.get("job") != expect_job:
        raise WireError(f"message from job {header.get('job')!r}, expected job {expect_job!r}")
    specs = header.get("arrays", [])
    if len(specs) != len(frames) - 2:
        raise WireError(f"header lists {len(specs)} arrays but {len(frames) - 2} frames came")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[2:]):
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if dtype not in _ALLOWED_DTYPES or not isinstance(shape, list):
            raise WireError(f"array {name!r}: bad dtype or shape in header")
        buf = memoryview(frame).cast("B") if not isinstance(frame, bytes) else frame
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > MAX_ARRAY_BYTES or nbytes != len(buf):
            raise WireError(f"array {name!r}: {len(buf)} bytes, header says {shape} {dtype}")
        if zlib.crc32(buf) != spec.get("crc"):
            raise WireError(f"array {name!r}: checksum mismatch (corrupted plan buffer)")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return kind, header, arrays


def encode_plan(plan: Plan, job: str, epoch: int = 0) -> list:
    header = {"job": job, "epoch": epoch, "iteration": plan.iteration, "rank": plan.rank}
    header.update({k: int(getattr(plan, k)) for k in Plan.SCALARS})
    return _pack(KIND_PLAN, header, [(name, getattr(plan, name)) for name, _ in Plan.ARRAYS])


def decode_plan(frames: list, job: str, rank: int, iteration: int, epoch: int = 0) -> Plan:
    """Decode a plan and check that it is the one this trainer expects next (rank, epoch, iteration)."""
    kind, header, arrays = _unpack(frames, job)
    if kind != KIND_PLAN:
        raise WireError(f"expected a plan, got message kind {kind!r}")
    if header.get("rank") != rank:
        raise WireError(f"plan for rank {header.get('rank')} delivered to rank {rank}")
    if header.get("epoch") != epoch:
        raise WireError(f"plan for epoch {header.get('epoch')} arrived when epoch {epoch} was expected")
    if header.get("iteration") != iteration:
        raise WireError(f"plan for iteration {header.get('iteration')} arrived when iteration {iteration} was expected")
    names = [n for n, _ in Plan.ARRAYS]
    if sorted(arrays) != sorted(names):
        raise WireError(f"plan arrays {sorted(arrays)} do not match {sorted(names)}")
    for name, dtype in Plan.ARRAYS:
        if arrays[name].dtype != dtype:
            raise WireError(f"plan array {name!r} has dtype {arrays[name].dtype}, expected {np.dtype(dtype)}")
    return Plan(iteration=iteration, rank=rank, **arrays, **{k: int(header[k]) for k in Plan.SCALARS})


# ------------------------------------------------------------ control messages
@dataclass(frozen=True)
class Hello:
    """Trainer -> oracle, once: this connection carries ``rank``'s plans. ``token`` proves the job's
    secret for this job and rank (``bagpipe.auth.hello_token``); the oracle ignores a hello without it."""

    rank: int
    token: str = ""


@dataclass(frozen=True)
class Credit:
    """Trainer -> oracle: ``rank`` finished ``iteration``; its write-backs after iterations
    <= ``written_through`` have landed (the planner may forget them)."""

    rank: int
    iteration: int
    written_through: int


@dataclass(frozen=True)
class End:
    """Oracle -> trainer: no plan follows."""

    rank: int


@dataclass(frozen=True)
class Error:
    """Either way: the sender stops, and says why."""

    rank: int
    message: str


Control = Hello | Credit | End | Error
_CONTROL_KINDS: dict[bytes, type] = {KIND_HELLO: Hello, KIND_CREDIT: Credit, KIND_END: End, KIND_ERROR: Error}
_KIND_OF: dict[type, bytes] = {cls: kind for kind, cls in _CONTROL_KINDS.items()}
MAX_MESSAGE_CHARS = 500  # an Error's message is cut to this


def encode_control(msg: Control, job: str) -> list:
    body = {f.name: getattr(msg, f.name) for f in fields(msg)}
    if isinstance(msg, Error):
        body["message"] = msg.message[:MAX_MESSAGE_CHARS]
    return _pack(_KIND_OF[type(msg)], dict(body, job=job), [])


def decode_control(frames: list, job: str) -> Control:
    """A control message, its fields checked against their types (a plan here is a WireError)."""
    kind, header, arrays = _unpack(frames, job)
    cls = _CONTROL_KINDS.get(kind)
    if cls is None:
        raise WireError(f"expected a control message, got message kind {kind!r}")
    if arrays:
        raise WireError(f"control message {cls.__name__} carries {len(arrays)} arrays")
    values = {}
    for f in fields(cls):
        value = header.get(f.name)
        want = str if f.type == "str" else int
        # bool is an int to Python, never a rank or an iteration here.
        if not isinstance(value, want) or isinstance(value, bool):
            raise WireError(f"{cls.__name__} message: field '{f.name}' is {value!r}, expected {want.__name__}")
        values[f.name] = value
    return cls(**values)


def message_kind(frames: list) -> bytes:
    """The one-byte kind of a message (frame 0), before decoding it."""
    if not frames:
        raise WireError("empty message")
    return bytes(frames[0])
