"""Building blocks of the planner kernels: prefetch, hashing, sorting, pools, lists, heaps, bit masks.

None of these knows a policy or an episode: each is a data structure over
plain arrays (``oracle.fastplan.layout`` names their columns), compiled
without reference counting where it allocates nothing, so that calling one
costs no atomic operations.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from oracle.fastplan.layout import (
    M_ECOUNT, M_EFREEN, M_EHWM, M_LA_FAR, M_LA_LIST, M_LA_NEAR, M_NHWM, X_KEY, X_QST, Y_FREQ, Y_LAST,
)


_DEBRUIJN = 0x03F79D71B4CB0A89

_CTZ = np.zeros(64, np.int64)

for _i in range(64):
    _CTZ[(((1 << _i) * _DEBRUIJN) & ((1 << 64) - 1)) >> 58] = _i

_SIGN = np.uint64(1 << 63)

# ----------------------------------------------------------------- small helpers
@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the CPU to start loading the cache line of ``arr[i, 0, ...]``; no effect on results.

    The kernels walk rows in an order fixed by the rules, and each row's
    record sits at a random place in memory. Loading the records a few
    iterations ahead turns a chain of cache misses into overlapping ones.
    """
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, args[1], sig.args[1], types.intp)]
        idx += [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])  # read, high locality, data
        return context.get_dummy_value()

    return types.void(arr, i), codegen

PF = 16  # how many iterations ahead the loops prefetch

@njit(inline="always")
def _ctz(x):
    """Index of the lowest set bit of a non-zero int64."""
    u = np.uint64(x)
    low = u & (np.uint64(0) - u)
    return _CTZ[np.int64((low * np.uint64(_DEBRUIJN)) >> np.uint64(58))]

@njit(inline="always")
def _popcount(x):
    c = 0
    while x != 0:
        x &= x - 1
        c += 1
    return c

@njit(inline="always")
def _shift_for(cap):
    s = 64
    c = cap
    while c > 1:
        c >>= 1
        s -= 1
    return s

@njit(inline="always")
def _home(key, shift):
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(shift))

@njit(_nrt=False)
def _hfind(h, key, shift, mask):
    """Position of ``key`` in the index ``h`` [cap, 2] (key, value + 1), or of the empty cell ending its probe.

    Values are stored plus one so that 0 marks an empty cell and a new index
    is just ``np.zeros`` (no pass over the memory to mark it empty).
    """
    p = _home(key, shift)
    while True:
        if h[p, 1] == 0 or h[p, 0] == key:
            return p
        p = (p + 1) & mask

@njit(_nrt=False)
def _hdel(h, p, shift, mask):
    """Remove the cell at ``p`` by shifting the rest of its cluster back (no tombstones)."""
    q = p
    while True:
        q = (q + 1) & mask
        if h[q, 1] == 0:
            break
        home = _home(h[q, 0], shift)
        if ((q - home) & mask) >= ((q - p) & mask):
            h[p, 0] = h[q, 0]
            h[p, 1] = h[q, 1]
            p = q
    h[p, 1] = 0

@njit(cache=True)
def rehash(old, new):
    """Insert every cell of index ``old`` into the empty index ``new``."""
    cap = new.shape[0]
    shift, mask = _shift_for(cap), cap - 1
    for p in range(old.shape[0]):
        if old[p, 1] != 0:
            q = _hfind(new, old[p, 0], shift, mask)
            new[q, 0] = old[p, 0]
            new[q, 1] = old[p, 1]

