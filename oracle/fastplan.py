"""Compiled kernels of the fast planner (``oracle.planner``).

Every public function here is a numba ``@njit(cache=True)`` kernel over
plain numpy arrays; ``oracle.planner`` owns the arrays, grows them between
calls, runs the per-trainer kernels in threads and turns the outputs into
``Plan`` objects. The rules are those of ``oracle.reference`` (the
executable specification); only the bookkeeping differs.

* **Rows of a trainer** live in an open-addressing hash index (key -> entry)
  over an entry pool: one 64-byte record per row, a single cache line
  (``E64`` holds its int64 fields, ``E32`` is an int32 view of the same
  memory for the others). A row has an entry while it is resident or used
  in the loaded window, so the pool grows with the window and the cache,
  never with table size.
* **The window** is a ring of R = horizon + 2 iterations. Loading
  an iteration sorts its distinct keys once (radix sort) and links every
  occurrence to the row's previous one, so retiring an iteration reads each
  row's next use from the ring instead of a per-row deque.
* **Victims** come from structures that give exactly the reference heap's
  order without a heap operation per use:
  - ``bagpipe`` orders (-next use, frequency, last use, key). Rows with no
    use in the window (set A) enter only when an iteration retires, with
    last use = that iteration and in key order, so one FIFO per frequency
    gives A's order (frequencies >= 64, rare there, use a small heap). Rows
    whose next use is v sit in bucket v, an unordered list sorted (stably,
    by radix) only when a victim search reaches it.
  - ``lru`` / ``lfu`` order (last use, key) / (frequency, last use, key),
    which only grow while a row stays resident: FIFOs per frequency again
    give the order, with lazily refreshed heap entries beyond 63.
  Every queued item carries a stamp; an item whose stamp differs from its
  row's current stamp is stale and skipped. Queue nodes are taken in
  append order from a pool and never reused in place (``compact_nodes``
  moves the live ones to the front, list by list, when the pool is full),
  so walking a list, as victim choice does, reads memory forwards.
* **Episodes** (rows held by several trainers) are a global hash index over
  records (one cache line each for up to two trainers) with present/pending
  bit masks and each holder's slot, so plans never read another trainer's
  row entries; versions
  of write-backs not yet acknowledged are a separate key -> version map, with
  a FIFO of (version, key) to forget them in order.

Residency is planned on demand: a row read at k and not resident is
fetched and installed in plan k (``oracle.staging`` moves the store fetches
ahead afterwards), so no fetch is ever pending across steps or deferred. One step is ``advance`` per trainer (retire k-1, fetch for k;
each touches only its trainer's state, so trainers run in parallel), then
``finish_step`` (k-1's evictions and write-backs) and, once plan k-1 has
been handed out, ``plan_iteration`` (plan k). ``load`` brings the next
iteration into each trainer's window, also in parallel.

Memory latency, not arithmetic, bounds this code: free lists of entries
and slots are array stacks (a linked free list costs a dependent cache miss
per allocation),
loops prefetch the records they will need a few iterations ahead, and
helpers that take many arrays are compiled without reference counting
(``_nrt=False``; they allocate nothing) so that calling them costs no
atomic operations.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

INF = 1 << 62
INF32 = (1 << 31) - 1  # "no use in the window" in int32 next-use fields

# The policies' codes (bagpipe.policies' ``code`` column, which tests/test_floors.py holds to these).
P_NONE, P_LRU, P_LFU, P_LRU_PREFETCH, P_STATIC, P_BAGPIPE, P_ORIGINAL = range(7)

# Config vector C.
C_POLICY, C_CAP, C_HORIZON, C_N, C_U, C_R, C_ITERS, C_BOUNDED, C_T, C_LB, C_NW, C_GW, C_BYPASS = range(13)
C_LEN = 13

# Row entry, one 64-byte cache line: int64 fields of E64 [.., 8] and int32 fields of its view E32 [.., 16].
X_KEY, X_QST, X_ACQ = range(3)  # key, queue stamp, acquisition order
Y_NEXT, Y_LAST, Y_FREQ, Y_LINK, Y_SLOT, Y_GIDX, Y_DSI, Y_FLAGS = range(8, 16)
F_PIN, F_INHEAP = 1, 2  # bits of Y_FLAGS

# Per-trainer counters M.
(M_ECOUNT, M_EHWM, M_EFREEN, M_NEXTSLOT, M_FREEN, M_NEXTFID, M_RES, M_STAMP, M_ACQ,
 M_NHWM, M_HOT, M_QMASK, M_LA_LIST, M_LA_NEAR, M_LA_FAR, M_NSCR, M_VLIST, M_VNODE) = range(18)
# M_NSCR: rows in the scratch area now (slots C_CAP + 0, 1, ...); M_VLIST / M_VNODE: the list and node the
# last victim left (-1: the heap), so a victim kept when its row bypasses goes back where it was.
M_LEN = 20

# Stats columns, in PlanStats field order.
S_FETCHED, S_JOINED, S_WRITTEN, S_SYNCED, S_PEAK, S_BYPASSED, S_SCRATCH_PEAK = range(7)
S_LEN = 7

# Episode record GE [g, GW]: fields, then NW present words, NW pending words, N holder entries.
# A holder entry is the holder's slot (low 32 bits) and, for a founder, its fetch id relative to the
# plan's first (high 32 bits): joins, installs and syncs then never read another trainer's row entry.
# With two trainers a record is 8 int64 and the planner aligns the records to one cache line each.
# An episode is live (updated at least once) once no founder is pending: on demand its founders fetch
# and install in the same plan. G_END_WRITER holds, while a step finishes, the iteration after which
# the episode ended (high 32 bits) and the trainer that writes it back (low 32 bits).
G_KEY, G_SYNC, G_JOIN, G_END_WRITER = range(4)
G_MASKS = 4
_LOW32 = (1 << 32) - 1
# Global counters GM.
GM_COUNT, GM_HWM, GM_FREEN, GM_WB_COUNT, GM_WQ_HEAD, GM_WQ_TAIL = range(6)
GM_LEN = 8

# Queue lists: 0..63 frequency classes (bagpipe's set A; the LRU/LFU queues),
# then, for bagpipe, 64 + b: rows whose next use falls in ring bucket b.
NCLASS = 64
HOT = NCLASS - 1  # a row this frequent may move to the heap at its next use

ERR_OK, ERR_NO_ROOM, ERR_INTERNAL = 0, 1, 2

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
def compact_heaps(E64, HP, HN):
    """Drop stale heap entries of every trainer and restore the heap order."""
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
def compact_nodes(E64, Q, QH, M):
    """Move every trainer's live queue nodes to the front of its pool, list after list, in list order.

    Stale nodes are dropped; each list keeps its order and its sorted prefix,
    and its nodes become consecutive in memory. Afterwards new nodes are
    taken from just past the live ones.
    """
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


# ------------------------------------------------------------------ loading
@njit(nogil=True, cache=True)
def load(C, i, t, rows, E64, E32, EFS, Hh, M, Wu, Wn, Wi, Wx, Q, QH, QL, PK, PN, distinct, WL):
    """Bring iteration ``i`` (keys [batch, columns], ``bagpipe.keys.plan_keys``) into trainer t's window.

    Dedups each trainer's share, sorts its distinct keys, links each key's
    previous loaded occurrence to this one, and (bagpipe) moves resident rows
    that had no use in the window from set A to bucket i. ``distinct[t]``
    receives its number of distinct rows. A negative key is an absent cell
    (``bagpipe.keys.ABSENT``: a partition's view, where another partition
    plans that cell): it adds no row and its read slot is -1. It touches only
    trainer t's state, so trainers load at the same time; ``WL[t]`` [6, U] is
    scratch.
    """
    U, R, LB, T = C[C_U], C[C_R], C[C_LB], C[C_T]
    bag = C[C_POLICY] == P_BAGPIPE
    static = C[C_POLICY] == P_STATIC
    hcap = Hh.shape[1]
    shift, mask = _shift_for(hcap), hcap - 1
    sl = i % R
    base = sl * U
    it, rank, kk, dk, de, at = WL[t, 0], WL[t, 1], WL[t, 2], WL[t, 3], WL[t, 4], WL[t, 5]
    E64t, E32t, Ht, Mt = E64[t], E32[t], Hh[t], M[t]
    r0 = t * LB
    # The present keys, in cell order, and the cell of each (at): absent cells are skipped here,
    # without a branch (in a partition's view they are a random half, which defeats prediction).
    m = 0
    for b in range(LB):
        for c in range(T):
            x = b * T + c
            key = rows[r0 + b, c]
            kk[m] = key
            at[m] = x
            it[x] = U - 1  # an absent cell's rank sits at U - 1 (step 2), unused when m < U
            m += key >= 0
    # 1. every occurrence -> its row's entry (created when new), and the distinct rows in order of
    # first occurrence (Y_DSI and de form a sparse set: no clearing). Two look-aheads: the hash cell
    # PF occurrences ahead, then, PF / 2 ahead, the entry that cell names (when the key sits at home).
    nd = 0
    EFSt = EFS[t]
    for y in range(m):
        if y + PF < m:
            _prefetch(Ht, _home(kk[y + PF], shift))
            q = _home(kk[y + PF // 2], shift)
            if Ht[q, 0] == kk[y + PF // 2] and Ht[q, 1] > 0:
                _prefetch(E64t, Ht[q, 1] - 1)
        key = kk[y]
        x = at[y]
        p = _hfind(Ht, key, shift, mask)
        e = Ht[p, 1] - 1
        if e < 0:
            fn = Mt[M_EFREEN]
            if fn > PF // 2:
                _prefetch(E64t, EFSt[fn - 1 - PF // 2])  # the entry taken PF / 2 new rows from now
            e = _ealloc(EFSt, Mt)
            E64t[e, X_KEY] = key
            E64t[e, X_QST] = -1
            E64[t, e, X_ACQ] = 0
            E32t[e, Y_NEXT] = INF32
            E32t[e, Y_LAST] = -1
            E32t[e, Y_FREQ] = 0
            E32[t, e, Y_SLOT] = -1
            E32[t, e, Y_GIDX] = -1
            E32t[e, Y_LINK] = -1
            flags = 0
            if static:
                lo, hi = 0, PN[t]
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if PK[t, mid] < key:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < PN[t] and PK[t, lo] == key:
                    flags = F_PIN
            E32t[e, Y_FLAGS] = flags
            Ht[p, 0] = key
            Ht[p, 1] = e + 1
            d = -1
        else:
            d = E32t[e, Y_DSI]
        if d < 0 or d >= nd or de[d] != e:
            d = nd
            E32t[e, Y_DSI] = d
            de[d] = e
            dk[d] = key
            nd += 1
        it[x] = d
    # 2. sorted by key; each occurrence's position among them
    order = _argsort(dk, nd)
    for s in range(nd):
        d = order[s]
        Wu[t, base + s] = de[d]
        rank[d] = s
    if m < U:
        rank[U - 1] = -1  # absent cells read nothing (nd <= m < U: no row's rank is there)
    for x in range(U):
        Wi[t, base + x] = rank[it[x]]
    Wn[t, sl] = nd
    distinct[t] = nd
    # 3. next-use links
    QHt, Qt = QH[t], Q[t]
    for s in range(nd):
        if s + PF < nd:
            _prefetch(E64t, Wu[t, base + s + PF])
            if s + PF // 2 < nd:
                lk = E32t[Wu[t, base + s + PF // 2], Y_LINK]
                if lk >= 0:
                    _prefetch(Wx[t], lk)
        e = Wu[t, base + s]
        Wx[t, base + s] = INF32
        if E32t[e, Y_NEXT] == INF32:
            E32t[e, Y_NEXT] = i
            if bag and E32[t, e, Y_SLOT] >= 0:
                # Resident with no use in the window (set A): now its next use is i.
                QL[t, R] -= 1
                QL[t, sl] += 1
                st = Mt[M_STAMP] + 1
                Mt[M_STAMP] = st
                E64t[e, X_QST] = st
                _lappend(Qt, QHt, Mt, NCLASS + sl, e, st)
        else:
            Wx[t, E32t[e, Y_LINK]] = i
        E32t[e, Y_LINK] = base + s


# -------------------------------------------------------------- residency
@njit(_nrt=False)
def _take_slot(C, t, S, Mt):
    fn = Mt[M_FREEN]
    if fn > 0:
        Mt[M_FREEN] = fn - 1
        return S[t, fn - 1]
    ns = Mt[M_NEXTSLOT]
    if C[C_BOUNDED] == 0 or ns < C[C_CAP]:
        Mt[M_NEXTSLOT] = ns + 1
        return ns
    return -1


@njit(_nrt=False)
def _release(C, t, e, E64t, E32t, EFS, Ht, Mt, S, QL, hshift, hmask):
    """Give up row ``e``'s slot (and its entry when it has no use left in the window)."""
    slot = np.int64(E32t[e, Y_SLOT])
    fn = Mt[M_FREEN]
    S[t, fn] = slot
    Mt[M_FREEN] = fn + 1
    E32t[e, Y_SLOT] = -1
    Mt[M_RES] -= 1
    if E32t[e, Y_FREQ] >= HOT:
        Mt[M_HOT] -= 1
    E32t[e, Y_FREQ] = 0
    nu = np.int64(E32t[e, Y_NEXT])
    if C[C_POLICY] == P_BAGPIPE:
        # Only queued rows are released (victims; the other policies drop rows just used).
        R = C[C_R]
        QL[t, R if nu == INF32 else nu % R] -= 1
    E64t[e, X_QST] = -1
    if C[C_POLICY] == P_LFU:
        E32t[e, Y_FLAGS] &= ~F_INHEAP
    # The episode's holder entry for t goes stale here, unread: finish_step clears t's present bit
    # before anything reads holder entries again (plan k), which saves a cache miss per victim.
    E32t[e, Y_GIDX] = -1
    if nu == INF32:
        p = _hfind(Ht, E64t[e, X_KEY], hshift, hmask)
        _hdel(Ht, p, hshift, hmask)
        fnn = Mt[M_EFREEN]
        EFS[t, fnn] = e
        Mt[M_EFREEN] = fnn + 1
        Mt[M_ECOUNT] -= 1
    return slot


