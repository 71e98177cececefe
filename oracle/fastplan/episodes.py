"""Rows across trainers: episodes, write-backs and their versions, and the plan of each iteration.

``finish_step`` settles the evictions of a step (who writes back, which
episodes end), ``plan_iteration`` builds plan k (fetches or joins of the new
rows, installs, reads, syncs), ``flush`` empties every cache after the last
iteration. The rules are ``oracle.reference``'s ``_plan``, ``_attach``
and ``_flush``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from oracle.fastplan.layout import (
    C_BYPASS, C_CAP, C_GW, C_LB, C_N, C_NW, C_R, C_T, C_U, ERR_OK, GM_COUNT, GM_FREEN, GM_HWM, GM_WB_COUNT, GM_WQ_HEAD,
    GM_WQ_TAIL, G_END_WRITER, G_JOIN, G_KEY, G_MASKS, G_SYNC, M_EHWM, M_NEXTFID, M_NEXTSLOT, M_NSCR, M_RES, S_FETCHED,
    S_JOINED, S_SCRATCH_PEAK, S_SYNCED, S_WRITTEN, X_ACQ, X_KEY, Y_GIDX, Y_SLOT, _LOW32,
)
from oracle.fastplan.primitives import (
    PF, _argsort, _bit_clear, _bit_set, _bits_empty, _bits_lowest, _bits_many, _ctz, _group, _hdel, _hfind, _home,
    _popcount, _prefetch, _shift_for,
)


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
def forget_writebacks(through, episodes):
    """Forget the versions of write-backs after iterations <= ``through`` (they have landed)."""
    GM, LW, WQ = episodes.counters, episodes.versions, episodes.written
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

@njit(nogil=True, cache=True)
def finish_step(C, k, rows, episodes, buffers):
    """After every trainer's ``advance(k)``: apply the evictions after iteration k-1.

    Merges the trainers' records in trainer order (the reference's order)
    into ``WEVF`` and ``WNEWF`` (new rows, offsets per trainer in
    ``new_off``), and settles who writes back. Returns (error, trainer in
    error, k-1's evictions).
    """
    ST = rows.stats
    GE, GM, GFS, Gh, LW, WQ = (episodes.records, episodes.counters, episodes.free, episodes.index, episodes.versions,
                               episodes.written)
    WEV, WNEW, counts, WEVF, WNEWF, new_off = (buffers.evictions, buffers.new_rows, buffers.counts,
                                               buffers.all_evictions, buffers.all_new_rows, buffers.new_offsets)
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
def plan_iteration(C, k, rows, window, episodes, buffers):
    """Plan k from the new rows ``finish_step`` merged: fetches and joins, installs, reads and syncs.

    Runs after iteration k-1's plan has been handed out, as in the
    reference, so write-backs acknowledged meanwhile already count.
    """
    E64, E32, M, ST = rows.entries, rows.entries32, rows.counters, rows.stats
    Wu, Wn, Wi = window.rows, window.counts, window.reads
    Gh, GE, GM, GFS, LW = episodes.index, episodes.records, episodes.counters, episodes.free, episodes.versions
    new, new_off, WJR, WIN = buffers.all_new_rows, buffers.new_offsets, buffers.joins, buffers.installs
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

@njit(nogil=True, cache=True)
def flush(C, after, rows, queues, episodes):
    """After the last iteration every cached row is evicted (in the order it was acquired), and written back once.

    Nothing is planned afterwards, so rows only leave their slots: their
    entries stay (cheaper than unlinking each from the index).
    """
    E64, E32, EFS, Hh, M, S, ST = (rows.entries, rows.entries32, rows.free_entries, rows.index, rows.counters,
                                   rows.free_slots, rows.stats)
    QL = queues.bucket_rows
    Gh, GE, GM, GFS, LW, WQ = (episodes.index, episodes.records, episodes.counters, episodes.free, episodes.versions,
                               episodes.written)
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