# ------------------------------------------------------------------ sorting
@njit
def _argsort(vals, n):
    """Stable ascending order of the int64 ``vals[:n]`` (LSD radix sort, 11-bit digits)."""
    order = np.empty(n, np.int64)
    if n <= 48:
        for i in range(n):
            v = vals[i]
            j = i
            while j > 0 and vals[order[j - 1]] > v:
                order[j] = order[j - 1]
                j -= 1
            order[j] = i
        return order
    cnt = np.zeros((6, 2048), np.int64)
    ukeys = np.empty(n, np.uint64)
    for i in range(n):
        u = np.uint64(vals[i]) ^ _SIGN
        ukeys[i] = u
        for d in range(6):
            cnt[d, np.int64((u >> np.uint64(11 * d)) & np.uint64(2047))] += 1
    src = np.arange(n)
    dst = np.empty(n, np.int64)
    for d in range(6):
        c = cnt[d]
        if c[np.int64((ukeys[0] >> np.uint64(11 * d)) & np.uint64(2047))] == n:
            continue  # every key has this digit: nothing to do
        total = 0
        for b in range(2048):
            x = c[b]
            c[b] = total
            total += x
        sh = np.uint64(11 * d)
        for i in range(n):
            o = src[i]
            b = np.int64((ukeys[o] >> sh) & np.uint64(2047))
            dst[c[b]] = o
            c[b] += 1
        src, dst = dst, src
    return src

@njit
def _group(owner, n, parts):
    """Stable order of records 0..n-1 grouped by ``owner`` in [0, parts), and the group offsets."""
    off = np.zeros(parts + 1, np.int64)
    for i in range(n):
        off[owner[i] + 1] += 1
    for p in range(parts):
        off[p + 1] += off[p]
    pos = off[:parts].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        o = owner[i]
        order[pos[o]] = i
        pos[o] += 1
    return order, off

# -------------------------------------------------------------- pools
@njit(_nrt=False)
def _ealloc(EFSt, Mt):
    fn = Mt[M_EFREEN]
    if fn > 0:
        Mt[M_EFREEN] = fn - 1
        e = np.int64(EFSt[fn - 1])
    else:
        e = Mt[M_EHWM]
        Mt[M_EHWM] = e + 1
    Mt[M_ECOUNT] += 1
    return e

@njit(_nrt=False)
def _nalloc(Mt):
    """A new queue node: always the next unused one (``compact_nodes`` makes room).

    Nodes are never reused in place: a list's nodes then lie in memory in the
    order they were appended, so walking a list from its head (victims leave
    from there) reads memory forwards instead of one random line per node,
    and appending writes the lines next to the previous appends. A node
    unlinked from its list is simply left behind until the next compaction.
    """
    n = Mt[M_NHWM]
    Mt[M_NHWM] = n + 1
    return n

@njit(_nrt=False)
def _lappend(Qt, QHt, Mt, li, e, stamp):
    n = _nalloc(Mt)
    Qt[n, 0] = e
    Qt[n, 1] = stamp
    Qt[n, 2] = -1
    tail = QHt[li, 1]
    if tail >= 0:
        Qt[tail, 2] = n
    else:
        QHt[li, 0] = n
    QHt[li, 1] = n

@njit(_nrt=False)
def _lpop(Qt, QHt, li):
    """Drop the head node of list ``li``. A list is sorted while its sorted prefix ends at its tail."""
    n = QHt[li, 0]
    nx = Qt[n, 2]
    QHt[li, 0] = nx
    if nx < 0:
        QHt[li, 1] = -1
        QHt[li, 2] = -1
    elif QHt[li, 2] == n:
        QHt[li, 2] = -1

@njit(_nrt=False)
def _lookahead(E64t, Qt, QHt, Mt, li, Ht, hshift):
    """Prefetch for the victims that will follow the head of list ``li``.

    Victims leave a list from its head, one after the other, and each costs
    misses on its record and its hash cell. Two pointers run
    ahead of the head (PF and PF / 2 nodes) and load those early; call this
    after every head pop. ``M_LA_LIST`` = -1 forgets them (the list changed).
    """
    if Mt[M_LA_LIST] != li:
        n = QHt[li, 0]
        near = -1
        d = 0
        while n >= 0 and d < PF:
            if d == PF // 2:
                near = n
            n = Qt[n, 2]
            d += 1
        Mt[M_LA_LIST] = li
        Mt[M_LA_NEAR] = near
        Mt[M_LA_FAR] = n
    else:
        far = Mt[M_LA_FAR]
        if far >= 0:
            Mt[M_LA_FAR] = Qt[far, 2]
        near = Mt[M_LA_NEAR]
        if near >= 0:
            Mt[M_LA_NEAR] = Qt[near, 2]
    far = Mt[M_LA_FAR]
    if far >= 0:
        _prefetch(E64t, Qt[far, 0])
    near = Mt[M_LA_NEAR]
    if near >= 0:
        _prefetch(Ht, _home(E64t[Qt[near, 0], X_KEY], hshift))

