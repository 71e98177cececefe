"""The compiled planner's state layout: field numbers of its records and codes, in one place.

Every kernel of ``oracle.fastplan`` reads and writes numpy arrays whose
columns these constants name; ``oracle.planner`` (the shell) allocates the
arrays with these widths. The package's docstring says what each structure
is for.
"""

from __future__ import annotations

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
