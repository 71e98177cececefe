"""The trainer's hot-embedding cache: rows in slots on the device, looked up by slot.

Each slot holds a row's embedding followed by its optimizer state
(``width = dim + state_width``). This module is pure torch: no sockets, no
Redis; the trainer loop feeds it rows and plans.

Why not fbgemm's fused backward-and-optimizer: a row read by several
trainers in one iteration must see the *sum* of their gradients before the
optimizer touches it, and fbgemm fuses the update into backward, before any
collective can run. So the lookup gathers each distinct slot once into a
leaf tensor, autograd sums the gradient per distinct row (deterministically,
in batch order), the trainer all-reduces the rows the plan lists, and one
vectorised row-wise update writes the new values back into the slots. With
one trainer the arithmetic is exactly that of the all-in-memory reference.

On CUDA, rows and indices come from the host without making the host wait
(``to_device``), and rows fetched from the store go into their slots through
a side stream (``RowInstaller``). On the CPU both are the plain tensors, so
the CPU's arithmetic is unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class SlotCache:
    """Rows in slots, row-wise SGD or Adagrad applied in place."""

    def __init__(self, slots: int, dim: int, state_width: int, device: torch.device,
                 optimizer: str, lr: float, eps: float, limit: int | None = None) -> None:
        self.dim, self.state_width, self.device = dim, state_width, device
        self.optimizer, self.lr, self.eps = optimizer, lr, eps
        self.limit = limit  # most slots it may ever hold (cache_rows for a bounded policy)
        self.rows = torch.zeros(slots, dim + state_width, dtype=torch.float32, device=device)

    @property
    def width(self) -> int:
        return self.dim + self.state_width

    def ensure_slots(self, slots: int) -> None:
        """Grow the slot table to at least ``slots`` (doubling, so growth is amortised, up to ``limit``)."""
        if slots > self.rows.shape[0]:
            if self.limit is not None and slots > self.limit:
                raise ValueError(f"a plan needs {slots} cache slots; this cache holds at most {self.limit} "
                                 "(config key 'cache_rows')")
            size = max(slots, 2 * self.rows.shape[0])
            grown = torch.zeros(size if self.limit is None else min(size, self.limit), self.width,
                                dtype=torch.float32, device=self.device)
            grown[: self.rows.shape[0]] = self.rows
            self.rows = grown

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        if slots.numel():
            self.rows.index_copy_(0, slots, values)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        return self.rows.index_select(0, slots)

    def lookup(self, kjt: KeyedJaggedTensor, mean: torch.Tensor | None = None
               ) -> tuple[KeyedTensor, torch.Tensor, torch.Tensor]:
        """Pooled embeddings of a KJT of slots (a bag of slots per sample and table, summed; the
        tables where ``mean`` [tables] is true divide their sums by the bag's length, an empty bag
        staying zero).

        Returns the KeyedTensor for the model, the leaf tensor of distinct rows
        (its ``.grad`` is the gradient per distinct row after backward), and
        the distinct slots in the leaf's order.
        """
        keys = kjt.keys()
        values = kjt.values()
        uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
        # One copy of each distinct row; every lookup of it reads that copy, so autograd sums the
        # row's gradients in the leaf (in batch order: the same bits whatever slots the rows sit in).
        leaf = self.rows.index_select(0, uniq)[:, : self.dim].contiguous().detach().requires_grad_(True)
        # Offsets from the lengths here, not kjt.offsets(): torchrec computes those with an fbgemm
        # operator that a CPU build of fbgemm lacks on CUDA.
        lengths = kjt.lengths().to(torch.int64)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        pooled = pooled_lookup(leaf, inverse, offsets, len(keys), kjt.stride())
        if mean is not None and bool(mean.any()):
            # Divide after summing, the same operations for every policy (a sum table divides by 1,
            # which changes no bit), so a cached and an all-in-memory run pool alike.
            per_bag = lengths.view(len(keys), kjt.stride()).t().to(pooled.dtype).clamp(min=1)
            divisor = torch.where(mean.to(pooled.device)[None, :], per_bag, torch.ones_like(per_bag))
            pooled = (pooled.view(kjt.stride(), len(keys), self.dim) / divisor[:, :, None]).view_as(pooled)
        return KeyedTensor(keys=keys, length_per_key=[self.dim] * len(keys), values=pooled), leaf, uniq

    @torch.no_grad()
    def apply_gradients(self, slots: torch.Tensor, grads: torch.Tensor) -> None:
        """One optimizer step on the rows in ``slots`` (distinct) with their total gradients."""
        if slots.numel() == 0:
            return
        rows = self.rows.index_select(0, slots)
        w = rows[:, : self.dim]
        if self.optimizer == "sgd":
            w = w - self.lr * grads
            self.rows[slots, : self.dim] = w
            return
        # Row-wise Adagrad, as fbgemm's EXACT_ROWWISE_ADAGRAD: one accumulator per row.
        state = rows[:, self.dim] + (grads * grads).mean(dim=1)
        w = w - self.lr * grads / (state.sqrt() + self.eps).unsqueeze(1)
        rows[:, : self.dim] = w
        rows[:, self.dim] = state
        self.rows.index_copy_(0, slots, rows)


def _fbgemm_lookup():
    """fbgemm's dense table-batched lookup (pooled forward, a dense gradient per row), or None."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers the operators)

        return torch.ops.fbgemm.dense_embedding_codegen_lookup_function
    except (ImportError, AttributeError, RuntimeError):
        return None


