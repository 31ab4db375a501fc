"""--inject, the tracer's side of the ring (see tracer/inject/__init__.py): every slot is
checked before it becomes a RawRecord; a full ring waits for the heartbeat."""
from __future__ import annotations

import ctypes
import gc
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracer.abi import Abi
from tracer.decoders import Decoder
from tracer.inject import layout as L
from tracer.instrument import Instrument
from tracer.tsc import TscClock

if TYPE_CHECKING:
    from tracer.inject.batch import SlotRun

# inject/batch.py and numpy are imported by the recorder before any stub runs (Recorder's
# constructor), not here: a trace without --inject does without them (80 ms of every start),
# and imported by the first drain they would take a tenth of a second and more in which no
# heartbeat is written


PID_MAX_LIMIT = 4 * 1024 * 1024      # include/linux/threads.h
_PID_MAX_LIMIT = PID_MAX_LIMIT

# A stub facing a full ring waits for room while the tracer's heartbeat is younger than
# this, then counts the call lost. Not 0.1 s: on a loaded machine a runnable tracer can wait
# for a CPU that long (runqueue waits of 0.26-0.46 s measured on the project's 2-CPU VM),
# and a tracer killed or stopped costs its tracee this much once, not per call.
_PATIENCE_S = 0.5
_BEAT_S = 0.002                      # the least time between two heartbeats
_STALL_S = 2.0                       # an uncommitted slot this old, with later ones committed
_SLOT = struct.Struct(L.SLOT_FORMAT)
_ERR_LO = (1 << 64) - 4095           # -4095..-1 as an unsigned word: -MAX_ERRNO..-1
_ERR_LO32 = (1 << 32) - 4095
_BATCH_MIN = 32                      # fewer committed slots than this: slot by slot (-c)


class _RingShort(Exception):
    """The ring file is shorter than the tracer expects (it cannot be, once sealed)."""


