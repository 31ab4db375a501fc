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


# ------------------------------------------------------------------ columns (JSON lines)

def key_bounds(slots: npt.NDArray[np.void], nargs: int,
               also: npt.NDArray[np.int64] | None = None) -> list[int]:
    """[0, b1, ..., len(slots)]: the slots between two bounds agree on thread, function,
    first `nargs` arguments, return value, flags and caller (all a call's line takes from
    its slot besides its times and out values), and on `also` (one value per slot)."""
    n = len(slots)
    if n < 2:
        return [0, n] if n else [0]
    diff = np.zeros(n - 1, dtype=bool)
    cols = [slots[name] for name in ("tid", "fid", "flags", "ret", "caller",
                                     *(f"a{k}" for k in range(nargs)))]
    for c in [*cols, *([] if also is None else [also])]:
        diff |= c[1:] != c[:-1]
    return [0, *(np.flatnonzero(diff) + 1).tolist(), n]


def _entry_seconds(run: SlotRun, mono_to_epoch: float) -> npt.NDArray[np.float64] | None:
    """Each slot's entry time in seconds since the epoch, as the events' way computes it:
    (ns0 + int((t0 - tsc0) * rate)) / 1e9 + mono_to_epoch, with the same float operations
    (exact while t0 - tsc0 and the products stay below 2^53; else None)."""
    t0 = run.slots["t0"]
    tsc0 = run.tsc0
    if not 0 <= tsc0 < 1 << 63 or int(t0.min()) < tsc0 or int(t0.max()) - tsc0 >= 1 << 53:
        return None
    if not 0 < run.rate < _MAX_RATE or not -(1 << 53) < run.ns0 < 1 << 53:
        return None
    ns = ((t0 - np.uint64(tsc0)).astype(np.float64) * run.rate).astype(np.int64)
    ns += np.int64(run.ns0)
    if int(ns.max()) >= 1 << 53 or int(ns.min()) <= -(1 << 53):
        return None
    out: npt.NDArray[np.float64] = ns.astype(np.float64) / 1e9 + mono_to_epoch
    return out


def entry_times(run: SlotRun, mono_to_epoch: float) -> list[float] | None:
    """Each slot's entry time (seconds since the epoch) as the events' way has it."""
    if not len(run.slots):
        return []
    x = _entry_seconds(run, mono_to_epoch)
    return None if x is None else x.tolist()


_POW10 = [10 ** k for k in range(8)]


def time_digits(run: SlotRun, mono_to_epoch: float
                ) -> tuple[npt.NDArray[np.int64], list[int]] | None:
    """Each slot's entry time as repr() of entry_times' float writes it, in two integers:
    the text is f"{i}.{str(p)[1:]}" (p is 10^k plus the k fractional digits: the digits
    with their leading zeros; i comes as an array). None where that is not certain, then
    repr() it is.

    repr() of a float is the shortest decimal that reads back as the same float (the
    nearest such, of that length). For times of 2004-2242 (2^30 <= x < 2^33 seconds) a float
    is I + F / 2^fb, fb = 53 - its exponent (20 to 22 bits of fraction), and the decimal
    with k fractional digits nearest to it is I + q / 10^k, q = round(F * 10^k / 2^fb): it
    reads back as x when it is within half a unit in the last place (on the half: when x's
    last mantissa bit is 0, reading rounds half to even). The smallest such k (at most 7:
    10^-7 is finer than the unit) is repr()'s length; halfway between two such decimals, the
    one with an even last digit (dtoa's rounding). Left to repr(): an exact power of two (its
    lower neighbour is nearer), anything outside the range. tests/test_slot_lines.py holds it
    to repr() on millions of times."""
    n = len(run.slots)
    if not n:
        return np.zeros(0, dtype=np.int64), []
    x = _entry_seconds(run, mono_to_epoch)
    if x is None or not bool(((x > 2.0 ** 30) & (x < 2.0 ** 33)).all()):
        return None
    _m, e = np.frexp(x)                         # x = m * 2^e, 0.5 <= m < 1
    if not same(e):
        return None                            # (a run across 2^31 or 2^32 s: repr's way)
    fb = 53 - int(e[0])
    big = np.ldexp(x, fb).astype(np.int64)      # x * 2^fb: m * 2^53, exact
    if bool((big == 1 << 52).any()):
        return None                            # a power of two
    mask = (1 << fb) - 1
    f = big & mask
    i = big >> fb
    # k = 7 always reads back (10^-7 is finer than the unit, 2^-fb). Whether fewer digits
    # do: the nearest k-digit decimal is dist / (10^k 2^fb) away, dist the distance of
    # f * 10^k to a multiple of 2^fb; a k that does not read back for any slot rules out
    # every smaller k too (a k-digit decimal is also a (k+1)-digit one).
    chosen = np.full(n, 7, dtype=np.int64)
    even: npt.NDArray[np.bool_] | None = None
    for k in range(6, -1, -1):
        p10 = _POW10[k]
        r = (f * p10) & mask
        twice = np.minimum(r, (1 << fb) - r) << 1
        ok = twice < p10
        on_half = twice == p10
        if bool(on_half.any()):
            if even is None:
                even = (big & 1) == 0
            ok |= on_half & even
        if not bool(ok.any()):
            break
        chosen[ok] = k
    s = f * np.asarray(_POW10, dtype=np.int64)[chosen]
    q = (s + (1 << (fb - 1))) >> fb
    # halfway between two k-digit decimals (both read back as x): dtoa's last digit rounds
    # half to even
    tie = (s & mask) == 1 << (fb - 1)
    if bool(tie.any()):
        q = np.where(tie, q & ~np.int64(1), q)
    k0 = chosen == 0
    if bool(k0.any()):
        i = np.where(k0, i + q, i)             # x.0 may round up to the next second
        q = np.where(k0, 0, q)
    p = np.asarray(_POW10, dtype=np.int64)[chosen] + q
    p = np.where(k0, 10, p)
    return i, p.tolist()


