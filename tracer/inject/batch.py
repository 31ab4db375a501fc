"""--inject, `-c`: whole runs of ring slots aggregated at once with numpy (the one module that
imports it), one array operation per column instead of a Python object per record.

The result is the per-slot path's (ring.RingReader._scan) to the nanosecond: each record's
duration is int(ticks * rate) truncated on its own, as there. What the per-slot path would
judge slot by slot (a corrupt slot, a duration too long to sum exactly in 64 bits) is left to
it: the batch then says so and aggregates nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tracer.inject import layout as L

# One slot (layout.SLOT_FORMAT), as numpy reads it; the out buffers are not needed for -c.
SLOT_DTYPE = np.dtype({
    "names": ["seq", "tid", "fid", "flags", "ret", "t0", "t1"],
    "formats": ["<u8", "<u4", "<u2", "<u2", "<u8", "<u8", "<u8"],
    "offsets": [L.S_SEQ, L.S_TID, L.S_FID, L.S_FLAGS, L.S_RET, L.S_T0, L.S_T1],
    "itemsize": L.SLOT,
})

# Durations up to 2^40 ticks (minutes at any TSC rate) times a rate below 4 ns per tick, over
# at most NSLOTS = 2^16 records, sum below 2^58: exact in int64. Anything longer goes slot by
# slot (Python integers).
_MAX_TICKS = 1 << 40
_MAX_RATE = 4.0


@dataclass(frozen=True, slots=True)
class FuncTotals:
    fid: int
    calls: int
    fallbacks: int
    errors: int
    total_ns: int


def committed(buf: bytes | memoryview, first_seq: int) -> int:
    """How many slots at the start of `buf` are committed: slot j's seq is first_seq + j."""
    seq = np.frombuffer(buf, SLOT_DTYPE)["seq"]
    bad = np.flatnonzero(seq != np.arange(first_seq, first_seq + len(seq), dtype=np.uint64))
    return int(bad[0]) if len(bad) else len(seq)


def aggregate(buf: bytes | memoryview | npt.NDArray[np.void], max_flags: list[int], value_ret: list[bool], err_lo: int,
              word_mask: int, rate: float, pid_limit: int) -> list[FuncTotals] | None:
    """Per-function totals of the committed slots in `buf`, or None when one of them is for
    the per-slot path to judge (a corrupt slot, an implausibly long call). max_flags[fid] is
    1 << (1 + the function's out count): every flag bit a stub can set is below it. A call
    is an error when its ret word (ret & word_mask) is at least err_lo (-4095 as that word)."""
    nf = len(max_flags)
    a = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, SLOT_DTYPE)
    if not len(a):
        return []
    tid, fid, flags = a["tid"], a["fid"], a["flags"]
    if int(fid.max()) >= nf or int(tid.min()) == 0 or int(tid.max()) >= pid_limit:
        return None
    if np.any(flags >= np.asarray(max_flags, dtype=np.uint16)[fid]):
        return None
    t0, t1 = a["t0"], a["t1"]
    pos = t1 > t0
    ticks = np.where(pos, t1 - t0, np.uint64(0))   # t1 - t0 wraps only where masked out
    if int(ticks.max()) >= _MAX_TICKS or not 0 < rate < _MAX_RATE:
        return None
    ns = (ticks.astype(np.float64) * rate).astype(np.int64)   # int(ticks * rate), each
    ret = a["ret"]
    if word_mask != (1 << 64) - 1:
        ret = ret & np.uint64(word_mask)        # the ABI's word: what abi.signed() reads
    err = ret >= np.uint64(err_lo)
    fb = (flags & 1).astype(bool)
    lo, hi = int(fid.min()), int(fid.max())
    if lo == hi:                                     # the common case: one function
        return [FuncTotals(lo, len(a), int(np.count_nonzero(fb)),
                           0 if value_ret[lo] else int(np.count_nonzero(err)),
                           int(ns.sum()))]
    out = []
    for f in np.unique(fid).tolist():
        sel: npt.NDArray[np.bool_] = fid == f
        out.append(FuncTotals(f, int(np.count_nonzero(sel)), int(np.count_nonzero(fb & sel)),
                              0 if value_ret[f] else int(np.count_nonzero(err & sel)),
                              int(ns[sel].sum())))
    return out


# ------------------------------------------------------------------ whole slots (record, JSON)

# One slot with every field (layout.SLOT_FORMAT): what `record` writes and the JSON renderer
# reads. The out buffers stay raw bytes (void): numpy's "S" type would drop trailing NULs.
FULL_DTYPE = np.dtype({
    "names": ["seq", "tid", "fid", "flags", "a0", "a1", "a2", "a3", "a4", "a5", "ret", "t0",
              "t1", "caller", "o0", "o1"],
    "formats": ["<u8", "<u4", "<u2", "<u2", "<u8", "<u8", "<u8", "<u8", "<u8", "<u8", "<u8",
                "<u8", "<u8", "<u8", "V16", "V16"],
    "offsets": [L.S_SEQ, L.S_TID, L.S_FID, L.S_FLAGS, *(L.S_ARGS + 8 * k for k in range(6)),
                L.S_RET, L.S_T0, L.S_T1, L.S_CALLER, L.S_OUT, L.S_OUT + L.OUT_MAX],
    "itemsize": L.SLOT,
})


@dataclass(frozen=True, slots=True)
class SlotRun:
    """Committed, validated ring slots in ring order (a numpy array of FULL_DTYPE), with the
    clock calibration in force when they were drained (TSC tick -> CLOCK_MONOTONIC ns:
    ns0 + int((tsc - tsc0) * rate), as ring.RingReader._scan converts each slot)."""
    slots: npt.NDArray[np.void]
    rate: float
    tsc0: int
    ns0: int

    def __len__(self) -> int:
        return len(self.slots)


def valid(buf: bytes | memoryview, max_flags: list[int], pid_limit: int
          ) -> npt.NDArray[np.void]:
    """The slots of committed `buf` that pass the per-slot path's checks (a known function,
    a plausible tid, only the flag bits the function's stub can set), in order; the others
    are corrupt (len(buf) // SLOT - len(result) of them)."""
    a = np.frombuffer(buf, FULL_DTYPE)
    nf = len(max_flags)
    fid, tid, flags = a["fid"], a["tid"], a["flags"]
    known = fid < nf
    limit = np.asarray(max_flags, dtype=np.uint16)[np.where(known, fid, 0)]
    ok = known & (tid > 0) & (tid < pid_limit) & (flags < limit)
    return a if bool(ok.all()) else a[ok]


def same(col: npt.NDArray[Any]) -> bool:
    """Every value of a column is its first."""
    return len(col) == 0 or bool((col == col[0]).all())


def distinct(col: npt.NDArray[Any]) -> list[int]:
    """The distinct values of an integer column (sorted)."""
    if same(col):
        return [int(col[0])] if len(col) else []
    return [int(x) for x in np.unique(col).tolist()]


def only_tids(run: SlotRun, tids: list[int]) -> SlotRun:
    """The run's slots of these threads only."""
    keep = np.isin(run.slots["tid"], np.asarray(tids, dtype=np.uint32))
    return SlotRun(run.slots[keep], run.rate, run.tsc0, run.ns0)


def raw(run: SlotRun) -> memoryview:
    """The run's slots as the ring held them (SLOT bytes each), without a copy."""
    a = run.slots if run.slots.flags.c_contiguous else np.ascontiguousarray(run.slots)
    return a.view(np.uint8).data