_FBGEMM_LOOKUP = _fbgemm_lookup()


def pooled_lookup(leaf: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, features: int,
                  batch: int) -> torch.Tensor:
    """Sum-pool rows of ``leaf`` [n, D] into [batch, features * D].

    ``indices`` are rows of ``leaf``, bag after bag, feature-major (KJT order: every sample's bag of
    feature 0, then feature 1, ...); ``offsets`` [features * batch + 1] delimit the bags; an empty
    bag pools to zero. On the CPU this is fbgemm's dense table-batched lookup with every feature
    reading the one leaf table (about twice as fast as gathering then reshaping, and its gradient
    per row accumulates in bag order, so it is the same bits for every policy); elsewhere, or
    without fbgemm, a gather and a sum per bag (``index_add_``), whose backward (a deterministic
    accumulating index_put under ``torch.use_deterministic_algorithms``) is as independent of the
    rows' slots. Not ``F.embedding_bag``: its gradient's summation order follows the row labels,
    so a cache's slots would change the bits (tests/test_trainer_core.py holds both paths to this).
    """
    n, dim = leaf.shape
    if _FBGEMM_LOOKUP is not None and leaf.device.type == "cpu" and n > 0:
        return _FBGEMM_LOOKUP(
            dev_weights=leaf.reshape(-1),
            weights_offsets=torch.zeros(features, dtype=torch.int64),
            D_offsets=torch.arange(0, (features + 1) * dim, dim, dtype=torch.int32),
            total_D=features * dim, max_D=dim,
            hash_size_cumsum=torch.tensor([0] * features + [n], dtype=torch.int64),
            total_hash_size_bits=int(math.log2(n)) + 1,
            indices=indices, offsets=offsets, pooling_mode=0,  # PoolingMode.SUM
            indice_weights=None, feature_requires_grad=None, output_dtype=0)  # SparseType.FP32
    bag_of = torch.repeat_interleave(torch.arange(features * batch, device=leaf.device), offsets.diff())
    bags = torch.zeros(features * batch, dim, dtype=leaf.dtype, device=leaf.device)
    bags = bags.index_add(0, bag_of, leaf[indices]) if n else bags
    return bags.view(features, batch, dim).transpose(0, 1).reshape(batch, features * dim)