@njit(_nrt=False)
def _lclear(QHt, li):
    QHt[li, 0] = -1
    QHt[li, 1] = -1
    QHt[li, 2] = -1

@njit
def _lsort(E64t, E32t, Qt, QHt, li):
    """Sort bucket list ``li`` in place by (frequency, last use), stably; drop stale nodes.

    Rows of one (frequency, last use) always enter a bucket in one batch in
    key order (one retiring iteration, or one loaded iteration's moves from
    set A), so the stable sort gives the full (frequency, last use, key).
    """
    cnt = 0
    n = QHt[li, 0]
    while n >= 0:
        cnt += 1
        n = Qt[n, 2]
    nodes = np.empty(cnt, np.int64)
    ents = np.empty(cnt, np.int64)
    stamps = np.empty(cnt, np.int64)
    m = 0
    n = QHt[li, 0]
    while n >= 0:
        nx = Qt[n, 2]
        e = Qt[n, 0]
        if E64t[e, X_QST] == Qt[n, 1]:
            nodes[m] = n
            ents[m] = e
            stamps[m] = Qt[n, 1]
            m += 1
        n = nx
    vals = np.empty(m, np.int64)
    for i in range(m):
        e = ents[i]
        vals[i] = (np.int64(E32t[e, Y_FREQ]) << 32) | (np.int64(E32t[e, Y_LAST]) + 1)
    order = _argsort(vals, m)
    for i in range(m):
        n = nodes[i]
        Qt[n, 0] = ents[order[i]]
        Qt[n, 1] = stamps[order[i]]
        Qt[n, 2] = nodes[i + 1] if i + 1 < m else -1
    if m == 0:
        QHt[li, 0] = -1
        QHt[li, 1] = -1
        QHt[li, 2] = -1
    else:
        QHt[li, 0] = nodes[0]
        QHt[li, 1] = nodes[m - 1]
        QHt[li, 2] = nodes[m - 1]

# ---------------------------------------------------------------------- heap
@njit(_nrt=False)
def _hlt(H, a, b):
    if H[a, 0] != H[b, 0]:
        return H[a, 0] < H[b, 0]
    if H[a, 1] != H[b, 1]:
        return H[a, 1] < H[b, 1]
    return H[a, 2] < H[b, 2]

@njit(_nrt=False)
def _hswap(H, a, b):
    for c in range(5):
        x = H[a, c]
        H[a, c] = H[b, c]
        H[b, c] = x

@njit(_nrt=False)
def _hdown(H, n, i):
    while True:
        l = 2 * i + 1
        if l >= n:
            return
        m = l
        if l + 1 < n and _hlt(H, l + 1, l):
            m = l + 1
        if not _hlt(H, m, i):
            return
        _hswap(H, i, m)
        i = m

@njit(_nrt=False)
def _hpush(H, HN, t, p0, p1, key, e, stamp):
    i = HN[t]
    HN[t] = i + 1
    H[i, 0] = p0
    H[i, 1] = p1
    H[i, 2] = key
    H[i, 3] = e
    H[i, 4] = stamp
    while i > 0:
        par = (i - 1) >> 1
        if not _hlt(H, i, par):
            break
        _hswap(H, i, par)
        i = par

@njit(_nrt=False)
def _hpop(H, HN, t):
    n = HN[t] - 1
    HN[t] = n
    if n > 0:
        for c in range(5):
            H[0, c] = H[n, c]
        _hdown(H, n, 0)

