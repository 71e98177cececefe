"""Which rows each trainer holds: loading the window, retiring uses, victims, bypass, acquiring slots.

One trainer's state only: ``load`` and ``advance`` run per trainer, in
threads (they release the GIL). The rules are ``oracle.reference``'s
``_load``, ``_advance``, ``_find_victim`` and ``_acquire``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from oracle.fastplan.layout import (
    C_BOUNDED, C_BYPASS, C_CAP, C_HORIZON, C_ITERS, C_LB, C_POLICY, C_R, C_T, C_U, ERR_INTERNAL, ERR_NO_ROOM, ERR_OK,
    F_INHEAP, F_PIN, HOT, INF, INF32, M_ACQ, M_ECOUNT, M_EFREEN, M_FREEN, M_HOT, M_LA_LIST, M_NEXTSLOT, M_NSCR, M_QMASK,
    M_RES, M_STAMP, M_VLIST, M_VNODE, NCLASS, P_BAGPIPE, P_LFU, P_LRU, P_LRU_PREFETCH, P_NONE, P_ORIGINAL, P_STATIC,
    S_BYPASSED, S_PEAK, S_SCRATCH_PEAK, X_ACQ, X_KEY, X_QST, Y_DSI, Y_FLAGS, Y_FREQ, Y_GIDX, Y_LAST, Y_LINK, Y_NEXT,
    Y_SLOT,
)
from oracle.fastplan.primitives import (
    PF, _argsort, _ctz, _ealloc, _hdel, _hdown, _hfind, _home, _hpop, _hpush, _lappend, _lclear, _lookahead, _lpop,
    _lsort, _prefetch, _shift_for,
)


# ------------------------------------------------------------------ loading
@njit(nogil=True, cache=True)
def load(C, i, t, keys, rows, window, queues, buffers):
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
    E64, E32, EFS, Hh, M, PK, PN, distinct = (rows.entries, rows.entries32, rows.free_entries, rows.index,
                                              rows.counters, rows.pinned_keys, rows.pinned_count, rows.distinct)
    Wu, Wn, Wi, Wx = window.rows, window.counts, window.reads, window.next_use
    Q, QH, QL = queues.nodes, queues.lists, queues.bucket_rows
    WL = buffers.load
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
            key = keys[r0 + b, c]
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
def _retire(C, t, i, rows, window, queues, GE, hshift, hmask, ev, nev):
    """Record iteration i's uses (next use, last use, frequency), empty the scratch area, then the policy's
    drops."""
    E64, E32, EFS, Hh, M, S = (rows.entries, rows.entries32, rows.free_entries, rows.index, rows.counters,
                               rows.free_slots)
    Wu, Wn, Wx = window.rows, window.counts, window.next_use
    Q, QH, QL, HP, HN = queues.nodes, queues.lists, queues.bucket_rows, queues.heap, queues.heap_sizes
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
def _acquire(C, t, k, rows, window, queues, GE, hshift, hmask, ev, nev, new, nnew):
    """Give trainer t's rows read at k and not resident a slot, and choose the victims they displace."""
    E64, E32, EFS, Hh, M, S, ST = (rows.entries, rows.entries32, rows.free_entries, rows.index, rows.counters,
                                   rows.free_slots, rows.stats)
    Wu, Wn, Wx = window.rows, window.counts, window.next_use
    Q, QH, QL, HP, HN = queues.nodes, queues.lists, queues.bucket_rows, queues.heap, queues.heap_sizes
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

# ------------------------------------------------------------------ one step
@njit(nogil=True, cache=True)
def advance(C, t, k, rows, window, queues, episodes, buffers):
    """Trainer t's part of step k: retire k-1, then choose the rows to fetch for k and what they displace.

    It touches only trainer t's state (and t's own column of shared episode
    records), so trainers run it at the same time, each in its own thread.
    Writes t's evictions and new rows to ``WEV[t]`` and ``WNEW[t]``, and
    their counts and error code to ``counts[t]``.
    """
    GE = episodes.records
    WEV, WNEW, counts = buffers.evictions, buffers.new_rows, buffers.counts
    hcap = rows.index.shape[1]
    hshift, hmask = _shift_for(hcap), hcap - 1
    nev = 0
    if k > 0:
        nev = _retire(C, t, k - 1, rows, window, queues, GE, hshift, hmask, WEV[t], 0)
    err, nev, nnew = _acquire(C, t, k, rows, window, queues, GE, hshift, hmask, WEV[t], nev, WNEW[t], 0)
    counts[t, 0] = nev
    counts[t, 1] = nnew
    counts[t, 2] = err