@njit(_nrt=False, inline="always")
def _evict_scratch(t, e, E64t, E32t, EFS, Ht, Mt, hshift, hmask, ev, nev):
    """Row entry e leaves its scratch slot after its one iteration (unqueued: the slot is not the cache's);
    recorded as eviction nev, returns nev + 1."""
    key = E64t[e, X_KEY]
    ev[nev, 0] = t
    ev[nev, 1] = key
    ev[nev, 2] = E32t[e, Y_SLOT]
    ev[nev, 3] = E32t[e, Y_GIDX]
    E32t[e, Y_SLOT] = -1
    Mt[M_NSCR] -= 1
    if E32t[e, Y_FREQ] >= HOT:
        Mt[M_HOT] -= 1
    E32t[e, Y_FREQ] = 0
    E64t[e, X_QST] = -1
    E32t[e, Y_GIDX] = -1
    if E32t[e, Y_NEXT] == INF32:
        p = _hfind(Ht, key, hshift, hmask)
        _hdel(Ht, p, hshift, hmask)
        fnn = Mt[M_EFREEN]
        EFS[t, fnn] = e
        Mt[M_EFREEN] = fnn + 1
        Mt[M_ECOUNT] -= 1
    return nev + 1


@njit(_nrt=False)
def _gdelete(GM, GFS, Gh, g, key):
    """Forget episode ``g`` of row ``key``."""
    gcap = Gh.shape[0]
    gshift, gmask = _shift_for(gcap), gcap - 1
    p = _hfind(Gh, key, gshift, gmask)
    _hdel(Gh, p, gshift, gmask)
    GFS[GM[GM_FREEN]] = g
    GM[GM_FREEN] += 1
    GM[GM_COUNT] -= 1