def host_fence() -> Callable[[], None] | None:
    """arm64 hosts: a function that runs `dmb ish` (a full barrier for this CPU's loads and
    stores, Arm ARM B2.3.11), from a few bytes mapped executable in the tracer; None on x86,
    whose loads are not reordered with other loads nor stores with older loads."""
    from tracer import arch
    try:
        if arch.native().name != "aarch64":
            return None
    except arch.UnsupportedArch:
        return None
    # written into a memfd before it is mapped executable: the kernel makes a page cache page
    # coherent with the instruction cache when it maps it (arm64 __sync_icache_dcache); code
    # stored through a data mapping could be fetched stale
    fd = os.memfd_create("vdsotrace-fence", os.MFD_CLOEXEC)
    try:
        os.write(fd, bytes.fromhex("bf3b03d5c0035fd6").ljust(mmap.PAGESIZE, b"\0"))  # dmb ish; ret
        buf = mmap.mmap(fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    finally:
        os.close(fd)
    fn = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    _FENCE_KEEP.append(buf)
    return fn


_FENCE_KEEP: list[mmap.mmap] = []


class _FileRing:
    """The ring, read and written through the tracer's descriptor with pread/pwrite and never
    mapped into the tracer: it is memory the tracee controls, and a mapping of a file that
    shrinks under it faults (SIGBUS) in the reader, where a read only comes back short.

    With a `fence` (arm64, whose loads are not ordered with each other): the stubs publish a
    slot by writing its seq with store-release after its other words, so a reader must load
    seq before the rest. A read of whole slots is done twice, `dmb ish` between: the seqs of
    the first read with the other words of the second (a slot whose seq was seen committed is
    then read whole), and the barrier again before TAIL is written (the slots' loads done
    before a stub may reuse them)."""
    __slots__ = ("fd", "fence")

    def __init__(self, fd: int, fence: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.fence = fence

    def __getitem__(self, sl: slice) -> bytes:
        n = sl.stop - sl.start
        data = os.pread(self.fd, n, sl.start)
        if len(data) != n:
            raise _RingShort()
        if self.fence is not None and sl.start >= L.DATA and n >= L.SLOT:
            self.fence()
            again = os.pread(self.fd, n, sl.start)
            if len(again) != n:
                raise _RingShort()
            import numpy as np
            words = np.frombuffer(again, dtype=np.uint64).reshape(-1, L.SLOT // 8).copy()
            words[:, L.S_SEQ // 8] = np.frombuffer(data, dtype=np.uint64)[L.S_SEQ // 8::L.SLOT // 8]
            return words.tobytes()
        return data

    def __setitem__(self, sl: slice, data: bytes) -> None:
        if self.fence is not None:
            self.fence()
        if os.pwrite(self.fd, data, sl.start) != len(data):
            raise _RingShort()

    def close(self) -> None:
        pass                    # the descriptor is the Recorder's


_RingBuf = mmap.mmap | _FileRing


@dataclass(frozen=True, slots=True)
class RawRecord:
    tid: int
    func: str                   # plain name, e.g. "clock_gettime"
    args: tuple[int, ...]       # raw argument words (len = decoder.nargs)
    ret: int                    # raw return register value (unsigned, abi word)
    outs: tuple[bytes | None, ...]   # per decoder OutSpec; None: NULL pointer or not copied
    fallback: bool
    t_entry_ns: int             # CLOCK_MONOTONIC ns
    duration_ns: int
    caller: int                 # return address
    fid: int = 0                # index into the recorder's `funcs` (func is its plain name)


@dataclass(slots=True)
class CallStats:
    """Per-function totals for `-c`, filled by Recorder.drain_stats."""
    calls: int = 0
    fallbacks: int = 0
    errors: int = 0
    total_ns: int = 0

    def add(self, fallback: bool, error: bool, duration_ns: int) -> None:
        self.calls += 1
        self.fallbacks += fallback
        self.errors += error
        self.total_ns += duration_ns


def _record_maker() -> Callable[..., RawRecord]:
    """RawRecord(...) through the slots' descriptors: the frozen dataclass __init__ goes
    through object.__setattr__ per field and costs twice as much, which the drain loop's
    1M records/s budget cannot afford. Same fields, same order, same instance."""
    new = object.__new__
    s_tid, s_func, s_args, s_ret, s_outs, s_fb, s_t, s_dur, s_caller, s_fid = (
        getattr(RawRecord, name).__set__ for name in RawRecord.__slots__)

    def make(tid: int, func: str, args: tuple[int, ...], ret: int,
             outs: tuple[bytes | None, ...], fallback: bool, t_entry_ns: int,
             duration_ns: int, caller: int, fid: int) -> RawRecord:
        r = new(RawRecord)
        s_tid(r, tid)
        s_func(r, func)
        s_args(r, args)
        s_ret(r, ret)
        s_outs(r, outs)
        s_fb(r, fallback)
        s_t(r, t_entry_ns)
        s_dur(r, duration_ns)
        s_caller(r, caller)
        s_fid(r, fid)
        return r
    return make


_make_record = _record_maker()


def _slot_outs(sizes: tuple[int, ...], flags: int, o0: bytes,
               o1: bytes) -> tuple[bytes | None, ...]:
    """A slot's output buffers (16 bytes each), cut to the function's out sizes; None where
    its flags say the call wrote nothing there (bit 1: the first, bit 2: the second)."""
    z = sizes[0]
    outs: tuple[bytes | None, ...] = ((o0 if z == 16 else o0[:z]) if flags & 2 else None,)
    if len(sizes) > 1:
        z = sizes[1]
        outs += ((o1 if z == 16 else o1[:z]) if flags & 4 else None,)
    return outs


def slot_records(buf: bytes, names: list[str], nargs: list[int],
                 outsz: list[tuple[int, ...]], rate: float, tsc0: int,
                 ns0: int) -> list[RawRecord]:
    """Validated slots (batch.valid) -> RawRecords, each as RingReader._scan makes it: the
    live drain's SlotRuns and `report`'s recorded ones become calls through this."""
    out: list[RawRecord] = []
    append = out.append
    make = _make_record
    for (_seq, tid, fid, flags, a0, a1, a2, a3, a4, a5, ret, t0, t1, caller, o0,
         o1) in _SLOT.iter_unpack(buf):
        sizes = outsz[fid]
        outs = _slot_outs(sizes, flags, o0, o1) if sizes else ()
        k = nargs[fid]
        dur = t1 - t0
        append(make(tid, names[fid], (a0, a1) if k == 2 else (a0, a1, a2, a3, a4, a5)[:k],
                    ret, outs, flags & 1 == 1, ns0 + int((t0 - tsc0) * rate),
                    int(dur * rate) if dur > 0 else 0, caller, fid))
    return out


class RingReader(Instrument):
    """The tracer's side of the ring: drain (validating every slot), count, heartbeat, report
    what was lost. The state is the Recorder's (set up in its __init__)."""
    _beat_at: float
    _clock: TscClock | None
    _code_fd: int
    _corrupt: int
    _fid_by_name: dict[str, int]
    _final: bool
    _header_corrupt: int
    _last_refine: float
    _lost_bad: int | None
    _lost_final: int | None
    _lost_seen: int
    _nargs: list[int]
    _outsz: list[tuple[int, ...]]
    _pending: list[RawRecord]
    _ring: _RingBuf | None
    _ring_broken: bool
    _stall_at: tuple[int, float] | None
    _t_install: float
    _tail: int
    abi: Abi
    code_page_kept: bool
    decoders: list[Decoder]
    longest_silence: float
    lossy: bool
    patience_s: float
    ring_kept: bool

    def lost(self) -> int:
        """Calls the stubs could not record (the ring was full), as far as the counter can
        be believed: the tracee can write any value there (see lost_counter_corrupt)."""
        if self._ring is None:
            return self._lost_final if self._lost_final is not None else self._lost_seen
        try:
            raw = int.from_bytes(self._ring[L.LOST:L.LOST + 8], "little")
        except (_RingShort, OSError):
            self._ring_broken = True
            return self._lost_seen
        if self._lost_bad is not None:
            return self._lost_seen
        # The stubs only ever add 1 (lock inc), once per call, and a call takes far more
        # than a nanosecond of a CPU: a value outside [last seen, 1 per ns per CPU since
        # install] was written by something else.
        cap = int((time.monotonic() - self._t_install) * 1e9) * (os.cpu_count() or 1)
        if self._lost_seen <= raw <= cap:
            self._lost_seen = raw
        else:
            self._lost_bad = raw
        return self._lost_seen

    def lost_counter_corrupt(self) -> int | None:
        """The impossible value the lost counter was found at, or None."""
        return self._lost_bad

    def corrupt(self) -> int:
        """Slots that failed validation and were skipped."""
        return self._corrupt

    def header_corrupt(self) -> int:
        """Times the ring's HEAD was found where no stub can have put it (the records in
        flight then were skipped and the tracer followed HEAD)."""
        return self._header_corrupt

    def ring_broken(self) -> bool:
        return self._ring_broken

    def leave_report(self) -> tuple[int, list[str]]:
        """(calls not recorded or corrupt, notices saying what was lost and what stays)."""
        lost, corrupt = self.lost(), self.corrupt()
        notes = []
        if lost:
            notes.append(f"{lost} calls were not recorded: the ring was full"
                         + ("" if self.lossy else
                            f" while the tracer was stopped or could not run (it was silent "
                            f"for up to {self.longest_silence:.2f} s; the tracee waits "
                            f"{self.patience_s} s at most)"))
        bad = self.lost_counter_corrupt()
        if bad is not None:
            notes.append(f"the ring's count of calls not recorded was overwritten (it read "
                         f"{bad}, more than the process can have made): how many calls were "
                         "not recorded is unknown")
        if corrupt:
            notes.append(f"{corrupt} corrupt ring records were skipped")
        if self.header_corrupt():
            notes.append(f"the ring's header was overwritten by the process "
                         f"{self.header_corrupt()} time(s): the calls in flight then were not "
                         "recorded")
        if self.ring_broken():
            notes.append("the ring could not be read any more (its header or file was damaged "
                         "by the process): later calls were not recorded")
        if self.code_page_kept:
            notes.append("the recorder's code page stays mapped: a thread may still return "
                         "through it")
        if self.ring_kept:
            notes.append("the recorder's ring stays mapped: a signal handler interrupted a "
                         "thread while it wrote a record")
        return lost + corrupt, notes

    def producers_stopped(self) -> None:
        """No stub can commit a slot any more (every thread stopped past the ring-writing
        window, or the process gone): an uncommitted slot is corrupt, not late."""
        self._final = True

    def drain(self, limit: int = 65536) -> list[RawRecord]:
        if self._pending:
            done, self._pending = self._pending[:limit], self._pending[limit:]
            return done
        out: list[RawRecord] = []
        self._drain_ring(limit, out, None)
        return out

    def drain_view(self, limit: int = 65536) -> list[RawRecord | SlotRun]:
        """Like drain(), but whole runs of committed, valid slots come as SlotRuns (their
        bytes as the ring holds them, validated at once with numpy), in ring order among the
        RawRecords of what is judged slot by slot: for `record` (which writes the slots
        themselves) and the JSON renderer (which formats them without an event each)."""
        if self._pending:
            done, self._pending = self._pending[:limit], self._pending[limit:]
            return list(done)
        out: list[RawRecord | SlotRun] = []
        self._drain_ring(limit, out, None, view=True)  # type: ignore[arg-type]
        return out

    def slot_records(self, run: SlotRun) -> list[RawRecord]:
        """A SlotRun of this reader's drain as the RawRecords drain() would have given."""
        return slot_records(run.slots.tobytes(), [f.plain for f in self.funcs], self._nargs,
                            self._outsz, run.rate, run.tsc0, run.ns0)

    def drain_stats(self, stats: dict[str, CallStats], limit: int = 1 << 20) -> int:
        """Like drain(), but only adds each record to `stats` (by plain function name) without
        building a RawRecord: the fast path for `-c`, which aggregates whole runs of committed
        slots at once (inject/batch.py). Returns how many records it consumed."""
        n = 0
        if self._pending:
            for r in self._pending:
                st = stats.get(r.func)
                if st is None:
                    st = stats[r.func] = CallStats()
                st.add(r.fallback, self._is_error(self._fid_by_name[r.func], r.ret),
                       r.duration_ns)
            n = len(self._pending)
            self._pending = []
        return n + self._drain_ring(limit, None, stats)

    def _is_error(self, fid: int, ret: int) -> bool:
        return not self.decoders[fid].ret_is_value and -4095 <= self.abi.signed(ret) < 0

    def heartbeat(self) -> None:
        """Tell the stubs the tracer is alive and draining (at most every _BEAT_S): a stub
        facing a full ring waits only while this is less than _PATIENCE_S old. Called from
        every drain, which the engine runs at least every few milliseconds while it is not
        stuck; a tracer killed, stopped, or blocked on its output stops beating."""
        if self.lossy or not self.installed or self._clock is None:
            return
        now = time.monotonic()
        gap = now - self._beat_at
        if gap < _BEAT_S:
            return
        self.longest_silence = max(self.longest_silence, gap)
        self._beat_at = now
        try:
            os.pwrite(self._code_fd, self._clock.read().to_bytes(8, "little"),
                      L.CODE_HEARTBEAT)
        except OSError:
            pass

    def _drain_ring(self, limit: int, out: list[RawRecord] | None,
                    stats: dict[str, CallStats] | None, view: bool = False) -> int:
        ring, clock = self._ring, self._clock
        if ring is None or clock is None or self._ring_broken:
            return 0
        self.heartbeat()
        try:
            return self._drain_ring_at(ring, clock, limit, out, stats, view)
        except (_RingShort, OSError):
            # the sealed file cannot shrink; if reading it fails anyway, stop reading it
            self._ring_broken = True
            return 0

    def _drain_ring_at(self, ring: _RingBuf, clock: TscClock, limit: int,
                       out: list[RawRecord] | None, stats: dict[str, CallStats] | None,
                       view: bool = False) -> int:
        now = time.monotonic()
        if now - self._last_refine > 0.25:
            clock.refine()
            self._last_refine = now
            self.lost()                         # sampled: a counter going back is corrupt
        head = int.from_bytes(ring[L.HEAD:L.HEAD + 8], "little")
        tail = self._tail
        avail = head - tail
        if avail == 0:
            return 0
        if not 0 < avail <= L.NSLOTS:
            # A stub claims only while head - tail < NSLOTS, and never moves HEAD back: the
            # tracee overwrote it. Follow it (what was in flight is skipped, counted once),
            # so that the stubs, which compare HEAD with TAIL, can claim again; a HEAD no
            # stub reaches in 2^63 calls is not followed and the ring is read no more.
            self._header_corrupt += 1
            self._stall_at = None
            if head >> 63:
                self._ring_broken = True
                return 0
            self._tail = head
            ring[L.TAIL:L.TAIL + 8] = head.to_bytes(8, "little")
            return 0
        n = min(avail, limit)
        funcs, nargs, outsz = self.funcs, self._nargs, self._outsz
        nf = len(funcs)
        names = [f.plain for f in funcs]
        value_ret = [d.ret_is_value for d in self.decoders]
        err_lo = _ERR_LO if self.abi.word == 8 else _ERR_LO32
        st_by_fid: list[CallStats] = []
        if stats is not None:
            for name in names:
                st = stats.get(name)
                if st is None:
                    st = stats[name] = CallStats()
                st_by_fid.append(st)
        rate, tsc0, ns0 = clock.rate, clock.tsc0, clock.ns0
        out_append = out.append if out is not None else None
        i = tail
        end = tail + n
        gc_was = gc.isenabled()
        gc.disable()          # a drain allocates only acyclic records: no collections mid-way
        try:
            i = self._scan(ring, i, end, out_append, st_by_fid if stats is not None else None,
                           names, nargs, outsz, value_ret, rate, tsc0, ns0, nf, err_lo, view)
        finally:
            if gc_was:
                gc.enable()
        if i != tail:
            self._stall_at = None
            self._tail = i
            ring[L.TAIL:L.TAIL + 8] = i.to_bytes(8, "little")
        return i - tail

    def _scan(self, ring: _RingBuf, i: int, end: int,
              out_append: Callable[[RawRecord], None] | None,
              st_by_fid: list[CallStats] | None, names: list[str], nargs: list[int],
              outsz: list[tuple[int, ...]], value_ret: list[bool], rate: float, tsc0: int,
              ns0: int, nf: int, err_lo: int, view: bool = False) -> int:
        """Validate and consume committed slots [i, end); returns the next index."""
        from tracer.inject import batch
        from tracer.inject.batch import SlotRun
        stats = st_by_fid
        mask = L.NSLOTS - 1
        word_mask = self.abi.mask       # an i386 ret above 32 bits is damage: its low word counts
        unpack = _SLOT.iter_unpack
        make = _make_record
        max_flags = [min(8, 1 << (1 + len(z))) for z in outsz]
        while i < end:
            s = i & mask
            cnt = min(end - i, L.NSLOTS - s)
            off = L.DATA + s * L.SLOT
            stop = False
            buf = memoryview(ring[off:off + cnt * L.SLOT])
            if view:
                # the committed prefix as a SlotRun (its invalid slots counted and left
                # out); what follows it, from an uncommitted slot on, slot by slot
                k = batch.committed(buf, i + 1)
                if k:
                    good = batch.valid(buf[:k * L.SLOT], max_flags, _PID_MAX_LIMIT)
                    self._corrupt += k - len(good)
                    if len(good):
                        out_append(SlotRun(good, rate, tsc0, ns0))  # type: ignore[misc,arg-type]
                    i += k
                    if k == cnt:
                        continue
                    buf = buf[k * L.SLOT:]
            if stats is not None and cnt >= _BATCH_MIN:
                # the committed prefix at once; the per-slot loop below takes what follows
                # (an uncommitted slot ends the drain there), or the prefix itself when
                # something in it needs judging slot by slot
                k = batch.committed(buf, i + 1)
                if k:
                    totals = batch.aggregate(buf[:k * L.SLOT], max_flags, value_ret, err_lo,
                                             word_mask, rate, _PID_MAX_LIMIT)
                    if totals is not None:
                        for t in totals:
                            st = stats[t.fid]
                            st.calls += t.calls
                            st.fallbacks += t.fallbacks
                            st.errors += t.errors
                            st.total_ns += t.total_ns
                        i += k
                        if k == cnt:
                            continue
                        buf = buf[k * L.SLOT:]
            for (seq, tid, fid, flags, a0, a1, a2, a3, a4, a5, ret, t0, t1, caller, o0,
                 o1) in unpack(buf):
                if seq != i + 1:
                    # seq > i + 1 cannot be written by a stub (it claims below tail + NSLOTS);
                    # an uncommitted slot is waited for, until it has stalled (or no stub
                    # can commit it any more).
                    if seq < i + 1 and not self._final and not self._stalled(i):
                        stop = True
                        break
                    self._corrupt += 1
                    i += 1
                    continue
                i += 1
                if fid >= nf or not 0 < tid < _PID_MAX_LIMIT or flags >> 3:
                    self._corrupt += 1
                    continue
                sizes = outsz[fid]
                if flags >> (1 + len(sizes)):
                    self._corrupt += 1
                    continue
                dur = t1 - t0
                if stats is not None:
                    st = stats[fid]
                    st.calls += 1
                    if flags & 1:
                        st.fallbacks += 1
                    if not value_ret[fid] and ret & word_mask >= err_lo:
                        st.errors += 1
                    if dur > 0:
                        st.total_ns += int(dur * rate)
                    continue
                outs = _slot_outs(sizes, flags, o0, o1) if sizes else ()
                k = nargs[fid]
                out_append(make(tid, names[fid], (a0, a1) if k == 2 else  # type: ignore[misc]
                                (a0, a1, a2, a3, a4, a5)[:k], ret, outs, flags & 1 == 1,
                                ns0 + int((t0 - tsc0) * rate),
                                int(dur * rate) if dur > 0 else 0, caller, fid))
            if stop:
                break
        return i

    def _stalled(self, index: int) -> bool:
        """True once slot `index` has stayed uncommitted for _STALL_S (a corrupt or lost
        claim: a live stub commits within a few instructions of claiming)."""
        now = time.monotonic()
        if self._stall_at is None or self._stall_at[0] != index:
            self._stall_at = (index, now)
            return False
        return now - self._stall_at[1] > _STALL_S
