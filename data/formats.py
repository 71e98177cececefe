"""The raw formats `data/` reads and writes, and the published statistics behind them.

Shared by the synthetic generator (``data.synth``), the preparer
(``data.prepare``) and the tests, so that the column layouts, the value
encodings and the hashes are defined exactly once. Sources of the figures are
cited in docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bagpipe.keys import splitmix64

FORMATS = ("criteo", "avazu")

# ---------------------------------------------------------------- Criteo
CRITEO_NUM_DENSE = 13
CRITEO_NUM_CAT = 26
CRITEO_FIELDS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_CAT

# Distinct values per categorical feature in Criteo Kaggle train.txt (45,840,617
# rows, CTR 0.2562), as listed by the DLRM literature (facebookresearch/dlrm).
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# The same for Criteo Terabyte (day_0..day_23). Its columns are not aligned with
# Kaggle's, so hashed table caps take the larger of the two (see table_caps).
CRITEO_TERABYTE_CARDINALITIES = (
    227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 292775614, 40790948, 187188510, 590152, 12973, 108, 36,
)
# Share of empty fields per integer feature I1..I13 in Criteo Kaggle (approximate).
CRITEO_DENSE_MISSING = (0.454, 0.0, 0.215, 0.217, 0.026, 0.224, 0.043, 0.0005, 0.043, 0.454, 0.043, 0.765, 0.217)
# Categorical features go missing together in the real data: one group of six
# at 3.4%, one of four at 44%; C6 alone at 12.1% and C22 alone at 76.3%.
# (group members as 0-based indices of C1..C26, missing rate)
CRITEO_CAT_MISSING_GROUPS = (
    ((2, 3, 11, 15, 20, 23), 0.034),
    ((18, 19, 24, 25), 0.440),
    ((5,), 0.121),
    ((21,), 0.763),
)

# ---------------------------------------------------------------- Avazu
AVAZU_HEADER = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
AVAZU_FIELDS = len(AVAZU_HEADER)
AVAZU_CAT_COLUMNS = AVAZU_HEADER[3:]  # every categorical column: all but id, click, hour
AVAZU_HEX_COLUMNS = frozenset({
    "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model",
})
# Distinct values per column of Avazu train.csv (40,428,967 rows, CTR 0.1698).
AVAZU_CARDINALITIES = {
    "C1": 7, "banner_pos": 7, "site_id": 4737, "site_domain": 7745, "site_category": 26,
    "app_id": 8552, "app_domain": 559, "app_category": 36, "device_id": 2686408,
    "device_ip": 6729486, "device_model": 8251, "device_type": 5, "device_conn_type": 4,
    "C14": 2626, "C15": 8, "C16": 9, "C17": 435, "C18": 4, "C19": 68, "C20": 172, "C21": 60,
}
# Avazu's `hour` spans 2014-10-21 00h .. 2014-10-30 23h: 240 hours.
AVAZU_FIRST_DAY = (2014, 10, 21)
AVAZU_DAYS = 10
# Dense features derived from `hour` (documented in docs/data.md).
AVAZU_NUM_DENSE = 2

# Hashed tables are capped at max(MIN_CAP, CAP_FACTOR x published cardinality):
# a feature with few values gets a small table but enough buckets that its
# values rarely collide.
CAP_FACTOR = 4
MIN_CAP = 1024


@dataclass(frozen=True)
class Layout:
    """Column layout of one raw format."""

    name: str
    sep: int  # separator byte
    num_fields: int
    num_dense: int
    cat_names: tuple[str, ...]  # output column names, in order
    cat_fields: tuple[int, ...]  # the raw field index of each categorical column
    hex_cats: tuple[bool, ...]  # categorical values are hex strings (else decimal integers)
    header: bytes | None  # each file's first line, if the format has one
    # Multi-hot text (`prepare --bag-separator`): the byte between ids inside a categorical field,
    # and the most ids each table's field may hold. None: one value per field.
    bag_sep: int | None = None
    bags: tuple[int, ...] | None = None

    @property
    def num_cat(self) -> int:
        return len(self.cat_names)


def layout(fmt: str) -> Layout:
    """The column layout of format ``fmt`` ('criteo' or 'avazu')."""
    if fmt == "criteo":
        return Layout(
            name="criteo", sep=ord("\t"), num_fields=CRITEO_FIELDS, num_dense=CRITEO_NUM_DENSE,
            cat_names=tuple(f"cat_{i}" for i in range(CRITEO_NUM_CAT)),
            cat_fields=tuple(range(1 + CRITEO_NUM_DENSE, CRITEO_FIELDS)),
            hex_cats=(True,) * CRITEO_NUM_CAT, header=None,
        )
    if fmt == "avazu":
        return Layout(
            name="avazu", sep=ord(","), num_fields=AVAZU_FIELDS, num_dense=AVAZU_NUM_DENSE,
            cat_names=AVAZU_CAT_COLUMNS, cat_fields=tuple(range(3, AVAZU_FIELDS)),
            hex_cats=tuple(c in AVAZU_HEX_COLUMNS for c in AVAZU_CAT_COLUMNS),
            header=",".join(AVAZU_HEADER).encode(),
        )
    raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")


def published_cardinalities(fmt: str) -> tuple[int, ...]:
    """Per categorical column, the largest published distinct-value count."""
    if fmt == "criteo":
        return tuple(max(k, t) for k, t in zip(CRITEO_KAGGLE_CARDINALITIES, CRITEO_TERABYTE_CARDINALITIES))
    return tuple(AVAZU_CARDINALITIES[c] for c in AVAZU_CAT_COLUMNS)


def table_caps(fmt: str) -> tuple[int, ...]:
    """Largest useful hashed table per categorical column (see CAP_FACTOR)."""
    return tuple(max(MIN_CAP, CAP_FACTOR * c) for c in published_cardinalities(fmt))


def value_hash(values: np.ndarray, column: int) -> np.ndarray:
    """Stable 64-bit hash of parsed categorical values (uint64) of column ``column``.

    The column index is mixed in so that equal values of different columns
    land in unrelated buckets.
    """
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(values, dtype=np.uint64) ^ _column_salt(column))


def _column_salt(column: int) -> np.uint64:
    with np.errstate(over="ignore"):
        return np.uint64(splitmix64(np.array([0xBA6919E + column], dtype=np.uint64))[0])


def hashed_ids(values: np.ndarray, missing: np.ndarray, column: int, num_embeddings: int) -> np.ndarray:
    """Row ids under hashing: 0 for a missing value, else 1 + hash mod (num_embeddings - 1)."""
    ids = (value_hash(values, column) % np.uint64(num_embeddings - 1)).astype(np.int64) + 1
    ids[missing] = 0
    return ids