# ------------------------------------------------------------------ retiring
@njit(_nrt=False)
def _enqueue_used(C, t, e, E64t, E32t, Mt, Qt, QHt, QL, HP, HN):
    """Queue a row that was just used (its frequency and last use changed) for victim choice."""
    pol = C[C_POLICY]
    f = np.int64(E32t[e, Y_FREQ])
    if pol == P_BAGPIPE:
        R = C[C_R]
        st = Mt[M_STAMP] + 1
        Mt[M_STAMP] = st
        E64t[e, X_QST] = st
        nu = np.int64(E32t[e, Y_NEXT])
        if nu == INF32:
            QL[t, R] += 1
            if f < NCLASS:
                _lappend(Qt, QHt, Mt, f, e, st)
                Mt[M_QMASK] |= np.int64(1) << f
            else:
                _hpush(HP[t], HN, t, -INF, (f << 32) | (np.int64(E32t[e, Y_LAST]) + 1), E64t[e, X_KEY], e, st)
        else:
            b = nu % R
            QL[t, b] += 1
            _lappend(Qt, QHt, Mt, NCLASS + b, e, st)
    elif pol == P_LRU or pol == P_LRU_PREFETCH:
        st = Mt[M_STAMP] + 1
        Mt[M_STAMP] = st
        E64t[e, X_QST] = st
        _lappend(Qt, QHt, Mt, 1, e, st)
        Mt[M_QMASK] |= np.int64(2)
    elif pol == P_LFU:
        if f < NCLASS:
            st = Mt[M_STAMP] + 1
            Mt[M_STAMP] = st
            E64t[e, X_QST] = st
            _lappend(Qt, QHt, Mt, f, e, st)
            Mt[M_QMASK] |= np.int64(1) << f
        elif (E32t[e, Y_FLAGS] & F_INHEAP) == 0:
            # From here on its priority only grows while resident: one heap entry, refreshed lazily.
            st = Mt[M_STAMP] + 1
            Mt[M_STAMP] = st
            E64t[e, X_QST] = st
            E32t[e, Y_FLAGS] |= F_INHEAP
            _hpush(HP[t], HN, t, f, np.int64(E32t[e, Y_LAST]), E64t[e, X_KEY], e, st)