@njit(cache=True)
def compact_heaps(rows, queues):
    """Drop stale heap entries of every trainer and restore the heap order."""
    E64 = rows.entries
    HP, HN = queues.heap, queues.heap_sizes
    for t in range(HP.shape[0]):
        H = HP[t]
        m = 0
        for i in range(HN[t]):
            if E64[t, H[i, 3], X_QST] == H[i, 4]:
                for c in range(5):
                    H[m, c] = H[i, c]
                m += 1
        HN[t] = m
        for i in range(m // 2 - 1, -1, -1):
            _hdown(H, m, i)

@njit(cache=True)
def compact_nodes(rows, queues):
    """Move every trainer's live queue nodes to the front of its pool, list after list, in list order.

    Stale nodes are dropped; each list keeps its order and its sorted prefix,
    and its nodes become consecutive in memory. Afterwards new nodes are
    taken from just past the live ones.
    """
    E64, M = rows.entries, rows.counters
    Q, QH = queues.nodes, queues.lists
    for t in range(Q.shape[0]):
        E64t, Qt, QHt, Mt = E64[t], Q[t], QH[t], M[t]
        moved = np.empty((max(Mt[M_NHWM], 1), 3), np.int64)
        m = 0
        for li in range(QHt.shape[0]):
            n = QHt[li, 0]
            sorted_tail = QHt[li, 2]
            in_sorted = sorted_tail >= 0
            new_sorted = -1  # last kept node of the sorted prefix
            first = m
            while n >= 0:
                if E64t[Qt[n, 0], X_QST] == Qt[n, 1]:
                    moved[m, 0] = Qt[n, 0]
                    moved[m, 1] = Qt[n, 1]
                    moved[m, 2] = m + 1
                    if in_sorted:
                        new_sorted = m
                    m += 1
                if n == sorted_tail:
                    in_sorted = False
                n = Qt[n, 2]
            if m > first:
                moved[m - 1, 2] = -1
                QHt[li, 0] = first
                QHt[li, 1] = m - 1
            else:
                QHt[li, 0] = -1
                QHt[li, 1] = -1
            QHt[li, 2] = new_sorted
        Qt[:m] = moved[:m]
        Mt[M_NHWM] = m
        Mt[M_LA_LIST] = -1

# ---------------------------------------------------------------- bit masks
@njit(_nrt=False)
def _bit_set(GE, g, w0, t):
    GE[g, w0 + (t >> 6)] |= np.int64(1) << np.int64(t & 63)

@njit(_nrt=False)
def _bit_clear(GE, g, w0, t):
    GE[g, w0 + (t >> 6)] &= ~(np.int64(1) << np.int64(t & 63))

@njit(_nrt=False)
def _bits_empty(GE, g, w0, nw):
    for w in range(nw):
        if GE[g, w0 + w] != 0:
            return False
    return True

@njit(_nrt=False)
def _bits_many(GE, g, w0, nw):
    """More than one bit set."""
    seen = False
    for w in range(nw):
        x = GE[g, w0 + w]
        if x != 0:
            if seen or (x & (x - 1)) != 0:
                return True
            seen = True
    return False

@njit(_nrt=False)
def _bits_lowest(GE, g, w0, nw):
    for w in range(nw):
        x = GE[g, w0 + w]
        if x != 0:
            return w * 64 + _ctz(x)
    return -1

# ------------------------------------------------------------ batch helpers
@njit(cache=True)
def distinct_keys(rows, r0, nrows):
    """Sorted distinct keys of rows[r0:r0 + nrows] (keys [batch, columns])."""
    T = rows.shape[1]
    n = nrows * T
    cap = 16
    while cap < 2 * n:
        cap *= 2
    h = np.zeros((cap, 2), np.int64)
    shift, mask = _shift_for(cap), cap - 1
    keys = np.empty(n, np.int64)
    nd = 0
    for b in range(r0, r0 + nrows):
        for c in range(T):
            key = rows[b, c]
            p = _hfind(h, key, shift, mask)
            if h[p, 1] == 0:
                h[p, 0] = key
                h[p, 1] = 1
                keys[nd] = key
                nd += 1
    order = _argsort(keys, nd)
    out = np.empty(nd, np.int64)
    for x in range(nd):
        out[x] = keys[order[x]]
    return out