def durations(run: SlotRun) -> list[int] | None:
    """Each slot's duration in ns: int((t1 - t0) * rate), 0 where t1 <= t0 (None where a
    duration is too long to compute so in float64 exactly as Python does)."""
    t0, t1 = run.slots["t0"], run.slots["t1"]
    if not len(t0):
        return []
    pos = t1 > t0
    ticks = np.where(pos, t1 - t0, np.uint64(0))
    if int(ticks.max()) >= _MAX_TICKS or not 0 < run.rate < _MAX_RATE:
        return None
    return (ticks.astype(np.float64) * run.rate).astype(np.int64).tolist()  # type: ignore[no-any-return]


_OUT_DTYPES: dict[tuple[int, str], np.dtype[Any]] = {}


def out_fields(slots: npt.NDArray[np.void], k: int, fmt: str) -> list[list[int]]:
    """The integer fields (struct format `fmt`: q, i or I each) of what slot out buffer k
    holds, one list per field."""
    dt = _OUT_DTYPES.get((k, fmt))
    if dt is None:
        kinds = {"q": "<i8", "i": "<i4", "I": "<u4"}
        offs, at = [], L.S_OUT + k * L.OUT_MAX
        for ch in fmt:
            offs.append(at)
            at += int(kinds[ch][-1])
        dt = _OUT_DTYPES[(k, fmt)] = np.dtype({
            "names": [f"f{j}" for j in range(len(fmt))], "formats": [kinds[c] for c in fmt],
            "offsets": offs, "itemsize": L.SLOT})
    v = slots.view(dt)
    return [v[f"f{j}"].tolist() for j in range(len(fmt))]


def pieces(run: SlotRun, size: int) -> list[SlotRun]:
    """The run in consecutive pieces of at most `size` slots (views, not copies)."""
    if len(run.slots) <= size:
        return [run]
    return [SlotRun(run.slots[at:at + size], run.rate, run.tsc0, run.ns0)
            for at in range(0, len(run.slots), size)]


def key_groups(slots: npt.NDArray[np.void], nargs: int, also: npt.NDArray[np.int64] | None,
               most: int) -> list[npt.NDArray[np.intp]] | None:
    """The slots grouped by what key_bounds compares (each group's indices in ring order,
    groups in the order of their keys); None when there are more than `most` groups."""
    names = ["tid", "fid", "flags", "ret", "caller", *(f"a{k}" for k in range(nargs))]
    cols = [slots[nm] for nm in names] + ([] if also is None else [also])
    keys = np.empty(len(slots), dtype=[(f"c{j}", "<u8") for j in range(len(cols))])
    for j, c in enumerate(cols):
        keys[f"c{j}"] = c.astype(np.uint64)
    _uniq, inv = np.unique(keys, return_inverse=True)
    inv = inv.reshape(-1)
    ngroups = int(inv.max()) + 1 if len(inv) else 0
    if ngroups > most:
        return None
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=ngroups)
    return list(np.split(order, np.cumsum(counts)[:-1]))
