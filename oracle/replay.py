"""Execute plans on a toy model in one process and check every invariant.

This is the trainers' contract in miniature: the same fetch, install, read,
sync, join, update and evict steps, on integer "rows" whose update is exact
and order-sensitive (``v <- 3 v + g``, g = the row's use count in the global
batch). The result must equal the same updates applied to one table holding
every row. Used by the tests (with hypothesis traces) and by ``bagpipe
simulate --verify``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bagpipe.wire import Plan
from bagpipe.keys import source_keys, trainer_keys

_MOD = (1 << 61) - 1


class ReplayError(AssertionError):
    """A plan broke an invariant (capacity, residency, stale read, equivalence)."""


def _initial(key: int) -> int:
    return (key * 0x9E3779B1 + 12345) % _MOD


@dataclass
class _Trainer:
    slot_key: dict[int, int]  # slot -> key installed there
    value: dict[int, int]  # slot -> value
    staged: dict[int, tuple[int, int]]  # fetch id -> (key, value)
    reserved: dict[int, int]  # slot -> fetch id (fetched, not installed)
    fetch_key: dict[int, int]  # fetch id -> key
    fetch_slot: dict[int, int]


def replay(plans_by_iter, batches, trainers: int, batch_size: int, capacity: int | None) -> dict[int, int]:
    """Run ``plans_by_iter`` (an iterable of (i, [Plan per trainer])) and check it.

    Returns the final store (key -> value). Raises ReplayError on the first
    broken invariant.
    """
    store: dict[int, tuple[int, int]] = {}  # key -> (value, version)
    reference: dict[int, int] = {}
    ts = [_Trainer({}, {}, {}, {}, {}, {}) for _ in range(trainers)]
    next_fid = [0] * trainers
    for i, plans in plans_by_iter:
        keys = source_keys(batches, i, trainers)
        # Reference: one table, one update per row per iteration.
        uniq, counts = np.unique(keys, return_counts=True)
        for key, g in zip(uniq.tolist(), counts.tolist()):
            reference[key] = (3 * reference.get(key, _initial(key)) + g) % _MOD
        # 1. fetches read the store now; no cached copy may be newer.
        for t, p in enumerate(plans):
            tr = ts[t]
            if p.first_fetch_id != next_fid[t]:
                raise ReplayError(f"iteration {i} trainer {t}: fetch ids start at {p.first_fetch_id}, expected {next_fid[t]}")
            for key, version in zip(p.fetch_keys.tolist(), p.fetch_versions.tolist()):
                value, stored_version = store.get(key, (_initial(key), -1))
                if stored_version < version:
                    raise ReplayError(f"iteration {i} trainer {t}: row {key} has version {stored_version} < {version}")
                for u, other in enumerate(ts):
                    for slot, k2 in other.slot_key.items():
                        if k2 == key and other.value[slot] != value:
                            raise ReplayError(f"iteration {i} trainer {t}: stale read of row {key}: trainer {u} holds a newer value")
                fid = next_fid[t]
                next_fid[t] += 1
                tr.staged[fid] = (key, value)
        # 2. installs.
        for t, p in enumerate(plans):
            tr = ts[t]
            for fid, slot in zip(p.install_ids.tolist(), p.install_slots.tolist()):
                if fid not in tr.staged:
                    raise ReplayError(f"iteration {i} trainer {t}: install of unknown fetch {fid}")
                if slot in tr.slot_key:
                    raise ReplayError(f"iteration {i} trainer {t}: install into occupied slot {slot}")
                key, value = tr.staged.pop(fid)
                tr.slot_key[slot], tr.value[slot] = key, value
        # 3. joins (values before this iteration's update).
        join_buf: dict[int, tuple[int, int]] = {}
        for t, p in enumerate(plans):
            for pos, slot, send in zip(p.join_pos.tolist(), p.join_slots.tolist(), p.join_send.tolist()):
                if send:
                    join_buf[pos] = (ts[t].slot_key[slot], ts[t].value[slot])
        for t, p in enumerate(plans):
            tr = ts[t]
            for pos, slot, send in zip(p.join_pos.tolist(), p.join_slots.tolist(), p.join_send.tolist()):
                if not send:
                    if slot in tr.slot_key:
                        raise ReplayError(f"iteration {i} trainer {t}: join into occupied slot {slot}")
                    tr.slot_key[slot], tr.value[slot] = join_buf[pos]
        if capacity is not None:
            for t, tr in enumerate(ts):
                # Rows fetched ahead wait in staging, off the cache: only installed rows count. Slots from
                # ``capacity`` on are the scratch area: rows there leave after this iteration (step 7).
                held = sum(1 for s in tr.slot_key if s < capacity)
                if held > capacity:
                    raise ReplayError(f"iteration {i} trainer {t}: holds {held} rows, capacity {capacity}")
        # 4. reads and local gradients.
        grads: list[dict[int, int]] = []
        for t, p in enumerate(plans):
            tr = ts[t]
            part = trainer_keys(keys, t, trainers)
            g: dict[int, int] = {}
            for key, slot in zip(part.ravel().tolist(), p.read_slots.ravel().tolist()):
                if tr.slot_key.get(slot) != key:
                    raise ReplayError(f"iteration {i} trainer {t}: row {key} read from slot {slot}, which holds {tr.slot_key.get(slot)}")
                g[slot] = g.get(slot, 0) + 1
            grads.append(g)
        # 5. sync: all-reduce of gradients by position.
        sync_buf: dict[int, int] = {}
        for t, p in enumerate(plans):
            for pos, slot in zip(p.sync_pos.tolist(), p.sync_slots.tolist()):
                sync_buf[pos] = sync_buf.get(pos, 0) + grads[t].get(slot, 0)
        # 6. updates.
        for t, p in enumerate(plans):
            tr = ts[t]
            total = dict(grads[t])
            for pos, slot in zip(p.sync_pos.tolist(), p.sync_slots.tolist()):
                total[slot] = sync_buf[pos]
            for slot, g in total.items():
                tr.value[slot] = (3 * tr.value[slot] + g) % _MOD
        # 7. evictions.
        for t, p in enumerate(plans):
            tr = ts[t]
            for slot, key, write in zip(p.evict_slots.tolist(), p.evict_keys.tolist(), p.evict_write.tolist()):
                if tr.slot_key.get(slot) != key:
                    raise ReplayError(f"iteration {i} trainer {t}: evicts row {key} from slot {slot}, which holds {tr.slot_key.get(slot)}")
                if write:
                    store[key] = (tr.value[slot], i)
                del tr.slot_key[slot], tr.value[slot]
            if capacity is not None:
                kept = sorted(s for s in tr.slot_key if s >= capacity)
                if kept:
                    raise ReplayError(f"iteration {i} trainer {t}: scratch slot {kept[0]} still holds row "
                                      f"{tr.slot_key[kept[0]]} after the iteration that read it")
    for t, tr in enumerate(ts):
        if tr.slot_key or tr.staged:
            raise ReplayError(f"trainer {t} still holds {len(tr.slot_key)} rows after the final flush")
    final = {key: value for key, (value, _) in store.items()}
    for key, value in reference.items():
        if final.get(key) != value:
            raise ReplayError(f"row {key}: {final.get(key)} after the run, {value} in one table")
    return final