@njit(_nrt=False)
def _retire(C, t, i, E64, E32, EFS, Hh, M, Wu, Wn, Wx, S, Q, QH, QL, HP, HN, GE, hshift, hmask,
            ev, nev):
    """Record iteration i's uses (next use, last use, frequency), empty the scratch area, then the policy's
    drops."""
    R, U, pol = C[C_R], C[C_U], C[C_POLICY]
    # Only a policy that bypasses has scratch slots (at C_CAP and beyond); no slot reaches this otherwise.
    cap = C[C_CAP] if C[C_BYPASS] != 0 else INF
    E64t, E32t, Ht, Mt, Qt, QHt = E64[t], E32[t], Hh[t], M[t], Q[t], QH[t]
    sl = i % R
    base = sl * U
    nd = Wn[t, sl]
    if pol == P_BAGPIPE:
        # Every row queued in bucket i is used at i and queued again below.
        _lclear(QHt, NCLASS + sl)
        QL[t, sl] = 0
    queued = pol == P_BAGPIPE or pol == P_LRU or pol == P_LRU_PREFETCH or pol == P_LFU
    for s in range(nd):
        if s + PF < nd:
            _prefetch(E64t, Wu[t, base + s + PF])
        e = Wu[t, base + s]
        E32t[e, Y_NEXT] = Wx[t, base + s]
        E32t[e, Y_LAST] = i
        f = E32t[e, Y_FREQ] + 1
        E32t[e, Y_FREQ] = f
        if f == HOT:
            Mt[M_HOT] += 1
        if E32t[e, Y_SLOT] >= cap:
            # In the scratch area for i only: it leaves now (in key order, as it came), before any drop.
            nev = _evict_scratch(t, e, E64t, E32t, EFS, Ht, Mt, hshift, hmask, ev, nev)
        elif queued:
            _enqueue_used(C, t, e, E64t, E32t, Mt, Qt, QHt, QL, HP, HN)
    if pol == P_NONE or pol == P_STATIC or pol == P_ORIGINAL:
        H = C[C_HORIZON]
        for s in range(nd):
            if s + PF < nd:
                ea = Wu[t, base + s + PF]
                _prefetch(E64t, ea)
                if s + PF // 2 < nd:
                    eb = Wu[t, base + s + PF // 2]
                    _prefetch(Ht, _home(E64t[eb, X_KEY], hshift))
            e = Wu[t, base + s]
            if pol == P_STATIC and (E32t[e, Y_FLAGS] & F_PIN) != 0:
                continue
            if pol == P_ORIGINAL and E32t[e, Y_NEXT] <= i + H:
                continue  # the original rule: keep a row while its reuse gap is under the lookahead
            nev = _evict(C, t, e, E64t, E32t, EFS, Ht, Mt, S, QL, hshift, hmask, ev, nev)
    return nev


@njit(_nrt=False, inline="always")
def _evict(C, t, e, E64t, E32t, EFS, Ht, Mt, S, QL, hshift, hmask, ev, nev):
    """Release row entry e and record (trainer, key, slot, episode) as eviction nev; returns nev + 1."""
    key = E64t[e, X_KEY]
    g = np.int64(E32t[e, Y_GIDX])
    slot = _release(C, t, e, E64t, E32t, EFS, Ht, Mt, S, QL, hshift, hmask)
    ev[nev, 0] = t
    ev[nev, 1] = key
    ev[nev, 2] = slot
    ev[nev, 3] = g
    return nev + 1


# -------------------------------------------------------------------- victims
@njit(_nrt=False, inline="always")
def _pop_live(E64t, Qt, QHt, Mt, li, Ht, hshift):
    """Pop list li up to and including its first item whose stamp is its row's: that row entry, or -1."""
    while QHt[li, 0] >= 0:
        n = QHt[li, 0]
        e = Qt[n, 0]
        live = E64t[e, X_QST] == Qt[n, 1]
        _lpop(Qt, QHt, li)
        _lookahead(E64t, Qt, QHt, Mt, li, Ht, hshift)
        if live:
            Mt[M_VLIST] = li
            Mt[M_VNODE] = n
            return e
    return -1


@njit(_nrt=False)
def _victim_bagpipe(C, t, need_at, vtop, E64t, E32t, Mt, Qt, QHt, QL, HP, HN, Ht, hshift):
    """The resident row with the smallest (-next use, frequency, last use, key), if its next use > need_at.

    Returns (row or -1, updated vtop, status): status 1 is an inconsistency, 2
    asks the caller to sort bucket list ``vtop`` and ask again (this function
    allocates nothing, so it runs without reference counting).
    """
    R = C[C_R]
    if QL[t, R] > 0:
        while True:
            m = Mt[M_QMASK]
            if m == 0:
                break
            f = _ctz(m)
            e = _pop_live(E64t, Qt, QHt, Mt, f, Ht, hshift)
            if e >= 0:
                return e, vtop, 0
            Mt[M_QMASK] = m & ~(np.int64(1) << f)
        H = HP[t]
        while HN[t] > 0:
            e = H[0, 3]
            ok = E64t[e, X_QST] == H[0, 4]
            _hpop(H, HN, t)
            if ok:
                Mt[M_VLIST] = -1
                return e, vtop, 0
        return -1, vtop, 1
    v = vtop
    while v > need_at:
        b = v % R
        if QL[t, b] > 0:
            li = NCLASS + b
            if QHt[li, 2] != QHt[li, 1]:
                return -1, v, 2
            e = _pop_live(E64t, Qt, QHt, Mt, li, Ht, hshift)
            if e >= 0:
                return e, v, 0
            return -1, v, 1
        v -= 1
    return -1, v, 0


@njit(_nrt=False)
def _unpop_victim(t, e, E64t, E32t, Mt, Qt, QHt, HP, HN):
    """Put back the row ``_victim_bagpipe`` just returned, where it was: it stays, and stays first."""
    li = Mt[M_VLIST]
    if li >= 0:
        n = Mt[M_VNODE]
        if QHt[li, 0] < 0:  # the pop emptied the list (a bucket list is sorted when victims leave it)
            QHt[li, 1] = n
            QHt[li, 2] = n if li >= NCLASS else -1
        QHt[li, 0] = n
        Mt[M_LA_LIST] = -1
    else:
        f = np.int64(E32t[e, Y_FREQ])
        _hpush(HP[t], HN, t, -INF, (f << 32) | (np.int64(E32t[e, Y_LAST]) + 1), E64t[e, X_KEY], e,
               E64t[e, X_QST])


@njit(_nrt=False)
def _victim_fifo(C, t, need_at, cur, skip, nskip, E64t, E32t, Mt, Qt, QHt, HP, HN):
    """LRU / LFU: the first row in queue order whose next use > need_at; the others stay queued.

    ``cur`` holds this pass's position in each class; skipped heap entries go
    to ``skip`` and are pushed back after the pass. Returns (row or -1, nskip).
    """
    m = Mt[M_QMASK]
    while m != 0:
        f = _ctz(m)
        m &= m - 1
        n = cur[f]
        if n == -1:
            continue
        if n == -2:
            n = QHt[f, 0]
        while n >= 0:
            e = Qt[n, 0]
            nx = Qt[n, 2]
            valid = E64t[e, X_QST] == Qt[n, 1]
            if valid and E32t[e, Y_NEXT] <= need_at:
                n = nx  # read before the row it is fetched for: keep it, look further
                continue
            if n == QHt[f, 0]:
                _lpop(Qt, QHt, f)
                if QHt[f, 0] < 0:
                    Mt[M_QMASK] &= ~(np.int64(1) << f)
            n = nx
            if valid:
                cur[f] = n
                return e, nskip
        cur[f] = -1
    if C[C_POLICY] == P_LFU:
        H = HP[t]
        while HN[t] > 0:
            e = H[0, 3]
            if E64t[e, X_QST] != H[0, 4]:
                _hpop(H, HN, t)
                continue
            f, last = np.int64(E32t[e, Y_FREQ]), np.int64(E32t[e, Y_LAST])
            if H[0, 0] != f or H[0, 1] != last:
                H[0, 0] = f  # used since it was queued: refresh, and look again
                H[0, 1] = last
                _hdown(H, HN[t], 0)
                continue
            if E32t[e, Y_NEXT] <= need_at:
                for c in range(5):
                    skip[nskip, c] = H[0, c]
                nskip += 1
                _hpop(H, HN, t)
                continue
            _hpop(H, HN, t)
            return e, nskip
    return -1, nskip


# -------------------------------------------------------------------- acquiring
@njit
def _acquire(C, t, k, E64, E32, EFS, Hh, M, Wu, Wn, Wx, S, Q, QH, QL, HP, HN, GE, ST,
             hshift, hmask, ev, nev, new, nnew):
    """Give trainer t's rows read at k and not resident a slot, and choose the victims they displace."""
    R, U, I, pol = C[C_R], C[C_U], C[C_ITERS], C[C_POLICY]
    bypass = C[C_BYPASS] != 0
    E64t, E32t, Ht, Mt, Qt, QHt = E64[t], E32[t], Hh[t], M[t], Q[t], QH[t]
    vtop = min(k + C[C_HORIZON], I - 1)
    cur = np.full(NCLASS, -2, np.int64)
    skip = np.empty((HN[t] if pol == P_LFU else 0, 5), np.int64)
    Mt[M_LA_LIST] = -1
    nskip = 0
    err = ERR_OK
    sl = k % R
    base = sl * U
    nk = Wn[t, sl]
    for s in range(nk):
        if s + PF < nk:
            _prefetch(E64t, Wu[t, base + s + PF])
        e = np.int64(Wu[t, base + s])
        if E32t[e, Y_SLOT] >= 0:
            continue
        slot = _take_slot(C, t, S, Mt)
        if slot < 0:
            v = -1
            if pol == P_BAGPIPE:
                v, vtop, status = _victim_bagpipe(C, t, k, vtop, E64t, E32t, Mt, Qt, QHt, QL, HP, HN,
                                                  Ht, hshift)
                if status == 2:
                    _lsort(E64t, E32t, Qt, QHt, NCLASS + vtop % R)
                    Mt[M_LA_LIST] = -1
                    v, vtop, status = _victim_bagpipe(C, t, k, vtop, E64t, E32t, Mt, Qt, QHt, QL, HP,
                                                      HN, Ht, hshift)
                if status != 0:
                    err = ERR_INTERNAL
                    break
                # The reference ranks the row, with its next use after k and no frequency yet, against
                # the victim (frequency >= 1): it comes first exactly when its next use is no sooner.
                if bypass and v >= 0 and Wx[t, base + s] >= E32t[v, Y_NEXT]:
                    _unpop_victim(t, v, E64t, E32t, Mt, Qt, QHt, HP, HN)
                    slot = C[C_CAP] + Mt[M_NSCR]
                    Mt[M_NSCR] += 1
                    ST[t, S_BYPASSED] += 1
                    ST[t, S_SCRATCH_PEAK] = max(ST[t, S_SCRATCH_PEAK], Mt[M_NSCR])
                    E32t[e, Y_SLOT] = slot
                    Mt[M_ACQ] += 1
                    E64[t, e, X_ACQ] = Mt[M_ACQ]
                    new[nnew, 0] = e
                    new[nnew, 1] = slot
                    new[nnew, 2] = E64t[e, X_KEY]
                    nnew += 1
                    continue
            elif pol == P_LRU or pol == P_LRU_PREFETCH or pol == P_LFU:
                v, nskip = _victim_fifo(C, t, k, cur, skip, nskip, E64t, E32t, Mt, Qt, QHt, HP, HN)
            if v < 0:
                err = ERR_NO_ROOM
                break
            nev = _evict(C, t, v, E64t, E32t, EFS, Ht, Mt, S, QL, hshift, hmask, ev, nev)
            slot = _take_slot(C, t, S, Mt)
        E32t[e, Y_SLOT] = slot
        Mt[M_RES] += 1
        Mt[M_ACQ] += 1
        E64[t, e, X_ACQ] = Mt[M_ACQ]
        new[nnew, 0] = e
        new[nnew, 1] = slot
        new[nnew, 2] = E64t[e, X_KEY]  # plan k reads it from here, not from the entry's cache line
        nnew += 1
    for x in range(nskip):
        _hpush(HP[t], HN, t, skip[x, 0], skip[x, 1], skip[x, 2], skip[x, 3], skip[x, 4])
    ST[t, S_PEAK] = max(ST[t, S_PEAK], Mt[M_RES])
    return err, nev, nnew


# -------------------------------------------------------------------- finishing
@njit
def _finish(C, after, ev, nev, GE, GM, GFS, Gh, LW, WQ, ST):
    """Apply the evictions after iteration ``after``; the last holder of a row writes it back.

    Returns the per-trainer eviction arrays of that iteration's plans.
    """
    N, nw = C[C_N], C[C_NW]
    ended = np.empty(nev, np.int64)
    ekeys = np.empty(nev, np.int64)
    nend = 0
    for r in range(nev):
        if r + PF < nev:
            _prefetch(GE, ev[r + PF, 3])
        t, g = ev[r, 0], ev[r, 3]
        _bit_clear(GE, g, G_MASKS, t)
        if _bits_empty(GE, g, G_MASKS, nw):  # no founder is pending at an eviction (on demand)
            ew = GE[g, G_END_WRITER]
            if (ew >> 32) != after:
                GE[g, G_END_WRITER] = (after << 32) | t
                ended[nend] = g
                ekeys[nend] = GE[g, G_KEY]
                nend += 1
            elif t < (ew & _LOW32):
                GE[g, G_END_WRITER] = (after << 32) | t
    ev_key = np.empty(nev, np.int64)
    ev_slot = np.empty(nev, np.int32)
    ev_write = np.empty(nev, np.uint8)
    ev_off = np.zeros(N + 1, np.int64)
    for r in range(nev):
        if r + PF < nev:
            _prefetch(GE, ev[r + PF, 3])
        t, g = ev[r, 0], ev[r, 3]
        ev_key[r] = ev[r, 1]
        ev_slot[r] = ev[r, 2]
        w = GE[g, G_END_WRITER] == (after << 32) | t
        ev_write[r] = 1 if w else 0
        if w:
            ST[t, S_WRITTEN] += 1
        ev_off[t + 1] += 1
    for t in range(N):
        ev_off[t + 1] += ev_off[t]
    lcap = LW.shape[0]
    lshift, lmask = _shift_for(lcap), lcap - 1
    tail = GM[GM_WQ_TAIL]
    gcap = Gh.shape[0]
    gshift = _shift_for(gcap)
    for x in range(nend):
        if x + PF < nend:
            _prefetch(LW, _home(ekeys[x + PF], lshift))
            _prefetch(Gh, _home(ekeys[x + PF], gshift))
        g = ended[x]
        key = ekeys[x]
        p = _hfind(LW, key, lshift, lmask)
        if LW[p, 1] == 0:
            GM[GM_WB_COUNT] += 1
            LW[p, 0] = key
        LW[p, 1] = after + 1
        WQ[tail, 0] = after
        WQ[tail, 1] = key
        tail += 1
        _gdelete(GM, GFS, Gh, g, key)
    GM[GM_WQ_TAIL] = tail
    return ev_key, ev_slot, ev_write, ev_off


@njit(cache=True)
def forget_writebacks(through, GM, LW, WQ):
    """Forget the versions of write-backs after iterations <= ``through`` (they have landed)."""
    lcap = LW.shape[0]
    lshift, lmask = _shift_for(lcap), lcap - 1
    h, tail = GM[GM_WQ_HEAD], GM[GM_WQ_TAIL]
    while h < tail and WQ[h, 0] <= through:
        key = WQ[h, 1]
        p = _hfind(LW, key, lshift, lmask)
        if LW[p, 1] - 1 == WQ[h, 0]:  # not superseded by a later write-back of the row
            _hdel(LW, p, lshift, lmask)
            GM[GM_WB_COUNT] -= 1
        h += 1
    GM[GM_WQ_HEAD] = h


# ------------------------------------------------------------------ planning
@njit
def _plan_new(C, k, new, new_off, E64, E32, M, GE, GM, GFS, Gh, LW, ST, jrec):
    """Plan k, part 1: where each new row comes from, a live episode (join) or the store (fetch)."""
    N, nw, gw = C[C_N], C[C_NW], C[C_GW]
    ho = gw - N  # column of trainer 0's holder entry
    gcap = Gh.shape[0]
    gshift, gmask = _shift_for(gcap), gcap - 1
    lcap = LW.shape[0]
    lshift, lmask = _shift_for(lcap), lcap - 1
    nnew = new_off[N]
    keys = new[:, 2]
    f_key = np.empty(nnew, np.int64)
    f_off = np.zeros(N + 1, np.int64)
    first_fid = np.empty(N, np.int64)
    # jrec: (key, trainer, slot, send) per join record; at most 2 per new row
    nj = 0
    nf = 0
    for t in range(N):
        E64t, Mt = E64[t], M[t]
        first_fid[t] = Mt[M_NEXTFID]
        for x in range(new_off[t], new_off[t + 1]):
            if x + PF < nnew:
                _prefetch(Gh, _home(keys[x + PF], gshift))
                if x + PF < new_off[t + 1]:
                    _prefetch(E64t, new[x + PF, 0])  # the entry takes its episode index below
                if x + PF // 2 < nnew:
                    q = _home(keys[x + PF // 2], gshift)
                    if Gh[q, 1] > 0:
                        _prefetch(GE, Gh[q, 1] - 1)
            e, slot, key = new[x, 0], new[x, 1], keys[x]
            p = _hfind(Gh, key, gshift, gmask)
            g = Gh[p, 1] - 1
            if g >= 0 and _bits_empty(GE, g, G_MASKS + nw, nw):  # live
                if GE[g, G_JOIN] != k:  # the sender holds the row since before this iteration
                    GE[g, G_JOIN] = k
                    snd = _bits_lowest(GE, g, G_MASKS, nw)
                    jrec[nj, 0] = key
                    jrec[nj, 1] = snd
                    jrec[nj, 2] = GE[g, ho + snd] & _LOW32
                    jrec[nj, 3] = 1
                    nj += 1
                jrec[nj, 0] = key
                jrec[nj, 1] = t
                jrec[nj, 2] = slot
                jrec[nj, 3] = 0
                nj += 1
                _bit_set(GE, g, G_MASKS, t)
                GE[g, ho + t] = slot
                E32[t, e, Y_GIDX] = g
                ST[t, S_JOINED] += 1
                continue
            if g < 0:
                fn = GM[GM_FREEN]
                if fn > 0:
                    GM[GM_FREEN] = fn - 1
                    g = GFS[fn - 1]
                else:
                    g = GM[GM_HWM]
                    GM[GM_HWM] = g + 1
                GM[GM_COUNT] += 1
                GE[g, G_KEY] = key
                GE[g, G_SYNC] = -1
                GE[g, G_JOIN] = -1
                GE[g, G_END_WRITER] = np.int64(-2) << 32
                for w in range(G_MASKS, ho):
                    GE[g, w] = 0
                Gh[p, 0] = key
                Gh[p, 1] = g + 1
            fid = Mt[M_NEXTFID]
            Mt[M_NEXTFID] = fid + 1
            _bit_set(GE, g, G_MASKS + nw, t)
            GE[g, ho + t] = ((fid - first_fid[t]) << 32) | slot
            E32[t, e, Y_GIDX] = g
            f_key[nf] = key
            nf += 1
            ST[t, S_FETCHED] += 1
        f_off[t + 1] = nf
    f_ver = np.empty(nf, np.int64)
    for x in range(nf):
        if x + PF < nf:
            _prefetch(LW, _home(f_key[x + PF], lshift))
        q = _hfind(LW, f_key[x], lshift, lmask)
        f_ver[x] = LW[q, 1] - 1  # -1 when there is none
    return f_key[:nf], f_ver, f_off, first_fid, jrec[:nj]


@njit
def _plan_read(C, k, E64, E32, Wu, Wn, Wi, GE, ST, first_fid, inst):
    """Plan k, part 2: rows read at k; an episode not yet live goes live now and all its founders install."""
    N, U, R, LB, T, nw, gw = C[C_N], C[C_U], C[C_R], C[C_LB], C[C_T], C[C_NW], C[C_GW]
    ho = gw - N
    sl = k % R
    base = sl * U
    total_read = 0
    for t in range(N):
        total_read += Wn[t, sl]
    # inst: (holder, fetch id, slot) per install; at most N per row read
    ni = 0
    scand = np.empty(total_read, np.int64)
    skeys = np.empty(total_read, np.int64)
    ns = 0
    read = np.empty((N, LB, T), np.int32)
    for t in range(N):
        nd = Wn[t, sl]
        us = np.empty(nd + 1, np.int32)
        us[nd] = -1  # an absent cell's Wi is -1: us[-1], read slot -1
        gs = np.empty(nd, np.int64)
        E64t, E32t = E64[t], E32[t]
        for s in range(nd):
            if s + PF < nd:
                _prefetch(E64t, Wu[t, base + s + PF])
            e = Wu[t, base + s]
            us[s] = E32t[e, Y_SLOT]
            gs[s] = E32t[e, Y_GIDX]
        for s in range(nd):
            if s + PF < nd:
                _prefetch(GE, gs[s + PF])
            g = gs[s]
            if not _bits_empty(GE, g, G_MASKS + nw, nw):  # founders pending: not live yet
                for w in range(nw):
                    bits = GE[g, G_MASKS + nw + w]
                    while bits != 0:
                        h = w * 64 + _ctz(bits)
                        bits &= bits - 1
                        held = GE[g, ho + h]
                        inst[ni, 0] = h
                        inst[ni, 1] = first_fid[h] + (held >> 32)
                        inst[ni, 2] = held & _LOW32
                        ni += 1
                    GE[g, G_MASKS + w] |= GE[g, G_MASKS + nw + w]
                    GE[g, G_MASKS + nw + w] = 0
            if GE[g, G_SYNC] != k:
                GE[g, G_SYNC] = k
                if _bits_many(GE, g, G_MASKS, nw):
                    scand[ns] = g
                    skeys[ns] = GE[g, G_KEY]
                    ns += 1
        rt = read[t]
        for b in range(LB):
            for c in range(T):
                rt[b, c] = us[Wi[t, base + b * T + c]]
    in_order, in_off = _group(inst[:, 0], ni, N)
    in_id = np.empty(ni, np.int64)
    in_slot = np.empty(ni, np.int32)
    for x in range(ni):
        r = in_order[x]
        in_id[x] = inst[r, 1]
        in_slot[x] = inst[r, 2]
    return read, in_id, in_slot, in_off, scand[:ns], skeys[:ns]


@njit
def _plan_sync(C, GE, scand, skeys, ST):
    """Plan k, part 3: syncs of the rows used now and held by two or more trainers, numbered by key."""
    N, nw, gw = C[C_N], C[C_NW], C[C_GW]
    ho = gw - N
    ns = len(scand)
    sorder = _argsort(skeys, ns)
    nsr = 0
    for x in range(ns):
        for w in range(nw):
            nsr += _popcount(GE[scand[x], G_MASKS + w])
    srec = np.empty((nsr, 3), np.int64)  # trainer, pos, slot
    r = 0
    for pos in range(ns):
        if pos + PF < ns:
            _prefetch(GE, scand[sorder[pos + PF]])
        g = scand[sorder[pos]]
        for w in range(nw):
            bits = GE[g, G_MASKS + w]
            while bits != 0:
                u = w * 64 + _ctz(bits)
                bits &= bits - 1
                srec[r, 0] = u
                srec[r, 1] = pos
                srec[r, 2] = GE[g, ho + u] & _LOW32
                r += 1
                ST[u, S_SYNCED] += 1
    so, sy_off = _group(srec[:, 0], nsr, N)
    sy_pos = np.empty(nsr, np.int32)
    sy_slot = np.empty(nsr, np.int32)
    for x in range(nsr):
        sy_pos[x] = srec[so[x], 1]
        sy_slot[x] = srec[so[x], 2]
    return sy_pos, sy_slot, sy_off, ns


@njit
def _plan_join(C, jrec):
    """Plan k, part 4: the joins, numbered by key (the sender, then the joiners in trainer order)."""
    N = C[C_N]
    nj = len(jrec)
    jkeys = np.empty(nj, np.int64)
    for x in range(nj):
        jkeys[x] = jrec[x, 0]
    jorder = _argsort(jkeys, nj)
    jown = np.empty(nj, np.int64)
    jpos = np.empty(nj, np.int64)
    n_join = 0
    for x in range(nj):
        rr = jorder[x]
        if x > 0 and jrec[rr, 0] != jrec[jorder[x - 1], 0]:
            n_join += 1
        jpos[x] = n_join
        jown[x] = jrec[rr, 1]
    if nj > 0:
        n_join += 1
    jo, jo_off = _group(jown, nj, N)
    jo_pos = np.empty(nj, np.int32)
    jo_slot = np.empty(nj, np.int32)
    jo_send = np.empty(nj, np.uint8)
    for x in range(nj):
        y = jo[x]
        jo_pos[x] = jpos[y]
        jo_slot[x] = jrec[jorder[y], 2]
        jo_send[x] = jrec[jorder[y], 3]
    return jo_pos, jo_slot, jo_send, jo_off, n_join


@njit
def _plan(C, k, new, new_off, E64, E32, M, Wu, Wn, Wi, GE, GM, GFS, Gh, LW, ST, WJR, WIN):
    """Plan k: fetches and joins of the new rows, installs, reads and syncs."""
    f_key, f_ver, f_off, first_fid, jrec = _plan_new(C, k, new, new_off, E64, E32, M, GE, GM, GFS, Gh, LW, ST,
                                                     WJR)
    read, in_id, in_slot, in_off, scand, skeys = _plan_read(C, k, E64, E32, Wu, Wn, Wi, GE, ST, first_fid, WIN)
    sy_pos, sy_slot, sy_off, ns = _plan_sync(C, GE, scand, skeys, ST)
    jo_pos, jo_slot, jo_send, jo_off, n_join = _plan_join(C, jrec)
    N = C[C_N]
    slots_needed = np.empty(N, np.int64)
    for t in range(N):
        # The scratch area lies past the cache's slots; the trainer keeps the most it ever used.
        sp = ST[t, S_SCRATCH_PEAK]
        slots_needed[t] = C[C_CAP] + sp if sp > 0 else M[t, M_NEXTSLOT]
    return (read, f_key, f_ver, f_off, first_fid, in_id, in_slot, in_off,
            sy_pos, sy_slot, sy_off, ns, jo_pos, jo_slot, jo_send, jo_off, n_join, slots_needed)


# ------------------------------------------------------------------ one step
@njit(nogil=True, cache=True)
def advance(C, t, k, E64, E32, EFS, Hh, M, Wu, Wn, Wx, S, Q, QH, QL, HP, HN, GE, ST, WEV, WNEW, counts):
    """Trainer t's part of step k: retire k-1, then choose the rows to fetch for k and what they displace.

    It touches only trainer t's state (and t's own column of shared episode
    records), so trainers run it at the same time, each in its own thread.
    Writes t's evictions and new rows to ``WEV[t]`` and ``WNEW[t]``, and
    their counts and error code to ``counts[t]``.
    """
    hcap = Hh.shape[1]
    hshift, hmask = _shift_for(hcap), hcap - 1
    nev = 0
    if k > 0:
        nev = _retire(C, t, k - 1, E64, E32, EFS, Hh, M, Wu, Wn, Wx, S, Q, QH, QL, HP, HN, GE,
                      hshift, hmask, WEV[t], 0)
    err, nev, nnew = _acquire(C, t, k, E64, E32, EFS, Hh, M, Wu, Wn, Wx, S, Q, QH, QL, HP, HN,
                              GE, ST, hshift, hmask, WEV[t], nev, WNEW[t], 0)
    counts[t, 0] = nev
    counts[t, 1] = nnew
    counts[t, 2] = err


@njit(nogil=True, cache=True)
def finish_step(C, k, GE, GM, GFS, Gh, LW, WQ, ST, WEV, WNEW, counts, WEVF, WNEWF, new_off):
    """After every trainer's ``advance(k)``: apply the evictions after iteration k-1.

    Merges the trainers' records in trainer order (the reference's order)
    into ``WEVF`` and ``WNEWF`` (new rows, offsets per trainer in
    ``new_off``), and settles who writes back. Returns (error, trainer in
    error, k-1's evictions).
    """
    N = C[C_N]
    err, err_t = ERR_OK, -1
    for t in range(N):
        if counts[t, 2] != ERR_OK:
            err, err_t = counts[t, 2], t
            break
    ev, new = WEVF, WNEWF
    nev = nnew = 0
    new_off[0] = 0
    for t in range(N):
        for x in range(counts[t, 0]):
            for c in range(4):
                ev[nev, c] = WEV[t, x, c]
            nev += 1
        for x in range(counts[t, 1]):
            for c in range(3):
                new[nnew, c] = WNEW[t, x, c]
            nnew += 1
        new_off[t + 1] = nnew
    if k == 0 or err != ERR_OK:
        # Nothing is resident before iteration 0, so planning it evicts nothing.
        nev = 0
    if err != ERR_OK:
        new_off[:] = 0
    return (err, err_t) + _finish(C, k - 1, ev, nev, GE, GM, GFS, Gh, LW, WQ, ST)


@njit(nogil=True, cache=True)
def plan_iteration(C, k, E64, E32, M, Wu, Wn, Wi, Gh, GE, GM, GFS, LW, ST, WNEWF, new_off, WJR, WIN):
    """Plan k from the new rows ``finish_step`` merged: fetches and joins, installs, reads and syncs.

    Runs after iteration k-1's plan has been handed out, as in the
    reference, so write-backs acknowledged meanwhile already count.
    """
    return _plan(C, k, WNEWF, new_off, E64, E32, M, Wu, Wn, Wi, GE, GM, GFS, Gh, LW, ST, WJR, WIN)


@njit(nogil=True, cache=True)
def flush(C, after, E64, E32, EFS, Hh, M, S, QL, Gh, GE, GM, GFS, LW, WQ, ST):
    """After the last iteration every cached row is evicted (in the order it was acquired), and written back once.

    Nothing is planned afterwards, so rows only leave their slots: their
    entries stay (cheaper than unlinking each from the index).
    """
    N = C[C_N]
    total = 0
    for t in range(N):
        total += M[t, M_RES] + M[t, M_NSCR]
    ev = np.empty((total, 4), np.int64)
    nev = 0
    for t in range(N):
        E64t, E32t, Ht, Mt = E64[t], E32[t], Hh[t], M[t]
        held = Mt[M_RES] + Mt[M_NSCR]
        res = np.empty(held, np.int64)
        acq = np.empty(held, np.int64)
        m = 0
        for e in range(Mt[M_EHWM]):
            if E32t[e, Y_SLOT] >= 0:
                res[m] = e
                acq[m] = E64[t, e, X_ACQ]
                m += 1
        order = _argsort(acq, m)
        for x in range(m):
            if x + PF < m:
                _prefetch(E64t, res[order[x + PF]])
            e = res[order[x]]
            key = E64t[e, X_KEY]
            g = np.int64(E32t[e, Y_GIDX])
            slot = np.int64(E32t[e, Y_SLOT])
            E32t[e, Y_SLOT] = -1
            E32t[e, Y_GIDX] = -1
            if C[C_BYPASS] != 0 and slot >= C[C_CAP]:
                Mt[M_NSCR] -= 1
            else:
                Mt[M_RES] -= 1
            ev[nev, 0] = t
            ev[nev, 1] = key
            ev[nev, 2] = slot
            ev[nev, 3] = g
            nev += 1
    return _finish(C, after, ev, nev, GE, GM, GFS, Gh, LW, WQ, ST)


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