class BagLayout:
    """How a batch's [b, S] matrix of slots becomes the lookup's KeyedJaggedTensor.

    Table t owns ``bags[t]`` adjacent columns; a sample's bag is the first of them that hold an id,
    the rest are pads (``bagpipe.dataset.PAD`` in the batch's ids; in the plan's slots a stand-in
    the lookup skips). ``pooling`` is ``sum`` or ``mean`` per table. One-hot data (every bag one
    id) keeps the plain path: one value per sample and table, no masking.
    """

    def __init__(self, table_names: list[str], bags: list[int], pooling: list[str]) -> None:
        self.table_names, self.bags = table_names, list(bags)
        self.one_hot = max(self.bags) == 1
        self.first_column = np.concatenate([[0], np.cumsum(self.bags)[:-1]]).astype(np.int64)
        self.mean = torch.tensor([p == "mean" for p in pooling], dtype=torch.bool)
        self._order: dict[int, np.ndarray] = {}

    def _values_order(self, batch: int) -> np.ndarray:
        """Flat positions of [b, S] in KJT order: table, then sample, then place in the bag."""
        if batch not in self._order:
            width = int(sum(self.bags))
            parts = [(np.arange(batch)[:, None] * width + lo + np.arange(w)[None, :]).ravel()
                     for lo, w in zip(self.first_column.tolist(), self.bags)]
            self._order[batch] = np.concatenate(parts)
        return self._order[batch]

    def kjt(self, read_slots: torch.Tensor, ids: np.ndarray) -> KeyedJaggedTensor:
        """The KJT of slots for a batch whose row ids (PAD where a bag ends early) are ``ids`` [b, S]."""
        if self.one_hot:
            return slots_kjt(self.table_names, read_slots)
        batch = ids.shape[0]
        order = self._values_order(batch)
        present = (ids >= 0).reshape(-1)[order]
        lengths = np.add.reduceat(ids >= 0, self.first_column, axis=1).T.reshape(-1)
        pick = torch.from_numpy(order[present]).to(read_slots.device)
        values = read_slots.reshape(-1).index_select(0, pick).to(torch.int64)
        return KeyedJaggedTensor(keys=self.table_names, values=values,
                                 lengths=torch.from_numpy(lengths.astype(np.int32)).to(read_slots.device),
                                 stride=batch)

    def lookup(self, cache: "SlotCache", read_slots: torch.Tensor, ids: np.ndarray):
        return cache.lookup(self.kjt(read_slots, ids), None if self.one_hot else self.mean)


def slots_kjt(table_names: list[str], read_slots: torch.Tensor) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor of cache slots from a [batch, tables] slot matrix (one id each)."""
    batch = read_slots.shape[0]
    values = read_slots.t().reshape(-1).to(torch.int64)
    lengths = torch.ones(values.numel(), dtype=torch.int32, device=values.device)
    return KeyedJaggedTensor(keys=table_names, values=values, lengths=lengths, stride=batch)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; on CUDA, without making the host wait.

    ``torch.from_numpy(a).to(cuda)`` copies from pageable memory, and PyTorch then
    synchronises the stream: the host waits for every kernel queued before the
    copy, so it cannot queue the next phase while the GPU runs this one. Here the
    array goes into pinned memory first (PyTorch's caching host allocator, which
    keeps the block until the copy reading it has completed) and the copy to the
    device is asynchronous, in the order of the current stream: kernels queued
    after it on that stream see the data. On the CPU it is ``torch.from_numpy``.
    """
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class RowInstaller:
    """Puts rows from the host into cache slots; on CUDA the copy runs on a side stream.

    The rows a plan installs arrive from the store while the previous step's
    kernels may still be running. On the compute stream their copy would queue
    behind those kernels; on a side stream it runs beside them (copy engine and
    SMs at once). The ordering that makes this correct:

    * the compute stream waits for an event recorded after the copy before the
      ``index_copy_`` that puts the rows in their slots, so that write, and the
      lookup after it, see the copied rows (``_order``);
    * the device buffers were allocated on the side stream but are read on the
      compute stream: ``record_stream`` keeps the allocator from handing them to
      the next install's copy before that read has run (``_keep``);
    * the pinned host buffers are protected by PyTorch's host allocator (``to_device``).

    The side stream waits for nothing: it writes fresh buffers, never the slots.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, cache: SlotCache, slots: np.ndarray, rows: np.ndarray) -> None:
        if self.stream is None:
            cache.write(to_device(slots.astype(np.int64), self.device), to_device(rows, self.device))
            return
        if len(slots) == 0:
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            dev_slots = to_device(slots.astype(np.int64), self.device)
            dev_rows = to_device(np.ascontiguousarray(rows, np.float32), self.device)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self._order(compute, copied)
        self._keep(compute, dev_slots, dev_rows)
        cache.write(dev_slots, dev_rows)

    def _order(self, compute: torch.cuda.Stream, copied: torch.cuda.Event) -> None:
        compute.wait_event(copied)

    def _keep(self, compute: torch.cuda.Stream, *tensors: torch.Tensor) -> None:
        for t in tensors:
            t.record_stream(compute)
